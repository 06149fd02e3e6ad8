"""data.decode=gpu keeps every image with its own label: the batched decoder (`decode_jpeg_batch`, nvJPEG on
CUDA) and what the loader does with an undecodable payload (`DecodeOnDevice`), run here on the CPU through
the same code. Each class is a solid colour, so an image's colour says which label it must carry."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from disttrain.config import AugmentConfig
from disttrain.data.augment import DeviceAugment
from disttrain.data.decode import decode_jpeg_batch
from disttrain.data.folder import DataError
from disttrain.data.loader import DecodeOnDevice, DeviceLoader, make_loader
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import ShardDataset, load_manifest
from disttrain.models.forward import evaluate
from disttrain.task import Task

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230)]
CPU = torch.device("cpu")
SIZE = 16


def _jpeg(label: int, size=(20, 18)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, COLOURS[label]).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _colour_label(image: torch.Tensor) -> int:
    """The class whose colour a (3, S, S) uint8 image shows."""
    mean = image.float().mean(dim=(1, 2))
    return int(torch.cdist(mean[None], torch.tensor(COLOURS, dtype=torch.float32)).argmin())


def _assert_paired(images: torch.Tensor, labels: torch.Tensor) -> None:
    assert len(images) == len(labels)
    shown = [_colour_label(image) for image in images]
    assert shown == labels.tolist(), f"images show classes {shown}, their labels say {labels.tolist()}"


GARBAGE = b"not a jpeg" * 8


def test_an_undecodable_payload_never_leaves_its_label_on_another_image():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    payloads = [_jpeg(label) for label in labels.tolist()]
    payloads[1] = GARBAGE  # class 1's sample is damaged
    payloads[4] = _jpeg(4)[:40]  # and class 4's is cut short inside its headers

    images, decoded = decode_jpeg_batch(payloads, SIZE, CPU)
    assert decoded == [0, 2, 3, 5] and images.shape == (4, 3, SIZE, SIZE)
    _assert_paired(images, labels[decoded])

    # validation: the damaged samples are left out with their labels, and counted
    images, kept, failed = DecodeOnDevice(SIZE, substitute=False)(payloads, labels, CPU)
    assert failed == 2 and kept.tolist() == [0, 2, 3, 5]
    _assert_paired(images, kept)

    # training: the batch keeps its size, each place taken by a decoded (image, label) pair
    train = DecodeOnDevice(SIZE, substitute=True)
    images, paired, failed = train(payloads, labels, CPU)
    assert failed == 2 and len(paired) == 6
    assert paired[[0, 2, 3, 5]].tolist() == [0, 2, 3, 5]  # the decoded ones keep their places
    _assert_paired(images, paired)

    # a training batch of which nothing decodes: the last pair decoded takes every place
    images, paired, failed = train([GARBAGE, GARBAGE, GARBAGE], torch.tensor([0, 1, 2]), CPU)
    assert failed == 3 and paired.tolist() == [5, 5, 5]
    _assert_paired(images, paired)
    # ... in validation it is an empty batch, counted
    images, kept, failed = DecodeOnDevice(SIZE, substitute=False)([GARBAGE, GARBAGE], torch.tensor([0, 1]), CPU)
    assert failed == 2 and images.shape == (0, 3, SIZE, SIZE) and kept.shape == (0,)
    # ... and a run whose very first training batch has nothing decodable stops with one line
    with pytest.raises(DataError, match=r"none of the 2 JPEG payloads of a training batch could be decoded .* no sample yet"):
        DecodeOnDevice(SIZE, substitute=True)([GARBAGE, GARBAGE], torch.tensor([0, 1]), CPU)


def _shards_with_damaged_valid_samples(tmp_path: Path, damaged: set[int]) -> tuple[Path, list[int]]:
    """Shards of a folder of solid-colour images (3 per class in each split, one shard per split);
    the JPEGs of the valid shard's samples at positions `damaged` are then overwritten with garbage.
    Returns the shards' folder and the damaged samples' labels."""
    src = tmp_path / "src"
    for split in ("train", "valid"):
        for label in range(len(COLOURS)):
            for i in range(3):
                path = src / split / f"c{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 20), COLOURS[label]).save(path)
    out = tmp_path / "shards"
    prepare(src, out, PrepareSettings(samples_per_shard=100, presize=SIZE, quality=95), workers=1, progress=False, log=lambda _: None)
    shard = out / json.loads((out / "manifest.json").read_text())["splits"]["valid"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpegs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    names = {jpegs[i] for i in damaged}
    labels = [int(data) for m, data in members if m.name.endswith(".cls") and m.name.replace(".cls", ".jpg") in names]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = GARBAGE if member.name in names else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return out, labels


def test_validation_from_shards_counts_only_what_it_decoded(tmp_path):
    """A DeviceLoader over a shard split read raw (data.decode=gpu's reader) with DecodeOnDevice,
    as a run builds it, 4 samples a batch: the first batch wholly damaged, one sample of the second.
    Every batch's images carry their own labels; `evaluate` neither shows nor counts the damaged
    samples (the empty first batch included), and counts their skips."""
    shards, damaged = _shards_with_damaged_valid_samples(tmp_path, {0, 1, 2, 3, 5})
    manifest = load_manifest(shards)
    valid = ShardDataset(manifest, "valid", 4, SIZE, train=False, raw=True)
    loader = DeviceLoader(make_loader(valid, 0, False), valid, 4, CPU, DecodeOnDevice(SIZE, substitute=False), name="valid")
    seen, sizes = [], []
    for images, labels in loader:
        _assert_paired(images, labels)
        seen += labels.tolist()
        sizes.append(len(labels))
    assert sizes == [0, 3, 4, 4, 2] and loader.take_skipped() == 5
    expected = [label for label in range(len(COLOURS)) for _ in range(3)]
    for label in damaged:
        expected.remove(label)
    assert sorted(seen) == expected

    palette = torch.tensor(COLOURS, dtype=torch.float32) / 255
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, len(COLOURS)))
    with torch.no_grad():  # a model that knows the colours (logits: minus the squared distance, less |x|^2)
        model[2].weight.copy_(2 * palette)
        model[2].bias.copy_(-(palette**2).sum(dim=1))
    view = DeviceAugment(AugmentConfig(), SIZE - 4, mean=[0.0] * 3, std=[1.0] * 3)  # the eval view a run validates through
    result = evaluate(Accelerator(cpu=True), model, loader, view, Task(classes=len(COLOURS)))
    assert (result.count, result.correct, result.skipped) == (13, 13, 5)
