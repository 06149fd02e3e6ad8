import itertools

import pytest

from disttrain.data.loader import RankBatchSampler


def _epoch(n, bs, world, seed=0, epoch=0, shuffle=True, drop_empty=False):
    per_rank = []
    for rank in range(world):
        sampler = RankBatchSampler(n, bs, world, rank, seed=seed, shuffle=shuffle, drop_empty=drop_empty)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, bs", [(100, 8), (101, 8), (7, 4), (23, 5), (64, 32), (5, 1), (3, 1), (1000, 64)])
def test_train_slices_are_disjoint_complete_and_equal_in_steps(n, bs, world):
    if n < world:
        pytest.skip("fewer samples than ranks is refused at build time")
    per_rank = _epoch(n, bs, world)
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, f"ranks take different step counts: {[len(b) for b in per_rank]}"
    assert all(batch for batches in per_rank for batch in batches), "an empty batch"
    assert all(len(batch) <= bs for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(n)), "the slices do not cover the data"
    if n >= world * len(per_rank[0]):  # enough samples for one per batch: nothing repeats
        assert len(seen) == n, "the slices overlap"
    sizes = [len(batch) for batches in per_rank for batch in batches]
    assert max(sizes) - min(sizes) <= 1, "batch sizes are not balanced"


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 23, 110])
def test_eval_sees_every_sample_exactly_once(n, world):
    per_rank = _epoch(n, 8, world, shuffle=False, drop_empty=True)
    seen = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert seen == list(range(n))


def test_order_changes_per_epoch_and_is_identical_on_every_rank():
    a = _epoch(50, 5, 2, epoch=0)
    b = _epoch(50, 5, 2, epoch=1)
    assert a != b
    assert a == _epoch(50, 5, 2, epoch=0)
    assert _epoch(50, 5, 2, seed=1) != a


def test_global_batches_match_between_world_sizes_when_divisible():
    one = _epoch(128, 32, 1)[0]
    two = _epoch(128, 16, 2)
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][step] + two[1][step])


def test_rank_outside_world_is_refused():
    with pytest.raises(ValueError):
        RankBatchSampler(10, 2, world_size=2, rank=2)
    assert list(itertools.islice(iter(RankBatchSampler(10, 2)), 1))
