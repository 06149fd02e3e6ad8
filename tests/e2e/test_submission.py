"""The test set as a submission, and predict / export of a multi-label model, on two briefly trained
models: a single-label ResNet-18 on the MNIST sample (1 process) and a multi-label one on the
multi-label sample (2 processes, a fixed train.threshold so the tags are a mix, not every tag).

`--format submission --out submission.csv.gz` is byte-identical on 1, 2 and 3 processes (gzip's
header holds no name and no time), its ids are the file stems and its rows the softmax; a
multi-label model's CSV has a `labels` column, the tags strictly above model.pt's threshold, the
same bytes on 1 and 2 processes; its ONNX export holds sigmoids and the threshold, and predict with
it writes the model.pt's CSV within the export's tolerance."""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.e2e

LAUNCHERS = {1: "python", 2: "accelerate", 3: "disttrain"}  # every way a user starts it (as tests/e2e/test_predict.py)
CLASSES = [str(c) for c in range(10)]
THRESHOLD = 0.4
"""The multi-label run's train.threshold: a few steps leave every sigmoid between 0.1 and 0.5."""
TOLERANCE = 1e-4 + 1e-6
"""The export's tolerance plus the CSV's 6 decimals."""


def _train(data: list[str], out: Path, nproc: int) -> Path:
    launch(["launch/train.py", "--config", "configs/demo.yaml", *data, f"run.output_dir={out}", "run.name=m", "train.epochs=1",
            "train.max_steps_per_epoch=3", "data.batch_size=8", "data.num_workers=0", "log.progress=false", "train.precision=no",
            "data.load_size=32", "data.image_size=32"], nproc=nproc, launcher=LAUNCHERS[nproc])
    return out / "m" / "model.pt"


@pytest.fixture(scope="module")
def single(tmp_path_factory, mnist_small) -> Path:
    """A single-label model.pt, trained on 1 process."""
    return _train([f"data.root={mnist_small}"], tmp_path_factory.mktemp("single"), 1)


@pytest.fixture(scope="module")
def multi_sample(tmp_path_factory) -> Path:
    from disttrain.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("ml") / "ml", multi_label=True, count=80)


@pytest.fixture(scope="module")
def multi(tmp_path_factory, multi_sample) -> Path:
    """A multi-label model.pt (labels.csv, id,tags), trained on 2 processes."""
    return _train([f"data.root={multi_sample}", "data.labels=labels.csv", "data.suffix=.png", "data.valid_pct=0.2",
                   "data.label_delim= ", f"train.threshold={THRESHOLD}"], tmp_path_factory.mktemp("multi"), 2)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory, mnist_small) -> Path:
    """13 digits as an unlabelled `test/` folder of `<id>.png`, 2 of them in a sub-folder."""
    root = tmp_path_factory.mktemp("digits") / "test"
    digits = sorted((mnist_small / "valid").rglob("*.png"))[::8][:13]
    for n, path in enumerate(digits):
        target = root / ("more" if n >= 11 else "") / f"{n * 7919 % 1000:03x}{n}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return root


@pytest.fixture(scope="module")
def multi_test_set(tmp_path_factory, multi_sample) -> Path:
    root = tmp_path_factory.mktemp("tags") / "test"
    root.mkdir()
    for path in sorted((multi_sample / "train").glob("*.png"))[:11]:
        shutil.copy(path, root / path.name)
    return root


def _predict(args: list[str], nproc: int):
    """`disttrain predict` in this process (1) or launched (2: accelerate launch, 3: disttrain launch)."""
    from disttrain.cli import main

    args = ["predict", "--precision", "no", "--workers", "0", "--batch-size", "4", *args]
    if nproc == 1:
        assert main(args) == 0
        return None
    return launch(["-m", "disttrain.cli", *args], nproc=nproc, launcher=LAUNCHERS[nproc])


