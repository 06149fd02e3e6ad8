"""How data-loader worker processes start: from a fork server, never forked from a training process.

A training process has other threads by the time its loaders start workers: gloo's, the queue
feeders of loaders already running, tqdm's monitor, W&B's. `fork()` copies every lock as it is at
that instant, held ones included, into a child where the thread that would release it does not
exist: a worker that then needs such a lock waits forever, and its rank with it. Python 3.12 warns
about exactly this ("This process is multi-threaded, use of fork() may lead to deadlocks in the
child"). A fork server is a fresh single-threaded process that imports the decoding modules once
and forks each worker from itself; the loader's dataset reaches the worker pickled (shared-memory
tensors and semaphores travel as file descriptors).

A script that starts loader workers must keep its top level import-safe (`if __name__ ==
"__main__":`), as Python's multiprocessing asks, and light: each worker imports it once more (as
`__mp_main__`).
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext

import torch

PRELOAD = ["torch", "numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "simplejpeg",
           "disttrain.data.decode", "disttrain.data.loader", "disttrain.data.shards", "disttrain.tracking",
           "disttrain.checkpoint", "disttrain.lr_sweep", "disttrain.models"]
"""Imported once by the fork server, so a worker starts without importing them again. Each worker
also imports the main script or module once more (as `__mp_main__`): `launch/train.py` imports
nothing at its top level; the `disttrain` command and `python -m disttrain.cli` import disttrain.cli,
whose own imports are these (disttrain.cli itself is not preloaded: `-m` runs it afresh, and runpy
warns when it finds it imported already). Not `__main__` either: the server must not run a script's
top level."""


def worker_context() -> BaseContext:
    """The multiprocessing context of every loader's workers (and of what they share: shard slot
    pools, epoch counters). Starts the fork server, once per process, so its imports overlap the
    caller's work."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


def start_worker_server(workers: int) -> None:
    """Start the fork server now when loaders will have workers: its imports then overlap the
    caller's own setup (accelerator, data scan, model) instead of delaying the first batch."""
    if workers > 0:
        worker_context()


def worker_init(_: int, cores: tuple[int, ...] = ()) -> None:
    """In each worker: it moves to `cores` (the loader workers' share of the rank's cores:
    disttrain/cores.py); decoding is its work, so torch ops there must not fight the training process
    for cores; its warnings (a corrupt shard sample) carry the rank, as the training process's do;
    and it lets go of the fork server's "alive" pipe (see `_release_fork_server`)."""
    from disttrain.cores import pin_worker
    from disttrain.tracking import setup_logging

    pin_worker(cores)
    torch.set_num_threads(1)
    setup_logging(int(os.environ.get("RANK", "0")), is_main=False)
    _release_fork_server()


def _release_fork_server() -> None:
    """A fork server lives until every holder of its "alive" pipe's write end is gone, and hands that
    end to each child it forks (for children that start processes of their own). A worker holding
    it keeps the server alive, and the worker itself waits for its parent, the server, to go: if
    the training process is SIGKILLed, neither would ever exit. A worker starts no processes, so it
    closes its copy; then the training process's death ends the server, and the worker follows
    within torch's watchdog interval (5 s: its parent is gone)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None
