"""The epoch table's column a run watches (checkpoint.monitor for the best checkpoints,
train.early_stop.monitor for stopping): which way is better, whether the run has that column, and
the early-stopping count.

Pure Python floats, no communication: the figure fed in is the validation result all-reduced over
the ranks, the same number on every rank, so every rank ranks alike and stops at the same epoch end
without another collective."""

from __future__ import annotations

import math
from typing import Literal

from disttrain.config import ConfigError

Direction = Literal["min", "max"]

NOT_MEASURES = ("threshold",)
"""Columns of the table that are no measure of quality (multi-label's tuned threshold): never watched."""


def direction(name: str) -> Direction:
    """`min` for a loss (a name ending in `loss`: valid_loss, ema_valid_loss), `max` for the rest
    (accuracy, accuracy_multi, f2, the EMA's)."""
    return "min" if name.endswith("loss") else "max"


def check_monitor(name: str, columns: tuple[str, ...], key: str) -> None:
    """Refuse, before training, a `key` (checkpoint.monitor, train.early_stop.monitor) that names no
    column of this run's epoch table (`columns`: valid_loss, the task's, the EMA's when it is on)."""
    usable = tuple(c for c in columns if c not in NOT_MEASURES)
    if name in NOT_MEASURES and name in columns:
        raise ConfigError(f"{key}: {name!r} is not a measure of quality; use one of {', '.join(usable)}")
    if name not in usable:
        raise ConfigError(f"{key}: {name!r} is not a column of this run's epoch table; use one of {', '.join(usable)}")


def is_better(value: float, than: float | None, mode: Direction, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `than` (None: nothing yet) by more than `min_delta` in `mode`'s
    direction. NaN never improves."""
    if math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value < than - min_delta if mode == "min" else value > than + min_delta


class EarlyStopping:
    """train.early_stop: `update` once per epoch end with the monitored figure; True once `patience`
    epochs in a row brought no improvement larger than `min_delta` (patience None: never). Every
    rank holds its own and feeds it the same all-reduced figure, so all of them say stop at the same
    epoch. `state_dict` goes into the checkpoint: a resumed run continues the count."""

    def __init__(self, monitor: str, patience: int | None, min_delta: float = 0.0):
        self.monitor = monitor
        self.mode = direction(monitor)
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.bad_epochs = 0  # epoch ends since the last improvement

    def update(self, value: float) -> bool:
        """Record one epoch's figure; whether to stop now."""
        value = float(value)
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def describe(self) -> str:
        """Why a run stops early (the trainer's line says when)."""
        best = "none yet" if self.best is None else f"{self.best:.6f}"
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return f"{self.monitor} has not improved{by} for {self.bad_epochs} epoch(s) (best {best})"

    def state_dict(self) -> dict:
        return {"monitor": self.monitor, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved count. A count kept for another monitor says nothing about this one: it
        is ignored and the count starts afresh."""
        if state.get("monitor") != self.monitor:
            return
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
