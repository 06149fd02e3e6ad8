"""Averages and ensembles of a briefly trained ResNet-18 (the MNIST sample, 1 process, 4 steps, a
checkpoint every 2): `disttrain average` of its two checkpoints writes the mean of their weights
(BatchNorm statistics averaged, or recomputed on training batches), a model.pt that predict takes;
`disttrain predict --weights A B` writes the mean of the probabilities each model's own predict
writes (plain; with TTA and models of different presizes; multi-label, whose tags are the mean
sigmoid above the mean threshold); models of other classes, or an ONNX file, are a one-line error."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.e2e

STEPS = ("step-00000002", "step-00000004")
TOLERANCE = 1e-6 + 1e-7
"""Each probability in a CSV is rounded to 6 decimals (within 5e-7): the mean of two rounded values
and the rounded mean differ by at most 1e-6, plus the ensemble's float32 mean (up to about 3e-8) and
float parsing: 1e-7 of slack, whatever the CPU's kernels round."""


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_small) -> Path:
    """The run dir: checkpoints at steps 2 and 4 (the first epoch's end) and on to 8, model.pt,
    config.yaml, and the SGDR snapshots of its two 1-epoch cycles (checkpoint.snapshot_cycles)."""
    out = tmp_path_factory.mktemp("ensemble")
    launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={out}", "run.name=e",
            "train.epochs=2", "schedule.name=sgdr", "schedule.cycle_len=1", "schedule.cycle_mult=1", "checkpoint.snapshot_cycles=true",
            "train.max_steps_per_epoch=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=5",
            "data.batch_size=8", "data.num_workers=0", "log.progress=false", "train.precision=no", "data.load_size=32",
            "data.image_size=32"], nproc=1, launcher="python")
    run_dir = out / "e"
    assert all((run_dir / "checkpoints" / step / "shared.pt").is_file() for step in STEPS)
    return run_dir


@pytest.fixture(scope="module")
def averaged(run, tmp_path_factory) -> Path:
    from disttrain.cli import main

    out = tmp_path_factory.mktemp("avg") / "averaged.pt"
    assert main(["average", "--out", str(out), *(str(run / "checkpoints" / step) for step in STEPS)]) == 0
    return out


def _checkpoint_weights(run: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run / "checkpoints" / step / "shared.pt", weights_only=True)["model"] for step in STEPS]


def test_average_of_two_checkpoints_holds_the_mean_of_their_weights(run, averaged):
    saved, own = torch.load(averaged, weights_only=True), torch.load(run / "model.pt", weights_only=True)
    first, second = _checkpoint_weights(run)
    assert list(saved["model"]) == list(first)
    for key, value in saved["model"].items():
        if value.is_floating_point():  # running statistics too (--bn mean)
            assert torch.equal(value, ((first[key].double() + second[key].double()) / 2).to(value.dtype)), key
        else:
            assert torch.equal(value, first[key]), key
    changed = [k for k in first if first[k].is_floating_point() and not torch.equal(first[k], second[k])]
    assert len(changed) > 50, "the two checkpoints differ: the mean is not either of them"
    assert {k: v for k, v in saved.items() if k != "model"} == {k: v for k, v in own.items() if k != "model"}, "the run's model.pt keys"


def test_batchnorm_statistics_recomputed_on_training_batches(run, averaged, mnist_small, tmp_path, capsys):
    from disttrain.cli import main

    out = tmp_path / "recomputed.pt"
    args = ["average", "--out", str(out), "--bn", "recompute", "--config", str(run / "config.yaml"), "--bn-batches", "2",
            *(str(run / "checkpoints" / step) for step in STEPS)]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("averaged 2 checkpoints (") and (
        f"BatchNorm statistics: recomputed on 16 training images (2 batches of {mnist_small}, the eval view: no augmentation; "
        "BatchNorm layers in train mode, cumulative average) on ") in line, line
    mean, recomputed = torch.load(averaged, weights_only=True)["model"], torch.load(out, weights_only=True)["model"]
    stats = [k for k in mean if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(mean[k], recomputed[k]) for k in stats)
    assert all(torch.equal(mean[k], recomputed[k]) for k in mean if k not in stats), "weights and counters as averaged"


def _predict(weights: list[Path], inputs: Path, out: Path, *extra: str) -> dict[str, list[str]]:
    """predict's CSV as {path: row}; the weights right before the inputs (the words split there)."""
    from disttrain.cli import main

    assert main(["predict", "--out", str(out), "--precision", "no", "--workers", "0", *extra, "--weights",
                 *map(str, weights), str(inputs)]) == 0
    with open(out, newline="") as stream:
        rows = list(csv.reader(stream))
    return {row[0]: row for row in rows[1:]} | {"": rows[0]}


def _resaved(source: Path, path: Path, **changes) -> Path:
    state = torch.load(source, weights_only=True)
    torch.save({**state, **changes}, path)
    return path


