"""How a rank's CPU cores are split between its compute (torch's intra-op threads) and its data-loader
workers, and whether its threads are pinned there, chosen from the machine's facts (`Machine`): the
cores this process may run on (`os.sched_getaffinity`: a SLURM allocation, a cgroup cpuset or
`taskset` narrows it), the machine's online cores, and the CPUs SLURM allocated on this node; shared
by the ranks of this node (`LOCAL_WORLD_SIZE`).

Sizes. Each rank counts an equal share of the job's cores (k = cores // local ranks) and sizes its
threads and workers from that share, pinned or not: loader workers on a quarter of it on a
CPU-trained run of 4+ cores per rank, one where it has 2-3 (sharing them), none where it has one (a
worker there could only take turns with the compute on that core, and its hand-over of each batch
costs more than it saves: measured with benchmarks/overhead.py, docs/figures.md); a GPU rank
decodes on all but the cores its training process keeps (below).

Pinning (`train.pin_cores`). A pinned rank keeps every thread on its own contiguous slice, so two
ranks never take turns on one core (the rank that loses its core for a moment is the one every
other rank then waits for in the all-reduce). That is only right where the job owns those cores:
pinned by itself, a process on a machine it shares puts its threads on the same first cores as
every other job that does the same (two single-GPU jobs, a `disttrain predict` beside a run, two
4-GPU jobs on an 8-GPU box). So `auto` pins only where a scheduler gave the job its cores: its
affinity is narrower than the machine (SLURM's task binding or cgroup, a container's cpuset,
`taskset`), or SLURM allocated it every core of the node; `on` pins wherever the ranks have a core
each (the user says the job owns the node); `off` never pins. Not pinned, nothing moves: the
threads and workers go where the kernel puts them, in the numbers of the share.

A GPU rank's training process keeps two cores of a slice of 4+ (the whole slice of 2-3), not one:
besides the Python loop that launches the kernels it runs the pin-memory copy of every batch,
NCCL's/gloo's progress threads and the folder scan, and one core for all of them makes each wait
for the others. It keeps one intra-op thread (its tensor work is on the GPU); the second core is the
helpers'. Its loader workers, the CPU work of a GPU job, take the rest of the slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
GPU_MAIN_CORES = 2
"""Cores a GPU rank's training process keeps in a pinned slice of 4+ (see the module docstring)."""


@dataclass(frozen=True)
class Machine:
    """The facts the split is chosen from (`machine_here` reads them; tests give their own)."""

    available: tuple[int, ...]
    """The cores this process may run on (its affinity)."""
    online: int
    """The machine's online cores."""
    slurm_cpus: int | None = None
    """CPUs SLURM allocated to the job on this node (`SLURM_CPUS_ON_NODE`); None outside SLURM."""


@dataclass(frozen=True)
class CoreSplit:
    cores: tuple[int, ...]
    """This rank's slice of the node's cores (not pinned: every core the process may run on)."""
    share: int
    """Cores this rank counts as its own: what `threads` and `workers` are sized from."""
    threads: int
    """torch intra-op threads of the training process."""
    workers: int
    """Loader worker processes of this rank."""
    compute_cores: tuple[int, ...]
    """Where the training process runs."""
    worker_cores: tuple[int, ...]
    """Where its loader workers run (the same cores as the compute when the slice has no room)."""
    pinned: bool
    """The threads are kept on `compute_cores` and the workers on `worker_cores`."""
    why: str
    """Why pinned or not, for the "training on" line."""

    def loader_cores(self) -> tuple[int, ...]:
        """Where this rank's loader workers are moved: `worker_cores` when pinned; empty (they stay
        where they start) when not."""
        return self.worker_cores if self.pinned else ()

    def describe(self) -> str:
        """For the "training on" line: e.g. `cores 0-7 (pinned: ...): 6 thread(s), 2 loader worker(s)
        on cores 6-7`, or `a share of 8 cores (not pinned: ...): 6 thread(s), 2 loader worker(s)`."""
        where = f"cores {_span(self.cores)}" if self.pinned else f"a share of {self.share} core(s)"
        where += f" ({self.why})"
        if self.workers == 0:
            return f"{where}: {self.threads} thread(s), decoding in the training process"
        if not self.pinned:
            return f"{where}: {self.threads} thread(s), {self.workers} loader worker(s)"
        shared = set(self.worker_cores) & set(self.compute_cores)
        on = "sharing them" if shared else f"on cores {_span(self.worker_cores)}"
        return f"{where}: {self.threads} thread(s), {self.workers} loader worker(s) {on}"


