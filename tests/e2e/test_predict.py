"""Using a trained model.pt alone: `evaluate --tta` gives the same predictions on 1, 2 and 3
processes, `predict` writes the same CSV on 1 and 2 processes and its accuracy is evaluate's exactly
(plain and TTA), bad files are skipped and counted, bad weights and arguments exit 2 with one line,
and `train.tta` adds the TTA line and metrics to a run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_small):
    """A ResNet-18 trained briefly on 2 processes with train.tta=true: (run dir, stdout)."""
    out = tmp_path_factory.mktemp("tta-run")
    done = launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={out}",
                   "run.name=t", "train.epochs=1", "train.max_steps_per_epoch=8", "data.batch_size=16", "data.num_workers=0",
                   "log.progress=false", "train.precision=no", "train.tta=true", "train.tta_n=3"], nproc=2)
    return out / "t", done.stdout


@pytest.fixture(scope="module")
def evaluated(trained, mnist_small, tmp_path_factory):
    """nproc -> evaluate --tta's JSON for the trained model.pt (no run config: model.pt alone)."""
    out, results = tmp_path_factory.mktemp("eval"), {}
    for nproc in (1, 2, 3):
        launch(["-m", "disttrain.cli", "evaluate", "--weights", str(trained[0] / "model.pt"), f"data.root={mnist_small}",
                "--tta", "--tta-n", "3", "--out", str(out / f"{nproc}.json"), "train.precision=no", "data.num_workers=0"],
               nproc=nproc, launcher="accelerate" if nproc > 1 else "python")
        results[nproc] = json.loads((out / f"{nproc}.json").read_text())
    return results


def test_train_tta_reports_and_logs_the_tta_metrics(trained, evaluated):
    run_dir, stdout = trained
    line = next(l for l in stdout.splitlines() if l.startswith("TTA (3 views, beta 0.25): valid_loss "))
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tta = [r for r in rows if "valid/tta_accuracy" in r]
    assert len(tta) == 1 and tta[0]["step"] == 8
    assert tta[0]["valid/tta_accuracy"] == evaluated[1]["tta_accuracy"]  # the same model, the same views: the same count
    assert f"({evaluated[1]['tta_correct']}/110)" in line


def test_tta_predictions_do_not_depend_on_the_number_of_processes(evaluated):
    """Also the exact validation without TTA: every valid image once (110 is not a multiple of the
    batch), the same counts on 1, 2 and 3 processes."""
    one = evaluated[1]
    assert one["count"] == 110 and one["tta_correct"] is not None
    for nproc in (2, 3):
        other = evaluated[nproc]
        assert other["world_size"] == nproc and other["count"] == 110
        assert (other["correct"], other["tta_correct"]) == (one["correct"], one["tta_correct"])
        assert other["tta_loss"] == pytest.approx(one["tta_loss"], rel=1e-5)
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)


def _predict(args, nproc):
    return launch(["-m", "disttrain.cli", "predict", *args], nproc=nproc, launcher="accelerate" if nproc > 1 else "python")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("tta", [False, True])
def test_predict_csv_is_the_same_on_1_and_2_processes_and_its_accuracy_is_evaluates(trained, evaluated, mnist_small, tmp_path, tta):
    valid = mnist_small / "valid"
    extra = ["--tta", "--tta-n", "3"] if tta else []
    csvs = {}
    for nproc in (1, 2):
        csvs[nproc] = tmp_path / f"{nproc}.csv"
        done = _predict(["--weights", str(trained[0] / "model.pt"), "--out", str(csvs[nproc]), "--precision", "no", "--workers", "0",
                         *extra, str(valid)], nproc)
        assert f"predicted 110 image(s) -> {csvs[nproc]}, 0 skipped" in done.stderr
    one, two = _rows(csvs[1]), _rows(csvs[2])
    assert [r["path"] for r in one] == [str(p) for p in sorted(valid.rglob("*.png"))]  # input order, whatever the ranks
    assert [r["label"] for r in one] == [r["label"] for r in two]
    classes = sorted(p.name for p in valid.iterdir())
    assert list(one[0]) == ["path", "label", "score", *classes]
    for row in one:
        probs = [float(row[c]) for c in classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and float(row["score"]) == max(probs)
    correct = sum(Path(r["path"]).parent.name == r["label"] for r in one)
    assert correct == evaluated[1]["tta_correct" if tta else "correct"]


def test_predict_skips_undecodable_files_and_prints_a_single_images_top_classes(trained, mnist_small, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    digits = sorted((mnist_small / "valid").rglob("*.png"))[:2]
    for i, digit in enumerate(digits):
        shutil.copy(digit, folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    out = tmp_path / "p.csv"
    done = _predict(["--weights", str(trained[0] / "model.pt"), "--out", str(out), "--workers", "0", str(folder)], 1)
    assert [r["path"] for r in _rows(out)] == [str(folder / "0.png"), str(folder / "1.png")]
    skipped = [l for l in done.stderr.splitlines() if l.startswith("skipped ")]
    assert [l.split(":")[0] for l in skipped] == [f"skipped {folder / 'cut.jpg'}", f"skipped {folder / 'notes.txt'}"]
    assert all(len(l.split(": ", 1)[1]) > 3 for l in skipped), "each with its reason"
    assert done.stderr.strip().splitlines()[-1].startswith("predicted 2 image(s) -> ") and ", 2 skipped" in done.stderr
    single = _predict(["--weights", str(trained[0] / "model.pt"), "--topk", "3", "--workers", "0", str(folder / "0.png")], 1)
    top = [line.split("\t") for line in single.stdout.strip().splitlines()]
    assert len(top) == 3 and [float(p) for _, p in top] == sorted((float(p) for _, p in top), reverse=True)


def test_bad_weights_empty_input_and_bad_arguments_exit_2_with_one_line(trained, tmp_path, mnist_small, capsys):
    """`disttrain predict` in this process (its exit code is main()'s return or SystemExit's)."""
    from disttrain.cli import main

    bare = tmp_path / "bare.pt"
    torch.save(torch.load(trained[0] / "model.pt", weights_only=True)["model"], bare)
    (tmp_path / "empty").mkdir()
    weights = str(trained[0] / "model.pt")
    cases = [
        (["--weights", str(bare), str(mnist_small / "valid")], f"disttrain: error: {bare}: is a bare state dict"),
        (["--weights", str(trained[0] / "checkpoints"), str(mnist_small / "valid")], "is a directory, not a weights file"),
        (["--weights", weights, str(tmp_path / "nothing")], "nothing: no such file or folder"),
        (["--weights", weights, str(tmp_path / "empty")], "no files to predict in"),
        (["--weights", weights, "--tta", "--tta-n", "0", "x.png"], "argument --tta-n: must be at least 1, got 0"),
        (["--weights", weights, "--topk", "0", "x.png"], "argument --topk: must be at least 1, got 0"),
    ]
    for args, expected in cases:
        try:
            code = main(["predict", "--precision", "no", *args])
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert expected in err and "Traceback" not in err, (args, err)
        if "argument --" not in expected:
            assert err.strip().count("\n") == 0, (args, err)
