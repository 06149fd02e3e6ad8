"""Precomputed activations (the lesson's `precompute=True`): the frozen body's output, computed once
per image, on which a stage trains and sweeps only the head.

Each rank runs the body (eval mode, the validation view) over its own share of the training images
and of the validation images, every image once across ranks, and keeps only that share: in host
memory, as fp16 (bf16 when the run trains in bf16, or when a value would overflow fp16), each batch
written into its rows as it comes (the pass takes what it keeps plus one batch). Nothing is
gathered. Training batches are drawn by `ShareBatchSampler` from the rank's own share (the same
number of steps on every rank; with one rank exactly the image path's batches); validation over
each rank's share keeps its metrics exact as always.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from disttrain.data.loader import ShareBatchSampler

FP16_MAX = 65504.0


class FeatureLoader:
    """The trainer's loader interface (`set_epoch`, `len`, `iter`, `take_skipped`, `epoch`,
    `batch_size`) over activations held in host memory: batched by a `ShareBatchSampler` (training),
    or in order (`sampler=None`: this rank's own validation share). Batches reach the device as
    float32 (the head's autocast casts them as it would the body's output)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 sampler: ShareBatchSampler | None = None):
        self.features = features.pin_memory() if device.type == "cuda" and len(features) else features
        self.labels = labels
        self.batch_size = batch_size
        self.device = device
        self.sampler = sampler
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch if self.sampler is not None else self._epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, skip)
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else math.ceil(len(self.labels) / self.batch_size)

    def take_skipped(self) -> int:
        return 0

    def _batch(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features[index].to(self.device, non_blocking=True).float()
        return features, self.labels[index].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            for start in range(0, len(self.labels), self.batch_size):
                yield self._batch(slice(start, start + self.batch_size))
            return
        for batch in self.sampler:
            yield self._batch(torch.as_tensor(batch))


def head_inputs(accelerator, model: nn.Module, head: nn.Module, loader, view,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(inputs of `head` stored as `dtype` on the CPU, labels, whether a value exceeds fp16's range)
    for every batch `loader` (a DeviceLoader over this rank's fixed share) gives this rank, in
    order: the model runs in eval mode under the run's autocast and the head's input is caught by a
    forward pre-hook. Each batch's activation is converted straight into its rows of one tensor
    allocated at the first batch for the whole share (its size from the loader's sampler): the
    memory this takes is what is kept plus one batch's activation."""
    samples = sum(len(batch) for batch in loader.source)
    caught: dict[str, torch.Tensor] = {}
    hook = head.register_forward_pre_hook(lambda _module, args: caught.__setitem__("x", args[0].detach()))
    inputs, labels = None, None
    filled, overflow = 0, False
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_labels in loader:
                with accelerator.autocast():
                    model(view(images, train=False))
                x = caught.pop("x")
                if inputs is None:  # pinned on CUDA: the FeatureLoader's copies to the device start from it
                    inputs = torch.empty((samples, *x.shape[1:]), dtype=dtype, pin_memory=x.device.type == "cuda")
                    labels = torch.empty((samples, *batch_labels.shape[1:]), dtype=batch_labels.dtype)  # multi-label: (samples, C)
                inputs[filled : filled + len(x)].copy_(x)
                labels[filled : filled + len(x)].copy_(batch_labels)
                filled += len(x)
                if dtype == torch.float16 and not overflow:
                    overflow = bool((x.abs() > FP16_MAX).any())
                del x
    finally:
        hook.remove()
    if filled != samples:
        raise RuntimeError(f"precompute: the {loader.name} loader gave {filled} samples where its sampler has {samples}")
    if inputs is None:
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.long), overflow
    return inputs, labels, overflow


@dataclass
class Precomputed:
    train: FeatureLoader
    valid: FeatureLoader
    seconds: float
    dtype: torch.dtype
    """How the activations are stored (fp16, or bf16)."""
    bytes_per_rank: int
    """The most host memory any rank holds for them (train + valid share)."""
    shape: tuple[int, ...]
    """One image's activation (the head's input)."""


def precompute(accelerator, model: nn.Module, head: nn.Module, view, train_share, valid_share, batch_size: int, steps: int,
               seed: int) -> Precomputed:
    """The body's output for this rank's share of the training images (`train_share`: a loader over
    them in order, each image once across ranks) and of the validation images (`valid_share`), kept
    on this rank; training batches of `batch_size`, `steps` per epoch, from its own share.

    Stored as bf16 when the run trains in bf16, else as fp16 unless a value on any rank exceeds
    fp16's range: then as bf16, from a second pass over the images (rare: an fp16 copy has lost
    what bf16 keeps, and keeping float32 copies to choose later would take twice the memory)."""
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    train_x, train_y, train_over = head_inputs(accelerator, model, head, train_share, view, dtype)
    valid_x, valid_y, valid_over = head_inputs(accelerator, model, head, valid_share, view, dtype)
    mine = torch.tensor([[float(train_over or valid_over), train_x.numel() + valid_x.numel()]], dtype=torch.float64,
                        device=accelerator.device)
    everyone = accelerator.gather(mine).cpu() if accelerator.num_processes > 1 else mine.cpu()
    overflow, values = bool(everyone[:, 0].max() > 0), int(everyone[:, 1].max())
    if overflow and dtype == torch.float16:
        dtype, train_x, valid_x = torch.bfloat16, None, None  # the fp16 copies go before the bf16 ones are made
        train_x, train_y, _ = head_inputs(accelerator, model, head, train_share, view, dtype)
        valid_x, valid_y, _ = head_inputs(accelerator, model, head, valid_share, view, dtype)
    device = accelerator.device
    train = FeatureLoader(train_x, train_y, batch_size, device, ShareBatchSampler(len(train_y), steps, seed))
    valid = FeatureLoader(valid_x, valid_y, batch_size * 2, device)
    shape = tuple(train_x.shape[1:])
    return Precomputed(train, valid, time.perf_counter() - t0, dtype, values * torch.finfo(dtype).bits // 8, shape)
