"""How a rank's CPU cores are split between its compute (torch's intra-op threads) and its data-loader
workers, chosen from the machine: the cores this process may run on (`os.sched_getaffinity`: a
SLURM allocation or a `taskset` shows here) shared by the ranks of this node (`LOCAL_WORLD_SIZE`).

Each rank takes its own equal, contiguous slice of those cores and keeps its threads there, so two
ranks never take turns on one core: a rank that loses its core for a moment is the one every other
rank then waits for in the gradient all-reduce. Its loader workers run on the slice's last cores,
off the compute's where the slice has room (a quarter of it, on a CPU-trained run of 4+ cores per
rank; all but one core when a GPU computes), and share the slice where it has none (2-3 cores). A
CPU rank with one core decodes in its own process: a worker there could only take turns with the
compute on that core, and its hand-over of each batch costs more than it saves (measured with
benchmarks/overhead.py: README "Measured").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

AUTO = "auto"


@dataclass(frozen=True)
class CoreSplit:
    cores: tuple[int, ...]
    """This rank's slice of the node's cores."""
    threads: int
    """torch intra-op threads of the training process."""
    workers: int
    """Loader worker processes of this rank."""
    compute_cores: tuple[int, ...]
    """Where the training process runs."""
    worker_cores: tuple[int, ...]
    """Where its loader workers run (the same cores as the compute when the slice has no room)."""
    pinned: bool
    """The slice is this rank's alone (False: fewer cores than ranks on this node, nothing pinned)."""

    def describe(self) -> str:
        """For the "training on" line: e.g. `cores 0-7: 6 threads, 2 loader workers on cores 6-7`."""
        where = f"cores {_span(self.cores)}" if self.pinned else f"{len(self.cores)} shared core(s)"
        if self.workers == 0:
            return f"{where}: {self.threads} thread(s), decoding in the training process"
        shared = self.pinned and set(self.worker_cores) & set(self.compute_cores)
        on = "sharing them" if shared or not self.pinned else f"on cores {_span(self.worker_cores)}"
        return f"{where}: {self.threads} thread(s), {self.workers} loader worker(s) {on}"


def _span(cores: tuple[int, ...]) -> str:
    if len(cores) > 1 and list(cores) == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def plan(available: list[int], local_rank: int, local_world: int, device_type: str,
         threads: int | str = AUTO, workers: int | str = AUTO) -> CoreSplit:
    """The split for rank `local_rank` of `local_world` on this node, over the `available` cores.
    `threads` / `workers`: a number (kept as given) or `auto`."""
    available = sorted(available)
    pinned = len(available) >= local_world
    if pinned:
        per_rank = len(available) // local_world
        cores = tuple(available[local_rank * per_rank:(local_rank + 1) * per_rank])
    else:  # more ranks than cores: every rank shares all of them
        cores = tuple(available)
    k = len(cores) if pinned else max(1, len(cores) // local_world)  # this rank's share
    cuda = device_type == "cuda"
    if workers == AUTO:  # one core per rank computing on the CPU: decoding in the process beats a worker on that core
        workers = max(1, k - 1) if cuda else 0 if k == 1 else 1 if k < 4 else k // 4
    # workers on cores of their own: a GPU rank's all but one; a CPU rank's last ones when it has 4+ and room
    separate = pinned and workers > 0 and (k >= 2 if cuda else 4 <= k and workers < k)
    compute = (1 if cuda else k - workers) if separate else k
    if threads == AUTO:
        threads = 1 if cuda else compute
    compute_cores, worker_cores = (cores[:compute], cores[compute:]) if separate else (cores, cores)
    return CoreSplit(cores, int(threads), int(workers), compute_cores, worker_cores, pinned)


def plan_here(device_type: str, threads: int | str = AUTO, workers: int | str = AUTO) -> CoreSplit:
    """`plan` for this process: its affinity, and its place on the node from the launcher's environment."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return plan(sorted(os.sched_getaffinity(0)), local_rank, local_world, device_type, threads, workers)


_worker_cores: tuple[int, ...] = ()  # set by `apply`; the loaders hand it to their workers
_current: CoreSplit | None = None


def apply(split: CoreSplit) -> None:
    """Run this process on the split's compute cores (every thread it has, and those it starts from
    now on), with its thread count; remember the workers' cores for the loaders (`worker_cores`)."""
    global _worker_cores, _current
    _current = split
    if split.pinned:
        for task in os.listdir("/proc/self/task"):  # sched_setaffinity moves one thread: move them all
            try:
                os.sched_setaffinity(int(task), split.compute_cores)
            except OSError:  # a thread that ended meanwhile
                pass
        _worker_cores = split.worker_cores
    torch.set_num_threads(split.threads)


def current() -> CoreSplit | None:
    """The split `apply` made in this process (None before)."""
    return _current


def worker_cores() -> tuple[int, ...]:
    """The cores this process's loader workers should run on (empty: wherever they start)."""
    return _worker_cores


def pin_worker(cores: tuple[int, ...]) -> None:
    """In a loader worker: move to `cores` (from `worker_cores` in the training process)."""
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except OSError:  # cores taken away since (a shrunk cgroup): stay where the server put us
            pass
