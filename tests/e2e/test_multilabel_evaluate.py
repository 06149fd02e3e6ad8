"""`disttrain evaluate --run RUN_DIR` on a run's own validation images (issue 26): a multi-label model
trained briefly on 2 processes on the multi-label digits sample (a flat folder + labels.csv with
space-separated tags, a drawn 20% split written to split.json), evaluated after one validation image
was removed and another cut: on 1 and 3 processes the same images (split.json's, the two counted
as skipped), every figure identical (they come from the gathered rows); the per-class supports are
labels.csv's tag counts of those images; --interpret writes the top losses (per-image binary
cross-entropy) and per-class false positives and negatives that agree with the per-class precision
and recall. A single-label run on the csv layout evaluates with --run too, with the accuracy its own
validation counted; bad --run uses exit 2 with one line."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.e2e

LAUNCHERS = {1: "python", 3: "disttrain"}  # 1 process against 3 (uneven shares; accelerate launch trained the run)
K = 5
TRAIN = ["launch/train.py", "--config", "configs/demo.yaml", "data.labels=labels.csv", "data.suffix=.png", "data.valid_pct=0.2",
         "train.epochs=1", "data.num_workers=0", "log.progress=false", "train.precision=no", "data.batch_size=16"]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def _tags(root: Path) -> dict[str, list[str]]:
    """labels.csv: image file name -> its tags."""
    return {row["id"] + ".png": row["tags"].split() for row in _csv(root / "labels.csv")}


@pytest.fixture(scope="module")
def multi_label_run(tmp_path_factory):
    """(data root, run dir, split.json's validation files, the two made unreadable): the multi-label
    sample (200 images, 32 px), trained 3 steps on 2 processes with train.threshold=auto and
    train.interpret; then one validation image is removed and another cut short."""
    from disttrain.data.demo import write_demo_data

    base = tmp_path_factory.mktemp("multi")
    root = write_demo_data(base / "digits", multi_label=True, count=200)
    launch([*TRAIN, f"data.root={root}", "data.label_delim= ", "train.threshold=auto", "train.max_steps_per_epoch=3",
            "train.interpret=true", "data.load_size=32", "data.image_size=32", f"run.output_dir={base / 'runs'}", "run.name=m"], nproc=2)
    run_dir = base / "runs" / "m"
    valid = json.loads((run_dir / "split.json").read_text())["valid"]
    gone, cut = valid[3], valid[-2]
    (root / "train" / gone).unlink()
    (root / "train" / cut).write_bytes((root / "train" / cut).read_bytes()[:60])
    return root, run_dir, valid, {gone, cut}


@pytest.fixture(scope="module")
def evaluated(multi_label_run, tmp_path_factory):
    """nproc -> (--out's JSON, the --interpret folder, stdout): `evaluate --run` on 1 (python) and
    3 (disttrain launch) processes, batches of 8 (5 global batches)."""
    _, run_dir, _, _ = multi_label_run
    out, results = tmp_path_factory.mktemp("evaluated"), {}
    for nproc, launcher in LAUNCHERS.items():
        args = ["evaluate", "--run", str(run_dir), "--out", str(out / f"{nproc}.json"), "--interpret", str(out / str(nproc)),
                "--interpret-k", str(K), "--batch-size", "8", "train.precision=no", "data.num_workers=0"]
        done = launch(["-m", "disttrain.cli", *args], nproc=nproc, launcher=launcher)
        results[nproc] = json.loads((out / f"{nproc}.json").read_text()), out / str(nproc), done.stdout
    return results


def test_evaluate_run_reads_the_runs_split_with_the_same_figures_on_1_2_and_3_processes(multi_label_run, evaluated):
    root, run_dir, valid, unreadable = multi_label_run
    one = evaluated[1][0]
    assert one["multi_label"] is True and one["run"] == str(run_dir) and one["data"] == str(root / "train")
    assert one["skipped"] == 2 and one["count"] == len(valid) - one["skipped"] == 38
    saved = torch.load(run_dir / "model.pt", weights_only=True)["task"]
    assert one["threshold"] == saved["threshold"] and one["beta"] == saved["beta"] == 2.0 and one["threshold_searched"] is False
    assert one["cells"] == one["count"] * 10 and one["accuracy_multi"] == one["correct"] / one["cells"]
    for nproc in (3,):  # every figure, floats with ==: each image in the same batch, the metrics from the gathered rows
        other = evaluated[nproc][0]
        assert other["world_size"] == nproc
        assert {k: v for k, v in other.items() if k != "world_size"} == {k: v for k, v in one.items() if k != "world_size"}
    for _, _, stdout in evaluated.values():
        assert f"evaluating {run_dir}/split.json's validation split of {root / 'train'} (valid_pct=0.2 seed=42): 39 image file(s) (and 1 " \
               "listed but not on disk)" in stdout
        assert f"accuracy_multi {one['accuracy_multi']:.6f} ({one['correct']}/{one['cells']})  f2 {one['fbeta']:.6f}" in stdout

    tags = _tags(root)
    seen = [name for name in valid if name not in unreadable]
    support = {c: sum(c in tags[name] for name in seen) for c in one["classes"]}
    assert {c: row["support"] for c, row in one["per_class"].items()} == support
    assert sum(support.values()) == sum(len(tags[name]) for name in seen)
    assert set(one["per_class"]["3"]) == {"precision", "recall", "f1", "support", "ap"} and 0 <= one["mean_ap"] <= 1


def test_interpret_shows_the_top_losses_and_per_class_errors_that_agree_with_precision_and_recall(multi_label_run, evaluated):
    root, run_dir, valid, unreadable = multi_label_run
    result, folder, stdout = evaluated[1]
    assert sorted(p.name for p in folder.iterdir()) == ["per_class.csv", "per_class_errors.csv", "per_class_errors.png",
                                                        "top_losses.csv", "top_losses.png"]
    assert f"interpret: 5 file(s) in {folder}" in stdout
    errors = _csv(folder / "per_class_errors.csv")
    assert [row["class"] for row in errors] == result["classes"]
    for row in errors:
        scores = result["per_class"][row["class"]]
        fp, fn, support = int(row["false_positives"]), int(row["false_negatives"]), int(row["support"])
        tp = support - fn
        assert support == scores["support"] and scores["recall"] == (tp / support if support else 0.0)
        assert scores["precision"] == (tp / (tp + fp) if tp + fp else 0.0)
    cells_wrong = sum(int(r["false_positives"]) + int(r["false_negatives"]) for r in errors)
    assert cells_wrong == result["cells"] - result["correct"]

    tags, top = _tags(root), _csv(folder / "top_losses.csv")
    assert [row["rank"] for row in top] == [str(i) for i in range(1, K + 1)]
    losses = [float(row["loss"]) for row in top]
    assert losses == sorted(losses, reverse=True) and losses[0] > 0
    for row in top:
        name = Path(row["path"]).name
        assert name in valid and name not in unreadable and row["actual"] == " ".join(tags[name])
        assert set(row["predicted"].split()) <= set(result["classes"])
    for nproc in (3,):  # the same rows, the same files
        for name in ("top_losses.csv", "per_class_errors.csv", "per_class.csv"):
            assert (evaluated[nproc][1] / name).read_bytes() == (folder / name).read_bytes(), (nproc, name)
    # the run's own train.interpret (2 processes, before the two files were made unreadable): the same kind of files
    written = {p.name for p in (run_dir / "interpret").iterdir()}
    assert {"top_losses.csv", "top_losses.png", "per_class_errors.csv", "per_class_errors.png"} <= written
    assert sum(int(r["support"]) for r in _csv(run_dir / "interpret" / "per_class_errors.csv")) == sum(len(tags[n]) for n in valid)


def test_threshold_auto_searches_the_best_f2_on_the_evaluated_images(multi_label_run, evaluated, tmp_path):
    from disttrain.cli import main

    _, run_dir, _, _ = multi_label_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", "--run", str(run_dir), "--threshold", "auto", "--out", str(tmp_path / "auto.json"),
                     "train.precision=no", "data.num_workers=0"]) == 0
    auto, fixed = json.loads((tmp_path / "auto.json").read_text()), evaluated[1][0]
    assert auto["threshold_searched"] is True and auto["count"] == fixed["count"] and auto["fbeta"] >= fixed["fbeta"]
    assert f"threshold {auto['threshold']:g} (best on these images)" in printed.getvalue()


def test_a_single_label_csv_run_evaluates_on_its_own_validation_split(tmp_path, capsys):
    from disttrain.cli import main
    from disttrain.data.demo import write_demo_data

    root = write_demo_data(tmp_path / "digits", train_per_class=8, valid_per_class=2, layout="csv")
    launch([*TRAIN, f"data.root={root}", "train.max_steps_per_epoch=2", f"run.output_dir={tmp_path / 'runs'}", "run.name=c"], nproc=1,
           launcher="python")
    run_dir = tmp_path / "runs" / "c"
    valid = json.loads((run_dir / "split.json").read_text())["valid"]
    assert main(["evaluate", "--run", str(run_dir), "--out", str(tmp_path / "c.json"), "train.precision=no", "data.num_workers=0"]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert "multi_label" not in result and result["count"] == len(valid) == 20 and result["skipped"] == 0
    assert sum(row["count"] for row in result["per_class"].values()) == 20 and len(result["confusion"]) == 10
    epochs = json.loads((run_dir / "results.json").read_text())["epochs"]
    assert result["accuracy"] == epochs[-1]["accuracy"]  # the images the run validated on
    labels = {row["id"] + ".png": row["label"] for row in _csv(root / "labels.csv")}
    assert {c: row["count"] for c, row in result["per_class"].items()} == {c: sum(labels[n] == c for n in valid) for c in result["classes"]}
    capsys.readouterr()

    # what a user gets wrong: one line, exit 2, nothing evaluated
    bare = tmp_path / "bare"
    bare.mkdir()
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    shutil.copy(run_dir / "config.yaml", no_model / "config.yaml")
    changed = tmp_path / "changed"
    shutil.copytree(root, changed)
    shutil.copy(changed / "train" / "d0001.png", changed / "train" / "extra.png")
    with open(changed / "labels.csv", "a") as stream:
        stream.write("extra,1\n")
    cases = [
        (["--run", str(bare)], f"--run {bare}: no config.yaml in it"),
        (["--run", str(no_model)], f"--run {no_model}: no model.pt in it"),
        (["--run", str(tmp_path / "nothing")], "no such folder"),
        (["--run", str(run_dir), "--data", str(root)], "--run evaluates on the run's own validation images"),
        (["--run", str(run_dir), f"data.root={changed}"], "changed since the run"),
        (["--run", str(run_dir), "--threshold", "auto"], "is a single-label model"),
        (["--run", str(run_dir), "--threshold", "1.5"], "--threshold 1.5: give a probability between 0 and 1"),
        (["--data", str(root)], "--weights: give the model.pt to evaluate"),
    ]
    for args, expected in cases:
        code = main(["evaluate", *args, "train.precision=no", "data.num_workers=0"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("disttrain: error: ") and expected in err and err.count("\n") == 1, (args, err)


def test_a_multi_label_model_refuses_class_folders(multi_label_run, tmp_path, capsys):
    from disttrain.cli import main

    _, run_dir, _, _ = multi_label_run
    (tmp_path / "3").mkdir()
    args = ["evaluate", "--weights", str(run_dir / "model.pt"), "--data", str(tmp_path), "train.precision=no", "data.num_workers=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is a multi-label model" in err and "--run RUN_DIR" in err and err.count("\n") == 1, err
