"""The evaluation metrics at 20,000 classes (disttrain/metrics.py): per-class figures, top-5 and the most
confused pairs exact against a plain reference computed here with numpy and Counters; no C x C
matrix anywhere (the sums hold one int64 cell per image); the confusion files stay bounded."""

from __future__ import annotations

import csv
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from disttrain.metrics import Confusion, EvalSums, most_confused, per_class
from disttrain.tracking import MATRIX_CLASSES, write_confusion

CLASSES = 20_000
NAMES = [f"c{i:05d}" for i in range(CLASSES)]  # sorted as their indices: ties in the reference sort by name


def batches(n_batches: int = 40, size: int = 64):
    """Logits (float32, N x 20,000) and labels with a known structure: half the labels from 300
    frequent classes (their mistakes repeat), the other half anywhere (class 0 and 19,999 included);
    a third of the images boosted on their true class, a third on a fixed partner class, a third noise."""
    rng = np.random.default_rng(0)
    frequent = rng.choice(CLASSES, 300, replace=False)
    partner = (np.arange(CLASSES) * 7919 + 13) % CLASSES
    for b in range(n_batches):
        labels = np.where(rng.random(size) < 0.5, rng.choice(frequent, size), rng.integers(0, CLASSES, size))
        labels[:2] = (0, CLASSES - 1) if b == 0 else labels[:2]
        logits = rng.standard_normal((size, CLASSES), dtype=np.float32)
        kind = rng.integers(0, 3, size)
        rows = np.arange(size)
        logits[rows[kind == 0], labels[kind == 0]] += 4.0
        logits[rows[kind == 1], partner[labels[kind == 1]]] += 4.0
        yield logits, labels


def test_per_class_top5_and_most_confused_are_exact_at_20000_classes():
    sums = EvalSums(CLASSES, torch.device("cpu"))
    loss = 0.0
    count, correct, top5 = Counter(), Counter(), 0
    pairs = Counter()
    n = 0
    for logits, labels in batches():
        sums.add(torch.from_numpy(logits), torch.from_numpy(labels))
        predicted = logits.argmax(axis=1)
        top = np.argpartition(-logits, 5, axis=1)[:, :5]
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        loss -= (shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(axis=1))).sum()
        for label, guess, five in zip(labels.tolist(), predicted.tolist(), top.tolist()):
            count[label] += 1
            correct[label] += guess == label
            top5 += label in five
            if guess != label:
                pairs[(label, guess)] += 1
        n += len(labels)

    assert sum(len(cells) for cells in sums.cells) == n, "one int64 cell per image, nothing C x C"
    result = sums.result(lambda totals: totals)
    assert (result.count, result.correct) == (n, sum(correct.values()))
    assert result.top5 == top5 / n and result.accuracy == sum(correct.values()) / n
    assert result.loss == pytest.approx(loss / n, rel=1e-5)

    table = per_class(result.confusion, NAMES)
    expected = {name: {"correct": correct[i], "count": count[i], "accuracy": correct[i] / count[i] if count[i] else None}
                for i, name in enumerate(NAMES)}
    assert table == expected
    assert table["c00000"]["count"] >= 1 and table["c19999"]["count"] >= 1

    reference = sorted(((NAMES[t], NAMES[p], k) for (t, p), k in pairs.items()), key=lambda cell: (-cell[2], cell[0], cell[1]))
    assert reference[0][2] >= 3 and reference[4][2] == reference[5][2], "repeated pairs and a tie across the cut of 5"
    assert most_confused(result.confusion, NAMES) == reference
    for limit in (1, 5, 20):
        assert most_confused(result.confusion, NAMES, limit) == reference[:limit]
    assert result.confusion.predictions().sum() == n and len(result.confusion.cells) <= n


def test_many_classes_write_every_nonzero_cell_and_a_bounded_plot(tmp_path):
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.integers(0, CLASSES, 5000))
    predicted = torch.where(torch.from_numpy(rng.random(5000) < 0.6), labels, (labels * 31 + 7) % CLASSES)
    confusion = Confusion.from_labels(labels, predicted, CLASSES)
    assert write_confusion(confusion, NAMES, tmp_path) == ["confusion_cells.csv", "confusion_summary.png"]
    with open(tmp_path / "confusion_cells.csv", newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["actual", "predicted", "count"]
    cells = Counter(zip(labels.tolist(), predicted.tolist()))
    assert {(r[0], r[1]): int(r[2]) for r in rows[1:]} == {(NAMES[t], NAMES[p]): k for (t, p), k in cells.items()}
    with Image.open(tmp_path / "confusion_summary.png") as image:
        assert max(image.size) <= 2000, image.size  # the old plot: 0.5 inch per class, a 1,000,000-pixel square here

    few = Confusion.from_dense([[3, 1], [0, 2]])
    assert write_confusion(few, ["a", "b"], tmp_path / "few") == ["confusion_matrix.csv", "confusion_matrix.png"]
    assert (tmp_path / "few" / "confusion_matrix.csv").read_text().splitlines()[1:] == ["a,3,1", "b,0,2"]
    assert MATRIX_CLASSES < CLASSES and not math.isnan(per_class(few, ["a", "b"])["b"]["accuracy"])
