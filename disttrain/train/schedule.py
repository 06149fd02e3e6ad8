"""LR schedules stepped once per optimizer step: one-cycle (with momentum cycling, as fastai),
cosine with linear warmup, constant, and SGDR (cosine annealing with warm restarts, cycles ending on
epoch boundaries). Each group's LR is its base LR times the same factor, so the
ratios between parameter groups (differential learning rates) are kept."""

from __future__ import annotations

import math

import torch

from disttrain.config import ScheduleConfig

MOMENTUM_HIGH, MOMENTUM_LOW = 0.95, 0.85


def _cos(start: float, end: float, pct: float) -> float:
    """Cosine interpolation from `start` (pct=0) to `end` (pct=1)."""
    return end + (start - end) * (1 + math.cos(math.pi * min(max(pct, 0.0), 1.0))) / 2


class Schedule:
    """Sets `lr` (and for one-cycle the momentum / AdamW beta1) of every param group from the number
    of optimizer steps taken. `step()` after each optimizer step; `state_dict()` for checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int | None = None):
        """`steps_per_epoch`: optimizer steps per epoch, which SGDR needs to end its cycles on epoch
        boundaries (defaults to all steps in one epoch)."""
        if total_steps < 1:
            raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch or total_steps
        self.warmup_steps = 0 if cfg.name == "sgdr" else int(round(cfg.warmup * total_steps))
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps_done = 0
        self._apply()

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base LR at optimizer step `step` (0-based)."""
        cfg, warm = self.cfg, self.warmup_steps
        if cfg.name == "onecycle":
            low = 1.0 / cfg.div_factor
            if step < warm:
                return _cos(low, 1.0, step / warm)
            return _cos(1.0, low / cfg.final_div_factor, (step - warm) / max(1, self.total_steps - 1 - warm))
        if cfg.name == "sgdr":
            start, length = self.cycle(step)
            return _cos(1.0, cfg.min_lr_ratio, (step - start) / max(1, length - 1))
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.name == "cosine":
            return _cos(1.0, cfg.min_lr_ratio, (step - warm) / max(1, self.total_steps - 1 - warm))
        return 1.0

    def cycle(self, step: int) -> tuple[int, int]:
        """SGDR: (first step, length in steps) of the cycle holding `step`: cycle c lasts
        cycle_len x cycle_mult^c epochs; steps past the last cycle stay in it."""
        start, epochs = 0, self.cfg.cycle_len
        while start + epochs * self.steps_per_epoch <= step and start + epochs * self.steps_per_epoch < self.total_steps:
            start += epochs * self.steps_per_epoch
            epochs *= self.cfg.cycle_mult
        return start, epochs * self.steps_per_epoch

    def ended_cycle(self) -> int | None:
        """SGDR: the index (0-based) of the cycle the steps taken so far have just completed; None
        in the middle of a cycle, or for the other schedules."""
        done = self.steps_done
        if self.cfg.name != "sgdr" or done == 0:
            return None
        start, length = self.cycle(done - 1)
        if done != min(start + length, self.total_steps):
            return None
        index, first = 0, 0
        while first < start:
            first = sum(self.cycle(first))
            index += 1
        return index

    def momentum(self, step: int) -> float | None:
        """One-cycle momentum: high -> low while the LR rises, back to high as it falls."""
        if self.cfg.name != "onecycle":
            return None
        warm = self.warmup_steps
        if step < warm:
            return _cos(MOMENTUM_HIGH, MOMENTUM_LOW, step / warm)
        return _cos(MOMENTUM_LOW, MOMENTUM_HIGH, (step - warm) / max(1, self.total_steps - 1 - warm))

    def _apply(self) -> None:
        step = min(self.steps_done, self.total_steps - 1)
        factor, momentum = self.lr_factor(step), self.momentum(step)
        for base, group in zip(self.base_lrs, self.optimizer.param_groups):
            group["lr"] = base * factor
            if momentum is not None:
                if "betas" in group:
                    group["betas"] = (momentum, group["betas"][1])
                elif group.get("momentum", 0) > 0:
                    group["momentum"] = momentum

    def set_peak_lr(self, lr: float) -> None:
        """Make `lr` the highest group's peak LR, keeping the ratios between groups (used by
        optim.lr=auto once the sweep has suggested a rate)."""
        top = max(self.base_lrs)
        self.base_lrs = [lr * base / top for base in self.base_lrs]
        self._apply()

    def step(self) -> None:
        self.steps_done += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "base_lrs": list(self.base_lrs), "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = state["steps_done"]
        self.base_lrs = list(state["base_lrs"])
        self._apply()
