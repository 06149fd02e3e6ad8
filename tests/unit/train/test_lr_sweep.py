import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.config import ConfigError, SweepConfig
from disttrain.models.checks import build_config
from disttrain.train.lr_sweep import DebiasedEMA, minimum, run_curve, slide, steep, suggest, sweep_lrs, useful_part, valley

FIXTURE = Path(__file__).parents[2] / "data" / "fastai_lr_rules.json"
# what tests/data/fastai_lr_rules.json holds (counted once; regenerating the fixture changes them):
FIXTURE_CURVES = 242
FIXTURE_NO_ANSWER = {"valley": 38, "slide": 28, "minimum": 115, "steep": 21}  # fastai: the first or last point
FIXTURE_FASTAI_RAISED = {"valley": 0, "slide": 38, "minimum": 0, "steep": 0}  # slide: 15 points or fewer
FIXTURE_STEEP_PAST_LOWEST = 31


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
    slope = np.diff(loss) / np.diff(np.log(lrs))  # fastai's: forward differences per log LR, the left point
    assert steep(lrs, loss) == lrs[np.argmin(slope)]


def test_minimum_is_a_tenth_of_the_lowest_point():
    lrs, loss = _curve()
    assert minimum(lrs, loss) == lrs[np.argmin(loss)] / 10
    falling = np.linspace(3, 1, 30)
    assert minimum(lrs[:30], falling) is None, "the lowest point is the last one: the loss was still falling"
    assert minimum(lrs[:30], falling[::-1]) is None, "the lowest point is the first one"


def test_valley_lies_inside_the_descending_stretch():
    lrs, loss = _curve()
    lr = valley(lrs, loss)
    assert 1e-4 < lr < lrs[np.argmin(loss)]
    # a line falling over the whole range: the run is all 31 points and starts "one before" point 0
    # (fastai counts the run's length from 1), so the pick is -1 + int(31/3) + int(31/6) = 14
    line_lrs = np.array(sweep_lrs(1e-4, 1, 31))
    assert valley(line_lrs, np.linspace(3, 1, 31)) == line_lrs[14]


def test_valley_at_an_edge_is_no_answer():
    lrs = np.array(sweep_lrs(1e-5, 1, 20))
    # a two-point fall, then a climb: the longest run is points 0-1, fastai's index is
    # -1 + int(2/3) + int(1/3) = -1, which fastai reads as lrs[-1], the top of the climb
    climb = np.concatenate([[3.0, 2.0], np.linspace(2.5, 4.0, 18)])
    assert valley(lrs, climb) is None
    assert steep(lrs, climb) is None, "the only fall is from the first point"
    cfg = SweepConfig(num_iter=20, skip_start=0, skip_end=0)
    values, suggestion, note = suggest(list(lrs), list(climb), cfg)
    assert note == "fallback to minimum: valley answered the last point of the curve"
    assert suggestion == values["minimum"] == lrs[1] / 10
    assert valley(lrs[:1], climb[:1]) is None and valley(lrs, np.linspace(1, 2, 20)) is None, "one point; no fall: index 0"


def test_slide_stops_where_the_slope_settles():
    lrs = np.array(sweep_lrs(1e-5, 1, 60))
    loss = np.concatenate([np.linspace(2.0, 1.0, 40), np.linspace(1.0, 3.0, 20) ** 2])
    lr = slide(lrs, loss)
    assert lrs[20] <= lr <= lrs[40], "inside the straight falling part, left of the blow-up"
    # fastai's threshold is on the loss change per point, not per log LR: a gentle curve (slope per
    # point changing by 0.004 over the window) counts as settled however close the LRs are
    gentle = 2.0 - 0.004 / 15 * np.arange(60) ** 2 / 2
    assert slide(lrs, gentle) == lrs[60 - 1 - 15]


def test_slide_walking_to_the_first_point_is_no_answer():
    lrs = np.array(sweep_lrs(1e-5, 1, 40))
    bowl = 3.0 - 0.01 * np.arange(40) ** 2 / 2  # the slope changes by 0.15 over every window: never settles
    assert slide(lrs, bowl) is None, "fastai would answer lrs[0]"
    assert slide(lrs[:15], bowl[:15]) is None, "15 points: fastai's lrs[-16] does not exist"
    values, suggestion, note = suggest(list(lrs), list(bowl), SweepConfig(num_iter=40, method="slide"))
    assert note == "fallback to valley: slide answered the first point of the curve"
    assert suggestion == values["valley"] is not None


