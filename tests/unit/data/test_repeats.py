"""data.repeats, repeated augmentation (DeiT's): over an epoch every rank takes the same steps,
each drawn image comes up to k times, its copies on different ranks where world >= k, the epoch
keeps its length; resuming with `skip` gives the rest of the same epoch; repeats 1 is exactly the
order from before repeats existed. Shards: each drawn sample k times in its rank's stream, the
batch counts unchanged."""

from __future__ import annotations

import collections
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_folder
from disttrain.data.loader import RankBatchSampler, epoch_order, make_loader
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import SlotRef, ShardDataset, load_manifest, train_steps


def _before_repeats(n: int, bs: int, world: int, rank: int, seed: int, epoch: int, skip: int = 0) -> list[list[int]]:
    """RankBatchSampler's training batches as they were before data.repeats (the reference)."""
    order = epoch_order(n, seed, epoch)
    steps = math.ceil(n / (world * bs))
    chunks = np.array_split(order, world * steps)
    out = []
    for step in range(skip, steps):
        index = step * world + rank
        batch = chunks[index]
        if len(batch) == 0:
            batch = order[index % n : index % n + 1]
        out.append(batch.tolist())
    return out


def _epoch(n: int, bs: int, world: int, repeats: int, seed: int = 0, epoch: int = 0, skip: int = 0) -> list[list[list[int]]]:
    """Every rank's batches of one epoch (each rank builds its own sampler, as in a run)."""
    per_rank = []
    for rank in range(world):
        sampler = RankBatchSampler(n, bs, world, rank, seed=seed, repeats=repeats)
        sampler.set_epoch(epoch, skip)
        per_rank.append(list(sampler))
        assert len(sampler) == math.ceil(n / (world * bs))
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, bs", [(100, 8), (101, 8), (7, 4), (23, 5), (5, 1), (1000, 64), (64, 32)])
def test_repeats_one_is_the_order_from_before(n, bs, world):
    if n < world:
        pytest.skip("fewer samples than ranks is refused at build time")
    for epoch, seed in ((0, 0), (3, 7)):
        assert _epoch(n, bs, world, 1, seed, epoch) == [_before_repeats(n, bs, world, r, seed, epoch) for r in range(world)]
        assert _epoch(n, bs, world, 1, seed, epoch, skip=1) == [_before_repeats(n, bs, world, r, seed, epoch, 1) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("repeats", [2, 3, 4])
@pytest.mark.parametrize("n, bs", [(100, 8), (101, 8), (23, 5), (7, 2), (1000, 64), (5, 1)])
def test_an_epoch_with_repeats(n, bs, world, repeats):
    if n < world:
        pytest.skip("fewer samples than ranks is refused at build time")
    per_rank = _epoch(n, bs, world, repeats, seed=5, epoch=2)
    steps = math.ceil(n / (world * bs))
    share = math.ceil(n / world)
    assert [len(batches) for batches in per_rank] == [steps] * world, "ranks take different step counts"
    assert all(0 < len(batch) <= bs for batches in per_rank for batch in batches), "an empty or oversized batch"
    assert [sum(len(b) for b in batches) for batches in per_rank] == [share] * world, "not the equal share of len(train)"
    sizes = [len(batch) for batches in per_rank for batch in batches]
    assert max(sizes) - min(sizes) <= 1, "batch sizes are not balanced"

    copies = collections.Counter(i for batches in per_rank for batch in batches for i in batch)
    assert sum(copies.values()) == world * share  # len(train), rounded up to an equal share per rank
    assert max(copies.values()) <= repeats or world * share > repeats * n, "an image more than `repeats` times"
    drawn = epoch_order(n, 5, 2)[: math.ceil(world * share / repeats)]  # the epoch's first images, in its order
    assert set(copies) == set(drawn.tolist()), "not the epoch's seeded draw"
    full = [i for i, c in copies.items() if c == repeats]
    assert len(full) >= len(drawn) - 1, "only the last drawn image may be cut short"
    ranks_of = collections.defaultdict(list)
    for rank, batches in enumerate(per_rank):
        for batch in batches:
            for i in batch:
                ranks_of[i].append(rank)
    for i, ranks in ranks_of.items():
        if world >= repeats:
            assert len(set(ranks)) == len(ranks), f"image {i}: two copies on one rank {ranks}"
        else:  # fewer ranks than copies: spread as evenly as round-robin deals them
            assert max(collections.Counter(ranks).values()) <= math.ceil(repeats / world), (i, ranks)
    if world == 1 and n >= repeats:
        flat = [i for batch in per_rank[0] for i in batch]
        assert flat[:repeats] == [int(drawn[0])] * repeats, "the copies of an image are not consecutive"


def test_the_copies_of_an_image_fall_in_the_same_global_step_where_they_can():
    """Dealt round-robin and split at the same positions on every rank, a global batch is a
    contiguous run of the repeated order: the copies of an image are in one step unless the run's
    end cuts them."""
    per_rank = _epoch(96, 8, 4, 3)
    for step in range(len(per_rank[0])):
        images = collections.Counter(i for rank in range(4) for i in per_rank[rank][step])
        assert sum(1 for c in images.values() if c < 3) <= 2, images


def test_skip_resumes_the_same_epoch_in_the_middle():
    for world, repeats in ((1, 3), (2, 2), (4, 3), (3, 4)):
        full = _epoch(203, 8, world, repeats, seed=1, epoch=4)
        for skip in (1, 3, len(full[0]) - 1, len(full[0])):
            assert _epoch(203, 8, world, repeats, seed=1, epoch=4, skip=skip) == [b[skip:] for b in full]


def test_epochs_differ_and_repeat_with_the_seed_on_every_rank():
    a = _epoch(60, 4, 2, 3, seed=0, epoch=0)
    assert a == _epoch(60, 4, 2, 3, seed=0, epoch=0)
    assert a != _epoch(60, 4, 2, 3, seed=0, epoch=1) and a != _epoch(60, 4, 2, 3, seed=1, epoch=0)


def test_through_a_dataloader_with_skip():
    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, index):
            return index

    sampler = RankBatchSampler(50, 4, world_size=2, rank=1, seed=3, repeats=2)
    loader = make_loader(Indices(), 0, False, sampler)
    sampler.set_epoch(2)
    full = [batch.tolist() for batch in loader]
    sampler.set_epoch(2, skip=3)
    assert [batch.tolist() for batch in loader] == full[3:] and len(full) == 7


