"""`disttrain evaluate --interpret` of a model with known mistakes: a ResNet-18 that tells red, green
and blue pictures apart (trained here in a few steps on real PNG files) evaluated on a folder of
PNGs and JPEGs where three pictures sit in another colour's folder (their labels swapped). On 1 and
on 2 processes those three, and only they, top the losses, make up the incorrect views and the most
confused pairs; every file is byte-identical on 1 and 2 processes and every PNG a valid image."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch

pytestmark = pytest.mark.e2e

CLASSES = ["blue", "green", "red"]
CHANNEL = {"red": 0, "green": 1, "blue": 2}
SWAPPED = {"red-02.png": "green", "green-01.jpg": "blue", "blue-04.png": "red"}
"""picture -> the folder it is put in (its label); every other picture is in its own colour's folder."""
K = 4


def _picture(path: Path, colour: str, seed: str) -> Path:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    array = rng.integers(0, 70, (36, 44, 3), dtype=np.uint8)  # not square: the presize crops
    array[..., CHANNEL[colour]] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def _train(root: Path, weights: Path) -> None:
    """A ResNet-18 trained on 8 pictures per colour through the eval view, saved as a run saves model.pt."""
    from disttrain.train.checkpoint import save_weights
    from disttrain.config import ModelConfig
    from disttrain.data.decode import load_presized
    from disttrain.models.forward import eval_view
    from disttrain.models.build import build_model

    pictures = [(_picture(root / c / f"{i}.png", c, f"train/{c}/{i}"), label) for label, c in enumerate(CLASSES) for i in range(8)]
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    x = eval_view(32, mean, std)(torch.from_numpy(np.stack([load_presized(p, 32) for p, _ in pictures])).permute(0, 3, 1, 2), train=False)
    y = torch.tensor([label for _, label in pictures])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), len(CLASSES)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with _one_thread():
        for _ in range(6):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # the final weights' statistics
            norm.reset_running_stats()
            norm.momentum = None
        with torch.no_grad():
            model(x)
    save_weights(weights, model.state_dict(), CLASSES, "resnet18", normalize={"mean": mean, "std": std}, image_size=32, load_size=32,
                 precision="no")


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    """(model.pt, the evaluated folder, the swapped pictures' paths as evaluate lists them)."""
    root = tmp_path_factory.mktemp("colours")
    _train(root / "train", root / "model.pt")
    folder = root / "eval"
    for colour in CLASSES:
        for i in range(6):
            name = f"{colour}-{i:02d}.{'jpg' if i % 2 else 'png'}"
            _picture(folder / SWAPPED.get(name, colour) / name, colour, f"eval/{colour}/{i}")
    return root / "model.pt", folder, {str(folder / label / name) for name, label in SWAPPED.items()}


