"""The lesson's other datasets, trained for real under the launchers: a flat folder labelled by a CSV
(ids without a suffix), several tags per image, a seeded validation split.

- every rank draws the same split, checked on what each rank drew before anything is compared or
  broadcast (tests/distributed/split_worker.py), on 1 and 3 processes, and split.json lists it;
- a multi-label run with the LR sweep: the same sweep on every rank, the table's columns say what
  it shows, model.pt keeps the task and its threshold;
- a resume whose data would split otherwise refuses with one line; data.valid_pct=0 trains on every
  image and the table shows the training loss and the time;
- a bad table stops every process with one line naming the file and the row before any trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import launch

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

LAUNCHERS = {1: "python", 3: "disttrain"}  # 1 process against 3 (uneven shares); accelerate launch: the other files


@pytest.fixture(scope="module")
def tags(tmp_path_factory) -> Path:
    """120 multi-label images (two to four digits on a 64x64 canvas), labels.csv `id,tags`."""
    from disttrain.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("tags") / "tags", multi_label=True, count=120)


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """The digits as one flat folder + labels.csv `id,label` (20 per class)."""
    from disttrain.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("csv") / "digits", train_per_class=16, valid_per_class=4, layout="csv")


def _common(root: Path, out: Path, name: str) -> list[str]:
    return ["configs/demo.yaml", f"data.root={root}", "data.labels=labels.csv", "data.suffix=.png", f"run.output_dir={out}",
            f"run.name={name}", "data.num_workers=0", "log.progress=false", "train.precision=no", "data.batch_size=8",
            "data.load_size=32", "data.image_size=32"]


MULTI = ["data.label_delim= ", "data.valid_pct=0.25", "data.stratify=true", "train.threshold=auto", "optim.lr=auto",
         "sweep.num_iter=12", "sweep.save_per_rank=true", "train.epochs=1", "train.max_steps_per_epoch=3"]


@pytest.fixture(scope="module")
def multi_runs(tags, tmp_path_factory):
    """nproc -> (run dir, the split files each rank wrote, stdout) of the multi-label run."""
    out, runs = tmp_path_factory.mktemp("multi"), {}
    for nproc, launcher in LAUNCHERS.items():
        dumps = out / f"dumps{nproc}"
        dumps.mkdir()
        done = launch(["tests/distributed/split_worker.py", str(dumps), *_common(tags, out, f"m{nproc}"), *MULTI],
                      nproc=nproc, launcher=launcher)
        runs[nproc] = out / f"m{nproc}", sorted(dumps.glob("split-rank*.json")), done.stdout
    return runs


def test_every_rank_draws_the_same_split_on_1_2_and_3_processes(multi_runs, tags):
    drawn = {}
    for nproc, (run_dir, files, stdout) in multi_runs.items():
        assert [f.name for f in files] == [f"split-rank{r}.json" for r in range(nproc)]
        records = [json.loads(f.read_text()) for f in files]
        assert all(r == records[0] for r in records), nproc  # what each rank drew, before any comparison
        saved = json.loads((run_dir / "split.json").read_text())
        assert saved["digest"] == records[0]["digest"] and saved["how"] == "valid_pct=0.25 seed=42 stratified"
        assert [str(tags / "train" / name) for name in saved["valid"]] == records[0]["valid"]
        assert f"split: {len(saved['valid'])} valid / {saved['train']} train files (valid_pct=0.25 seed=42 stratified), the same on {nproc} rank(s)" in stdout
        drawn[nproc] = records[0]
    assert drawn[1] == drawn[3]
    from disttrain.config.parse import build_config_unchecked
    from disttrain.data.source import list_source

    here = list_source(build_config_unchecked(None, [f"data.root={tags}", "data.labels=labels.csv", "data.suffix=.png", *MULTI[:3]]).data)
    assert [str(p) for p, _ in here.valid] == drawn[1]["valid"] and 25 <= len(here.valid) <= 35  # about a quarter, per tag


def test_a_multi_label_run_sweeps_alike_on_every_rank_and_keeps_its_task(multi_runs):
    for nproc, (run_dir, _, stdout) in multi_runs.items():
        curves = [json.loads((run_dir / f"lr_sweep.rank{r}.json").read_text()) for r in range(nproc)]
        for key in ("lrs", "losses", "smoothed", "suggestions", "suggestion", "iterations", "stopped_early"):
            assert all(c[key] == curves[0][key] for c in curves), (nproc, key)
        assert "images with 10 tags (multi-label)" in stdout
        header = next(line for line in stdout.splitlines() if line.startswith("epoch "))
        assert header.split() == ["epoch", "train_loss", "valid_loss", "accuracy_multi", "f2", "threshold", "time"]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        valid = [r for r in rows if "valid/f2" in r][-1]
        assert 0 <= valid["valid/f2"] <= 1 and 0 <= valid["valid/mAP"] <= 1 and "valid/accuracy" not in valid
        saved = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        assert saved["task"]["multi_label"] is True and saved["task"]["beta"] == 2.0
        assert saved["task"]["threshold"] == valid["valid/threshold"]  # auto: the last validation's best, kept
        results = json.loads((run_dir / "results.json").read_text())
        assert results["epochs"][-1]["metrics"]["f2"] == valid["valid/f2"]


def test_a_resume_whose_data_would_split_otherwise_refuses_with_one_line(digits_csv, tmp_path):
    args = [*_common(digits_csv, tmp_path, "r"), "data.valid_pct=0.2", "train.epochs=2", "train.max_steps_per_epoch=2",
            "checkpoint.every_n_steps=2"]
    launch(["launch/train.py", "--config", *args, "train.epochs=1"], nproc=1, launcher="python")
    before = (tmp_path / "r" / "split.json").read_text()
    done = launch(["launch/train.py", "--config", *args, "data.split_seed=7"], nproc=1, launcher="python", check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "split.json" in line]
    assert len(lines) == 1 and f"{tmp_path / 'r' / 'split.json'}: the run split its data as valid_pct=0.2 seed=42" in lines[0]
    assert "start a new run" in lines[0] and (tmp_path / "r" / "split.json").read_text() == before
    resumed = launch(["launch/train.py", "--config", *args], nproc=1, launcher="python")  # the same split: resumes
    assert "resuming from" in resumed.stdout and (tmp_path / "r" / "split.json").read_text() == before


def test_valid_pct_zero_trains_on_every_image_and_shows_what_it_can(digits_csv, tmp_path):
    done = launch(["launch/train.py", "--config", *_common(digits_csv, tmp_path, "all"), "data.valid_pct=0", "train.epochs=1",
                   "train.max_steps_per_epoch=3"], nproc=2)
    assert "data: 200 train / 0 valid images in 10 classes" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("epoch "))
    row = done.stdout.splitlines()[done.stdout.splitlines().index(header) + 1]
    cells = row.split()
    assert len(cells) == 3 and cells[0] == "0" and float(cells[1]) > 0 and ":" in cells[2]  # epoch, train_loss, time
    result = json.loads((tmp_path / "all" / "results.json").read_text())["epochs"][0]
    assert math.isnan(result["valid_loss"]) and result["train_loss"] > 0
    assert json.loads((tmp_path / "all" / "split.json").read_text())["valid"] == []


def test_a_bad_table_stops_every_process_with_one_line_before_any_trains(digits_csv, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train").symlink_to(digits_csv / "train")
    rows = (digits_csv / "labels.csv").read_text().splitlines()
    (bad / "labels.csv").write_text("\n".join(rows[:5] + [rows[3]] + rows[5:]) + "\n")  # line 6 repeats line 4's file
    done = launch(["launch/train.py", "--config", *_common(bad, tmp_path, "bad"), "data.valid_pct=0.2"], nproc=2, launcher="disttrain",
                  check=False)
    assert done.returncode == 2 and "training on" not in done.stdout
    name = rows[3].split(",")[0] + ".png"
    message = f"{bad / 'labels.csv'}: row at line 6 names {name}, as the row at line 4 does; a file may be listed once: remove one"
    assert message in done.stderr and done.stderr.count(message) == 1, done.stderr[-3000:]
