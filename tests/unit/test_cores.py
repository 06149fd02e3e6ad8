"""How a rank's cores are split between its threads and its loader workers (disttrain/cores.py)."""

from __future__ import annotations

import os

import pytest
import torch

from disttrain import cores
from disttrain.config import ConfigError, load_config


def test_two_cpu_ranks_on_two_cores_each_take_one_and_decode_on_it():
    splits = [cores.plan([0, 1], rank, 2, "cpu") for rank in range(2)]
    assert [s.cores for s in splits] == [(0,), (1,)]
    assert all(s.threads == 1 and s.workers == 0 and s.pinned for s in splits)
    assert splits[1].describe() == "cores 1: 1 thread(s), decoding in the training process"


def test_a_cpu_rank_with_two_cores_computes_on_both_and_shares_them_with_one_worker():
    split = cores.plan([0, 1, 2, 3], 1, 2, "cpu")
    assert (split.cores, split.threads, split.workers) == ((2, 3), 2, 1)
    assert split.worker_cores == split.compute_cores == (2, 3)
    assert split.describe() == "cores 2-3: 2 thread(s), 1 loader worker(s) sharing them"


def test_a_cpu_rank_with_room_keeps_its_workers_off_the_compute_cores():
    split = cores.plan(list(range(16)), 1, 2, "cpu")  # 8 cores per rank: 2 for decoding
    assert split.cores == tuple(range(8, 16))
    assert (split.threads, split.workers) == (6, 2)
    assert split.compute_cores == tuple(range(8, 14)) and split.worker_cores == (14, 15)
    assert split.describe() == "cores 8-15: 6 thread(s), 2 loader worker(s) on cores 14-15"
    crowded = cores.plan(list(range(16)), 1, 2, "cpu", workers=8)  # no room left: all share the slice
    assert crowded.threads == 8 and crowded.compute_cores == crowded.worker_cores == tuple(range(8, 16))


def test_a_gpu_rank_gives_all_but_one_core_to_decoding():
    split = cores.plan(list(range(16)), 0, 1, "cuda")
    assert (split.threads, split.workers, split.compute_cores) == (1, 15, (0,))
    assert split.worker_cores == tuple(range(1, 16))


def test_more_ranks_than_cores_pins_nothing_and_numbers_given_are_kept():
    split = cores.plan([0, 1], 2, 4, "cpu", threads=3, workers=0)
    assert not split.pinned and split.cores == (0, 1)
    assert (split.threads, split.workers) == (3, 0)
    assert split.describe() == "2 shared core(s): 3 thread(s), decoding in the training process"


def test_apply_pins_every_thread_and_sets_the_thread_count():
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    mine = sorted(before)[:1]
    try:
        cores.apply(cores.plan(mine, 0, 1, "cpu"))
        assert os.sched_getaffinity(0) == set(mine) and torch.get_num_threads() == 1
        assert cores.worker_cores() == tuple(mine)
    finally:
        for task in os.listdir("/proc/self/task"):  # every thread back where it was
            try:
                os.sched_setaffinity(int(task), before)
            except OSError:
                pass
        torch.set_num_threads(threads)
        cores._current, cores._worker_cores = None, ()  # later tests in this process build loaders


@pytest.mark.parametrize("key", ["train.threads=0", "data.num_workers=-1", "train.threads=many"])
def test_bad_numbers_are_refused_by_key(key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(None, [key])
