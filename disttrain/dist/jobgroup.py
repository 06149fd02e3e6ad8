"""The collectives that wait for work of unbounded length, on a gloo group of their own without
`train.collective_timeout`: the main process scanning a training folder (it decodes every image) or
listing a million files for `predict` while the others wait for the result, the ranks of an
inference job (`predict`, `evaluate`) that finish their shares minutes apart, and a training run's
checkpoint saves (a large model on a slow filesystem). On the training group, bounded at 300 s,
such a wait would fail the job after (or before) the work was done. This group waits as long as the
work takes; it cannot hang on a dead rank, because a rank that dies ends the job (the launcher, torch
elastic or SLURM, stops the others)."""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from disttrain.errors import UserError

T = TypeVar("T")

WAIT = timedelta(days=30)
"""How long these collectives may wait: longer than any inference job runs."""

_SHARED_ERRORS = UserError  # ConfigError, DataError, WeightsError, CheckpointError


class JobGroup:
    """Every rank builds it at the same point, after the Accelerator (build_trainer, predict,
    evaluate); with one process, every method works locally and nothing is created."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.group = dist.new_group(backend="gloo", timeout=WAIT) if world_size > 1 and dist.is_initialized() else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank is here, however long the slowest takes."""
        if self.group is not None:
            dist.barrier(group=self.group)

    def from_main(self, make: Callable[[], T]) -> T:
        """`make()` runs on the main process only; every rank gets its result, or raises the same
        user error (a UserError: DataError, WeightsError, ConfigError, ...) it raised."""
        payload: list = [None]
        if self.is_main:
            try:
                payload[0] = make()
            except _SHARED_ERRORS as err:
                payload[0] = err
        if self.group is not None:
            dist.broadcast_object_list(payload, src=0, group=self.group)
        if isinstance(payload[0], _SHARED_ERRORS):
            raise payload[0]
        return payload[0]

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """All ranks' sum of a tensor (any device; returned on the CPU). Waits for the slowest rank."""
        values = values.detach().cpu().clone()
        if self.group is not None:
            dist.all_reduce(values, group=self.group)
        return values

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order (on every rank)."""
        if self.group is None:
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out
