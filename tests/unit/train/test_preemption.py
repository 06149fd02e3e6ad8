"""Preemption before training: the LR sweep stops on any rank's flag (it rides on the sweep's one
all-reduce per step), and the line every rank ends with. The real signal, on the real SLURM
cluster, at each point: tests/slurm/test_slurm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from disttrain.train.checkpoint import Preempted
from disttrain.config import SweepConfig
from disttrain.train.lr_sweep import SweepInterrupted, run_curve


def test_the_sweep_stops_after_the_step_where_any_rank_was_signalled():
    """This rank never got the signal; the other (its share of the all-reduce added here) got it
    during step 4: every rank stops after that step's reduce, as this one does."""
    cfg = SweepConfig(num_iter=10, beta=0.0, skip_start=0, skip_end=0)
    steps = []

    def step(i, lr):
        steps.append(i)
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)

    def reduce_sum(mine):
        other = torch.tensor([1.0, 0.0, float(steps[-1] >= 3)], dtype=torch.float64)
        return mine + other

    with pytest.raises(SweepInterrupted, match="after step 4 of 10") as stop:
        run_curve(step, reduce_sum, 2, cfg, stop=lambda: False)
    assert steps == [0, 1, 2, 3] and (stop.value.step, stop.value.of) == (4, 10)
    lrs, *_ = run_curve(step, lambda t: t.clone(), 1, cfg, stop=lambda: False)  # no flag anywhere: all of it
    assert len(lrs) == 10


def test_the_line_says_what_was_saved():
    assert str(Preempted(None, saved=False, where="during the data scan")) == (
        "preempted during the data scan, before the first checkpoint: nothing to save yet")
    path = Path("runs/x/checkpoints/step-00000004-stage1")
    assert str(Preempted(path, saved=False, where="after the LR sweep of head")) == (
        f"preempted after the LR sweep of head: nothing to save since checkpoint {path}")
    assert str(Preempted(path)) == f"preempted: checkpoint saved in {path}"
