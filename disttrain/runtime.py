"""The one place that builds the Accelerator: device choice, precision, accumulation, seeds."""

from __future__ import annotations

import random

import numpy as np
import torch
from datetime import timedelta

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from disttrain.config import Config, ConfigError


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this machine: CPU (gloo) when CUDA is absent, precision from the config.

    Works under `accelerate launch`, `torchrun` and plain `python` (one process). Gradient
    accumulation (`train.grad_accum`) is done by the Trainer with `no_sync` over exactly the
    micro-batches of each group (also the shorter last group of an epoch), so Accelerate's own
    accumulation counter, which would divide the loss a second time, is left at 1.
    """
    cuda = torch.cuda.is_available()
    if cfg.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA device; use train.precision=bf16 on CPU")
    return Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.train.precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout))],
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Call with the same seed on every rank before the
    model is built so every rank starts from identical weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A seed for `rank`'s own random stream (augmentation), distinct per rank and per stream."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % 2**63
