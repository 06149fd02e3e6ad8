"""MixUp and CutMix of a normalized batch on the device, per sample, with the targets mixed alike.

Each sample of the batch is paired with the sample a random permutation of the batch gives it, so
any batch size works (an odd per-rank batch on uneven data included); a sample that the
permutation pairs with itself, or that is not drawn for mixing (`mix_prob`), keeps its image and
target. A mixed sample takes CutMix (a box of its partner's pixels) or MixUp (a blend with its
partner), each with its own lam from Beta(alpha, alpha); CutMix's lam is then the exact share of
the sample's own pixels left after the box is clipped to the image, so the targets say what the
pixels hold. Both are applied as one weight tensor per sample, one `torch.lerp` for the batch:
a constant lam per sample for MixUp, a 0/1 mask for CutMix.

All random draws come from this object's own numpy PCG64 generator on the CPU (a few numbers per
sample), so a seed gives the same mixing on any device, and `state_dict` resumes it to the bit.
The targets are the task's soft rows (label smoothing folded in, disttrain/task.py) mixed by lam:
the training loss is against them; validation never goes through here.
"""

from __future__ import annotations

import numpy as np
import torch

from disttrain.config import AugmentConfig
from disttrain.task import Task


class Mixer:
    """MixUp / CutMix of training batches (augment.mixup, augment.cutmix and the mix_* keys)."""

    def __init__(self, cfg: AugmentConfig, task: Task, seed: int):
        """`seed`: this rank's own (the mixing of each rank's batch is its own)."""
        self.cfg = cfg
        self.task = task
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.last_lam: np.ndarray = np.ones(0)
        """The per-sample lam of the last call (float64: 1 for a sample left as it was)."""
        self.last_perm: np.ndarray = np.arange(0)
        """The partner of each sample in the last call (a permutation of the batch)."""

    @property
    def on(self) -> bool:
        return self.cfg.mixup > 0 or self.cfg.cutmix > 0

    def enabled(self, epoch: int) -> bool:
        """Whether the batches of this epoch (0-based, of the run) are mixed: mixup or cutmix on, and
        the epoch before augment.mix_off_epoch."""
        return self.on and (self.cfg.mix_off_epoch is None or epoch < self.cfg.mix_off_epoch)

    def describe(self) -> str:
        """A one-liner for the "training on" line, e.g. `MixUp alpha 0.2 / CutMix alpha 1.0, switch
        0.5, p 1.0, off from epoch 8`; `off` when neither is on."""
        cfg = self.cfg
        if not self.on:
            return "off"
        parts = []
        if cfg.mixup > 0:
            parts.append(f"MixUp alpha {float(cfg.mixup)}")
        if cfg.cutmix > 0:
            box = (f"box {float(cfg.cutmix_minmax[0])}-{float(cfg.cutmix_minmax[1])} of the side" if cfg.cutmix_minmax is not None
                   else f"alpha {float(cfg.cutmix)}")
            parts.append(f"CutMix {box}")
        text = " / ".join(parts)
        if cfg.mixup > 0 and cfg.cutmix > 0:
            text += f", switch {float(cfg.mix_switch_prob)}"
        text += f", p {float(cfg.mix_prob)}"
        if cfg.mix_off_epoch is not None:
            text += f", off from epoch {cfg.mix_off_epoch}"
        return text

    def state_dict(self) -> dict:
        """The generator's state as plain python types (torch.load(weights_only=True) reads it)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def _draw(self, n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The batch's draws, in a fixed order: partners, who is mixed, who takes CutMix, MixUp's lam,
        CutMix's box sizes and places. Returns the permutation, lam (float64, 1 = unchanged), the
        CutMix flag and the boxes (n, 4: top, bottom, left, right; empty for non-CutMix samples)."""
        cfg, rng = self.cfg, self.rng
        perm = rng.permutation(n)
        mixed = (rng.random(n) < cfg.mix_prob) & (perm != np.arange(n))
        if cfg.mixup > 0 and cfg.cutmix > 0:
            cut = rng.random(n) < cfg.mix_switch_prob
        else:
            cut = np.full(n, cfg.cutmix > 0)
        cut &= mixed
        lam = np.ones(n)
        if cfg.mixup > 0:
            lam = np.where(mixed & ~cut, rng.beta(cfg.mixup, cfg.mixup, n), 1.0)
        boxes = np.zeros((n, 4), dtype=np.int64)
        if cfg.cutmix > 0:
            size = np.array([height, width])
            if cfg.cutmix_minmax is None:
                # side ratio sqrt(1 - lam) of each side, centred anywhere in the image, then clipped
                ratio = np.sqrt(1.0 - rng.beta(cfg.cutmix, cfg.cutmix, n))
                sides = (ratio[:, None] * size).astype(np.int64)
                centres = rng.integers(0, size, size=(n, 2))
                low = np.clip(centres - sides // 2, 0, size)
                high = np.clip(centres - sides // 2 + sides, 0, size)
            else:
                # each side a uniform fraction in [min, max] of the image's side, the box placed inside it
                sides = (rng.uniform(*cfg.cutmix_minmax, size=(n, 2)) * size).astype(np.int64)
                low = rng.integers(0, size - sides + 1, size=(n, 2))
                high = low + sides
            boxes = np.where(cut[:, None], np.stack([low[:, 0], high[:, 0], low[:, 1], high[:, 1]], axis=1), 0)
            area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
            lam = np.where(cut, 1.0 - area / (height * width), lam)
        return perm, lam, cut, boxes

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a float normalized (N, C, H, W) batch (any device and memory format, kept) and its
        targets (int64 labels or uint8 multi-hot rows). Returns the mixed batch and its float32
        (N, classes) soft targets: lam x own + (1 - lam) x partner's, label smoothing folded in.
        The caller asks `enabled(epoch)` first; with mixup and cutmix off nothing is drawn."""
        soft = self.task.soft_targets(targets.to(x.device))
        n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        if not self.on:
            self.last_lam, self.last_perm = np.ones(n), np.arange(n)
            return x, soft
        perm, lam, cut, boxes = self._draw(n, height, width)
        self.last_lam, self.last_perm = lam, perm
        if not (lam < 1).any():
            return x, soft
        device = x.device
        lam_t = torch.from_numpy(lam).to(device=device, dtype=torch.float32)
        perm_t = torch.from_numpy(perm).to(device)
        if cut.any():
            # one 0/1 mask per sample: 0 inside its box (the partner's pixels), 1 elsewhere; MixUp's
            # and unmixed samples' rows are their constant lam
            box = torch.from_numpy(boxes).to(device)
            rows = torch.arange(height, device=device)
            cols = torch.arange(width, device=device)
            in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])
            in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])
            inside = in_rows[:, :, None] & in_cols[:, None, :]
            cut_t = torch.from_numpy(cut).to(device)[:, None, None]
            weight = torch.where(cut_t, (~inside).to(x.dtype), lam_t.to(x.dtype)[:, None, None]).unsqueeze(1)
        else:
            weight = lam_t.to(x.dtype).view(n, 1, 1, 1)
        mixed = torch.empty_like(x)  # the input's memory format (channels_last stays so)
        torch.lerp(x[perm_t], x, weight, out=mixed)
        return mixed, torch.lerp(soft[perm_t], soft, lam_t[:, None])
