"""`optim.lr=auto` and `--find-lr` through the real entry points."""

import json
import math

import pytest
import torch

from conftest import launch
from disttrain.train.checkpoint import load_checkpoint
from disttrain.models.checks import load_config
from disttrain.train.lr_sweep import DebiasedEMA, suggest, sweep_lrs
from disttrain.train.schedule import Schedule

pytestmark = pytest.mark.e2e

NUM_ITER = 20
SMALL_SWEEP = [f"sweep.num_iter={NUM_ITER}", "sweep.start_lr=1e-5", "sweep.end_lr=1", "sweep.skip_start=2", "sweep.skip_end=1"]


def check_curve(sweep: dict, cfg) -> None:
    """What `lr_sweep.json` says is what its curve shows: the LRs of the exponential schedule, the
    debiased EMA of the losses, a stop exactly at the first divergent point (or none), and the
    method's suggestion computed on that curve."""
    n = sweep["iterations"]
    assert len(sweep["lrs"]) == len(sweep["losses"]) == len(sweep["smoothed"]) == n >= 2
    assert sweep["lrs"] == pytest.approx(sweep_lrs(cfg.start_lr, cfg.end_lr, cfg.num_iter)[:n], rel=1e-12)
    ema = DebiasedEMA(cfg.beta)
    assert sweep["smoothed"] == pytest.approx([ema.update(loss) for loss in sweep["losses"]], rel=1e-12)
    best, stop = math.inf, None
    for i, value in enumerate(sweep["smoothed"]):
        if not math.isfinite(value) or value > cfg.divergence * best:
            stop = i
            break
        best = min(best, value)
    if stop is None:
        assert n == cfg.num_iter and not sweep["stopped_early"]
    else:
        assert n == stop + 1, "the sweep ran past the first divergent point"
        assert sweep["stopped_early"] == (n < cfg.num_iter)
    if sweep["stopped_early"]:
        last = sweep["smoothed"][-1]
        assert n < cfg.num_iter and (not math.isfinite(last) or last > cfg.divergence * min(sweep["smoothed"][:-1]))
    values, suggestion, _ = suggest(sweep["lrs"], sweep["smoothed"], cfg)
    assert values == sweep["suggestions"] and suggestion == sweep["suggestion"] == sweep["suggestions"][sweep["method"]]


def test_lr_auto_sweeps_then_trains_at_the_suggestion(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "optim.lr=auto", "train.epochs=1", "data.batch_size=16", "log.progress=false", "log.every_n_steps=1",
         "train.precision=no"] + SMALL_SWEEP,
        nproc=2,
    )
    run_dir = tmp_path / "demo"
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.sweep.num_iter == NUM_ITER and cfg.train.precision == "no"
    sweep = json.loads((run_dir / "lr_sweep.json").read_text())
    check_curve(sweep, cfg.sweep)
    suggestion = sweep["suggestion"]
    assert suggestion is not None and cfg.sweep.start_lr <= suggestion <= cfg.sweep.end_lr

    # the LR the optimizer ran at: the one-cycle schedule of the run (10 steps: ceil(300 / (16 x 2)))
    # scaled to the suggestion, at every step, as logged from the optimizer's param groups
    total = 10
    schedule = Schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), cfg.schedule, total_steps=total)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    assert [step for step, _ in logged] == list(range(1, total + 1))
    for step, lr in logged:  # after `step` optimizer steps, the LR of the next one
        assert lr == pytest.approx(suggestion * schedule.lr_factor(min(step, total - 1)), rel=1e-12), step
    assert max(lr for _, lr in logged) == pytest.approx(suggestion * max(schedule.lr_factor(s) for s in range(total)), rel=1e-12)

    # and the checkpoint a resume would start from keeps it
    meta, shared, _ = load_checkpoint(run_dir / "checkpoints" / f"step-{total:08d}", 0, 2)
    assert shared["schedule"]["base_lrs"] == pytest.approx([suggestion] * len(shared["schedule"]["base_lrs"]), rel=1e-12)
    assert shared["schedule"]["steps_done"] == total
    assert [g["lr"] for g in shared["optimizer"]["param_groups"]] == pytest.approx(
        [suggestion * schedule.lr_factor(total - 1)] * len(shared["optimizer"]["param_groups"]), rel=1e-12)
    assert meta["lr_sweep"]["suggestion"] == suggestion and meta["lr_sweep"]["method"] == sweep["method"] == "minimum"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["peak_lr"] == pytest.approx(suggestion, rel=1e-12)

    lines = proc.stdout.splitlines()
    sweep_line = next(i for i, line in enumerate(lines) if line.startswith("LR sweep: suggestion"))
    assert f"suggestion {suggestion:.1e} (minimum)" in lines[sweep_line] and "agreed by 2 ranks" in lines[sweep_line]
    assert lines.index("epoch     train_loss  valid_loss  accuracy  time") > sweep_line


def test_find_lr_only_sweeps(tmp_path, mnist_small):
    proc = launch(
        ["-m", "disttrain.cli", "find-lr", "--config", "configs/demo.yaml", f"data.root={mnist_small}",
         f"run.output_dir={tmp_path}", "data.batch_size=16", "sweep.method=steep", "train.precision=no"] + SMALL_SWEEP,
        launcher="python",
    )
    assert "LR sweep: suggestion" in proc.stdout and "(steep)" in proc.stdout and "agreed by 1 ranks" in proc.stdout
    assert "epoch " not in proc.stdout, "find-lr does not train"
    assert not (tmp_path / "demo" / "model.pt").exists()
    sweep = json.loads((tmp_path / "demo" / "lr_sweep.json").read_text())
    assert sweep["world_size"] == 1 and sweep["method"] == "steep"
    check_curve(sweep, load_config(tmp_path / "demo" / "config.yaml").sweep)


def test_a_curve_without_descent_is_an_error_but_the_curve_is_saved(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--find-lr", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "sweep.start_lr=100", "sweep.end_lr=1e6", "sweep.num_iter=10", "sweep.skip_start=0", "sweep.skip_end=0",
         "train.precision=no"],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2
    assert "disttrain: error: the LR sweep has no suggestion (no descent" in proc.stderr
    assert "LR sweep: suggestion none" in proc.stdout
    sweep = json.loads((tmp_path / "demo" / "lr_sweep.json").read_text())
    assert sweep["stopped_early"] and sweep["suggestion"] is None and len(sweep["losses"]) >= 2
    assert (tmp_path / "demo" / "lr_sweep.png").exists()
