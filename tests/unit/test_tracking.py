"""Where the W&B files go: WANDB_DIR wins (W&B's own convention); the run dir says where they are."""

from __future__ import annotations

import io

from disttrain.config import load_config
from disttrain.tracking import ConsoleReporter, Tracker


def test_wandb_dir_wins_and_the_run_dir_says_where_the_files_are(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(scratch))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"])
    out = io.StringIO()
    tracker = Tracker(cfg, True, ConsoleReporter(True, progress=False, stream=out))
    tracker.log({"train/loss": 1.0}, step=1)
    run_id = tracker.wandb_run.id
    tracker.finish()
    run_dir = tmp_path / "runs" / "r"
    runs = list((scratch / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, sorted(p.name for p in scratch.rglob("*"))[:20]
    assert not (run_dir / "wandb").exists(), "nothing under the run dir when WANDB_DIR is set"
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert (run_dir / "wandb_files").read_text().strip() == str(runs[0])
    assert f"W&B: run {run_id}, files in {runs[0]} (WANDB_DIR)" in out.getvalue()
    assert (run_dir / "metrics.jsonl").read_text().count("train/loss") == 1


def test_without_wandb_dir_the_files_stay_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    tracker = Tracker(cfg, True, ConsoleReporter(False))
    run_id = tracker.wandb_run.id
    tracker.finish()
    runs = list((tmp_path / "r" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (tmp_path / "r" / "wandb_files").read_text().strip() == str(runs[0])