@contextlib.contextmanager
def _one_thread():
    """As a launched rank runs (OMP_NUM_THREADS=1): the same arithmetic, and 2 threads on a busy
    2-core machine wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def interpreted(swapped, tmp_path_factory):
    """nproc -> (the --interpret folder, --out's JSON, the command's stdout): 1 process (in this one)
    and 2 (accelerate launch), 5 batches of 4."""
    from disttrain.cli import main

    weights, folder, _ = swapped
    out, results = tmp_path_factory.mktemp("interpret"), {}
    for nproc in (1, 2):
        args = ["evaluate", "--weights", str(weights), "--data", str(folder), "--interpret", str(out / str(nproc)), "--interpret-k", str(K),
                "--batch-size", "4", "--out", str(out / f"{nproc}.json"), "train.precision=no", "data.num_workers=0"]
        if nproc == 1:
            printed = io.StringIO()
            with _one_thread(), contextlib.redirect_stdout(printed):
                assert main(args) == 0
            stdout = printed.getvalue()
        else:
            stdout = launch(["-m", "disttrain.cli", *args], nproc=nproc).stdout
        results[nproc] = out / str(nproc), json.loads((out / f"{nproc}.json").read_text()), stdout
    return results


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_swapped_pictures_and_only_they_top_the_losses(interpreted, swapped, nproc):
    out, result, stdout = interpreted[nproc]
    wrong = swapped[2]
    assert result["count"] == 18 and result["correct"] == 15 and result["world_size"] == nproc
    top = _csv(out / "top_losses.csv")
    assert [row["rank"] for row in top] == ["1", "2", "3", "4"]
    assert {row["path"] for row in top[:3]} == wrong and top[3]["path"] not in wrong
    losses = [float(row["loss"]) for row in top]
    assert losses == sorted(losses, reverse=True) and losses[2] > 1.0 > 0.1 > losses[3]
    for row in top[:3]:  # labelled by the folder, predicted by the colour
        name = Path(row["path"]).name
        assert (row["actual"], row["predicted"]) == (SWAPPED[name], name.split("-")[0]) and float(row["probability_actual"]) < 0.5
    assert _csv(out / "most_confused.csv") == [{"actual": "blue", "predicted": "green", "count": "1"},
                                              {"actual": "green", "predicted": "red", "count": "1"},
                                              {"actual": "red", "predicted": "blue", "count": "1"}]
    scores = {row["class"]: row for row in _csv(out / "per_class.csv")}
    assert all((r["precision"], r["recall"], r["support"]) == ("0.833333", "0.833333", "6") for r in scores.values())
    with open(out / "confusion_matrix.csv", newline="") as stream:
        assert [list(map(int, row[1:])) for row in list(csv.reader(stream))[1:]] == result["confusion"]

    views: dict[str, list[dict]] = {}
    for row in _csv(out / "views.csv"):
        views.setdefault(row["view"], []).append(row)
    assert {row["path"] for row in views["random_incorrect"]} == wrong
    assert len(views["random_correct"]) == K and not {row["path"] for row in views["random_correct"]} & wrong
    for label, colour in enumerate(CLASSES):
        (mistake,) = views[f"most_incorrect_{colour}"]
        assert mistake["actual"] == colour and mistake["path"] in wrong
        best = views[f"most_correct_{colour}"]
        assert len(best) == K and all(row["actual"] == row["predicted"] == colour for row in best)
        p = [float(row["probability_actual"]) for row in best]
        assert p == sorted(p, reverse=True)
    assert len(views["most_uncertain"]) == K
    assert f"interpret: 16 file(s) in {out}: top_losses.csv, most_confused.csv, " in stdout
    assert "most_correct_<class>.png for 3 of 3 classes, most_incorrect_<class>.png for 3 of 3 classes" in stdout


def test_every_file_is_the_same_on_1_and_2_processes_and_every_png_is_an_image(interpreted):
    one, two = interpreted[1][0], interpreted[2][0]
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 16
    assert {"top_losses.png", "random_correct.png", "random_incorrect.png", "most_uncertain.png", "most_correct_red.png",
            "most_incorrect_blue.png", "confusion_matrix.png"} <= set(names)
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
        if name.endswith(".png"):
            with Image.open(one / name) as image:
                image.verify()
                assert image.format == "PNG" and min(image.size) > 100


def test_interpret_arguments_are_checked_before_any_work(swapped, tmp_path, monkeypatch, capsys):
    """In this process: one line, exit 2, nothing written (the weights here do not exist)."""
    from disttrain.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    folder, none = str(swapped[1]), str(tmp_path / "none.pt")
    cases = [
        (["--data", folder, "--interpret", "out", "--interpret-k", "0"], "--interpret-k: must be at least 1"),
        (["--data", folder, "--interpret", "a-file"], "--interpret a-file: is a file, not a folder"),
        (["--data", str(tmp_path / "shards"), "--interpret", "out"],
         "--interpret: needs a folder of images (DIR/<class>/<images>), not shards"),
        (["--interpret", "out", "data.format=shards"], "--interpret: needs a folder of images"),
    ]
    for args, expected in cases:
        assert main(["evaluate", "--weights", none, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("disttrain: error: ") and expected in err and err.count("\n") == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "shards"]
