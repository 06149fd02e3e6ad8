"""Shards: prepare -> read round trips, the rank/worker split, equal batch counts, corrupt members."""

from __future__ import annotations

import collections
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder
from disttrain.data.decode import load_presized
from disttrain.data.folder import DataError, scan_image_folder
from disttrain.data.loader import DeviceLoader, FolderDataset, make_loader
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import ShardDataset, SlotRef, load_manifest, plan_epoch, read_range, shard_order, train_steps

CLASSES = ("a", "b", "c")


def _prepare(tmp_path: Path, train_per_class: int, valid_per_class: int, per_shard: int, valid_name="val") -> Path:
    src = make_folder(
        tmp_path / "src",
        {"train": {c: train_per_class for c in CLASSES}, valid_name: {c: valid_per_class for c in CLASSES}},
        size=(30, 22),
    )
    out = tmp_path / "shards"
    prepare(src, out, PrepareSettings(samples_per_shard=per_shard, presize=16), workers=1, progress=False, log=lambda _: None)
    return out


def _source_labels(shards: Path, split: str) -> dict[str, int]:
    """key -> label as written, read with plain tarfile (independent of the reader under test)."""
    labels, paths = {}, {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "cls":
                    labels[key] = int(data)
                elif ext == "path":
                    paths[key] = data.decode()
    assert {k: CLASSES[v] for k, v in labels.items()} == {k: p.split("/")[0] for k, p in paths.items()}
    return labels


def _stored(shards: Path, split: str) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Each shard's keys in order, and each key's image as the CPU decoder makes it from the stored
    JPEG (read with plain tarfile, in the manifest's shard order)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    keys, pixels = [], {}
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            jpegs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
        keys.append(sorted(jpegs))
        pixels.update({k: torch.from_numpy(load_presized(j, 16)) for k, j in jpegs.items()})
    assert [len(k) for k in keys] == [e["samples"] for e in manifest["splits"][split]["shards"]]
    return keys, pixels


def _check_training_epoch(shards: Path, per_rank, world: int, batch_size: int, epoch: int, seed: int = 3) -> None:
    """What a training epoch from shards must be, rank by rank: `ceil(N / (world x batch_size))` full
    batches; rank r's samples are exactly the r-th of `world` contiguous ranges of the epoch's seeded
    shard sequence, each once, plus only the repeats that fill its last batches (drawn from that
    range, each repeated sample delivered twice at most here); every label is its key's label and
    every image is its key's image."""
    truth = _source_labels(shards, "train")
    shard_keys, pixels = _stored(shards, "train")
    sequence = [k for s in shard_order(len(shard_keys), epoch, seed, shuffle=True) for k in shard_keys[s]]
    total = len(sequence)
    steps = train_steps(total, world, batch_size)
    for rank, batches in enumerate(per_rank):
        assert len(batches) == steps, f"rank {rank}"
        part = sequence[total * rank // world : total * (rank + 1) // world]
        delivered = collections.Counter()
        for images, labels, info in batches:
            assert images.dtype == torch.uint8 and images.shape == (batch_size, 16, 16, 3) and len(labels) == batch_size
            assert info["skipped"] == 0 and len(info["keys"]) == batch_size
            assert [truth[k] for k in info["keys"]] == labels.tolist()
            for image, key in zip(images, info["keys"]):
                assert torch.equal(image, pixels[key]), f"rank {rank}: the image delivered for {key} is not its image"
            delivered.update(info["keys"])
        assert set(delivered) == set(part), f"rank {rank}: not exactly its own range"
        repeats = delivered - collections.Counter(part)
        assert sum(repeats.values()) == steps * batch_size - len(part), f"rank {rank}: repeats beyond the last batches"
        assert max(repeats.values(), default=0) <= 1, f"rank {rank}: {repeats.most_common(3)}"


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory) -> Path:
    """train: 3 shards (20+20+20 samples), val/: 2 shards (10+11)."""
    return _prepare(tmp_path_factory.mktemp("three"), train_per_class=20, valid_per_class=7, per_shard=20)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    """train: 1 shard of 27 samples; valid/: 1 shard of 6."""
    return _prepare(tmp_path_factory.mktemp("one"), train_per_class=9, valid_per_class=2, per_shard=100, valid_name="valid")


def test_prepare_writes_balanced_shards_and_a_manifest(three_shards):
    manifest = json.loads((three_shards / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES)
    assert manifest["presize"] == 16 and manifest["source"]["valid_dir"] == "val"
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [20, 20, 20]
    assert [s["samples"] for s in manifest["splits"]["valid"]["shards"]] == [11, 10]
    assert manifest["splits"]["train"]["samples"] == 60 and manifest["splits"]["train"]["bad_files"] == []
    labels = _source_labels(three_shards, "train")
    assert collections.Counter(labels.values()) == {0: 20, 1: 20, 2: 20}
    # shards mix the classes (shuffled once when written)
    with tarfile.open(three_shards / "train-000000.tar") as tar:
        first = {int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")}
    assert len(first) == 3
    # images stored with the shorter side at the presize (30x22 -> 22x16)
    with tarfile.open(three_shards / "train-000000.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (22, 16)
    assert not list(three_shards.glob("*.tmp")) and not (three_shards / ".prepare-progress.jsonl").exists()


def test_shards_are_standard_webdataset(three_shards):
    import webdataset as wds

    dataset = wds.WebDataset([str(p) for p in sorted(three_shards.glob("train-*.tar"))], shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == 60
    assert {s["__key__"] for s in samples} == set(_source_labels(three_shards, "train"))
    assert all(isinstance(s["jpg"], Image.Image) and s["cls"] in (0, 1, 2) for s in samples)


def _pixels(dataset: ShardDataset, images):
    """The batch's pixels: from the worker's shared slot when the loader sent a SlotRef."""
    return dataset.pool.take(images, torch.Tensor.clone) if isinstance(images, SlotRef) else images


def _read_all(shards: Path, split: str, world: int, workers: int, batch_size: int, train: bool, epoch: int = 0):
    """Every rank's batches (a loader per rank, as each rank builds its own)."""
    manifest = load_manifest(shards)
    per_rank = []
    for rank in range(world):
        dataset = ShardDataset(manifest, split, batch_size, 16, world, rank, workers, train=train, seed=3)
        dataset.set_epoch(epoch)
        batches = [(_pixels(dataset, images), labels, info) for images, labels, info in make_loader(dataset, workers, False)]
        assert len(batches) == len(dataset)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_validation_round_trip_every_sample_once(three_shards, world, workers):
    truth = _source_labels(three_shards, "valid")
    _, pixels = _stored(three_shards, "valid")
    seen = collections.Counter()
    for batches in _read_all(three_shards, "valid", world, workers, batch_size=4, train=False):
        for images, labels, info in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (16, 16, 3) and 1 <= len(labels) <= 4
            assert [truth[k] for k in info["keys"]] == labels.tolist() and len(images) == len(labels)
            assert all(torch.equal(image, pixels[key]) for image, key in zip(images, info["keys"]))
            seen.update(info["keys"])
    assert len(truth) == 21 and seen == collections.Counter(list(truth))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_training_round_trip_equal_full_batches_every_sample(three_shards, world, workers):
    per_rank = _read_all(three_shards, "train", world, workers, batch_size=7, train=True, epoch=2)
    _check_training_epoch(three_shards, per_rank, world, batch_size=7, epoch=2)
    assert sorted({k for batches in per_rank for _, _, info in batches for k in info["keys"]}) == sorted(_source_labels(three_shards, "train"))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_shard_two_ranks_two_workers(one_shard, workers):
    """Fewer shards than ranks x workers: every reader takes its part of the one shard."""
    per_rank = _read_all(one_shard, "train", 2, workers, batch_size=4, train=True)
    assert [len(b) for b in per_rank] == [4, 4]  # ceil(27 / 8)
    assert all(len(labels) == 4 and images.shape[0] == 4 for batches in per_rank for images, labels, _ in batches), "not full"
    _check_training_epoch(one_shard, per_rank, 2, batch_size=4, epoch=0)
    keys = [k for batches in per_rank for _, _, info in batches for k in info["keys"]]
    assert len(keys) == 32 and set(keys) == set(_source_labels(one_shard, "train"))
    valid = _read_all(one_shard, "valid", 2, workers, batch_size=4, train=False)
    assert sorted(k for batches in valid for _, _, info in batches for k in info["keys"]) == sorted(_source_labels(one_shard, "valid"))


def test_epochs_differ_and_repeat_with_the_seed(three_shards):
    def order(epoch):
        return [k for _, _, info in _read_all(three_shards, "train", 1, 0, 6, True, epoch)[0] for k in info["keys"]]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_plan_properties_on_random_layouts():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 40) for _ in range(rng.randint(1, 6))]
        world, workers, bs = rng.randint(1, 5), rng.randint(0, 4), rng.randint(1, 9)
        total = sum(counts)
        if total < world:
            continue
        for train in (True, False):
            covered, epoch = collections.Counter(), rng.randint(0, 3)
            for rank in range(world):
                plans = plan_epoch(counts, world, rank, workers, bs, train, epoch=epoch, seed=1)
                assert len(plans) == max(1, workers)
                if train:
                    assert sum(p.batches for p in plans) == train_steps(total, world, bs)
                    assert all(p.samples <= p.batches * bs for p in plans)
                for p in plans:
                    assert sum(b - a for _, a, b in p.pieces) == p.samples
                    covered.update((s, i) for s, a, b in p.pieces for i in range(a, b))
            assert covered == collections.Counter((s, i) for s, n in enumerate(counts) for i in range(n))


# -- corrupt data -------------------------------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    img = Image.frombytes("RGB", (20, 20), random.Random(seed).randbytes(1200))
    img.save(out, "JPEG")
    return out.getvalue()


def _corrupt_shards(tmp_path: Path) -> Path:
    """train: one good shard (12), one with 3 bad samples among 10, one truncated after 4 of 10."""
    root = tmp_path / "corrupt"
    root.mkdir()
    shards = []

    def shard(name: str, samples: list[tuple[str, bytes | None, bytes | None]]) -> None:
        with tarfile.open(root / name, "w") as tar:
            for key, cls, img in samples:
                if cls is not None:
                    _member(tar, f"{key}.cls", cls)
                if img is not None:
                    _member(tar, f"{key}.jpg", img)
        shards.append({"name": name, "samples": len(samples)})

    shard("train-000000.tar", [(f"g{i:02d}", b"%d" % (i % 2), _jpeg(i)) for i in range(12)])
    bad = [(f"b{i:02d}", b"%d" % (i % 2), _jpeg(100 + i)) for i in range(10)]
    bad[2] = ("b02", b"1", b"this is not an image")
    bad[5] = ("b05", None, _jpeg(5))  # no .cls
    bad[7] = ("b07", b"0", _jpeg(7)[:200])  # truncated JPEG payload
    shard("train-000001.tar", bad)
    shard("train-000002.tar", [(f"t{i:02d}", b"0", _jpeg(200 + i)) for i in range(10)])
    with tarfile.open(root / "train-000002.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "t04.jpg").offset_data + 10
    data = (root / "train-000002.tar").read_bytes()
    (root / "train-000002.tar").write_bytes(data[:cut])  # cut inside the 5th sample's image
    shard("valid-000000.tar", bad)
    manifest = {
        "classes": ["x", "y"],
        "presize": 20,
        "splits": {"train": {"shards": shards[:3]}, "valid": {"shards": shards[3:]}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_read_range_counts_what_it_skips(tmp_path):
    root = _corrupt_shards(tmp_path)
    skipped: dict[str, int] = {}
    keys = [s.key for s in read_range(root / "train-000001.tar", 0, 10, skipped, num_classes=2)]
    assert keys == ["b00", "b01", "b02", "b03", "b04", "b06", "b07", "b08", "b09"]  # b05 has no label
    assert skipped == {"no .cls member": 1}
    skipped = {}
    keys = [s.key for s in read_range(root / "train-000002.tar", 2, 8, skipped, num_classes=2)]
    assert keys == ["t02", "t03"] and skipped == {"truncated shard": 4}


def test_read_range_follows_webdatasets_grouping_and_counts_every_sample(tmp_path):
    """Every sample of the range is delivered or counted. webdataset's grouping closes a sample when
    the next one's first member has been read, so a cut inside that member also costs the (complete)
    sample before it; a member name repeated within a sample keeps the first."""
    path = tmp_path / "edge.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            _member(tar, f"e{i}.cls", b"7" if i == 1 else b"0")  # e1: a label out of range
            _member(tar, f"e{i}.jpg", _jpeg(i))
            if i == 2:
                _member(tar, "e2.jpg", b"a second e2.jpg")
    skipped: dict[str, int] = {}
    samples = list(read_range(path, 0, 6, skipped, num_classes=2))
    assert [s.key for s in samples] == ["e0", "e2", "e3", "e4", "e5"] and skipped == {"bad label": 1}
    assert samples[1].image == _jpeg(2) and all(s.label == 0 for s in samples)
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "e4.cls").offset_data
    path.write_bytes(path.read_bytes()[:cut])  # e4.cls's header is there, its byte is not
    skipped = {}
    assert [s.key for s in read_range(path, 1, 6, skipped, num_classes=2)] == ["e2"]
    assert skipped == {"bad label": 1, "truncated shard": 3}  # e3 (complete, not yet closed), e4, e5


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_members_are_skipped_without_changing_batch_counts(tmp_path, workers):
    root = _corrupt_shards(tmp_path)
    manifest = load_manifest(root)
    skipped, lengths = 0, []
    for rank in range(2):
        dataset = ShardDataset(manifest, "train", 4, 20, world=2, rank=rank, num_workers=workers, train=True)
        batches = [(_pixels(dataset, i), l, info) for i, l, info in make_loader(dataset, workers, False)]
        lengths.append(len(batches))
        assert all(len(labels) == 4 for _, labels, _ in batches)
        keys = [k for _, _, info in batches for k in info["keys"]]
        assert not {"b02", "b05", "b07"} & set(keys)
        skipped += sum(info["skipped"] for _, _, info in batches)
    assert lengths == [train_steps(32, 2, 4)] * 2
    assert skipped == 3 + 6  # three bad samples, six lost to the truncation

    valid = ShardDataset(manifest, "valid", 4, 20, world=1, rank=0, num_workers=workers, train=False)
    loader = DeviceLoader(make_loader(valid, workers, False), valid, 4, torch.device("cpu"))
    count = sum(len(labels) for _, labels in loader)
    assert count == 7 and loader.take_skipped() == 3 and loader.skipped == 0


def test_missing_manifest_and_missing_shard_are_clear_errors(tmp_path, three_shards):
    make_folder(tmp_path / "folder", {"train": {"a": 1}, "valid": {"a": 1}})
    with pytest.raises(DataError, match="looks like an image folder: set data.format=folder"):
        load_manifest(tmp_path / "folder")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((three_shards / "manifest.json").read_text())
    with pytest.raises(DataError, match="lists shard\\(s\\) that do not exist: .*train-000000.tar"):
        load_manifest(copy)


@pytest.fixture(scope="module")
def jpeg_source(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of RGB and grey JPEGs whose shorter side is already 16 px (landscape, portrait and
    square), and its shards made with --presize 16: `prepare` stores such files byte for byte."""
    root = tmp_path_factory.mktemp("jpegs")
    src = root / "src"
    rng = np.random.default_rng(5)
    for split, per_class in (("train", 6), ("valid", 2)):
        for ci, cls in enumerate(CLASSES):
            for i in range(per_class):
                w, h = [(22, 16), (16, 20), (16, 16)][i % 3]
                mode = "L" if i % 4 == 3 else "RGB"
                shape = (h, w) if mode == "L" else (h, w, 3)
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                path = src / split / cls / f"{i:02d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, mode).save(path, quality=80)
    out = root / "shards"
    prepare(src, out, PrepareSettings(samples_per_shard=7, presize=16), workers=1, progress=False, log=lambda _: None)
    return src, out


@pytest.mark.parametrize("load_size", [16, 12])  # the stored size (centre crop only), and a resize
@pytest.mark.parametrize("split, workers", [("train", 2), ("valid", 0)])
def test_shard_pixels_equal_the_folder_paths_pixels(jpeg_source, load_size, split, workers):
    """A JPEG stored as is (its bytes are the source file's, checked here) must reach the model with
    exactly the pixels the folder path (`FolderDataset` over the source folder) gives the same file.
    Re-encoded images (other formats or sizes) are lossy by design and not compared exactly."""
    src, shards = jpeg_source
    folder = scan_image_folder(src)
    part = folder.train if split == "train" else folder.valid
    index = {str(Path(path).relative_to(part.dir)): i for i, path in enumerate(part.paths)}
    dataset = FolderDataset(part, load_size)

    stored = {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".path"):
                key = name.split(".")[0]
                stored[key] = data.decode()
                assert members[f"{key}.jpg"] == (part.dir / data.decode()).read_bytes(), f"{data.decode()} was re-encoded"
    assert len(stored) == len(part) == (18 if split == "train" else 6)

    reader = ShardDataset(load_manifest(shards), split, 4, load_size, num_workers=workers, train=split == "train", seed=1)
    compared = collections.Counter()
    for images, labels, info in make_loader(reader, workers, False):
        for image, label, key in zip(_pixels(reader, images), labels.tolist(), info["keys"]):
            expected, expected_label = dataset[index[stored[key]]]
            assert image.shape == (load_size, load_size, 3) and torch.equal(image, expected), stored[key]
            assert label == expected_label
            compared[stored[key]] += 1
    assert set(compared) == set(index)


def test_pooled_batches_carry_the_right_pixels_also_after_an_abandoned_epoch(three_shards):
    """Workers decode into reused shared slots: every delivered image is its key's image, also when
    the previous epoch was abandoned with batches still in flight (their slots are reclaimed)."""
    manifest = load_manifest(three_shards)
    expected = {}
    for path, count in zip(manifest.splits["train"].paths, manifest.splits["train"].counts):
        for sample in read_range(path, 0, count, {}, 3):
            expected[sample.key] = torch.from_numpy(load_presized(sample.image, 16))
    dataset = ShardDataset(manifest, "train", 5, 16, num_workers=2, train=True, seed=1)
    assert dataset.pool is not None and dataset.pool.slots == 6
    loader = DeviceLoader(make_loader(dataset, 2, False), dataset, 5, torch.device("cpu"))
    raw = make_loader(dataset, 2, False)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        batches = iter(raw)
        next(batches)  # abandoned after one batch: the others stay unconsumed in their slots
        del batches
        dataset.set_epoch(epoch)
        seen = 0
        for images, labels, info in raw:
            pixels = dataset.pool.take(images, torch.Tensor.clone)
            for image, key in zip(pixels, info["keys"]):
                assert torch.equal(image, expected[key]), key
            seen += len(labels)
        assert seen == train_steps(60, 1, 5) * 5
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_skipping_batches_resumes_the_exact_stream(three_shards, workers):
    """set_epoch(epoch, skip=k) (resuming mid-epoch) yields exactly the batches k, k+1, ... of the
    uninterrupted epoch, pixels included, whichever worker had produced them."""
    manifest = load_manifest(three_shards)
    dataset = ShardDataset(manifest, "train", 4, 16, world=1, rank=0, num_workers=workers, train=True, seed=2)
    loader = make_loader(dataset, workers, False)

    def stream(skip):
        dataset.set_epoch(1, skip)
        return [(tuple(info["keys"]), _pixels(dataset, images).sum().item()) for images, _, info in loader]

    full = stream(0)
    assert len(full) == 15
    for skip in (1, 2, 4, 7, 14, 15):
        assert stream(skip) == full[skip:], skip
