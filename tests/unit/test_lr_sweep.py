import math

import numpy as np
import pytest
import torch

from disttrain.config import ConfigError, SweepConfig, build_config
from disttrain.lr_sweep import DebiasedEMA, minimum, run_curve, slide, steep, suggest, sweep_lrs, valley


def _curve(n=100):
    """A textbook range-test curve: flat up to 1e-5, a smooth fall around 1e-3, then a blow-up."""
    lrs = np.array(sweep_lrs(1e-7, 10, n))
    x = np.log10(lrs)
    loss = 2.3 - 1.5 / (1 + np.exp(-(x + 3) * 3))  # falls around 1e-3, steepest exactly there
    loss = np.where(x < -5, 2.3, loss)  # a flat start (equal values are no descent)
    loss = loss + np.where(x > -1.5, (x + 1.5) ** 2 * 2, 0.0)  # diverges past ~3e-2
    return lrs, loss


def test_sweep_lrs_endpoints_and_geometric_growth():
    lrs = sweep_lrs(1e-7, 10, 100)
    assert lrs[0] == 1e-7 and lrs[-1] == pytest.approx(10, rel=1e-12) and len(lrs) == 100
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, ratios[0])


def test_debiased_ema_is_unbiased_on_a_constant():
    ema = DebiasedEMA(0.98)
    assert [round(ema.update(3.0), 12) for _ in range(5)] == [3.0] * 5
    ema = DebiasedEMA(0.5)
    assert ema.update(2.0) == 2.0
    assert ema.update(4.0) == pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)


def test_steep_finds_the_steepest_descent():
    lrs, loss = _curve()
    assert steep(lrs, loss) == pytest.approx(1e-3, rel=0.2)


def test_minimum_is_a_tenth_of_the_lowest_point():
    lrs, loss = _curve()
    assert minimum(lrs, loss) == pytest.approx(lrs[np.argmin(loss)] / 10)


def test_valley_lies_inside_the_descending_stretch():
    lrs, loss = _curve()
    lr = valley(lrs, loss)
    assert 1e-4 < lr < lrs[np.argmin(loss)]
    # a line falling over the whole range: the run is everything, the pick is ~half way
    line_lrs = np.array(sweep_lrs(1e-4, 1, 31))
    assert valley(line_lrs, np.linspace(3, 1, 31)) == line_lrs[10 + 5]


def test_slide_stops_where_the_slope_settles():
    lrs = np.array(sweep_lrs(1e-5, 1, 60))
    loss = np.concatenate([np.linspace(2.0, 1.0, 40), np.linspace(1.0, 3.0, 20) ** 2])
    lr = slide(lrs, loss)
    assert lrs[20] <= lr <= lrs[40], "inside the straight falling part, left of the blow-up"


def test_no_descent_gives_no_suggestion_and_says_so():
    cfg = SweepConfig(num_iter=50)
    lrs = sweep_lrs(cfg.start_lr, cfg.end_lr, 50)
    values, suggestion, note = suggest(lrs, list(np.linspace(1, 3, 50)), cfg)
    assert suggestion is None and note.startswith("no descent")
    assert values["valley"] is None and values["steep"] is None


def test_skips_and_fallback_are_labelled():
    cfg = SweepConfig(method="slide", skip_start=2, skip_end=1)
    lrs, loss = _curve(12)  # too short for slide's window
    values, suggestion, note = suggest(list(lrs), list(loss), cfg)
    assert values["slide"] is None and note.startswith("fallback to valley")
    assert suggestion == values["valley"]


def _diverging_with_a_dip(cfg):
    """The shape of a real 2-process sweep (demo model, 32 px, AdamW): a gentle fall between 1e-4
    and 1e-3, a climb past 1e-2, and, after a spike near 3, a few good batches that make the
    smoothed loss dip once (the dip that made `steep` answer 4.75 before the rules were cut at the
    minimum). Smoothed and cut by the real sweep loop, as a run would."""
    lrs = np.array(sweep_lrs(cfg.start_lr, cfg.end_lr, cfg.num_iter))
    x = np.log10(lrs)
    raw = 2.3 - 0.9 / (1 + np.exp(-(x + 3.5) * 3))  # 2.3 -> 1.4 around 3e-4
    raw = raw + np.where(x > -2, (x + 2) ** 2, 0.0)  # climbs past 1e-2
    raw = np.where((x > 0.55) & (x < 0.8), 1.5, raw)  # three good batches after the spike
    lrs, _, smoothed, _, _ = _run([list(raw)], cfg)
    return np.array(lrs), np.array(smoothed)


@pytest.mark.parametrize("method", ["valley", "steep", "minimum", "slide"])
def test_no_rule_answers_past_the_minimum_of_the_smoothed_loss(method):
    cfg = SweepConfig(method=method)
    lrs, smoothed = _diverging_with_a_dip(cfg)
    lowest = lrs[int(np.argmin(smoothed))]
    assert 1e-3 < lowest < 1e-1 and np.any(np.diff(smoothed[lrs > lowest]) < 0), "a dip after the minimum"
    assert steep(lrs[5:-2], smoothed[5:-2]) > 1, "on the whole curve steep lands in the dip: the case is real"
    values, suggestion, note = suggest(list(lrs), list(smoothed), cfg)
    assert note is None and suggestion == values[method]
    assert all(v is not None and v <= lowest for v in values.values()), values
    assert 1e-4 < values["steep"] < 1e-2 and 1e-5 < values["valley"] < lowest


def _run(losses_per_rank, cfg):
    """run_curve fed rank 0's losses, with the sum an all-reduce over every rank would return."""
    current = {}

    def step(i, lr):
        current["i"] = i
        return torch.tensor(losses_per_rank[0][i], dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)

    def reduce_sum(mine):
        return torch.tensor([sum(losses[current["i"]] for losses in losses_per_rank), 0.0], dtype=torch.float64)

    return run_curve(step, reduce_sum, len(losses_per_rank), cfg)


def test_stop_is_decided_on_the_mean_loss():
    cfg = SweepConfig(num_iter=40, beta=0.0, divergence=4.0, skip_start=0, skip_end=0)
    calm = [1.0] * 40
    spiky = [1.0] * 10 + [5.0] * 30  # alone, this rank would stop at step 10 (5 > 4 x 1)
    lrs, losses, smoothed, local, stopped = _run([calm, spiky], cfg)
    assert not stopped and len(lrs) == 40, "mean (3.0) never exceeds 4 x best (1.0)"
    assert losses[15] == 3.0 and local[15] == 1.0
    lrs, losses, smoothed, local, stopped = _run([spiky], cfg)
    assert stopped and len(lrs) == 11


def test_non_finite_loss_stops_at_once():
    cfg = SweepConfig(num_iter=20, skip_start=0, skip_end=0)
    lrs, losses, smoothed, local, stopped = _run([[math.nan] * 20], cfg)
    assert len(lrs) == 1 and stopped and math.isnan(smoothed[0])


@pytest.mark.parametrize(
    "override, expected",
    [("sweep.start_lr=10", r"sweep\.start_lr \(10\.0\) must be below sweep\.end_lr"),
     ("sweep.num_iter=5", r"sweep\.num_iter: 5 is too few"),
     ("sweep.method=magic", r"sweep\.method")],
)
def test_bad_sweep_config(override, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config({}, [override])
    assert build_config({}, ["optim.lr=auto"]).optim.lr == "auto"