@pytest.mark.parametrize("case", ["plain", "tta, another presize"])
def test_an_ensemble_writes_the_mean_of_each_models_own_probabilities(run, averaged, mnist_small, tmp_path, capsys, case):
    a = run / "model.pt"
    b = averaged if case == "plain" else _resaved(averaged, tmp_path / "b36.pt", load_size=36)
    extra = () if case == "plain" else ("--tta", "--tta-n", "2")
    one, two = _predict([a], mnist_small / "valid", tmp_path / "a.csv", *extra), _predict([b], mnist_small / "valid", tmp_path / "b.csv", *extra)
    both = _predict([a, b], mnist_small / "valid", tmp_path / "ab.csv", *extra)
    assert "an ensemble of 2 models (the mean of their probabilities)" in capsys.readouterr().err
    assert both[""] == one[""] and list(both) == list(one) and len(both) == 111
    classes = both[""][3:]
    largest = 0.0
    for path, row in both.items():
        if not path:
            continue
        mean = [(float(x) + float(y)) / 2 for x, y in zip(one[path][3:], two[path][3:])]
        probs = [float(p) for p in row[3:]]
        largest = max(largest, max(abs(p - m) for p, m in zip(probs, mean)))
        assert probs[classes.index(row[1])] == float(row[2]) == max(probs)  # the label's is the top one (ties in 6 decimals either way)
    assert largest <= TOLERANCE
    assert any(one[p][3:] != two[p][3:] for p in one if p), "two different models"


def test_a_multi_label_ensemble_averages_the_sigmoids_then_applies_the_mean_threshold(run, averaged, mnist_small, tmp_path):
    a = _resaved(run / "model.pt", tmp_path / "ma.pt", task={"multi_label": True, "threshold": 0.4, "beta": 2.0})
    b = _resaved(averaged, tmp_path / "mb.pt", task={"multi_label": True, "threshold": 0.6, "beta": 2.0})
    one, two = _predict([a], mnist_small / "valid", tmp_path / "a.csv"), _predict([b], mnist_small / "valid", tmp_path / "b.csv")
    both = _predict([a, b], mnist_small / "valid", tmp_path / "ab.csv")
    assert both[""][:2] == ["path", "labels"]
    classes, tagged = both[""][2:], 0
    for path, row in both.items():
        if not path:
            continue
        probs = [float(p) for p in row[2:]]
        assert max(abs(p - (float(x) + float(y)) / 2) for p, x, y in zip(probs, one[path][2:], two[path][2:])) <= TOLERANCE
        assert row[1].split() == [c for c, p in zip(classes, probs) if p > 0.5 + 1e-6] or any(abs(p - 0.5) <= 1e-6 for p in probs)
        tagged += bool(row[1])
    assert 0 < tagged, "some tags above the threshold"


def test_models_of_other_classes_or_an_onnx_file_are_one_line_errors(run, tmp_path, mnist_small, capsys):
    from disttrain.cli import main

    a = run / "model.pt"
    state = torch.load(a, weights_only=True)
    other = _resaved(a, tmp_path / "other.pt", classes=list(reversed(state["classes"])))
    multi = _resaved(a, tmp_path / "multi.pt", task={"multi_label": True, "threshold": 0.5, "beta": 2.0})
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not used")
    for weights, message in (([a, other], f"{a} and {other}: the same classes in another order"),
                             ([a, multi], f"{a} and {multi}: one is a single-label model, the other multi-label"),
                             ([a, onnx], f"--weights {onnx}: an ensemble takes model.pt files only")):
        assert main(["predict", "--weights", *map(str, weights), str(mnist_small / "valid"), "--out", str(tmp_path / "x.csv"),
                     "--precision", "no", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("disttrain: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "x.csv").exists()


def test_the_weights_end_at_the_first_word_that_is_no_model_file(tmp_path):
    from disttrain.cli.parsers import split_weights

    zipped = tmp_path / "snapshot"
    torch.save({"w": torch.zeros(1)}, zipped)  # a torch file without a suffix
    assert split_weights(["a.pt", "b.PTH", str(zipped), "photos/", "c.pt"]) == (["a.pt", "b.PTH", str(zipped)], ["photos/", "c.pt"])
    assert split_weights(["model"]) == (["model"], [])
    assert split_weights(["model.pt", "x.jpg"]) == (["model.pt"], ["x.jpg"])


def test_sgdr_snapshots_hold_the_weights_at_each_cycle_end(run):
    """checkpoint.snapshot_cycles: cycle 0 ends with the first epoch (step 4), cycle 1 with the run;
    each snapshot is a model file predict takes (the weights, classes and the run's metadata)."""
    snapshots = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snapshots == ["cycle-0.pt", "cycle-1.pt"]
    first = torch.load(run / "snapshots" / "cycle-0.pt", weights_only=True)
    last = torch.load(run / "snapshots" / "cycle-1.pt", weights_only=True)
    at_step_4 = torch.load(run / "checkpoints" / "step-00000004" / "shared.pt", weights_only=True)["model"]
    final = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(first["model"][k], at_step_4[k]) for k in at_step_4)
    assert all(torch.equal(last["model"][k], final["model"][k]) for k in final["model"])
    assert {k: v for k, v in first.items() if k != "model"} == {k: v for k, v in final.items() if k != "model"}
