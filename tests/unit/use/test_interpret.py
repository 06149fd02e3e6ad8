"""The lesson's selections (disttrain/use/interpret.py) on records whose answers are known by
construction: top losses and their ties, the five views, most confused, precision / recall / F1 with
a class never predicted and one without images; the gather's input order; the grids show what the
model saw; a view without candidates is not written and the summary says so."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from disttrain.use.interpret import (
    Records,
    SampleRecorder,
    class_scores,
    confusion,
    most_confused,
    most_correct,
    most_incorrect,
    most_uncertain,
    random_pick,
    safe_names,
    seen_images,
    select_views,
    top_losses,
    write_interpretation,
)
from disttrain.metrics import Confusion


def records(probs: list[list[float]], labels: list[int], index: list[int] | None = None) -> Records:
    """Records whose softmax probabilities are `probs` (logits = log p)."""
    p = torch.tensor(probs, dtype=torch.float32)
    return Records.from_logits(index if index is not None else range(len(probs)), p.log(), torch.tensor(labels))


# three classes; (probabilities, label): correct unless said otherwise
SAMPLES = [
    ([0.90, 0.05, 0.05], 0),  # 0 correct, confident
    ([0.50, 0.40, 0.10], 0),  # 1 correct, uncertain (margin 0.10)
    ([0.20, 0.70, 0.10], 0),  # 2 wrong: predicted 1, p(0) 0.20
    ([0.05, 0.90, 0.05], 0),  # 3 wrong: predicted 1, p(0) 0.05 (most confidently wrong of class 0)
    ([0.10, 0.80, 0.10], 1),  # 4 correct
    ([0.05, 0.90, 0.05], 1),  # 5 correct, p(1) 0.90 (ties with 7)
    ([0.60, 0.35, 0.05], 1),  # 6 wrong: predicted 0
    ([0.05, 0.90, 0.05], 1),  # 7 correct, p(1) 0.90 (ties with 5)
]


@pytest.fixture
def recs() -> Records:
    return records([p for p, _ in SAMPLES], [label for _, label in SAMPLES])


def test_records_hold_the_loss_the_probability_of_the_true_class_and_the_top_2_margin(recs):
    assert recs.predicted.tolist() == [0, 0, 1, 1, 1, 1, 0, 1]
    assert recs.correct.tolist() == [True, True, False, False, True, True, False, True]
    assert recs.p_actual.tolist() == pytest.approx([0.9, 0.5, 0.2, 0.05, 0.8, 0.9, 0.35, 0.9], abs=1e-6)
    assert recs.loss.tolist() == pytest.approx([-math.log(p) for p in recs.p_actual.tolist()], rel=1e-5)
    assert recs.margin.tolist() == pytest.approx([0.85, 0.1, 0.5, 0.85, 0.7, 0.85, 0.25, 0.85], abs=1e-6)


def test_top_losses_are_the_highest_losses_and_ties_go_to_the_earlier_input(recs):
    assert top_losses(recs, 3) == [3, 2, 6]  # p(actual) 0.05, 0.20, 0.35
    assert top_losses(recs, 100) == [3, 2, 6, 1, 4, 0, 5, 7]  # 0, 5 and 7 tie at p 0.9: input order
    tied = records([[0.5, 0.5]] * 4, [1, 0, 1, 0])
    assert top_losses(tied, 3) == [0, 1, 2]


def test_the_five_views(recs):
    assert most_correct(recs, 1, 2) == [5, 7]  # p(1) 0.90 twice (input order), then 0.80
    assert most_correct(recs, 1, 9) == [5, 7, 4]
    assert most_correct(recs, 0, 9) == [0, 1]
    assert most_correct(recs, 2, 9) == []  # no image of class 2
    assert most_incorrect(recs, 0, 9) == [3, 2]  # lowest probability of the true class first
    assert most_incorrect(recs, 1, 9) == [6]
    assert most_uncertain(recs, 3) == [1, 6, 2]  # margins 0.10, 0.25, 0.50
    assert random_pick(recs, False, 9) == [2, 3, 6]  # fewer candidates than asked: all, in input order
    picked = random_pick(recs, True, 3, seed=5)
    assert len(picked) == 3 and picked == sorted(picked) and set(picked) <= {0, 1, 4, 5, 7}
    assert random_pick(recs, True, 3, seed=5) == picked  # the seed decides
    assert {tuple(random_pick(recs, True, 3, seed=s)) for s in range(20)} != {tuple(picked)}  # and it does draw
    views = {v.name: v.rows for v in select_views(recs, ["a", "b", "c"], 2, seed=5)}
    assert list(views) == ["top_losses", "random_correct", "random_incorrect", "most_uncertain", "most_correct_a", "most_correct_b",
                           "most_correct_c", "most_incorrect_a", "most_incorrect_b", "most_incorrect_c"]
    assert views["top_losses"] == [3, 2] and views["random_correct"] == random_pick(recs, True, 2, seed=5)
    assert views["most_correct_c"] == [] and views["most_incorrect_a"] == [3, 2]


def test_most_confused_and_the_per_class_scores_from_the_confusion_matrix(recs):
    counts = confusion(recs, 3)
    assert counts.dense().tolist() == [[2, 2, 0], [1, 3, 0], [0, 0, 0]]
    assert most_confused(counts, ["a", "b", "c"]) == [("a", "b", 2), ("b", "a", 1)]
    assert most_confused(Confusion.from_dense([[0, 1, 1], [1, 0, 3], [1, 0, 0]]), ["z", "y", "x"]) == [
        ("y", "x", 3), ("x", "z", 1), ("y", "z", 1), ("z", "x", 1), ("z", "y", 1)]
    a, b, c = class_scores(counts, ["a", "b", "c"])
    assert (a.precision, a.recall, a.support) == (pytest.approx(2 / 3), 0.5, 4)
    assert a.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert (b.precision, b.recall, b.f1, b.support) == (0.6, 0.75, pytest.approx(2 * 0.6 * 0.75 / 1.35), 4)
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 0)  # never predicted, no images
    never = class_scores(Confusion.from_dense([[3, 0], [2, 0]]), ["p", "q"])[1]  # 2 images, never predicted: precision 0 (zero_division=0)
    assert (never.precision, never.recall, never.f1, never.support) == (0.0, 0.0, 0.0, 2)


def test_the_gather_orders_every_ranks_records_by_input_index():
    from disttrain.dist.jobgroup import JobGroup

    recorder = SampleRecorder()
    recorder.add([4, 5], torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    recorder.add([0, 2], torch.tensor([[0.0, 1.0], [3.0, 0.0]]), torch.tensor([1, 1]))
    gathered = recorder.gather(JobGroup(1))
    assert gathered.index.tolist() == [0, 2, 4, 5] and gathered.label.tolist() == [1, 1, 0, 0]
    assert gathered.predicted.tolist() == [1, 0, 0, 1]
    assert len(SampleRecorder().gather(JobGroup(1))) == 0


def test_file_names_of_classes_are_safe_and_unique():
    assert safe_names(["cat", "a/b", "a b", "..", "ok-1.x"]) == ["cat", "a_b_1", "a_b_2", "class", "ok-1.x"]


def _picture(path, colour: int, size=(40, 30)):
    rng = np.random.default_rng(colour)
    array = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    array[..., colour] += 180
    Image.fromarray(array).save(path)
    return str(path)


def test_grids_show_what_the_model_saw_and_views_without_candidates_are_not_written(tmp_path):
    from disttrain.data.decode import load_presized
    from disttrain.models.forward import eval_view

    paths = [_picture(tmp_path / f"{i}.png", i % 2) for i in range(4)]
    view = eval_view(24, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], channels_last=True)
    images, ok = seen_images(paths[:2] + [str(tmp_path / "gone.png")], 24, view)
    assert images.dtype == np.uint8 and images.shape == (3, 24, 24, 3) and ok == [True, True, False]
    assert np.array_equal(images[0], load_presized(paths[0], 24))  # the presized square, normalization undone exactly
    smaller = seen_images(paths[:1], 32, view)[0][0]  # presized to 32, resampled to 24 by the view
    assert smaller.shape == (24, 24, 3) and abs(smaller.astype(int).mean() - images[0].astype(int).mean()) < 3

    every_one_right = records([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]], [0, 1, 0, 1])
    out = tmp_path / "out"
    written = write_interpretation(every_one_right, paths, ["red", "green"], out, 2, 24, view)
    assert sorted(p.name for p in out.iterdir()) == sorted(written.files) == sorted(
        ["top_losses.csv", "top_losses.png", "most_confused.csv", "confusion_matrix.csv", "confusion_matrix.png", "per_class.csv",
         "views.csv", "random_correct.png", "most_uncertain.png", "most_correct_red.png", "most_correct_green.png"])
    assert [v.name for v in written.empty] == ["random_incorrect", "most_incorrect_red", "most_incorrect_green"]
    lines = written.lines(["red", "green"])
    assert lines[0].startswith(f"interpret: 11 file(s) in {out}: top_losses.csv, ")
    assert "most_correct_<class>.png for 2 of 2 classes" in lines[0]
    assert lines[1] == "interpret: no images to show, not written: random_incorrect.png; most_incorrect_<class>.png of red, green"
    with open(out / "top_losses.csv", newline="") as stream:
        top = list(csv.reader(stream))
    assert top == [["rank", "path", "actual", "predicted", "loss", "probability_actual"],
                   ["1", paths[3], "green", "green", f"{-math.log(0.6):.6f}", "0.600000"],
                   ["2", paths[2], "red", "red", f"{-math.log(0.7):.6f}", "0.700000"]]
    assert (out / "most_confused.csv").read_text() == "actual,predicted,count\n"
    assert (out / "per_class.csv").read_text().splitlines()[1] == "red,1.000000,1.000000,1.000000,2"
    assert [(actual, predicted) for _, actual, predicted, _, _ in written.top] == [("green", "green"), ("red", "red")]
    assert np.array_equal(written.top[0][0], seen_images([paths[3]], 24, view)[0][0])
    for name in written.grids:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_interpret_options_outside_their_ranges_are_config_errors(tmp_path):
    from disttrain.config import ConfigError
    from disttrain.models.checks import load_config
    from disttrain.use.evaluate import EvaluateOptions, check_interpret

    with pytest.raises(ConfigError, match=r"^train.interpret: needs data.format=folder"):
        load_config(None, ["train.interpret=true", "data.format=shards"])
    with pytest.raises(ConfigError, match=r"^train.interpret_k: must be > 0"):
        load_config(None, ["train.interpret_k=0"])
    assert load_config(None, ["train.interpret=true"]).train.interpret
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^--interpret: needs a folder of images"):
        check_interpret(load_config(None), EvaluateOptions("m.pt", data=str(tmp_path), interpret="out"))
    with pytest.raises(ConfigError, match=r"^--interpret: needs a folder of images"):
        check_interpret(load_config(None, ["data.format=shards"]), EvaluateOptions("m.pt", interpret="out"))
    check_interpret(load_config(None, ["data.format=shards"]), EvaluateOptions("m.pt"))  # without --interpret: shards are fine