def _rows(text: str, delimiter: str = ",") -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def _probs(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([[float(r[c]) for c in CLASSES] for r in rows], dtype=torch.float64)


def test_the_submission_is_byte_identical_on_1_2_and_3_processes_with_the_stems_as_ids(single, test_set, tmp_path):
    """With --tta; 13 images in batches of 4 (the last one short, every rank a batch on 3). The
    gzip header has no file name and time 0; the rows are the plain CSV's probabilities."""
    files = {}
    for nproc in LAUNCHERS:
        files[nproc] = tmp_path / f"{nproc}" / "submission.csv.gz"
        files[nproc].parent.mkdir()
        _predict(["--weights", str(single), "--tta", "--tta-n", "3", "--format", "submission", "--out", str(files[nproc]),
                  str(test_set)], nproc)
    data = files[1].read_bytes()
    assert files[2].read_bytes() == data and files[3].read_bytes() == data
    assert data[:4] == b"\x1f\x8b\x08\x00" and data[4:8] == b"\x00\x00\x00\x00", "no FNAME flag, mtime 0"
    rows = _rows(gzip.decompress(data).decode())
    assert list(rows[0]) == ["id", *CLASSES]
    assert [r["id"] for r in rows] == [p.stem for p in sorted(test_set.rglob("*.png"))]
    assert all(sum(p) == pytest.approx(1.0, abs=1e-4) for p in _probs(rows).tolist())

    _predict(["--weights", str(single), "--tta", "--tta-n", "3", "--out", str(tmp_path / "p.csv.gz"), str(test_set)], 1)
    plain = _rows(gzip.decompress((tmp_path / "p.csv.gz").read_bytes()).decode())  # .gz for the default CSV too
    assert list(plain[0])[:3] == ["path", "label", "score"] and [r["path"] for r in plain] == [str(p) for p in sorted(test_set.rglob("*.png"))]
    assert [[r[c] for c in CLASSES] for r in plain] == [[r[c] for c in CLASSES] for r in rows], "the same numbers"


def _check_labels(rows: list[dict], threshold: float) -> int:
    """Every row's `labels` are the tags whose probability is above `threshold` (a probability within
    the CSV's rounding of it is not checked); returns how many tags were predicted in all."""
    predicted = 0
    for row in rows:
        tags = row["labels"].split(" ") if row["labels"] else []
        assert tags == [c for c in CLASSES if c in tags], "in class order"
        predicted += len(tags)
        for c in CLASSES:
            p = float(row[c])
            if abs(p - threshold) > 1e-6:
                assert (c in tags) == (p > threshold), (row, c)
    return predicted


def test_a_multi_label_models_csv_lists_the_tags_above_its_threshold_the_same_on_1_and_2_processes(multi, multi_test_set, tmp_path):
    state = torch.load(multi, map_location="cpu", weights_only=True)
    assert state["task"]["multi_label"] is True and state["task"]["threshold"] == THRESHOLD
    files = {nproc: tmp_path / f"{nproc}.csv" for nproc in (1, 2)}
    for nproc, out in files.items():
        _predict(["--weights", str(multi), "--out", str(out), str(multi_test_set)], nproc)
    text = files[1].read_bytes()
    assert files[2].read_bytes() == text
    rows = _rows(text.decode())
    assert list(rows[0]) == ["path", "labels", *CLASSES] and len(rows) == 11
    probs = _probs(rows)
    assert (probs.sum(dim=1) - 1).abs().max() > 0.1, "sigmoids, not a softmax"
    predicted = _check_labels(rows, THRESHOLD)
    assert 0 < predicted < probs.numel(), "a mix of tags above and below the threshold"

    # --threshold overrides model.pt's; --topk ranks the tags; --format tags is planet's; submission: id + sigmoids
    lowest = float(probs.min()) / 2
    _predict(["--weights", str(multi), "--threshold", f"{lowest:.6f}", "--out", str(tmp_path / "low.csv"), str(multi_test_set)], 1)
    assert [r["labels"] for r in _rows((tmp_path / "low.csv").read_text())] == [" ".join(CLASSES)] * 11
    _predict(["--weights", str(multi), "--topk", "2", "--out", str(tmp_path / "top.tsv"), str(multi_test_set)], 1)
    top = _rows((tmp_path / "top.tsv").read_text(), delimiter="\t")
    assert [r["class"] for r in top[0::2]] == [CLASSES[i] for i in probs.argmax(dim=1).tolist()]
    _predict(["--weights", str(multi), "--format", "tags", "--out", str(tmp_path / "tags.csv"), str(multi_test_set)], 1)
    tags = _rows((tmp_path / "tags.csv").read_text())
    assert [(r["image_name"], r["tags"]) for r in tags] == [(Path(r["path"]).stem, r["labels"]) for r in rows]
    _predict(["--weights", str(multi), "--format", "submission", "--out", str(tmp_path / "s.csv"), str(multi_test_set)], 1)
    submission = _rows((tmp_path / "s.csv").read_text())
    assert list(submission[0]) == ["id", *CLASSES] and [[r[c] for c in CLASSES] for r in submission] == [[r[c] for c in CLASSES] for r in rows]


def test_a_multi_label_onnx_export_holds_sigmoids_and_its_threshold_and_predicts_the_same_csv(multi, multi_test_set, tmp_path, capsys):
    import onnx

    from disttrain.cli import main
    from disttrain.use.exported import from_props

    out = tmp_path / "model.onnx"
    assert main(["export", "--weights", str(multi), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"each tag's sigmoid (model.pt's threshold {THRESHOLD:g})" in printed
    meta = from_props({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert meta["multi_label"] is True and meta["threshold"] == THRESHOLD and meta["classes"] == CLASSES

    _predict(["--weights", str(multi), "--out", str(tmp_path / "pt.csv"), str(multi_test_set)], 1)
    _predict(["--weights", str(out), "--out", str(tmp_path / "onnx.csv"), str(multi_test_set)], 1)
    pt, ox = _rows((tmp_path / "pt.csv").read_text()), _rows((tmp_path / "onnx.csv").read_text())
    assert list(ox[0]) == ["path", "labels", *CLASSES] and [r["path"] for r in ox] == [r["path"] for r in pt]
    p_pt, p_ox = _probs(pt), _probs(ox)
    assert (p_ox - p_pt).abs().max() <= TOLERANCE
    assert (p_ox.sum(dim=1) - 1).abs().max() > 0.1 and ((p_ox > 0) & (p_ox < 1)).all(), "sigmoids, not a softmax"
    _check_labels(ox, THRESHOLD)
    clear = ((p_pt - THRESHOLD).abs() > 2 * TOLERANCE).all(dim=1)  # rows no tolerance can move across the threshold
    assert clear.sum() >= 8 and all(a["labels"] == b["labels"] for a, b, c in zip(pt, ox, clear.tolist()) if c)


def test_submission_and_threshold_mistakes_exit_2_with_one_line(single, multi, test_set, tmp_path, monkeypatch, capsys):
    """Two inputs with one stem, --threshold for a single-label model or out of (0, 1), --topk with
    another format: one line each, nothing written."""
    from disttrain.cli import main

    monkeypatch.chdir(tmp_path)
    twin = tmp_path / "twin"
    shutil.copytree(test_set, twin / "a")
    shutil.copytree(test_set, twin / "b")
    first = sorted(test_set.rglob("*.png"))[0].relative_to(test_set)
    cases = [
        (["--weights", str(single), "--format", "submission", "--out", "s.csv", str(twin)],
         f"{twin / 'a' / first} and {twin / 'b' / first}: the same id '{first.stem}'"),
        (["--weights", str(single), "--threshold", "0.3", str(test_set)], "--threshold: only for a multi-label model"),
        (["--weights", str(multi), "--threshold", "1", str(test_set)], "--threshold: must be between 0 and 1"),
        (["--weights", str(multi), "--topk", "2", "--format", "submission", str(test_set)], "--topk: writes its own rows"),
    ]
    for args, expected in cases:
        code = main(["predict", "--precision", "no", "--workers", "0", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("disttrain: error: ") and expected in err and err.strip().count("\n") == 0, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin"], "nothing written"
