"""W&B tracking with the real client in offline mode, read back from the run files, and metrics.jsonl."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import BIN, REPO, free_port, kill_job, launch, run_env
from wandb_records import artifact_files, config, history, media, read_records, run_record, summary

pytestmark = pytest.mark.e2e

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, the shape of a real key


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("wandb")
    args = ["--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={out}", "run.name=w",
            "optim.lr=auto", "sweep.num_iter=20", "train.epochs=2", "data.batch_size=16", "train.clip_grad=1.0",
            "log.every_n_steps=3", "log.progress=false", "log.wandb.tags=[ci,demo]", "train.precision=no", "train.interpret=true",
            "train.interpret_k=4"]
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
    assert {"run", "data", "optim", "train", "log"} <= set(resolved)
    for section, values in resolved.items():
        assert logged[section] == values, section
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for path in files:
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


def test_the_sweep_table_and_plot_are_logged(offline_run):
    """`lr_sweep/table` holds the sweep's rows (lr, loss, smoothed, log10_lr) as in lr_sweep.json,
    `lr_sweep/curve` is drawn from the same table, and `lr_sweep/plot` is the run dir's
    lr_sweep.png, byte for byte."""
    _, run_dir, runs = offline_run
    rows = history(read_records(next(runs[0].glob("run-*.wandb"))))
    row = next(r for r in rows if "lr_sweep/suggestion" in r)
    sweep = json.loads((run_dir / "lr_sweep.json").read_text())
    assert row["lr_sweep/suggestion"] == sweep["suggestion"]

    table = media(row, "lr_sweep/table")
    assert table["_type"] == "table-file" and table["nrows"] == sweep["iterations"] and table["ncols"] == 4
    stored = json.loads((runs[0] / "files" / table["path"]).read_text())
    assert stored["columns"] == ["lr", "loss", "smoothed", "log10_lr"]
    expected = [[lr, loss, smooth, math.log10(lr)] for lr, loss, smooth in zip(sweep["lrs"], sweep["losses"], sweep["smoothed"])]
    assert len(stored["data"]) == sweep["iterations"] >= 2
    for got, want in zip(stored["data"], expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    assert media(row, "lr_sweep/curve_table")["sha256"] == table["sha256"]  # the line plot's data is that table

    plot = media(row, "lr_sweep/plot")
    assert plot["_type"] == "image-file" and plot["format"] == "png"
    png = runs[0] / "files" / plot["path"]
    assert png.read_bytes() == (run_dir / "lr_sweep.png").read_bytes()
    assert hashlib.sha256(png.read_bytes()).hexdigest() == plot["sha256"]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (plot["width"], plot["height"]) and min(image.size) > 100


def test_train_interpret_writes_the_files_and_logs_the_grids_and_the_top_losses_table(offline_run, mnist_small):
    """train.interpret on 2 processes: <run dir>/interpret/ once model.pt is written, and in W&B each
    grid (the PNG of the run dir, byte for byte) and the Table of the top losses, whose rows are
    top_losses.csv's with the 28 px digit the model saw."""
    proc, run_dir, runs = offline_run
    folder = run_dir / "interpret"
    with open(folder / "top_losses.csv", newline="") as fh:
        top = list(csv.DictReader(fh))
    assert len(top) == 4 and all(Path(row["path"]).parent.parent == mnist_small / "valid" for row in top)
    assert [float(r["loss"]) for r in top] == sorted((float(r["loss"]) for r in top), reverse=True)
    with open(folder / "confusion_matrix.csv", newline="") as fh:  # the 110 valid digits, once across the 2 ranks
        assert sum(sum(map(int, row[1:])) for row in list(csv.reader(fh))[1:]) == 110
    assert f"interpret: {len(list(folder.iterdir()))} file(s) in {folder}: top_losses.csv, " in proc.stdout

    records = read_records(next(runs[0].glob("run-*.wandb")))
    row = next(r for r in history(records) if any(k.startswith("interpret/top_losses_table") for k in r))
    table = media(row, "interpret/top_losses_table")
    assert table["_type"] == "table-file" and table["nrows"] == 4
    assert json.loads((runs[0] / "files" / table["path"]).read_text())["columns"] == ["image", "actual", "predicted", "loss",
                                                                                      "probability_actual"]
    staged = artifact_files(records)  # the Table with its images: the run's table artifact
    stored = json.loads(Path(staged["interpret/top_losses_table.table.json"]).read_text())
    for (image, actual, predicted, loss, p), want in zip(stored["data"], top, strict=True):
        assert (actual, predicted) == (want["actual"], want["predicted"])
        assert (loss, p) == (pytest.approx(float(want["loss"]), abs=1e-6), pytest.approx(float(want["probability_actual"]), abs=1e-6))
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (28, 28)
        with Image.open(staged[image["path"]]) as digit:
            assert digit.size == (28, 28)
    grids = sorted(p.name for p in folder.glob("*.png") if p.name != "confusion_matrix.png")
    assert "top_losses.png" in grids and "most_correct_0.png" in grids
    for name in grids:
        logged = media(row, f"interpret/{name[:-4]}")
        assert logged["_type"] == "image-file", name
        assert (runs[0] / "files" / logged["path"]).read_bytes() == (folder / name).read_bytes(), name


