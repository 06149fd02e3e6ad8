"""Precomputed activations: what one pass over a rank's share allocates, and the values it keeps.

Memory is counted as torch's CPU allocator reports it to the profiler (every allocation and free
of a tensor's memory while profiling, in order): byte counts, the same on any CPU."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import TensorDataset

from disttrain.data.loader import DeviceLoader, RankBatchSampler, make_loader
from disttrain.train.precompute import precompute

FEATURES = 4096  # the head's input per sample: big against everything else the pass allocates
TRAIN, VALID, BATCH = 1024, 512, 32


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _model(scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(body=nn.Sequential(nn.Flatten(), nn.Linear(8, FEATURES)), head=nn.Linear(FEATURES, 2)))
    with torch.no_grad():
        model.body[1].weight.mul_(scale)
    return model


def _share(images: torch.Tensor) -> DeviceLoader:
    """A rank's fixed share as the precompute stage reads it (a DeviceLoader over an unshuffled
    RankBatchSampler), over (N, 2, 2, 2) inputs."""
    sampler = RankBatchSampler(len(images), BATCH, shuffle=False, drop_empty=True)
    dataset = TensorDataset(images, torch.arange(len(images)) % 2)
    return DeviceLoader(make_loader(dataset, 0, False, sampler), sampler, BATCH, torch.device("cpu"), name="share")


def _inputs(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 2, 2, 2, generator=torch.Generator().manual_seed(seed))


def _peak_allocated(fn):
    """(fn(), the most CPU tensor memory held at once during it beyond what was held before)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return result, peak


def test_the_pass_takes_what_it_keeps_plus_a_batch_not_float32_copies(accelerator):
    """Before, every batch was kept as float32, concatenated (another float32 copy), then converted:
    4-5x the fp16 bytes kept. Now each batch goes straight into its rows of the fp16 home."""
    model, train, valid = _model(), _share(_inputs(TRAIN, 1)), _share(_inputs(VALID, 2))
    view = lambda images, train: images.reshape(len(images), -1)  # noqa: E731
    features, peak = _peak_allocated(lambda: precompute(accelerator, model, model.head, view, train, valid, BATCH, 4, 0))
    kept = features.train.features.nbytes + features.valid.features.nbytes
    assert features.dtype == torch.float16 and kept == (TRAIN + VALID) * FEATURES * 2 == features.bytes_per_rank
    assert peak <= 1.25 * kept, f"the pass allocated {peak / kept:.2f}x the {kept} bytes it keeps"


@pytest.mark.parametrize("scale, dtype", [(1.0, torch.float16), (1e5, torch.bfloat16)])
def test_kept_values_are_the_bodys_output_rounded_once(accelerator, scale, dtype):
    """fp16 unless a value exceeds fp16's range (then every value as bf16, from a second pass): the
    stored values are exactly the body's float32 output converted to that dtype, labels in order."""
    model, train_images, valid_images = _model(scale), _inputs(96, 3), _inputs(40, 4)
    view = lambda images, train: images.reshape(len(images), -1)  # noqa: E731
    features = precompute(accelerator, model, model.head, view, _share(train_images), _share(valid_images), 16, 3, 0)
    assert features.dtype == dtype and features.shape == (FEATURES,)
    with torch.no_grad():
        for images, loader in ((train_images, features.train), (valid_images, features.valid)):
            expected = model.body(images.permute(0, 3, 1, 2).reshape(len(images), -1)).to(dtype)
            assert loader.features.dtype == dtype and torch.equal(loader.features, expected)
            assert torch.equal(loader.labels, torch.arange(len(images)) % 2)
    assert (scale > 1) == bool(model.body(train_images.permute(0, 3, 1, 2).reshape(96, -1)).abs().max() > 65504)
