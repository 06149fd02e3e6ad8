"""Precomputed activations (the lesson's `precompute=True`): the frozen body's output, computed once
per image, on which a stage trains and sweeps only the head.

Each rank runs the body (eval mode, the validation view) over its own share of the training images
and of the validation images, every image once across ranks, and keeps only that share: in host
memory, as fp16 (bf16 when the run trains in bf16, or when a value would overflow fp16). Nothing is
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


def head_inputs(accelerator, model: nn.Module, head: nn.Module, loader, view) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of `head` as float32 on the CPU, labels on the CPU) for every batch `loader` gives
    this rank, in order: the model runs in eval mode under the run's autocast and the head's input
    is caught by a forward pre-hook."""
    caught: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: caught.append(args[0].detach().float().cpu()))
    labels = []
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_labels in loader:
                with accelerator.autocast():
                    model(view(images, train=False))
                labels.append(batch_labels.cpu())
    finally:
        hook.remove()
    if not caught:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(caught), torch.cat(labels)


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
    on this rank; training batches of `batch_size`, `steps` per epoch, from its own share."""
    t0 = time.perf_counter()
    train_x, train_y = head_inputs(accelerator, model, head, train_share, view)
    valid_x, valid_y = head_inputs(accelerator, model, head, valid_share, view)
    peak = max((float(x.abs().max()) for x in (train_x, valid_x) if x.numel()), default=0.0)
    mine = torch.tensor([[float(peak > FP16_MAX), train_x.numel() + valid_x.numel()]], dtype=torch.float64, device=accelerator.device)
    everyone = accelerator.gather(mine).cpu() if accelerator.num_processes > 1 else mine.cpu()
    overflow, values = bool(everyone[:, 0].max() > 0), int(everyone[:, 1].max())
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" or overflow else torch.float16
    device = accelerator.device
    train = FeatureLoader(train_x.to(dtype), train_y, batch_size, device, ShareBatchSampler(len(train_y), steps, seed))
    valid = FeatureLoader(valid_x.to(dtype), valid_y, batch_size * 2, device)
    shape = tuple(train_x.shape[1:])
    return Precomputed(train, valid, time.perf_counter() - t0, dtype, values * torch.finfo(dtype).bits // 8, shape)
