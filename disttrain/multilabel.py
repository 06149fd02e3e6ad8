"""Multi-label validation metrics (issue 26): each image has any number of the C tags, the model's
sigmoid outputs are thresholded per tag, and the figures are the lesson's and fastai's:
`accuracy_multi`, F-beta averaged over samples (the planet competition's F2), per-class precision,
recall, F1 and average precision, and the threshold that maximizes F-beta (the lesson's `opt_th`).

Why the rows are gathered rather than summed: the average precision ranks every validation image by
its score per class, and the threshold search recomputes F-beta at each of the 91 grid values; neither
can be rebuilt from per-rank sums. So each rank keeps its samples' logits, targets (and TTA
probabilities) on the device while it evaluates (no sync per batch), and `MultiLabelSums.result`
gathers every rank's rows to every rank once at the end. The cost: N x C x 9 bytes on every rank
(float32 logits, bool targets, float32 TTA probabilities), 1.2 MB for planet's 8,000 x 17, plus a few
float64 working copies of that size on the CPU while the figures are computed.

Exact on any number of processes: every figure is computed from the whole matrices in float64 with
formulas that do not depend on the order of the rows: per-cell values, integer counts, sums rounded
once (`math.fsum`), and average precision over groups of equal scores. So 1, 2 or 3 ranks holding the
same rows in any partition report bitwise-identical figures.

A tag is predicted when its probability is strictly above the threshold (`p > t`: the lesson's
`preds > th` and fastai's `accuracy_multi`; fastai's `FBetaMulti` uses `>=`, which differs only for a
probability exactly on the threshold). Used by the validation of a multi-label run and by
`disttrain evaluate` on a multi-label model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from disttrain.metrics import gather_objects

THRESHOLDS: tuple[float, ...] = tuple(k / 100 for k in range(5, 96))
"""The grid searched by `threshold: auto`: 0.05 to 0.95 in steps of 0.01, each value built exactly as
an integer / 100. The lesson's `opt_th` searches the same steps over 0.17 to 0.24 only."""


def _array(values: Any, dtype) -> np.ndarray:
    """A numpy copy of a tensor (on any device) or an array-like, as `dtype`."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype)


def _checked(probs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities as float64 and the targets as bool, of the same (N, C) shape."""
    probs, true = _array(probs, np.float64), _array(targets, np.float64) != 0
    if probs.shape != true.shape or probs.ndim != 2:
        raise ValueError(f"multi-label metrics need probabilities and targets of the same (N, C) shape, "
                         f"got {probs.shape} and {true.shape}")
    return probs, true


def _predicted(probs: Any, targets: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true), both bool (N, C): the tags above the threshold and the target tags."""
    probs, true = _checked(probs, targets)
    return probs > threshold, true


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """top / bottom, 0 where bottom is 0 (sklearn's zero_division=0)."""
    top, bottom = np.asarray(top, dtype=np.float64), np.asarray(bottom, dtype=np.float64)
    return np.divide(top, bottom, out=np.zeros_like(top), where=bottom > 0)


def _fbeta(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float) -> np.ndarray:
    """F-beta from counts, 0 where tp + fp + fn = 0 (sklearn's zero_division default)."""
    b2 = beta * beta
    return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * fn + fp)


def _mean(values: np.ndarray) -> float:
    """The mean, its sum rounded once (independent of the order of the values); NaN when empty."""
    return math.fsum(values.tolist()) / len(values) if len(values) else math.nan


def _sample_fbeta(predicted: np.ndarray, true: np.ndarray, beta: float) -> float:
    """The mean over samples (rows) of F-beta, from the bool (N, C) predicted and true tags."""
    tp = (predicted & true).sum(axis=1)
    return _mean(_fbeta(tp, predicted.sum(axis=1) - tp, true.sum(axis=1) - tp, beta))


def fbeta_samples(probs: Any, targets: Any, threshold: float, beta: float) -> float:
    """F-beta of each sample's predicted tags against its true tags, averaged over samples (the planet
    competition's F2 with beta 2; sklearn's `fbeta_score(average='samples')`, which fastai's
    `FBetaMulti(average='samples')` calls). A sample with no true and no predicted tag scores 0, as
    sklearn's default zero_division (planet has no such image: every one has a weather tag)."""
    return _sample_fbeta(*_predicted(probs, targets, threshold), beta)


def accuracy_multi(probs: Any, targets: Any, threshold: float) -> float:
    """The fraction of (sample, tag) cells predicted right (fastai's `accuracy_multi`); NaN when empty."""
    predicted, true = _predicted(probs, targets, threshold)
    return int((predicted == true).sum()) / true.size if true.size else math.nan


