"""A run's records are never destroyed (the issue's scenario through the real entry points, W&B
offline): a 1-epoch run, then `--find-lr` and `checkpoint.resume=never` under the same run name. The
sweep keeps its records in <run dir>/find-lr/ (the run's W&B id stays, for a later resume), the fresh
run moves the first run's metrics.jsonl and W&B run id to <run dir>/superseded-<UTC>/."""

from __future__ import annotations

import json

import pytest

from conftest import launch

pytestmark = pytest.mark.e2e


def test_find_lr_and_a_fresh_run_under_the_same_name_keep_the_first_runs_records(tmp_path, mnist_small):
    common = ["--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=same",
              "data.batch_size=16", "log.every_n_steps=1", "log.progress=false", "train.precision=no"]
    train = common + ["train.epochs=1", "train.max_steps_per_epoch=3"]
    env = {"WANDB_MODE": "offline"}
    run_dir = tmp_path / "same"

    launch(["launch/train.py", *train], nproc=1, launcher="python", env=env)
    first_rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(first_rows) == 4 and "valid/accuracy" in first_rows[-1]  # 3 steps and the epoch

    launch(["launch/train.py", "--find-lr", *common, "sweep.num_iter=10", "sweep.skip_start=0", "sweep.skip_end=0",
            "sweep.start_lr=1e-4", "sweep.end_lr=1e-2"], nproc=1, launcher="python", env=env)
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == first_rows, "find-lr left the run's metrics alone"
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id, "a later resume continues the run's W&B run"
    assert "lr_sweep/suggestion" in (run_dir / "find-lr" / "metrics.jsonl").read_text()
    assert (run_dir / "find-lr" / "wandb_run_id").read_text().strip() != first_id

    proc = launch(["launch/train.py", *train, "checkpoint.resume=never"], nproc=1, launcher="python", env=env)
    (aside,) = run_dir.glob("superseded-*")
    assert (aside / "metrics.jsonl").read_text().splitlines() == first_rows
    assert (aside / "wandb_run_id").read_text().strip() == first_id
    assert f"moved the earlier records of {run_dir} (W&B run {first_id}) to {aside}" in proc.stdout
    second_id = (run_dir / "wandb_run_id").read_text().strip()
    assert second_id not in (first_id, "") and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    kept = [json.loads(line) for path in run_dir.rglob("metrics.jsonl") for line in path.read_text().splitlines()]
    assert all(json.loads(row) in kept for row in first_rows)
