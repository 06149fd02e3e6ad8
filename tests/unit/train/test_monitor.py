"""The monitored column: its direction, the early check that the run has it, and early stopping
(patience, min_delta, NaN, the count carried through a checkpoint's state)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from disttrain.config import ConfigError
from disttrain.train.monitor import EarlyStopping, check_monitor, direction, is_better

SINGLE = ("valid_loss", "accuracy", "ema_valid_loss", "ema_accuracy")
MULTI = ("valid_loss", "accuracy_multi", "f2", "threshold")


def test_losses_fall_and_the_rest_rise():
    assert [direction(n) for n in ("valid_loss", "ema_valid_loss")] == ["min", "min"]
    assert [direction(n) for n in ("accuracy", "ema_accuracy", "accuracy_multi", "f2", "ema_f2")] == ["max"] * 5


def test_a_monitor_the_run_lacks_is_refused_naming_the_key_and_the_columns():
    check_monitor("ema_accuracy", SINGLE, "checkpoint.monitor")
    check_monitor("f2", MULTI, "train.early_stop.monitor")
    with pytest.raises(ConfigError, match=r"checkpoint\.monitor: 'ema_accuracy' is not a column .*; use one of valid_loss, accuracy$"):
        check_monitor("ema_accuracy", ("valid_loss", "accuracy"), "checkpoint.monitor")
    with pytest.raises(ConfigError, match=r"train\.early_stop\.monitor: 'accuracy' .* use one of valid_loss, accuracy_multi, f2$"):
        check_monitor("accuracy", MULTI, "train.early_stop.monitor")
    with pytest.raises(ConfigError, match=r"checkpoint\.monitor: 'threshold' is not a measure of quality"):
        check_monitor("threshold", MULTI, "checkpoint.monitor")


def test_nan_never_improves():
    assert not is_better(math.nan, None, "min") and not is_better(math.nan, 1.0, "max")
    assert is_better(1.0, None, "min") and is_better(0.5, 1.0, "min") and not is_better(1.0, 1.0, "min")


def test_stops_after_patience_epochs_without_improvement():
    stop = EarlyStopping("valid_loss", patience=2)
    assert [stop.update(v) for v in (0.9, 0.5, 0.6, 0.5, 0.4, 0.7, math.nan)] == [False, False, False, True, False, False, True]
    assert stop.best == 0.4 and stop.bad_epochs == 2
    assert stop.describe() == "valid_loss has not improved for 2 epoch(s) (best 0.400000)"


def test_max_direction_and_min_delta():
    stop = EarlyStopping("accuracy", patience=2, min_delta=0.01)
    assert stop.update(0.80) is False and stop.best == 0.80
    assert stop.update(0.805) is False and stop.bad_epochs == 1  # not by more than 0.01
    assert stop.update(0.82) is False and stop.bad_epochs == 0 and stop.best == 0.82
    assert stop.update(0.79) is False and stop.update(0.83) is True  # 0.83 - 0.82 is not more than 0.01


def test_no_patience_never_stops_but_keeps_counting():
    stop = EarlyStopping("valid_loss", patience=None)
    assert not any(stop.update(v) for v in (1.0, 2.0, 3.0, 4.0)) and stop.bad_epochs == 3


def test_a_resumed_run_continues_the_count_through_a_checkpoint():
    before = EarlyStopping("ema_valid_loss", patience=3)
    for v in (0.5, 0.6, 0.7):
        before.update(v)
    buf = io.BytesIO()
    torch.save({"early_stop": before.state_dict()}, buf)
    buf.seek(0)
    after = EarlyStopping("ema_valid_loss", patience=3)
    after.load_state_dict(torch.load(buf, weights_only=True)["early_stop"])
    assert (after.best, after.bad_epochs) == (0.5, 2)
    assert after.update(0.55) is True  # the third epoch without improvement, counted across the resume
    other = EarlyStopping("accuracy", patience=3)
    other.load_state_dict(before.state_dict())  # another monitor's count says nothing about this one
    assert (other.best, other.bad_epochs) == (None, 0)
