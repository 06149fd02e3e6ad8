"""W&B tracking with the real client in offline mode, read back from the run files, and metrics.jsonl."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from conftest import launch
from wandb_records import config, history, read_records, run_record, summary

pytestmark = pytest.mark.e2e

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, the shape of a real key


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("wandb")
    args = ["--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={out}", "run.name=w",
            "optim.lr=auto", "sweep.num_iter=20", "train.epochs=2", "data.batch_size=16", "train.clip_grad=1.0",
            "log.every_n_steps=3", "log.progress=false", "log.wandb.tags=[ci,demo]"]
    proc = launch(["launch/train.py", *args], env={"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "WANDB_PROJECT": "from-env"})
    run_dir = out / "w"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    return proc, run_dir, runs


def test_one_offline_run_with_every_series(offline_run):
    proc, run_dir, runs = offline_run
    assert len(runs) == 1, "exactly one W&B run (the main process's), not one per rank"
    records = read_records(next(runs[0].glob("run-*.wandb")))
    rows = history(records)
    keys = set().union(*rows)
    for key in ("train/loss", "train/lr", "train/images_per_sec", "train/grad_norm", "epoch", "valid/loss",
                "valid/accuracy", "valid/top5", "epoch_time_sec", "lr_sweep/suggestion", "lr_sweep/valley",
                "lr_sweep/steep", "lr_sweep/minimum", "lr_sweep/slide"):
        assert key in keys, f"{key} was not logged; logged: {sorted(keys)}"
    assert any(k.startswith("lr_sweep/curve") for k in keys)
    assert any(k.startswith("train/samples") for k in keys)
    assert any(k.startswith("valid/confusion_matrix") for k in keys)

    train = [r for r in rows if "train/loss" in r]
    steps = [r["_step"] for r in train]
    assert steps == sorted(steps) and steps[0] == 3 and all(b - a == 3 for a, b in zip(steps, steps[1:]))
    assert all(0 < r["train/loss"] < 10 and r["train/images_per_sec"] > 0 and r["train/lr"] > 0 for r in train)
    epochs = [r for r in rows if "valid/accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["valid/accuracy"] <= r["valid/top5"] <= 1 for r in epochs)
    assert summary(records)["valid/accuracy"]["max"] == pytest.approx(max(r["valid/accuracy"] for r in epochs))

    run = run_record(records)
    assert run.project == "from-env" and list(run.tags) == ["ci", "demo"] and run.display_name == "w"
    assert (run_dir / "wandb_run_id").read_text().strip() == run.run_id


def test_config_is_the_resolved_config_and_no_secret_is_kept(offline_run):
    _, run_dir, runs = offline_run
    records = read_records(next(runs[0].glob("run-*.wandb")))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    logged = config(records)
    for section, values in resolved.items():
        assert logged[section] == values, section
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_metrics_jsonl_has_the_same_series(offline_run):
    proc, run_dir, runs = offline_run
    rows = history(read_records(next(runs[0].glob("run-*.wandb"))))
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "train/lr", "valid/accuracy", "valid/loss", "lr_sweep/suggestion"):
        ours = [(r["step"], r[key]) for r in local if key in r]
        theirs = [(r["_step"], r[key]) for r in rows if key in r]
        assert ours == theirs and ours, key
    # the confusion matrix, exact across ranks: every valid image once, its diagonal is the accuracy
    with open(run_dir / "confusion_matrix.csv") as fh:
        table = list(csv.reader(fh))
    counts = [[int(v) for v in row[1:]] for row in table[1:]]
    assert sum(map(sum, counts)) == 110
    final = [r for r in local if "valid/accuracy" in r][-1]["valid/accuracy"]
    assert sum(counts[i][i] for i in range(10)) / 110 == pytest.approx(final)
    assert (run_dir / "confusion_matrix.png").stat().st_size > 1000
    assert proc.stdout.count("epoch     train_loss") == 1


def test_disabled_creates_no_wandb_files(tmp_path, mnist_small):
    launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=d",
             "train.epochs=1", "train.max_steps_per_epoch=4", "data.batch_size=16", "log.every_n_steps=2",
             "log.progress=false", "log.wandb.mode=disabled"], env={"WANDB_MODE": ""}, nproc=1)
    assert not (tmp_path / "d" / "wandb").exists() and not (tmp_path / "d" / "wandb_run_id").exists()
    local = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local if "train/loss" in r] == [2, 4]


def test_a_resumed_tracker_continues_the_same_run(tmp_path, monkeypatch):
    from disttrain.config import load_config
    from disttrain.tracking import ConsoleReporter, Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r"])
    first = Tracker(cfg, True, ConsoleReporter(False))
    first.log({"train/loss": 1.0}, step=1)
    run_id = first.wandb_run.id
    first.finish()
    again = Tracker(cfg, True, ConsoleReporter(False), resume_step=1)
    assert again.wandb_run.id == run_id
    again.log({"train/loss": 0.5}, step=2)
    again.finish()
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert all(run_id in p.name for p in (tmp_path / "r" / "wandb").glob("offline-run-*"))  # one run id, however many dirs
    fresh = Tracker(cfg, True, ConsoleReporter(False))  # a new run (not resuming) gets a new W&B run
    assert fresh.wandb_run.id != run_id
    fresh.finish()


def test_environment_wins_over_the_config_and_credentials_pick_the_mode(tmp_path, monkeypatch):
    from disttrain.config import WandbConfig
    from disttrain.tracking import resolve_wandb

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_TAGS", "WANDB_NAME", "WANDB_ENTITY", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    cfg = WandbConfig(project="p", tags=["a"], group="g")
    assert resolve_wandb(cfg, "run") == {"mode": "offline", "project": "p", "entity": None, "name": "run", "tags": ["a"], "group": "g"}
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb(cfg, "run")["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "q")
    monkeypatch.setenv("WANDB_TAGS", "x,y")
    assert resolve_wandb(cfg, "run") == {"mode": "disabled", "project": "q", "entity": None, "name": "run", "tags": ["x", "y"], "group": "g"}
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert resolve_wandb(cfg, "run")["mode"] == "online"


RAISING_RUN = """
import sys
from disttrain.config import load_config
from disttrain.tracking import ConsoleReporter, Tracker

tracker = Tracker(load_config(None, sys.argv[1:]), True, ConsoleReporter(False))
try:
    tracker.log({"train/loss": 1.0}, step=1)
    raise RuntimeError("boom")
except RuntimeError:
    tracker.finish(failed=True)  # what the CLI does when training raised
    raise
"""


def test_a_run_that_raised_is_marked_failed(tmp_path):
    # In its own process, as in a real run: the W&B run files are complete once that process has exited.
    proc = launch(["-c", RAISING_RUN, f"run.output_dir={tmp_path}", "run.name=f"], launcher="python", check=False,
                  env={"WANDB_MODE": "offline"})
    assert proc.returncode == 1 and "boom" in proc.stderr
    records = read_records(next((tmp_path / "f" / "wandb").glob("offline-run-*/run-*.wandb")))
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