def _span(cores: tuple[int, ...]) -> str:
    if len(cores) > 1 and list(cores) == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def ownership(machine: Machine, local_world: int, pin: str = AUTO) -> tuple[bool, str]:
    """Whether the ranks of this node pin their threads (`train.pin_cores`: auto, on, off), and why."""
    n, online = len(machine.available), machine.online
    if pin == "off":
        return False, "not pinned: train.pin_cores=off"
    if n < local_world:
        return False, f"not pinned: {local_world} ranks share {n} core(s)"
    if pin == "on":
        return True, "pinned: train.pin_cores=on"
    if n < online:
        return True, f"pinned: the job's allocation, {n} of the machine's {online} cores (its CPU affinity)"
    if machine.slurm_cpus is not None and machine.slurm_cpus >= online:
        return True, f"pinned: SLURM allocated all {online} cores of this node to the job"
    if machine.slurm_cpus is not None:
        return False, (f"not pinned: SLURM allocated {machine.slurm_cpus} of this node's {online} cores without binding "
                       "the job to them; set train.pin_cores=on if the job owns the node")
    return False, (f"not pinned: this process may run on all {online} cores of the machine (no allocation); "
                   "set train.pin_cores=on if the job owns the node")


def plan(machine: Machine, local_rank: int, local_world: int, device_type: str,
         threads: int | str = AUTO, workers: int | str = AUTO, pin: str = AUTO) -> CoreSplit:
    """The split for rank `local_rank` of `local_world` on this node of `machine`. `threads` /
    `workers`: a number (kept as given) or `auto`; `pin`: `train.pin_cores`."""
    available = tuple(sorted(machine.available))
    pinned, why = ownership(machine, local_world, pin)
    counted = len(available)
    if not pinned and machine.slurm_cpus is not None and len(available) >= machine.online:
        counted = min(counted, machine.slurm_cpus)  # the allocation's size, where SLURM did not bind the job to it
    k = max(1, counted // local_world)  # this rank's share
    cuda = device_type == "cuda"
    main = k if k < 4 else GPU_MAIN_CORES  # a GPU rank's training process: the whole of a small slice
    if workers == AUTO:
        if cuda:
            workers = max(1, k - main) if k >= 4 else max(1, k - 1)
        else:  # one core per rank computing on the CPU: decoding in the process beats a worker on that core
            workers = 0 if k == 1 else 1 if k < 4 else k // 4
    workers = int(workers)
    # room for workers on cores of their own: a GPU rank's beyond its main ones, a CPU rank's last ones (4+ cores)
    room = 0 < workers <= k - main if cuda else 4 <= k and 0 < workers < k
    compute = (main if cuda else k - workers) if room else k
    if threads == AUTO:
        threads = 1 if cuda else compute
    if not pinned:
        return CoreSplit(available, k, int(threads), workers, available, available, False, why)
    cores = available[local_rank * k:(local_rank + 1) * k]
    compute_cores, worker_cores = (cores[:compute], cores[compute:]) if room else (cores, cores)
    return CoreSplit(cores, k, int(threads), workers, compute_cores, worker_cores, True, why)


def online_cores() -> int:
    """The machine's online cores (/sys/devices/system/cpu/online, e.g. `0-15`; else os.cpu_count)."""
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def slurm_cpus_on_node(environ: dict | None = None) -> int | None:
    """CPUs SLURM allocated to the job on this node: SLURM_CPUS_ON_NODE, else SLURM_JOB_CPUS_PER_NODE
    where it is one figure for every node (`16` or `16(x2)`); None outside SLURM."""
    env = os.environ if environ is None else environ
    value = env.get("SLURM_CPUS_ON_NODE", "")
    if value.isdigit():
        return int(value)
    value = env.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0]
    same_everywhere = "," not in env.get("SLURM_JOB_CPUS_PER_NODE", "")
    return int(value) if value.isdigit() and same_everywhere else None


_STARTED_ON: tuple[int, ...] = tuple(sorted(os.sched_getaffinity(0)))
"""The cores this process could run on when it imported this module, before any `apply` narrowed
them: a fact of the process, read once and never changed (a second plan in one process starts from
it, not from the slice the first one pinned)."""


def machine_here() -> Machine:
    """This process's facts (its affinity as it started, before any `apply` of this process)."""
    available = _STARTED_ON
    return Machine(available, max(online_cores(), len(available)), slurm_cpus_on_node())


def plan_here(device_type: str, threads: int | str = AUTO, workers: int | str = AUTO, pin: str = AUTO) -> CoreSplit:
    """`plan` for this process: its machine, and its place on the node from the launcher's environment."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return plan(machine_here(), local_rank, local_world, device_type, threads, workers, pin)


def apply(split: CoreSplit) -> None:
    """Put `split` into effect in this process: pinned, every thread it has (and those it starts from
    now on) runs on the compute cores; any split, torch uses its thread count. The split itself is
    the caller's value to hand on (the loaders take `loader_cores()`, the "training on" line
    `describe()`): nothing is remembered here."""
    if split.pinned:
        for task in os.listdir("/proc/self/task"):  # sched_setaffinity moves one thread: move them all
            try:
                os.sched_setaffinity(int(task), split.compute_cores)
            except OSError:  # a thread that ended meanwhile
                pass
    torch.set_num_threads(split.threads)


def pin_worker(cores: tuple[int, ...]) -> None:
    """In a loader worker: move to `cores` (the split's `loader_cores()`, handed to the loader)."""
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except OSError:  # cores taken away since (a shrunk cgroup): stay where the server put us
            pass