def average_precision(probs: Any, targets: Any) -> np.ndarray:
    """Each class's average precision as sklearn's `average_precision_score`: the precision at each
    distinct score (all images with that score or more counted as predicted: equal scores form one
    group, so the order of equal scores does not matter), weighted by the recall it adds. NaN for a
    class without positives (sklearn says 0 there; `mean_ap` leaves such classes out)."""
    scores, true = _checked(probs, targets)
    out = np.full(scores.shape[1], math.nan)
    for c in range(scores.shape[1]):
        positives = int(true[:, c].sum())
        if not positives:
            continue
        column = np.nan_to_num(scores[:, c], nan=-np.inf)  # NaN scores (a diverged model): one group, last
        order = np.argsort(-column, kind="stable")
        ranked, hits = column[order], np.cumsum(true[order, c])
        ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # last image of each group
        tp = hits[ends]
        precision = tp / (ends + 1)
        added = np.diff(tp, prepend=0)  # positives each group adds: the recall step is added / positives
        out[c] = math.fsum((added * precision).tolist()) / positives
    return out


def mean_ap(ap: np.ndarray) -> float:
    """The mean of the classes' average precisions over the classes with at least one positive."""
    return _mean(ap[~np.isnan(ap)])


def per_class_scores(probs: Any, targets: Any, threshold: float) -> list[dict]:
    """Per class, in class order: `{"precision", "recall", "f1", "support", "ap"}` at the threshold
    (0 where a ratio is 0/0: sklearn's zero_division=0 as `disttrain.use.interpret`; `ap` None for a
    class without positives, `support` its positives)."""
    predicted, true = _predicted(probs, targets, threshold)
    tp = (predicted & true).sum(axis=0)
    fp, fn, support = predicted.sum(axis=0) - tp, true.sum(axis=0) - tp, true.sum(axis=0)
    precision, recall, f1 = _ratio(tp, tp + fp), _ratio(tp, support), _fbeta(tp, fp, fn, 1.0)
    ap = average_precision(probs, targets)
    return [{"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
             "support": int(support[c]), "ap": None if math.isnan(ap[c]) else float(ap[c])}
            for c in range(len(tp))]


def best_threshold(probs: Any, targets: Any, beta: float) -> tuple[float, float]:
    """(threshold, F-beta): the value of `THRESHOLDS` with the highest sample-averaged F-beta, the lowest
    of equal ones; (0.5, NaN) without samples (nothing to choose from)."""
    probs, true = _checked(probs, targets)
    if not len(probs):
        return 0.5, math.nan
    best = (0.5, -math.inf)
    for threshold in THRESHOLDS:
        score = _sample_fbeta(probs > threshold, true, beta)
        if score > best[1]:
            best = (threshold, score)
    return best


@dataclass
class MultiLabelResult:
    """The multi-label figures of one evaluation, the same on every rank and any number of ranks."""

    loss: float
    """Binary cross-entropy with logits, averaged over every (sample, tag) cell, without smoothing."""
    accuracy: float
    """`accuracy_multi` at `threshold`: correct / cells."""
    fbeta: float
    """F-beta at `threshold`, averaged over samples."""
    threshold: float
    """The threshold used: the one given, or with `auto` the best of `THRESHOLDS` on these samples."""
    beta: float
    """The beta of F-beta (2: the planet competition's F2)."""
    count: int
    """The samples evaluated, over all ranks."""
    skipped: int
    """Unreadable samples, summed over ranks."""
    mean_ap: float
    """Mean average precision over the classes with at least one positive (NaN with none)."""
    per_class: list[dict]
    """Per class, in class order: precision, recall, f1, support, ap (see `per_class_scores`)."""
    correct: int
    """The (sample, tag) cells predicted right at `threshold` ..."""
    cells: int
    """... of count x classes."""
    tta_loss: float | None = None
    """With TTA: the binary cross-entropy of the TTA probabilities (clamped to 1e-12 from 0 and 1) ..."""
    tta_accuracy: float | None = None
    """... `accuracy_multi` and ..."""
    tta_fbeta: float | None = None
    """... F-beta of the TTA probabilities at the same `threshold` (the one of the plain pass) ..."""
    tta_correct: int | None = None
    """... and their cells predicted right (None without TTA)."""


def per_class_table(result: MultiLabelResult, classes: list[str]) -> dict[str, dict]:
    """`{class name: {"precision", "recall", "f1", "support", "ap"}}`."""
    if len(classes) != len(result.per_class):
        raise ValueError(f"{len(classes)} class names for a result of {len(result.per_class)} classes")
    return dict(zip(classes, result.per_class))