def test_no_descent_gives_no_suggestion_and_says_so():
    cfg = SweepConfig(num_iter=50)
    lrs = sweep_lrs(cfg.start_lr, cfg.end_lr, 50)
    values, suggestion, note = suggest(lrs, list(np.linspace(1, 3, 50)), cfg)
    assert suggestion is None and note.startswith("no descent")
    assert values["valley"] is None and values["steep"] is None and values["minimum"] is None
    slide_cfg = SweepConfig(num_iter=50, method="slide")
    values, suggestion, note = suggest(lrs, list(np.linspace(1, 3, 50)), slide_cfg)
    assert values["slide"] is not None, "on a straight rising line fastai's slide settles at once"
    assert suggestion is None and note.startswith("no descent"), "disttrain's own: no suggestion from a curve that never fell"


def test_skips_and_fallback_are_labelled():
    cfg = SweepConfig(method="slide", skip_start=2, skip_end=1)
    lrs, loss = _curve(12)  # too short for slide's window
    values, suggestion, note = suggest(list(lrs), list(loss), cfg)
    assert values["slide"] is None and note == "fallback to valley: slide needs more than 15 points, the curve has 9"
    assert suggestion == values["valley"]


def test_the_rules_see_the_curve_fastais_lr_find_gives_them():
    """Default settings: [num_iter // 10 : -5] of the recorded points, cut at the first non-finite
    smoothed loss; steps the fp16 scaler skipped (None) are left out after that."""
    cfg = SweepConfig(num_iter=100)
    assert (cfg.skip_start, cfg.skip_first, cfg.skip_end) == (None, 10, 5)
    assert SweepConfig(num_iter=50).skip_first == 5 and SweepConfig(num_iter=50, skip_start=0).skip_first == 0
    lrs = sweep_lrs(cfg.start_lr, cfg.end_lr, 100)
    smoothed = [3.0 - i / 100 for i in range(100)]
    x, y = useful_part(lrs, smoothed, cfg.skip_first, cfg.skip_end)
    assert x.tolist() == lrs[10:95] and y.tolist() == smoothed[10:95]
    x, _ = useful_part(lrs[:60], smoothed[:60], cfg.skip_first, cfg.skip_end)
    assert x.tolist() == lrs[10:55], "an early stop: the last 5 recorded points go"
    holes = smoothed[:40] + [math.nan] + smoothed[41:]
    holes[20] = None
    x, _ = useful_part(lrs, holes, cfg.skip_first, cfg.skip_end)
    assert x.tolist() == lrs[10:20] + lrs[21:40], "skipped step 20 left out, cut before the NaN at 40"
    values, suggestion, note = suggest(lrs[:15], smoothed[:15], cfg)
    assert suggestion is None and set(values.values()) == {None}
    assert note.startswith("too short a curve: no point left of the 15 recorded after leaving out the first 10 and last 5")


def _diverging_with_a_dip(cfg):
    """The shape of a real 2-process sweep (demo model, 32 px, AdamW): a gentle fall between 1e-4
    and 1e-3, a climb past 1e-2, and, after a spike near 3, a few good batches that make the
    smoothed loss dip once (the dip that made `steep` answer 4.75 before it was cut at the
    minimum). Smoothed and cut by the real sweep loop, as a run would."""
    lrs = np.array(sweep_lrs(cfg.start_lr, cfg.end_lr, cfg.num_iter))
    x = np.log10(lrs)
    raw = 2.3 - 0.9 / (1 + np.exp(-(x + 3.5) * 3))  # 2.3 -> 1.4 around 3e-4
    raw = raw + np.where(x > -2, (x + 2) ** 2, 0.0)  # climbs past 1e-2
    raw = np.where((x > 0.55) & (x < 0.8), 1.5, raw)  # three good batches after the spike
    lrs, _, smoothed, _, _ = _run([list(raw)], cfg)
    return np.array(lrs), np.array(smoothed)


