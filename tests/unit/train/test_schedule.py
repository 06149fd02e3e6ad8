import math

import pytest
import torch

from disttrain.config import ScheduleConfig
from disttrain.train.schedule import Schedule


def _optimizer(lrs=(1e-2, 1e-3)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def _lrs(schedule, total):
    out = []
    for _ in range(total):
        out.append(schedule.get_last_lr())
        schedule.step()
    return out


def test_onecycle_endpoints_peak_and_momentum():
    cfg = ScheduleConfig(name="onecycle", warmup=0.25, div_factor=25, final_div_factor=1e4)
    opt = _optimizer()
    lrs = _lrs(Schedule(opt, cfg, total_steps=100), 100)
    assert math.isclose(lrs[0][0], 1e-2 / 25)
    assert math.isclose(lrs[25][0], 1e-2)
    assert max(lr[0] for lr in lrs) == pytest.approx(1e-2)
    assert math.isclose(lrs[-1][0], 1e-2 / 25 / 1e4)
    assert all(math.isclose(a / b, 10.0) for a, b in lrs), "group LR ratios must be kept"
    sched = Schedule(_optimizer(), cfg, total_steps=100)
    for _ in range(25):
        sched.step()
    assert math.isclose(sched.optimizer.param_groups[0]["momentum"], 0.85)


def test_cosine_with_warmup_and_constant():
    cfg = ScheduleConfig(name="cosine", warmup=0.1, min_lr_ratio=0.0)
    lrs = [lr[0] for lr in _lrs(Schedule(_optimizer(), cfg, total_steps=50), 50)]
    assert lrs[0] < lrs[4] < lrs[5] == pytest.approx(1e-2)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    const = [lr[0] for lr in _lrs(Schedule(_optimizer(), ScheduleConfig(name="constant", warmup=0.0), total_steps=10), 10)]
    assert const == [1e-2] * 10


def test_state_dict_round_trip():
    cfg = ScheduleConfig()
    a = Schedule(_optimizer(), cfg, total_steps=40)
    for _ in range(13):
        a.step()
    b = Schedule(_optimizer(), cfg, total_steps=40)
    b.load_state_dict(a.state_dict())
    assert b.get_last_lr() == a.get_last_lr()


def test_tiny_runs_do_not_divide_by_zero():
    for total in (1, 2, 3):
        lrs = _lrs(Schedule(_optimizer(), ScheduleConfig(), total_steps=total), total)
        assert all(math.isfinite(lr[0]) and lr[0] > 0 for lr in lrs)
