"""Where the W&B files go: WANDB_DIR wins (W&B's own convention); the run dir says where they are. A run's
records are never destroyed: set aside by a run that does not continue them, kept apart by find-lr,
rewritten atomically on resume."""

from __future__ import annotations

import io
import json

from disttrain.models.checks import load_config
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


def _records(run_dir, rows: int, run_id: str = "run1"):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, rows + 1)))
    (run_dir / "wandb_run_id").write_text(run_id + "\n")
    (run_dir / "wandb_files").write_text(f"/somewhere/offline-run-x-{run_id}\n")
    return {name: (run_dir / name).read_text() for name in ("metrics.jsonl", "wandb_run_id", "wandb_files")}


def test_a_run_that_does_not_continue_the_records_moves_them_aside_and_find_lr_keeps_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "log.wandb.mode=disabled"])
    run_dir = tmp_path / "r"
    before = _records(run_dir, 3)

    out = io.StringIO()
    sweep = Tracker(cfg, True, ConsoleReporter(True, progress=False, stream=out), find_lr_only=True)
    sweep.log({"lr_sweep/suggestion": 0.1}, step=0)
    sweep.finish()
    assert {name: (run_dir / name).read_text() for name in before} == before, "find-lr leaves the run's records alone"
    assert (run_dir / "find-lr" / "metrics.jsonl").read_text().count("lr_sweep/suggestion") == 1 and out.getvalue() == ""

    fresh = Tracker(cfg, True, ConsoleReporter(True, progress=False, stream=out))  # checkpoint.resume=never
    fresh.log({"train/loss": 0.5}, step=1)
    fresh.finish()
    (aside,) = run_dir.glob("superseded-*")
    assert {name: (aside / name).read_text() for name in before} == before
    assert out.getvalue() == f"moved the earlier records of {run_dir} (W&B run run1) to {aside}: this run does not continue them\n"
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1 and not (run_dir / "wandb_run_id").exists()

    Tracker(cfg, True, ConsoleReporter(False)).finish()  # once more: another folder, nothing overwritten
    assert len(list(run_dir.glob("superseded-*"))) == 2


def test_a_resume_rewrites_metrics_jsonl_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "log.wandb.mode=disabled"])
    run_dir = tmp_path / "r"
    before = _records(run_dir, 5)["metrics.jsonl"]
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write('{"step": 6, "train/lo')  # a row cut by a kill
    with open(run_dir / "metrics.jsonl") as old:  # what a reader holds while the run restarts
        tracker = Tracker(cfg, True, ConsoleReporter(False), resume_step=3)
        tracker.log({"train/loss": 0.1}, step=4)
        tracker.finish()
        assert old.read().startswith(before), "replaced by a new file, not truncated in place"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train/loss"] == 0.1
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "wandb_files", "wandb_run_id"], "no temporary file left"
    assert not list(run_dir.glob("superseded-*")) and (run_dir / "wandb_run_id").read_text() == "run1\n"
