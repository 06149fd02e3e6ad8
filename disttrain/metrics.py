"""Exact evaluation metrics: each rank adds its batches to sums and counts (`EvalSums`), which are
reduced across ranks once at the end, so the result is the same on any number of processes.

The confusion matrix is kept as its nonzero cells (`Confusion`): each rank notes every sample's
cell (true class x classes + predicted, int64, on the device), counts its distinct cells once at
the end, and the ranks' (cell, count) pairs are gathered and summed. That is at most one cell per
validation image whatever the number of classes (a dense matrix is C x C: 477 million cells at
21,841 classes), and exact: per-class figures and the most confused pairs come from it.

Used by the validation of a training run (`disttrain.train.trainer.evaluate`), by `disttrain evaluate`
(`disttrain.use.evaluate`) and by the interpretation (`disttrain.use.interpret`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Confusion:
    """A confusion matrix (row = true class, column = predicted) as its nonzero cells; exact at any
    number of classes. Build it with `from_cells`, `from_labels` or `from_dense`."""

    classes: int
    cells: torch.Tensor
    """int64, ascending, distinct: true class * classes + predicted class, of every nonzero cell."""
    counts: torch.Tensor
    """int64: the images in each of those cells (all > 0)."""

    @classmethod
    def from_cells(cls, classes: int, cells: torch.Tensor, counts: torch.Tensor) -> "Confusion":
        """Cells given any number of times (e.g. one part per rank), their counts summed (on the CPU)."""
        cells, counts = cells.long().cpu(), counts.long().cpu()
        distinct, where = torch.unique(cells, return_inverse=True)
        summed = torch.zeros(len(distinct), dtype=torch.int64).index_add_(0, where, counts)
        kept = summed != 0
        return cls(classes, distinct[kept], summed[kept])

    @classmethod
    def from_labels(cls, labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> "Confusion":
        """One image per (true label, predicted class) pair."""
        cells = labels.long().cpu() * classes + predicted.long().cpu()
        return cls.from_cells(classes, cells, torch.ones_like(cells))

    @classmethod
    def from_dense(cls, matrix) -> "Confusion":
        """From a (classes x classes) matrix of counts (nested lists or a tensor)."""
        flat = torch.as_tensor(matrix, dtype=torch.int64)
        classes = flat.shape[0]
        flat = flat.flatten()
        cells = flat.nonzero().flatten()
        return cls(classes, cells, flat[cells])

    @property
    def true(self) -> torch.Tensor:
        """The true class of each cell."""
        return self.cells // self.classes

    @property
    def predicted(self) -> torch.Tensor:
        """The predicted class of each cell."""
        return self.cells % self.classes

    def _per_class(self, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.classes, dtype=torch.int64).index_add_(0, index, values)

    def support(self) -> torch.Tensor:
        """Images per true class (the row sums)."""
        return self._per_class(self.true, self.counts)

    def predictions(self) -> torch.Tensor:
        """Images predicted as each class (the column sums)."""
        return self._per_class(self.predicted, self.counts)

    def correct(self) -> torch.Tensor:
        """Images of each class predicted as that class (the diagonal)."""
        hit = self.true == self.predicted
        return self._per_class(self.true[hit], self.counts[hit])

    def dense(self) -> torch.Tensor:
        """The whole (classes x classes) int64 matrix: for a few classes only (it is C x C)."""
        flat = torch.zeros(self.classes * self.classes, dtype=torch.int64)
        flat[self.cells] = self.counts
        return flat.view(self.classes, self.classes)


def per_class(confusion: Confusion, classes: list[str]) -> dict[str, dict]:
    """`{class: {"correct", "count", "accuracy"}}` (row = true class); the accuracy is None for a
    class without samples."""
    counts, correct = confusion.support().tolist(), confusion.correct().tolist()
    return {name: {"correct": hit, "count": count, "accuracy": hit / count if count else None}
            for name, hit, count in zip(classes, correct, counts)}


def most_confused(confusion: Confusion, classes: list[str], limit: int | None = None) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) of the off-diagonal cells, the highest count first, then by the
    names; the first `limit` of them (all with None)."""
    wrong = confusion.true != confusion.predicted
    cells, counts = confusion.cells[wrong], confusion.counts[wrong]
    if limit is not None and len(counts) > limit:  # only the cells that can make the cut, then the exact order
        kept = counts >= counts.topk(limit).values[-1]
        cells, counts = cells[kept], counts[kept]
    n = confusion.classes
    found = [(classes[cell // n], classes[cell % n], count) for cell, count in zip(cells.tolist(), counts.tolist())]
    return sorted(found, key=lambda cell: (-cell[2], cell[0], cell[1]))[:limit]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, over torch.distributed's default group (the one the
    Accelerator reduces on); `[value]` without one."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    count: int
    skipped: int = 0
    top5: float | None = None
    """Top-5 accuracy (None with fewer than 5 classes)."""
    confusion: Confusion | None = None
    """The confusion matrix (row = true class, column = predicted), summed over ranks."""
    tta_loss: float | None = None
    """With TTA: the loss (negative log of the blended probability of the true class) ..."""
    tta_accuracy: float | None = None
    """... and the accuracy of the TTA predictions (see disttrain/use/inference.py)."""
    tta_correct: int | None = None


class EvalSums:
    """One rank's sums: loss, correct, count, skipped, top-5 correct, TTA loss, TTA correct (float64,
    exact for counts below 2**53; on the device: no sync per batch) and each sample's confusion cell
    (int64, on the device; `num_classes` enables top-5, with 5 classes or more, and the confusion)."""

    def __init__(self, num_classes: int | None, device: torch.device, tta: bool = False):
        self.classes = num_classes or 0
        self.tta = tta
        self.sums = torch.zeros(7, device=device, dtype=torch.float64)
        self.cells: list[torch.Tensor] = []
        """Each batch's true label * classes + predicted class."""

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
            self.cells.append(labels.long() * classes + predicted)

    def result(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], skipped: int = 0,
               gather: Callable[[Any], list] = gather_objects) -> EvalResult:
        """All ranks' totals (`reduce_sum`: one all-reduce of a tensor; `gather`: every rank's object,
        on the same ranks, by default over the default group; `skipped`: this rank's unreadable
        samples). With no sample at all, the loss and accuracies are NaN."""
        self.sums[3] += skipped
        totals = reduce_sum(self.sums).cpu()
        loss_sum, correct, count, skipped, top5, tta_loss, tta_correct = totals.tolist()
        classes = self.classes
        confusion = None
        if classes:
            mine = torch.cat(self.cells) if self.cells else torch.zeros(0, dtype=torch.int64)
            cells, counts = torch.unique(mine, return_counts=True)  # this rank's distinct cells, on its device
            parts = gather((cells.cpu(), counts.cpu()))
            confusion = Confusion.from_cells(classes, torch.cat([c for c, _ in parts]), torch.cat([n for _, n in parts]))
        per = (lambda value: value / count) if count else (lambda value: math.nan)
        return EvalResult(
            per(loss_sum),
            per(correct),
            int(correct),
            int(count),
            int(skipped),
            top5=per(top5) if classes >= 5 else None,
            confusion=confusion,
            tta_loss=per(tta_loss) if self.tta else None,
            tta_accuracy=per(tta_correct) if self.tta else None,
            tta_correct=int(tta_correct) if self.tta else None,
        )
