"""The task, decided once from the data and handed down: single-label (one class per image: softmax
outputs, cross-entropy, accuracy) or multi-label (any number of tags per image, planet's: sigmoid
outputs, binary cross-entropy on the multi-hot targets, metrics at a threshold). The loaders, the
training step, the LR sweep, validation, TTA, predict, evaluate and export all ask it rather than
testing the data themselves. model.pt stores it (`to_saved`; an older model.pt has none: single-label).

Training may hand the loss soft targets (float, one row per sample: MixUp/CutMix's mixtures,
disttrain/data/mix.py) instead of labels; `soft_targets` turns labels into such rows, with the label
smoothing folded in, so that mixing and smoothing compose the same way for every loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch
import torch.nn.functional as F

from disttrain.metrics import EvalSums
from disttrain.multilabel import MultiLabelSums


@dataclass(frozen=True)
class Task:
    multi_label: bool = False
    """Several labels per image (data.label_delim)."""
    classes: int = 0
    """Outputs of the model (classes, or tags)."""
    smoothing: float = 0.0
    """train.label_smoothing: cross-entropy's, or the binary targets' (1 - eps + eps/C and eps/C)."""
    threshold: Union[float, str] = 0.5
    """Multi-label: a tag is predicted when its probability is above this; `auto`: the best F-beta's on the
    validation set (a number in model.pt)."""
    beta: float = 2.0
    """Multi-label: the beta of F-beta (train.fbeta)."""
    loss_kind: str = "ce"
    """train.loss for single-label data: `ce` (softmax cross-entropy) or `bce` (binary cross-entropy
    on the one-hot, smoothed or mixed targets). Multi-label data always trains with binary
    cross-entropy. Training only: model.pt does not store it (predictions are the same softmax)."""

    def __post_init__(self) -> None:
        if self.loss_kind not in ("ce", "bce"):
            raise ValueError(f"Task.loss_kind (train.loss): must be ce or bce, got {self.loss_kind!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The epoch table's metric columns after the losses."""
        if not self.multi_label:
            return ("accuracy",)
        return ("accuracy_multi", f"f{self.beta:g}", "threshold")

    def row(self, result) -> dict[str, float]:
        """The epoch table's metric columns of a validation result (`columns` in order)."""
        if not self.multi_label:
            return {"accuracy": result.accuracy}
        return dict(zip(self.columns, (result.accuracy, result.fbeta, result.threshold)))

    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """(N, classes) float32 target rows: (N,) int64 labels one-hot, (N, classes) uint8 multi-hot
        rows as floats, with the label smoothing folded in as y (1 - eps) + eps/C (for a one-hot row
        this is exactly cross-entropy's label_smoothing target). Float targets are taken as soft rows
        already (smoothed and mixed) and returned as float32, unchanged."""
        if targets.is_floating_point():
            return targets.float()
        if targets.dim() == 1:
            if self.classes <= 0:
                raise ValueError("Task.soft_targets: int64 labels need Task.classes (the number of classes), got 0")
            soft = F.one_hot(targets.long(), self.classes).float()
        else:
            soft = targets.float()
        if self.smoothing:
            soft = soft * (1 - self.smoothing) + self.smoothing / self.classes
        return soft

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch (float32 logits). Targets: int64 labels, uint8
        multi-hot rows, or float (N, classes) soft rows already smoothed and mixed (not smoothed
        again). Single-label `ce`: softmax cross-entropy; `bce` and multi-label: binary
        cross-entropy with logits on the soft rows."""
        if targets.is_floating_point():
            if not self.multi_label and self.loss_kind == "ce":
                return F.cross_entropy(logits, targets)
            return F.binary_cross_entropy_with_logits(logits, targets.float())
        if not self.multi_label and self.loss_kind == "ce":
            return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)
        return F.binary_cross_entropy_with_logits(logits, self.soft_targets(targets))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, or each tag's sigmoid."""
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)

    def sums(self, device: torch.device, tta: bool = False) -> EvalSums | MultiLabelSums:
        """A rank's validation sums (disttrain/metrics.py, disttrain/multilabel.py)."""
        if self.multi_label:
            return MultiLabelSums(self.classes, device, threshold=self.threshold, beta=self.beta, tta=tta)
        return EvalSums(self.classes or None, device, tta=tta)

    def with_threshold(self, threshold: float) -> "Task":
        """The same task at another threshold (every other field carried)."""
        return replace(self, threshold=threshold)

    def to_saved(self) -> dict:
        """model.pt's `task` entry (a fixed threshold: the one last used)."""
        return {"multi_label": self.multi_label, "threshold": self.threshold if self.threshold != "auto" else 0.5, "beta": self.beta}

    @classmethod
    def from_saved(cls, state: dict, classes: int) -> "Task":
        saved = state.get("task") or {}
        return cls(bool(saved.get("multi_label", False)), classes, 0.0, float(saved.get("threshold", 0.5)), float(saved.get("beta", 2.0)))