def test_repeats_are_refused_for_evaluation_and_below_one():
    with pytest.raises(ValueError, match="1 for evaluation"):
        RankBatchSampler(10, 2, shuffle=False, drop_empty=True, repeats=2)
    with pytest.raises(ValueError, match="at least 1"):
        RankBatchSampler(10, 2, repeats=0)


# -- shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train: 3 shards of 20 samples; a validation split of 2 + 1."""
    root = tmp_path_factory.mktemp("repeats")
    src = make_folder(root / "src", {"train": {c: 20 for c in "abc"}, "val": {c: 1 for c in "abc"}}, size=(30, 22))
    prepare(src, root / "shards", PrepareSettings(samples_per_shard=20, presize=16), workers=1, progress=False, log=lambda _: None)
    return root / "shards"


def _pixels(dataset: ShardDataset, images) -> torch.Tensor:
    return dataset.pool.take(images, torch.Tensor.clone) if isinstance(images, SlotRef) else images


def _read(shards: Path, world: int, workers: int, batch_size: int, repeats: int, epoch: int = 0, skip: int = 0, buffer: int = 1000):
    """Every rank's training batches as (keys, pixel sums), and each rank's dataset."""
    manifest = load_manifest(shards)
    out = []
    for rank in range(world):
        dataset = ShardDataset(manifest, "train", batch_size, 16, world, rank, workers, train=True, seed=3,
                               shuffle_buffer=buffer, repeats=repeats)
        dataset.set_epoch(epoch, skip)
        out.append([(tuple(info["keys"]), _pixels(dataset, images).clone(), labels)
                    for images, labels, info in make_loader(dataset, workers, False)])
    return out


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2)])
@pytest.mark.parametrize("repeats", [2, 3])
def test_shards_emit_each_drawn_sample_repeats_times_with_the_same_batch_counts(shards, world, workers, repeats):
    plain = _read(shards, world, workers, 7, 1, epoch=1)
    repeated = _read(shards, world, workers, 7, repeats, epoch=1)
    steps = train_steps(60, world, 7)
    assert [len(b) for b in repeated] == [len(b) for b in plain] == [steps] * world
    assert all(len(keys) == 7 for batches in repeated for keys, _, _ in batches), "a batch is not full"
    pixels, classes, readers = {}, _classes(shards), max(1, workers)
    for rank in range(world):
        own = {k for keys, _, _ in plain[rank] for k in keys}  # the rank's range of the epoch
        copies = collections.Counter(k for keys, _, _ in repeated[rank] for k in keys)
        assert set(copies) <= own, "a sample from another rank's range"
        assert max(copies.values()) <= repeats
        cut = readers * (repeats - 1)  # a reader stops at its quota: fewer than `repeats` of its copies left out
        assert sum(c == repeats for c in copies.values()) >= len(copies) - cut, copies
        assert len(copies) <= math.ceil(steps * 7 / repeats) + readers - 1, "more distinct samples than the epoch's share"
        for keys, images, labels in repeated[rank]:
            for key, image, label in zip(keys, images, labels.tolist()):
                assert torch.equal(pixels.setdefault(key, image), image), f"{key}: its copies are not its image"
                assert label == classes[key]


def _classes(shards: Path) -> dict[str, int]:
    """Each training key's class index, from the shards' `.cls` members (read with plain tarfile)."""
    out = {}
    for shard in sorted(shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    out[member.name.split(".")[0]] = int(tar.extractfile(member).read())
    assert len(out) == 60
    return out


def test_shards_without_a_shuffle_buffer_put_the_copies_in_a_row(shards):
    keys = [k for keys, _, _ in _read(shards, 1, 0, 6, 3, buffer=0)[0] for k in keys]
    assert len(keys) == 60
    assert all(keys[i] == keys[i + 1] == keys[i + 2] for i in range(0, 60, 3)), keys[:9]
    assert len(set(keys)) == 20


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_with_repeats_resume_with_skip_exactly(shards, workers):
    full = _read(shards, 1, workers, 4, 2, epoch=2)[0]
    assert len(full) == 15
    for skip in (1, 6, 14):
        resumed = _read(shards, 1, workers, 4, 2, epoch=2, skip=skip)[0]
        assert [k for k, _, _ in resumed] == [k for k, _, _ in full[skip:]]
        assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(resumed, full[skip:]))


def test_shard_validation_refuses_repeats(shards):
    with pytest.raises(ValueError, match="1 for validation"):
        ShardDataset(load_manifest(shards), "valid", 4, 16, train=False, repeats=2)
