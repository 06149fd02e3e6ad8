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

import contextlib
import multiprocessing
import os
import signal
import threading
from multiprocessing import forkserver
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext

import torch

from disttrain.dist.cores import pin_worker
from disttrain.dist.logs import setup_logging

PRELOAD = ["torch", "numpy", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "simplejpeg",
           "disttrain.data.decode", "disttrain.data.loader", "disttrain.data.shards", "disttrain.tracking",
           "disttrain.train.checkpoint", "disttrain.train.lr_sweep", "disttrain.models.build"]
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
    forkserver.ensure_running()
    return ctx


def start_worker_server(workers: int) -> None:
    """Start the fork server now when loaders will have workers: its imports then overlap the
    caller's own setup (accelerator, data scan, model) instead of delaying the first batch."""
    if workers > 0:
        worker_context()


class StartTimedOut(Exception):
    """Starting a loader's workers took longer than its timeout (`start_deadline`)."""


@contextlib.contextmanager
def start_deadline(seconds: float):
    """Start a loader's workers within `seconds` (0: no bound), or raise StartTimedOut.

    Each worker starts with two waits that have no timeout in multiprocessing: for the fork server
    to answer with the new process (it answers only once its own imports are done: a server whose
    imports hang never does), and for the new worker to read its pickled dataset (a large one fills
    the pipe; a worker whose import of the main script hangs never reads it). Either would hold the
    training process for good, and the other ranks in their next collective. SIGALRM interrupts the
    wait; only the main thread receives signals, so elsewhere (and where a timer is already armed,
    not ours to replace) the start is not bounded."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def expire(*_) -> None:
        raise StartTimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def worker_init(_: int, cores: tuple[int, ...] = ()) -> None:
    """In each worker: it ends with its training process (`_end_with_rank`); it moves to `cores`
    (the loader workers' share of the rank's cores: disttrain/dist/cores.py); decoding is its work, so
    torch ops there must not fight the training process for cores; its warnings (a corrupt shard
    sample) carry the rank, as the training process's do; and it lets go of the fork server's
    "alive" pipe (see `_release_fork_server`)."""
    _end_with_rank()
    pin_worker(cores)
    torch.set_num_threads(1)
    setup_logging(int(os.environ.get("RANK", "0")), is_main=False)
    _release_fork_server()


def _end_with_rank() -> None:
    """The worker exits the moment its training process is gone, whatever it is doing then.

    torch's own check (the worker's parent changed) runs only between two items, every 5 s, and a
    worker's parent is the fork server, not the training process: a worker blocked inside the
    dataset (a shards worker waiting for a free slot, a read from a hung filesystem) would outlive a
    killed rank for good, and with it the resource tracker that removes the run's semaphores from
    /dev/shm. multiprocessing gives each child a pipe whose write end only the training process
    holds (`parent_process().sentinel`): it reads end-of-file once that process is gone (SIGKILL
    included) or has let go of the worker. A daemon thread waits for that and ends the worker at once."""
    sentinel = multiprocessing.parent_process().sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="disttrain-rank-watch", daemon=True).start()


def _release_fork_server() -> None:
    """A fork server lives until every holder of its "alive" pipe's write end is gone, and hands that
    end to each child it forks (for children that start processes of their own). A worker holding
    it keeps the server alive, and the worker itself waits for its parent, the server, to go: if
    the training process is SIGKILLed, neither would ever exit. A worker starts no processes, so it
    closes its copy; then the training process's death ends the server, and the worker ends
    with the training process itself (`_end_with_rank`)."""
    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None