GROUP_LRS_RUN = """
import json, sys
from disttrain.train.build import build_trainer
from disttrain.models.checks import load_config
from disttrain.dist.runtime import build_runtime

cfg = load_config(None, sys.argv[1:])
trainer, _ = build_trainer(cfg, build_runtime(cfg))
state = trainer.schedule.state_dict()
# different LRs per param group, set directly here (a staged run gets them from lr_ratio, per layer group)
trainer.schedule.load_state_dict({**state, "base_lrs": [max(state["base_lrs"]) / 10**g for g in range(len(state["base_lrs"]))]})
trainer.train_epoch(0)
trainer.tracker.finish()
print("base_lrs", json.dumps(trainer.schedule.base_lrs))
"""


def test_groups_with_different_lrs_are_logged_per_group(tmp_path, mnist_small):
    """A real Trainer (one CPU process) whose param groups have different LRs logs
    `train/lr/group<i>` (and no `train/lr`) at every log point: each group's LR of the schedule, in
    metrics.jsonl and in the offline W&B run."""
    from disttrain.models.checks import load_config
    from disttrain.train.schedule import Schedule

    proc = launch(["-c", GROUP_LRS_RUN, f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=g",
                   "data.load_size=28", "data.image_size=28", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
                   "train.max_steps_per_epoch=4", "log.every_n_steps=2", "log.progress=false", "train.precision=no"],
                  launcher="python", env={"WANDB_MODE": "offline"})
    bases = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("base_lrs "))[len("base_lrs "):])
    assert len(bases) >= 2 and len(set(bases)) == len(bases)
    run_dir = tmp_path / "g"
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = Schedule(optimizer, load_config(run_dir / "config.yaml").schedule, total_steps=4).lr_factor
    expected = {step: {f"train/lr/group{g}": base * factor(min(step, 3)) for g, base in enumerate(bases)} for step in (2, 4)}

    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in local if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert "train/lr" not in r
        assert {k: v for k, v in r.items() if k.startswith("train/lr")} == pytest.approx(expected[r["step"]], rel=1e-12)

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = [r for r in history(read_records(next(runs[0].glob("run-*.wandb")))) if "train/loss" in r]
    assert [r["_step"] for r in logged] == [2, 4]
    for r in logged:
        assert "train/lr" not in r
        assert {k: v for k, v in r.items() if k.startswith("train/lr")} == pytest.approx(expected[r["_step"]], rel=1e-12)


