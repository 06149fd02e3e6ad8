"""Precomputed activations (the lesson's `precompute=True`): the frozen body's output, computed once
per image, on which a stage trains and sweeps only the head.

Each rank runs the body (eval mode, the validation view) over its own share of the images, every
sample once across ranks. Training batches must be the ones the image path would draw, so the
ranks' training activations are all-gathered (a few KB per image) and `FeatureLoader` draws batches
with the same `RankBatchSampler` as the image loader; validation keeps each rank's own share, so
its metrics are exact as always.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from disttrain.data.loader import RankBatchSampler


class FeatureLoader:
    """The trainer's loader interface (`set_epoch`, `len`, `iter`, `take_skipped`, `epoch`,
    `batch_size`) over activations held on the device: batched by a `RankBatchSampler` (training),
    or in order (`sampler=None`: this rank's own validation share)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: RankBatchSampler | None = None):
        self.features = features
        self.labels = labels
        self.sampler = sampler
        self.batch_size = batch_size
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            for start in range(0, len(self.labels), self.batch_size):
                yield self.features[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            return
        for batch in self.sampler:
            index = torch.as_tensor(batch, device=self.features.device)
            yield self.features[index], self.labels[index]


def head_inputs(accelerator, model: nn.Module, head: nn.Module, loader, view) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of `head`, labels) for every batch `loader` gives this rank, in order: the model runs
    in eval mode under the run's autocast and the head's input is caught by a forward pre-hook."""
    caught: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: caught.append(args[0].detach().float()))
    labels = []
    model.eval()
    try:
        with torch.no_grad():
            for images, batch_labels in loader:
                with accelerator.autocast():
                    model(view(images, train=False))
                labels.append(batch_labels)
    finally:
        hook.remove()
    device = accelerator.device
    if not caught:
        return torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(caught), torch.cat(labels)


def gather_in_order(features: torch.Tensor, labels: torch.Tensor, indices: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, labels) of dataset `indices`, placed at their index: the whole set
    on every rank (one all_gather_object; activations are small)."""
    mine = (indices, features.cpu(), labels.cpu())
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    width = next(part[1].shape[1:] for part in parts if len(part[0]))
    all_features = torch.zeros((total, *width), dtype=features.dtype)
    all_labels = torch.full((total,), -1, dtype=torch.long)
    for idx, feats, labs in parts:
        all_features[idx] = feats
        all_labels[idx] = labs
    if (all_labels < 0).any():
        raise RuntimeError("precompute: some training images have no activations after the gather; this is a bug")
    return all_features.to(features.device), all_labels.to(features.device)


def precompute(trainer, head: nn.Module, eval_train, train_sampler: RankBatchSampler, valid_loader, view, batch_size: int):
    """(train FeatureLoader, valid FeatureLoader, seconds): the body's output for this rank's share of
    the training images (`eval_train`: a loader over them, in the order of `train_sampler`'s
    unshuffled share) gathered from all ranks, and for its own validation images."""
    acc = trainer.accelerator
    t0 = time.perf_counter()
    features, labels = head_inputs(acc, trainer.module, head, eval_train, view)
    share = [i for batch in eval_train.source for i in batch]
    all_features, all_labels = gather_in_order(features, labels, share, train_sampler.num_samples)
    train = FeatureLoader(all_features, all_labels, batch_size, train_sampler)
    valid = FeatureLoader(*head_inputs(acc, trainer.module, head, valid_loader, view), batch_size * 2)
    return train, valid, time.perf_counter() - t0
