"""Using a trained model.pt alone, on a bare `<class>/*` folder (no train/) holding an undecodable
file and a text file: `evaluate` gives the same counts and confusion matrix on 1, 2 and 3 processes;
`predict` writes byte-identical CSVs on 1, 2 and 3 processes, whose accuracy is evaluate's exactly
(plain and TTA); evaluate of a dataset root reads only its validation folder and writes nothing
unless asked; a photo's EXIF orientation is applied; bad weights and arguments exit 2 with one
line; `train.tta` adds the TTA line and metrics to a run."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from conftest import launch

pytestmark = pytest.mark.e2e

LAUNCHERS = {1: "python", 2: "accelerate", 3: "disttrain"}  # every way a user starts it


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_small):
    """A ResNet-18 trained briefly on 2 processes with train.tta=true: (run dir, stdout)."""
    out = tmp_path_factory.mktemp("tta-run")
    done = launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={out}",
                   "run.name=t", "train.epochs=1", "train.max_steps_per_epoch=8", "data.batch_size=16", "data.num_workers=0",
                   "log.progress=false", "train.precision=no", "train.tta=true", "train.tta_n=3"], nproc=2)
    return out / "t", done.stdout


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_small):
    """The 110 valid digits as a bare `<class>/*` folder, with an undecodable JPEG and a text file
    that sort after every digit (so the digits' batches are those of the clean folder)."""
    root = tmp_path_factory.mktemp("labelled") / "digits"
    shutil.copytree(mnist_small / "valid", root)
    (root / "9" / "zz-cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (root / "9" / "zz-notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def evaluated(trained, digits, tmp_path_factory):
    """nproc -> (evaluate --tta's JSON on the digits folder, from model.pt alone; the launched
    command's output): 1 process in this one, 2 under accelerate launch, 3 under disttrain launch."""
    from disttrain.cli import main

    out, results = tmp_path_factory.mktemp("eval"), {}
    for nproc in LAUNCHERS:
        args = ["evaluate", "--weights", str(trained[0] / "model.pt"), "--data", str(digits), "--tta", "--tta-n", "3",
                "--out", str(out / f"{nproc}.json"), "train.precision=no", "data.num_workers=0"]
        done = launch(["-m", "disttrain.cli", *args], nproc=nproc, launcher=LAUNCHERS[nproc]) if nproc > 1 else main(args)
        results[nproc] = json.loads((out / f"{nproc}.json").read_text()), done
    return results


def test_train_tta_reports_and_logs_the_tta_metrics(trained, evaluated):
    run_dir, stdout = trained
    line = next(l for l in stdout.splitlines() if l.startswith("TTA (3 views, beta 0.25): valid_loss "))
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tta = [r for r in rows if "valid/tta_accuracy" in r]
    assert len(tta) == 1 and tta[0]["step"] == 8
    assert tta[0]["valid/tta_accuracy"] == evaluated[1][0]["tta_accuracy"]  # the same model, the same views: the same count
    assert f"({evaluated[1][0]['tta_correct']}/110)" in line


def test_evaluate_gives_the_same_counts_and_confusion_matrix_on_1_2_and_3_processes(evaluated, digits):
    """Every digit once (110 is not a multiple of the batch), the bad file listed and counted,
    top-5, per-class accuracy and the confusion matrix; sums exact across ranks."""
    one, done = evaluated[1][0], evaluated[2][1]
    assert one["count"] == 110 and one["skipped"] == 1 and one["world_size"] == 1 and one["data"] == str(digits)
    assert one["top5"] is not None and len(one["confusion"]) == 10 and sum(map(sum, one["confusion"])) == 110
    assert one["per_class"]["3"] == {"correct": one["confusion"][3][3], "count": 11, "accuracy": one["confusion"][3][3] / 11}
    assert sum(one["confusion"][i][i] for i in range(10)) == one["correct"]
    assert f"evaluating {digits}: 111 image file(s) in 10 class folder(s) (model.pt has 10 classes) on 2 process(es)" in done.stdout and "per-class accuracy: 0 " in done.stdout
    assert f"skipped {digits / '9' / 'zz-cut.jpg'}: not an image" in done.stderr
    for nproc in (2, 3):
        other = evaluated[nproc][0]
        assert other["world_size"] == nproc
        for key in ("count", "skipped", "correct", "tta_correct", "confusion", "per_class", "top5"):
            assert other[key] == one[key], (nproc, key)
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-12) and other["tta_loss"] == pytest.approx(one["tta_loss"], rel=1e-12)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _counts(stdout: str) -> list[str]:
    """The '(correct/count)' of the plain and TTA lines of evaluate's summary."""
    return [line.rsplit("(", 1)[1].split(")")[0] for line in stdout.splitlines() if line.startswith(("loss ", "with TTA"))]


def test_evaluate_of_a_dataset_root_reads_only_its_validation_folder_and_writes_nothing_unless_asked(
        trained, evaluated, digits, tmp_path, monkeypatch, capsys):
    """In this process. The old way (`--config` of the run, `data.root=ROOT`) evaluates ROOT/valid
    and never looks at train/ (an undecodable file there goes unnoticed) nor writes into the run
    dir; `--split test` picks the other folder; `--out` and `--out-dir` write exactly their files."""
    from disttrain.cli import main

    root = tmp_path / "root"
    (root / "train" / "0").mkdir(parents=True)
    (root / "train" / "0" / "broken.png").write_text("not an image")
    (root / "valid").symlink_to(digits)
    for label in ("0", "1"):
        shutil.copytree(digits / label, root / "test" / label)
    run_dir = trained[0]
    before = _snapshot(run_dir)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    weights = str(run_dir / "model.pt")
    code = main(["evaluate", "--weights", weights, "--config", str(run_dir / "config.yaml"), f"data.root={root}", "--tta", "--tta-n", "3",
                 "data.num_workers=0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"evaluating {root / 'valid'}: 111 image file(s)" in out.out and "broken.png" not in out.err + out.out
    assert _counts(out.out) == [f"{evaluated[1][0]['correct']}/110", f"{evaluated[1][0]['tta_correct']}/110"]
    assert _snapshot(run_dir) == before and list(work.iterdir()) == []

    code = main(["evaluate", "--weights", weights, "--data", str(root), "--split", "test", "--out", "r.json", "--out-dir", "cm",
                 "train.precision=no", "data.num_workers=0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((work / "r.json").read_text())
    assert result["count"] == 22 and result["data"] == str(root / "test") and result["tta_correct"] is None
    assert result["per_class"]["2"] == {"correct": 0, "count": 0, "accuracy": None} and result["per_class"]["0"]["count"] == 11
    assert sorted(p.name for p in work.rglob("*")) == ["cm", "confusion_matrix.csv", "confusion_matrix.png", "r.json"]
    with open(work / "cm" / "confusion_matrix.csv", newline="") as stream:
        table = list(csv.reader(stream))
    assert table[0] == ["true \\ predicted", *map(str, range(10))] and [list(map(int, row[1:])) for row in table[1:]] == result["confusion"]


def _predict(args: list[str], nproc: int):
    return launch(["-m", "disttrain.cli", "predict", *args], nproc=nproc, launcher=LAUNCHERS[nproc])


def _rows(text: str, delimiter: str = ",") -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def test_predict_csv_is_byte_identical_on_1_2_and_3_processes_and_its_accuracy_is_evaluates(trained, evaluated, digits, tmp_path):
    weights = str(trained[0] / "model.pt")
    csvs = {}
    for nproc in LAUNCHERS:
        csvs[nproc] = tmp_path / f"{nproc}.csv"
        workers = "1" if nproc == 1 else "0"  # decoding in a worker process, and in the rank itself
        done = _predict(["--weights", weights, "--out", str(csvs[nproc]), "--precision", "no", "--workers", workers, str(digits)], nproc)
        lines = done.stderr.splitlines()
        assert f"skipped {digits / '9' / 'zz-cut.jpg'}: not an image (PIL cannot identify the format)" in lines
        summary = f"predicted 110 image(s) -> {csvs[nproc]}, 1 skipped (not decodable), 1 left out by their suffix (--ext); "
        assert any(line.startswith(summary) and line.endswith(f" images/s on {nproc} process(es)") for line in lines), done.stderr
        assert not Path(f"{csvs[nproc]}.parts").exists(), "the parts folder is removed"
    text = csvs[1].read_bytes()
    assert csvs[2].read_bytes() == text and csvs[3].read_bytes() == text  # paths, labels, every probability
    rows = _rows(text.decode())
    assert [r["path"] for r in rows] == [str(p) for p in sorted(digits.rglob("*.png"))]  # input order
    classes = [str(c) for c in range(10)]
    assert list(rows[0]) == ["path", "label", "score", *classes]
    for row in rows:
        probs = [float(row[c]) for c in classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and float(row["score"]) == max(probs) and row["label"] == classes[probs.index(max(probs))]
    assert sum(Path(r["path"]).parent.name == r["label"] for r in rows) == evaluated[1][0]["correct"]


def test_predict_top_k_with_tta_ranks_the_classes_and_its_accuracy_is_evaluates(trained, evaluated, digits, tmp_path):
    """In this process."""
    from disttrain.cli import main

    out = tmp_path / "top.tsv"
    assert main(["predict", "--weights", str(trained[0] / "model.pt"), "--out", str(out), "--precision", "no", "--workers", "0", "--tta",
                 "--tta-n", "3", "--topk", "2", str(digits)]) == 0
    rows = _rows(out.read_text(), delimiter="\t")
    assert list(rows[0]) == ["path", "rank", "class", "probability"] and len(rows) == 220
    firsts, seconds = rows[0::2], rows[1::2]
    assert [r["rank"] for r in firsts] == ["1"] * 110 and [r["path"] for r in firsts] == [r["path"] for r in seconds]
    assert all(float(a["probability"]) >= float(b["probability"]) and a["class"] != b["class"] for a, b in zip(firsts, seconds))
    assert sum(Path(r["path"]).parent.name == r["class"] for r in firsts) == evaluated[1][0]["tta_correct"]


def _sideways_jpeg(digit: np.ndarray, path: Path, orientation: int | None) -> bytes:
    """The digit turned 90 degrees counter-clockwise as stored pixels; orientation 6 tells a viewer to
    turn it back clockwise."""
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(np.rot90(digit).copy()).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path.read_bytes()


def test_predict_applies_a_photos_exif_orientation_and_its_output_does_not_depend_on_how_many_files(
        trained, digits, tmp_path, monkeypatch, capsys):
    """In this process, CSV to stdout (the parts folder made in the current directory and removed).
    A JPEG stored sideways with EXIF orientation 6 is predicted as its upright pixels (a PNG the test
    turns itself); the same JPEG without the tag is not."""
    from disttrain.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    digit = np.asarray(Image.open(sorted((digits / "7").glob("*.png"))[0]).convert("RGB"))
    tagged = _sideways_jpeg(digit, folder / "b-tagged.jpg", 6)
    _sideways_jpeg(digit, folder / "c-untagged.jpg", None)
    stored = simplejpeg.decode_jpeg(tagged, colorspace="RGB")  # the pixels as stored, no EXIF applied
    Image.fromarray(np.rot90(stored, k=-1).copy()).save(folder / "a-upright.png")
    monkeypatch.chdir(tmp_path)
    weights = str(trained[0] / "model.pt")
    common = ["predict", "--weights", weights, "--precision", "no", "--workers", "0", "--batch-size", "1"]  # each image alone
    assert main([*common, str(folder)]) == 0
    rows = {Path(r["path"]).name: [v for k, v in r.items() if k != "path"] for r in _rows(capsys.readouterr().out)}
    assert list(rows) == ["a-upright.png", "b-tagged.jpg", "c-untagged.jpg"]
    assert rows["b-tagged.jpg"] == rows["a-upright.png"] and rows["c-untagged.jpg"] != rows["a-upright.png"]
    assert main([*common, str(folder / "b-tagged.jpg")]) == 0
    single = _rows(capsys.readouterr().out)  # one file: still the CSV, not another format
    assert len(single) == 1 and list(single[0])[:3] == ["path", "label", "score"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"], "no parts folder left behind"
    assert main([*common, "--topk", "1", str(folder / "b-tagged.jpg")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[:3] == [str(folder / "b-tagged.jpg"), "1", rows["b-tagged.jpg"][0]]


def test_bad_weights_inputs_and_arguments_exit_2_with_one_line(trained, digits, tmp_path, monkeypatch, capsys):
    """In this process (the exit code is main()'s return). Argument errors come before any weights
    are read (here the weights do not exist) and before any work."""
    from disttrain.cli import main

    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(trained[0] / "model.pt", weights_only=True)["model"], bare)
    (tmp_path / "empty").mkdir()
    for name in ("texts/a.txt", "broken/a.jpg", "cats/cat/1.png", "a-file"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("not an image")
    weights, none = str(trained[0] / "model.pt"), str(tmp_path / "none.pt")
    predict_cases = [
        (["--weights", str(bare), str(digits)], f"{bare}: is a bare state dict"),
        (["--weights", str(trained[0] / "checkpoints"), str(digits)], "is a directory, not a weights file"),
        (["--weights", weights, str(tmp_path / "nothing")], "nothing: no such file or folder"),
        (["--weights", weights, str(tmp_path / "empty")], "no files to predict in"),
        (["--weights", weights, str(tmp_path / "texts")], "(1 file(s) with other suffixes; --ext takes .bmp,"),
        (["--weights", weights, "--out", "p.csv", str(tmp_path / "broken")], "none of the 1 input file(s) could be read as an image"),
        (["--weights", none, "--tta", "--tta-n", "0", "x.png"], "--tta-n: must be 1 to 10"),
        (["--weights", none, "--tta-n", "11", "x.png"], "--tta-n: must be 1 to 10"),
        (["--weights", none, "--tta", "--tta-beta", "2", "x.png"], "--tta-beta: must be in [0, 1]"),
        (["--weights", none, "--topk", "0", "x.png"], "--topk: must be at least 1"),
        (["--weights", none, "--out", "missing/p.csv", "x.png"], "--out missing/p.csv: the folder missing does not exist"),
        (["--weights", none, "--out", str(tmp_path), "x.png"], f"--out {tmp_path}: is a folder; give a file name"),
        (["--weights", none, "--ext", ",", str(digits)], "--ext ',': no suffix given"),
    ]
    evaluate_cases = [
        (["--weights", weights, "--data", str(tmp_path / "cats")], "cats: class folder(s) cat are not classes of"),
        (["--weights", weights, "--data", str(digits), "--split", "test"], f"--split test: {digits / 'test'} is not a folder"),
        (["--weights", weights, "--data", str(tmp_path / "nothing")], "nothing: no such folder"),
        (["--weights", none, "--data", str(digits), "--out-dir", "a-file"], "--out-dir a-file: is a file, not a folder"),
        (["--weights", none, "--data", str(digits), "--tta-beta", "-1"], "--tta-beta: must be in [0, 1]"),
        (["--weights", none, "--data", str(digits), "--batch-size", "0"], "--batch-size: must be at least 1"),
    ]
    for command, cases in (("predict", predict_cases), ("evaluate", evaluate_cases)):
        for args, expected in cases:
            extra = ["--precision", "no"] if command == "predict" else ["train.precision=no"]
            code = main([command, *extra, *args])
            err = capsys.readouterr().err
            assert code == 2, (args, err)
            last = err.strip().splitlines()[-1]
            assert last.startswith("disttrain: error: ") and expected in last and "Traceback" not in err, (args, err)
            if "broken" not in args[-1]:
                assert err.strip().count("\n") == 0, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bare.pt", "broken", "cats", "empty", "texts"], "nothing written"