def _bce(probs_or_logits: np.ndarray, true: np.ndarray, logits: bool) -> float:
    """The binary cross-entropy averaged over every cell (NaN when empty): from logits (stable form),
    or from probabilities clamped 1e-12 away from 0 and 1."""
    x, y = probs_or_logits, true.astype(np.float64)
    if logits:
        cells = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    else:
        cells = -(y * np.log(np.maximum(x, 1e-12)) + (1 - y) * np.log(np.maximum(1 - x, 1e-12)))
    return _mean(cells.ravel())


class MultiLabelSums:
    """One rank's validation rows (float32 logits, bool targets, TTA probabilities; on the device: no
    sync per batch), turned into a `MultiLabelResult` from every rank's rows by `result`. `threshold`:
    a number in (0, 1) or "auto" (the best of `THRESHOLDS`); `beta`: F-beta's beta."""

    def __init__(self, num_classes: int, device: torch.device, threshold: float | str = 0.5,
                 beta: float = 2.0, tta: bool = False):
        if threshold != "auto" and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"threshold {threshold!r}: give a number between 0 and 1 or 'auto' (train.threshold)")
        if not beta > 0:
            raise ValueError(f"beta {beta!r}: F-beta needs a beta above 0 (train.fbeta)")
        self.classes, self.device = num_classes, device
        self.threshold, self.beta, self.tta = threshold, float(beta), tta
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        """Each batch's (logits, targets, TTA probabilities or None)."""

    def add(self, logits: torch.Tensor, targets: torch.Tensor, tta_probs: torch.Tensor | None = None) -> None:
        """A batch: float32 logits (B, C) of the plain pass, the multi-hot targets (B, C; 0 or 1, any
        dtype) and, with TTA, the TTA probabilities (B, C)."""
        if logits.ndim != 2 or logits.shape[1] != self.classes or targets.shape != logits.shape:
            raise ValueError(f"multi-label batch: logits {tuple(logits.shape)} and targets {tuple(targets.shape)}, "
                             f"expected both (batch, {self.classes})")
        if self.tta and (tta_probs is None or tta_probs.shape != logits.shape):
            raise ValueError(f"TTA evaluation needs TTA probabilities of shape {tuple(logits.shape)}")
        self.rows.append((logits.detach().float(), targets.detach() != 0,
                          tta_probs.detach().float() if self.tta else None))

    def result(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], skipped: int = 0,
               gather: Callable[[Any], list] = gather_objects) -> MultiLabelResult:
        """All ranks' figures (`reduce_sum`: one all-reduce of a tensor, for the skipped samples;
        `gather`: every rank's object, on the same ranks, by default over the default group;
        `skipped`: this rank's unreadable samples). With no sample at all the figures are NaN."""
        skipped_all = reduce_sum(torch.tensor([skipped], dtype=torch.float64, device=self.device)).cpu()
        columns = (0, 1, 2) if self.tta else (0, 1)  # logits, targets, TTA probabilities
        empty = torch.zeros(0, self.classes)
        parts = gather(tuple(torch.cat([row[i] for row in self.rows]).cpu() if self.rows else empty for i in columns))
        logits, true = (np.concatenate([_array(part[i], dtype) for part in parts]).reshape(-1, self.classes)
                        for i, dtype in ((0, np.float64), (1, bool)))
        with np.errstate(over="ignore"):  # exp(-logit) is inf below logit -709: the probability is 0
            probs = 1 / (1 + np.exp(-logits))
        if self.threshold == "auto":
            threshold, fbeta = best_threshold(probs, true, self.beta)
        else:
            threshold, fbeta = float(self.threshold), fbeta_samples(probs, true, self.threshold, self.beta)
        correct = int(((probs > threshold) == true).sum())
        result = MultiLabelResult(
            loss=_bce(logits, true, logits=True), accuracy=correct / true.size if true.size else math.nan, fbeta=fbeta,
            threshold=threshold, beta=self.beta, count=len(true), skipped=int(skipped_all.sum().item()),
            mean_ap=mean_ap(average_precision(probs, true)), per_class=per_class_scores(probs, true, threshold),
            correct=correct, cells=true.size)
        if self.tta:
            tta = np.concatenate([_array(part[2], np.float64) for part in parts]).reshape(-1, self.classes)
            result.tta_loss = _bce(tta, true, logits=False)
            result.tta_correct = int(((tta > threshold) == true).sum())
            result.tta_accuracy = result.tta_correct / true.size if true.size else math.nan
            result.tta_fbeta = fbeta_samples(tta, true, threshold, self.beta)
        return result