@pytest.mark.parametrize("method", ["valley", "steep", "minimum", "slide"])
def test_steep_does_not_answer_past_the_minimum_of_the_smoothed_loss(method):
    """steep is searched only up to the lowest smoothed loss (disttrain's own). valley, slide and
    minimum are fastai's on the whole trimmed curve: minimum cannot lie past the lowest point, and on
    this curve valley and slide do not either (valley's run ends at the lowest point, slide settles
    inside the fall), but nothing but the curve keeps them there."""
    cfg = SweepConfig(method=method)
    lrs, smoothed = _diverging_with_a_dip(cfg)
    x, y = useful_part(list(lrs), list(smoothed), cfg.skip_first, cfg.skip_end)
    lowest = x[int(np.argmin(y))]
    assert 1e-3 < lowest < 1e-1 and np.any(np.diff(y[x > lowest]) < 0), "a dip after the minimum, inside the trimmed curve"
    fastai_steep = x[np.argmin(np.diff(y) / np.diff(np.log(x)))]
    assert fastai_steep > 1, "fastai's steep lands in the dip: the case is real"
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
        return torch.tensor([sum(losses[current["i"]] for losses in losses_per_rank), 0.0, 0.0], dtype=torch.float64)

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
     ("sweep.method=magic", r"sweep\.method"),
     ("sweep.skip_start=-1", r"sweep\.skip_start: must be >= 0, got -1"),
     ("sweep.num_iter=10", None),
     ("sweep.skip_end=88", r"sweep\.skip_start \+ sweep\.skip_end \(10 \+ 88\) leave no curve of sweep\.num_iter=100 points")],
)
def test_bad_sweep_config(override, expected):
    if expected is None:  # the smallest sweep keeps a curve with the default skips (1 + 5 of 10)
        assert build_config({}, [override]).sweep.skip_first == 1
        return
    with pytest.raises(ConfigError, match=expected):
        build_config({}, [override])
    assert build_config({}, ["optim.lr=auto"]).optim.lr == "auto"


def _float32(values):
    """The fixture's values as the float32 numbers fastai was fed, as Python floats (NaN stays NaN)."""
    return np.array(values, dtype=np.float32).astype(np.float64).tolist()


def test_rules_give_fastais_answers_on_the_fixture_curves():
    """tests/data/fastai_lr_rules.json (benchmarks/peers/fastai_lr_rules.py): synthetic and real curves
    with fastai 2.8's own answers, through fastai's Learner.lr_find code path. With default settings
    `suggest` looks at exactly the points fastai's functions were fed, and valley, slide and minimum
    answer exactly fastai's LR, except where fastai's answer is the fed curve's first or last point
    (or fastai raised: too few points), which is no answer here. steep is fastai's wherever fastai's
    lies at or before the lowest smoothed loss; past it, steep stays at or before it (or none)."""
    data = json.loads(FIXTURE.read_text())
    assert data["fastai"].startswith("2.8.")
    curves = data["curves"]
    no_answer = {rule: 0 for rule in ("valley", "slide", "minimum", "steep")}
    fastai_raised = {rule: 0 for rule in no_answer}
    steep_past_lowest = 0
    for curve in curves:
        lrs, smoothed, name = _float32(curve["lrs"]), _float32(curve["smoothed"]), curve["name"]
        cfg = SweepConfig(num_iter=curve["num_iter"])
        x, y = useful_part(lrs, smoothed, cfg.skip_first, cfg.skip_end)
        a, b = curve["fed"] or (0, 0)
        assert x.tolist() == lrs[a:b] and y.tolist() == smoothed[a:b], f"{name}: not the points fastai was fed"
        values, _, _ = suggest(lrs, smoothed, cfg)
        fastai = curve["fastai"]
        for rule in ("valley", "slide", "minimum", "steep"):
            answer = fastai[rule]
            if "error" in answer:
                fastai_raised[rule] += 1
                assert values[rule] is None, (name, rule, answer)
                continue
            if rule == "steep" and answer["index"] > fastai["minimum"]["index"]:  # fastai's minimum index: the lowest point
                steep_past_lowest += 1
                assert values["steep"] is None or values["steep"] <= x[fastai["minimum"]["index"]], name
                continue
            if answer["index"] in (0, b - a - 1):
                no_answer[rule] += 1
                assert values[rule] is None, (name, rule, answer)
            else:
                assert values[rule] == answer["lr"], (name, rule, values[rule], answer)
    # the counts of this fixture: every rule meets both cases, and most curves get a real answer
    assert len(curves) == FIXTURE_CURVES
    assert no_answer == FIXTURE_NO_ANSWER and fastai_raised == FIXTURE_FASTAI_RAISED
    assert steep_past_lowest == FIXTURE_STEEP_PAST_LOWEST
