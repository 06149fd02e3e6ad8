"""How a rank's cores are split between its threads and its loader workers, and whether they are
pinned (disttrain/dist/cores.py), on injected machines: 1/2/4/8 ranks over 8/16/64 cores, with and
without an allocation."""

from __future__ import annotations

import os

import pytest
import torch

from disttrain.dist import cores
from disttrain.dist.cores import Machine
from disttrain.config import ConfigError
from disttrain.models.checks import load_config

RANKS, MACHINES = [1, 2, 4, 8], [8, 16, 64]


def _node(machine: Machine, world: int, device: str, **kw) -> list[cores.CoreSplit]:
    return [cores.plan(machine, rank, world, device, **kw) for rank in range(world)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("online", MACHINES)
@pytest.mark.parametrize("world", RANKS)
def test_a_machine_without_an_allocation_pins_nothing_but_sizes_each_rank_from_its_share(world, online, device):
    splits = _node(Machine(tuple(range(online)), online), world, device)
    share = online // world
    for split in splits:
        assert not split.pinned and split.share == share
        assert split.compute_cores == split.worker_cores == tuple(range(online)), "nothing moves"
        assert split.why == (f"not pinned: this process may run on all {online} cores of the machine (no allocation); "
                             "set train.pin_cores=on if the job owns the node")
        if device == "cpu":  # the share is the rank's threads plus its workers, no more
            assert split.threads + split.workers == share or (split.workers == 1 and split.threads == share < 4)
        else:
            assert split.threads == 1 and split.workers == (share - 2 if share >= 4 else max(1, share - 1))
    assert cores.plan(Machine(tuple(range(16)), 16), 1, 2, "cpu").describe() == (
        "a share of 8 core(s) (not pinned: this process may run on all 16 cores of the machine (no allocation); "
        "set train.pin_cores=on if the job owns the node): 6 thread(s), 2 loader worker(s)")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("online", MACHINES)
@pytest.mark.parametrize("world", RANKS)
def test_an_allocation_is_pinned_one_slice_per_rank_within_it(world, online, device):
    mine = tuple(range(online // 2, online))  # the job's half of the machine (SLURM, a cgroup cpuset, taskset)
    splits = _node(Machine(mine, online), world, device)
    share = len(mine) // world
    if share == 0:  # 8 ranks in 4 cores: no slice each
        assert all(not s.pinned and s.why == f"not pinned: {world} ranks share {len(mine)} core(s)" for s in splits)
        return
    taken: set[int] = set()
    for split in splits:
        assert split.pinned and split.why == f"pinned: the job's allocation, {len(mine)} of the machine's {online} cores (its CPU affinity)"
        assert len(split.cores) == split.share == share and set(split.cores) <= set(mine)
        assert not taken & set(split.cores), "no core of two ranks"
        taken |= set(split.cores)
        assert set(split.compute_cores) | set(split.worker_cores) == set(split.cores)


@pytest.mark.parametrize("online", MACHINES)
@pytest.mark.parametrize("world", RANKS)
def test_a_pinned_gpu_rank_leaves_its_helper_threads_room(world, online):
    """The training process of a GPU rank keeps two cores (the whole slice when it has 2-3): its
    pin-memory thread, NCCL/gloo threads and the folder scan have a core beside the Python loop;
    the loader workers take the rest, on cores of their own where the slice has 4+."""
    for split in _node(Machine(tuple(range(online)), online, slurm_cpus=online), world, "cuda"):
        k = split.share
        assert split.pinned and split.threads == 1
        assert len(split.compute_cores) == min(k, 2) if k >= 4 else split.compute_cores == split.cores
        assert len(split.compute_cores) >= 2 or k == 1
        if k >= 4:
            assert not set(split.compute_cores) & set(split.worker_cores) and split.workers == len(split.worker_cores) == k - 2
    split = cores.plan(Machine(tuple(range(16)), 16), 0, 1, "cuda", pin="on")
    assert (split.threads, split.workers, split.compute_cores) == (1, 14, (0, 1))
    assert split.describe() == "cores 0-15 (pinned: train.pin_cores=on): 1 thread(s), 14 loader worker(s) on cores 2-15"


def test_slurm_pins_where_it_allocated_the_whole_node_and_counts_its_cpus_where_it_did_not_bind():
    whole = cores.plan(Machine(tuple(range(16)), 16, slurm_cpus=16), 1, 2, "cpu")
    assert whole.pinned and whole.cores == tuple(range(8, 16)) and whole.why == "pinned: SLURM allocated all 16 cores of this node to the job"
    part = cores.plan(Machine(tuple(range(64)), 64, slurm_cpus=16), 1, 2, "cpu")
    assert not part.pinned and part.share == 8 and (part.threads, part.workers) == (6, 2)
    assert part.why.startswith("not pinned: SLURM allocated 16 of this node's 64 cores without binding the job to them")
    assert cores.slurm_cpus_on_node({"SLURM_CPUS_ON_NODE": "12", "SLURM_JOB_CPUS_PER_NODE": "16(x2)"}) == 12
    assert cores.slurm_cpus_on_node({"SLURM_JOB_CPUS_PER_NODE": "16(x2)"}) == 16
    assert cores.slurm_cpus_on_node({"SLURM_JOB_CPUS_PER_NODE": "16,8"}) is None  # which node is this one?
    assert cores.slurm_cpus_on_node({}) is None


def test_pin_cores_on_and_off_override_auto_but_never_pin_more_ranks_than_cores():
    free = Machine(tuple(range(8)), 8)
    on = _node(free, 2, "cpu", pin="on")
    assert [s.cores for s in on] == [(0, 1, 2, 3), (4, 5, 6, 7)] and all(s.pinned for s in on)
    off = cores.plan(Machine((0, 1, 2, 3), 8), 0, 2, "cpu", pin="off")
    assert not off.pinned and off.why == "not pinned: train.pin_cores=off" and off.share == 2
    crowded = cores.plan(Machine((0, 1), 2), 2, 4, "cpu", threads=3, workers=0, pin="on")
    assert not crowded.pinned and crowded.cores == (0, 1) and (crowded.threads, crowded.workers) == (3, 0)
    assert crowded.describe() == "a share of 1 core(s) (not pinned: 4 ranks share 2 core(s)): 3 thread(s), decoding in the training process"


def test_cpu_splits_of_a_pinned_slice():
    two = _node(Machine((0, 1), 2), 2, "cpu", pin="on")
    assert [s.cores for s in two] == [(0,), (1,)] and all(s.threads == 1 and s.workers == 0 for s in two)
    assert two[1].describe() == "cores 1 (pinned: train.pin_cores=on): 1 thread(s), decoding in the training process"
    small = cores.plan(Machine((0, 1, 2, 3), 4), 1, 2, "cpu", pin="on")
    assert (small.cores, small.threads, small.workers) == ((2, 3), 2, 1) and small.worker_cores == small.compute_cores
    assert small.describe().endswith(": 2 thread(s), 1 loader worker(s) sharing them")
    room = cores.plan(Machine(tuple(range(16)), 32), 1, 2, "cpu")  # 8 cores per rank: 2 for decoding
    assert room.compute_cores == tuple(range(8, 14)) and room.worker_cores == (14, 15) and room.threads == 6
    assert room.describe().endswith(": 6 thread(s), 2 loader worker(s) on cores 14-15")
    crowded = cores.plan(Machine(tuple(range(16)), 32), 1, 2, "cpu", workers=8)  # no room left: all share the slice
    assert crowded.threads == 8 and crowded.compute_cores == crowded.worker_cores == tuple(range(8, 16))


def _restore(before: set[int], threads: int) -> None:
    for task in os.listdir("/proc/self/task"):  # every thread back where it was
        try:
            os.sched_setaffinity(int(task), before)
        except OSError:
            pass
    torch.set_num_threads(threads)


def test_apply_pins_every_thread_of_a_pinned_split_and_moves_nothing_otherwise():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    mine = tuple(sorted(before)[:1])
    try:
        pinned = cores.plan(Machine(mine, len(before) + 1), 0, 1, "cpu")  # one core of a larger machine: an allocation
        cores.apply(pinned)
        assert os.sched_getaffinity(0) == set(mine) and torch.get_num_threads() == 1 and pinned.loader_cores() == mine
        assert cores.machine_here().available == tuple(sorted(before)), "planned again: from the affinity it started with"
        _restore(before, threads)
        shared = cores.plan(Machine(tuple(sorted(before)), len(before)), 0, 1, "cpu")
        cores.apply(shared)
        assert os.sched_getaffinity(0) == before and shared.loader_cores() == ()
        assert torch.get_num_threads() == shared.threads
    finally:
        _restore(before, threads)


@pytest.mark.parametrize("key", ["train.threads=0", "data.num_workers=-1", "train.threads=many", "train.pin_cores=yes"])
def test_bad_numbers_are_refused_by_key(key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(None, [key])


def test_pin_cores_reads_yaml_on_and_off(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  pin_cores: on\n")  # YAML 1.1: a boolean
    assert load_config(tmp_path / "c.yaml").train.pin_cores == "on"
    assert load_config(None, ["train.pin_cores=off"]).train.pin_cores == "off"


def test_the_split_is_a_value_and_no_dist_module_keeps_state_of_its_own():
    """The plan is handed down (build_runtime returns it): it cannot be changed after the fact, and no
    module of disttrain/dist rebinds a module global (`global`) for other modules to read."""
    import ast
    import dataclasses
    from pathlib import Path

    import disttrain.dist

    split = cores.plan(Machine((0, 1, 2, 3), 4), 0, 1, "cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        split.workers = 3
    folder = Path(disttrain.dist.__file__).parent
    rebinding = [f"{path.name}:{node.lineno}" for path in sorted(folder.glob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
    assert rebinding == []


def test_loader_cores_are_the_workers_own_only_where_pinned():
    pinned = cores.plan(Machine(tuple(range(8)), 16), 0, 1, "cpu")  # an allocation of 8 of 16 cores
    shared = cores.plan(Machine(tuple(range(8)), 8), 0, 1, "cpu")  # the whole machine: not pinned
    assert pinned.pinned and pinned.loader_cores() == pinned.worker_cores == (6, 7)
    assert not shared.pinned and shared.workers == 2 and shared.loader_cores() == ()
