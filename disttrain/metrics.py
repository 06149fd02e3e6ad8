"""Exact evaluation metrics: each rank adds its batches to sums and counts (`EvalSums`), which are
reduced across ranks once at the end, so the result is the same on any number of processes.

Used by the validation of a training run (`disttrain.trainer.evaluate`) and by `disttrain evaluate`
(`disttrain.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    count: int
    skipped: int = 0
    top5: float | None = None
    """Top-5 accuracy (None with fewer than 5 classes)."""
    confusion: torch.Tensor | None = None
    """(classes x classes) counts, row = true class, column = predicted, summed over ranks."""
    tta_loss: float | None = None
    """With TTA: the loss (negative log of the blended probability of the true class) ..."""
    tta_accuracy: float | None = None
    """... and the accuracy of the TTA predictions (see disttrain/inference.py)."""
    tta_correct: int | None = None


class EvalSums:
    """One rank's sums: loss, correct, count, skipped, top-5 correct, TTA loss, TTA correct (float64,
    on the device: no sync per batch) and the confusion counts (`num_classes` enables top-5, with 5
    classes or more, and the confusion matrix)."""

    def __init__(self, num_classes: int | None, device: torch.device, tta: bool = False):
        self.classes = num_classes or 0
        self.tta = tta
        self.sums = torch.zeros(7, device=device, dtype=torch.float64)
        self.confusion = torch.zeros(self.classes * self.classes, device=device, dtype=torch.float64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, tta: torch.Tensor | None = None) -> None:
        """A batch: float32 logits of the plain pass, the true labels, the TTA probabilities (with TTA)."""
        sums, classes = self.sums, self.classes
        if self.tta:
            sums[5] += F.nll_loss(tta.clamp_min(1e-12).log(), labels, reduction="sum").double()
            sums[6] += (tta.argmax(dim=1) == labels).sum()
        predicted = logits.argmax(dim=1)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (predicted == labels).sum()
        sums[2] += len(labels)
        if classes >= 5:
            sums[4] += (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()
        if classes:
            self.confusion += torch.bincount(labels * classes + predicted, minlength=classes * classes).double()

    def result(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], skipped: int = 0) -> EvalResult:
        """All ranks' totals (`reduce_sum`: one all-reduce of a tensor; `skipped`: this rank's unreadable
        samples). With no sample at all, the loss and accuracies are NaN."""
        self.sums[3] += skipped
        totals = reduce_sum(torch.cat([self.sums, self.confusion])).cpu()
        loss_sum, correct, count, skipped, top5, tta_loss, tta_correct = totals[:7].tolist()
        classes = self.classes
        per = (lambda value: value / count) if count else (lambda value: math.nan)
        return EvalResult(
            per(loss_sum),
            per(correct),
            int(correct),
            int(count),
            int(skipped),
            top5=per(top5) if classes >= 5 else None,
            confusion=totals[7:].long().view(classes, classes) if classes else None,
            tta_loss=per(tta_loss) if self.tta else None,
            tta_accuracy=per(tta_correct) if self.tta else None,
            tta_correct=int(tta_correct) if self.tta else None,
        )


def per_class(confusion: torch.Tensor, classes: list[str]) -> dict[str, dict]:
    """`{class: {"correct", "count", "accuracy"}}` from a confusion matrix (row = true class); the
    accuracy is None for a class without samples."""
    rows = confusion.tolist()
    table = {}
    for i, name in enumerate(classes):
        count, correct = int(sum(rows[i])), int(rows[i][i])
        table[name] = {"correct": correct, "count": count, "accuracy": correct / count if count else None}
    return table
