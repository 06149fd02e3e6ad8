"""`optim.lr=auto` and `--find-lr` through the real entry points."""

import json

import pytest

from conftest import launch

pytestmark = pytest.mark.e2e

SMALL_SWEEP = ["sweep.num_iter=20", "sweep.start_lr=1e-5", "sweep.end_lr=1", "sweep.skip_start=2", "sweep.skip_end=1"]


def test_lr_auto_sweeps_then_trains_at_the_suggestion(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "optim.lr=auto", "train.epochs=1", "data.batch_size=16", "log.progress=false"] + SMALL_SWEEP,
        nproc=2,
    )
    sweep = json.loads((tmp_path / "demo" / "lr_sweep.json").read_text())
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert sweep["suggestion"] == sweep["suggestions"][sweep["method"]] and sweep["iterations"] <= 20
    assert results["peak_lr"] == pytest.approx(sweep["suggestion"], rel=1e-12)
    lines = proc.stdout.splitlines()
    sweep_line = next(i for i, line in enumerate(lines) if line.startswith("LR sweep: suggestion"))
    assert "agreed by 2 ranks" in lines[sweep_line]
    assert lines.index("epoch     train_loss  valid_loss  accuracy  time") > sweep_line


def test_find_lr_only_sweeps(tmp_path, mnist_small):
    proc = launch(
        ["-m", "disttrain.cli", "find-lr", "--config", "configs/demo.yaml", f"data.root={mnist_small}",
         f"run.output_dir={tmp_path}", "data.batch_size=16", "sweep.method=steep"] + SMALL_SWEEP,
        launcher="python",
    )
    assert "LR sweep: suggestion" in proc.stdout and "(steep)" in proc.stdout and "agreed by 1 ranks" in proc.stdout
    assert "epoch " not in proc.stdout, "find-lr does not train"
    assert not (tmp_path / "demo" / "model.pt").exists()
    assert json.loads((tmp_path / "demo" / "lr_sweep.json").read_text())["world_size"] == 1


def test_a_curve_without_descent_is_an_error_but_the_curve_is_saved(tmp_path, mnist_small):
    proc = launch(
        ["launch/train.py", "--find-lr", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
         "sweep.start_lr=100", "sweep.end_lr=1e6", "sweep.num_iter=10", "sweep.skip_start=0", "sweep.skip_end=0"],
        launcher="python",
        check=False,
    )
    assert proc.returncode == 2
    assert "disttrain: error: the LR sweep has no suggestion (no descent" in proc.stderr
    assert "LR sweep: suggestion none" in proc.stdout
    sweep = json.loads((tmp_path / "demo" / "lr_sweep.json").read_text())
    assert sweep["stopped_early"] and sweep["suggestion"] is None and len(sweep["losses"]) >= 2
    assert (tmp_path / "demo" / "lr_sweep.png").exists()