def test_a_killed_and_resumed_launched_run_continues_the_same_wandb_run(tmp_path, mnist_small):
    """2 processes logging offline, SIGKILLed after a mid-epoch checkpoint and started again with the
    same command: both offline-run dirs carry the run id of `wandb_run_id`, the resumed run's history
    starts after the checkpoint's step and is the rest of metrics.jsonl, and every log point is in
    metrics.jsonl once."""
    args = ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
            "run.name=k", "train.epochs=1", "data.batch_size=16", "data.num_workers=0", "log.progress=false",
            "log.every_n_steps=2", "checkpoint.every_n_steps=3", "train.precision=no"]  # 10 steps: checkpoints at 3, 6, 9
    run_dir = tmp_path / "k"
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**run_env(), "WANDB_MODE": "offline"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "step-00000006").exists():  # polling for a file the run writes
            assert proc.poll() is None, f"the run ended before its step-6 checkpoint:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no step-6 checkpoint"
            time.sleep(0.05)
    finally:
        kill_job(proc)  # the launcher and every worker (each in a session of its own), as a node crash
    assert not (run_dir / "results.json").exists(), "the kill must land mid-run"
    checkpoint_step = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert checkpoint_step in (6, 9)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in first_dirs] == [run_id]

    resumed = launch(args, nproc=2, env={"WANDB_MODE": "offline"})
    resuming = next((line for line in resumed.stdout.splitlines() if line.startswith("resuming from")), "")
    assert f"step-{checkpoint_step:08d}: " in resuming and f"global step {checkpoint_step}," in resuming, (checkpoint_step, resuming)
    assert "LR sweep" not in resumed.stdout
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and dirs[0] == first_dirs[0], dirs
    assert all(p.name.rsplit("-", 1)[1] == run_id for p in dirs)
    for p in dirs:
        files = list(p.glob("run-*.wandb"))
        assert [f.name for f in files] == [f"run-{run_id}.wandb"]
    records = read_records(dirs[1] / f"run-{run_id}.wandb")
    assert run_record(records).run_id == run_id
    rows = history(records)

    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local if "train/loss" in r] == [2, 4, 6, 8, 10], "every log point once"
    assert [r["step"] for r in local if "valid/loss" in r] == [10]
    assert rows and min(r["_step"] for r in rows) > checkpoint_step, "the resumed run's history continues after the checkpoint"
    for key in ("train/loss", "train/lr", "valid/loss", "valid/accuracy"):
        theirs = [(r["_step"], r[key]) for r in rows if key in r]
        ours = [(r["step"], r[key]) for r in local if key in r and r["step"] > checkpoint_step]
        assert theirs == ours and theirs, key
    # The killed run's file: wandb-core buffers records (32 KiB blocks) and a SIGKILL loses what it held;
    # with this little logged, the file is the bare header. Whatever it does hold is this run's.
    first = read_records(dirs[0] / f"run-{run_id}.wandb")
    assert all(r.run.run_id == run_id for r in first if r.WhichOneof("record_type") == "run")
    assert all(r["_step"] <= 9 for r in history(first)), "the killed run logged nothing past its last step"


def test_disabled_creates_no_wandb_files(tmp_path, mnist_small):
    launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=d",
             "train.epochs=1", "train.max_steps_per_epoch=4", "data.batch_size=16", "log.every_n_steps=2",
             "log.progress=false", "log.wandb.mode=disabled", "train.precision=no"], env={"WANDB_MODE": ""}, nproc=1)
    assert not (tmp_path / "d" / "wandb").exists() and not (tmp_path / "d" / "wandb_run_id").exists()
    local = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local if "train/loss" in r] == [2, 4]


def test_a_resumed_tracker_continues_the_same_run(tmp_path, monkeypatch):
    from disttrain.models.checks import load_config
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
    dirs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert dirs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", p.name) for p in dirs), dirs  # one run id, however many dirs
    assert (tmp_path / "r" / "wandb_run_id").read_text().strip() == run_id
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
from disttrain.models.checks import load_config
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
