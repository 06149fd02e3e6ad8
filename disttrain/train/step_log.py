"""What the Trainer logs while it trains, apart from the loop itself: the window of loss and images
since the last log point (`LogWindow`, reduced across ranks only there), the rows of train/* and
valid/* metrics made from it, and the augmented samples shown once in W&B (`SampleLog`).

The loop (disttrain/train/trainer.py) decides when; this module decides what a row holds. Nothing
here reads the device outside `LogWindow.take`: the loop's steps stay free of syncs."""

from __future__ import annotations

import math
import time

import torch
from accelerate import Accelerator

from disttrain.metrics import EvalResult
from disttrain.multilabel import MultiLabelResult
from disttrain.tracking import Tracker

SAMPLE_GRID = 16  # augmented images shown once in W&B (train/samples)


class LogWindow:
    """Loss and images since the last log point (device tensors, read only at the log point) and
    the training time they took (the clock is paused outside train_epoch)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.images = 0
        self.seconds = 0.0
        self._since: float | None = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def add(self, loss_sum: torch.Tensor, images: int) -> None:
        self.loss += loss_sum
        self.images += images

    def take(self, accelerator: Accelerator, flag: bool = False) -> tuple[float, int, float, bool]:
        """(mean loss over all ranks, images on all ranks, training seconds, any rank's `flag`) since
        the last call: one all-reduce, called on every rank at the same step."""
        local = torch.stack([self.loss, self.loss.new_tensor(self.images), self.loss.new_tensor(float(flag))])
        loss_sum, images, flags = accelerator.reduce(local, reduction="sum").tolist()
        self.pause()
        seconds = max(self.seconds, 1e-9)
        self.loss.zero_()
        self.images, self.seconds = 0, 0.0
        self.resume()
        return loss_sum / images, int(images), seconds, flags > 0

    def state_dict(self) -> dict:
        """This rank's window, for its checkpoint (a resumed run's first log point counts it)."""
        return {"loss": self.loss.detach().cpu(), "images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.loss.copy_(state["loss"].to(self.loss.device))
        self.images, self.seconds = state["images"], state["seconds"]


def train_metrics(loss: float, images: int, seconds: float, epoch: float, lrs: list[float], lr_owner: list[int] | None,
                  grad_norm: torch.Tensor | None, stage_key: dict) -> dict:
    """The train/* row of a log point: the window's loss and speed, the LR (one series where every
    param group shares it, else one per layer group), the last gradient norm (train.clip_grad)."""
    metrics = {"train/loss": loss, "train/images_per_sec": images / seconds, "epoch": epoch, **stage_key}
    named = dict(zip(lr_owner, lrs)) if lr_owner is not None else dict(enumerate(lrs))  # by layer group
    if lr_owner is None and len(set(lrs)) == 1:  # decay / no-decay groups share one LR: one series
        metrics["train/lr"] = lrs[0]
    else:
        metrics.update({f"train/lr/group{g}": lr for g, lr in named.items()})
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    return metrics


def _scores(result: EvalResult | MultiLabelResult, prefix: str) -> dict:
    if isinstance(result, MultiLabelResult):
        scores = {"accuracy_multi": result.accuracy, f"f{result.beta:g}": result.fbeta, "threshold": result.threshold,
                  "mAP": result.mean_ap}
    else:
        scores = {"accuracy": result.accuracy}
    if getattr(result, "top5", None) is not None:
        scores["top5"] = result.top5
    return {"valid/" + prefix + "loss": result.loss, **{f"valid/{prefix}{k}": v for k, v in scores.items()}}


def epoch_metrics(result: EvalResult | MultiLabelResult, seconds: float, epoch: int, stage_key: dict,
                  ema_result: EvalResult | MultiLabelResult | None = None) -> dict:
    """The valid/* row at the end of `epoch` (multi-label: valid/accuracy_multi, valid/f<beta>,
    valid/threshold, valid/mAP in place of the accuracy and top-5); with train.ema the EMA's as
    valid/ema_loss, valid/ema_accuracy, ... (left out while a stage does not update it)."""
    metrics = _scores(result, "")
    if ema_result is not None and not math.isnan(ema_result.loss):
        metrics.update(_scores(ema_result, "ema_"))
    return {**metrics, "epoch_time_sec": seconds, "epoch": epoch + 1, **stage_key}


class SampleLog:
    """The first training batch's augmented images, shown once in W&B (train/samples): not again in
    a later stage, nor by a resumed run (`done`)."""

    def __init__(self, tracker: Tracker | None, mean: list[float] | None, std: list[float] | None):
        self.tracker, self.mean, self.std = tracker, mean, std
        self.shown = tracker is None

    def show(self, images: torch.Tensor, step: int) -> None:
        """Log `images` (model inputs) unless shown already."""
        if not self.shown:
            self.tracker.log_samples(images[:SAMPLE_GRID], self.mean, self.std, step=step)
            self.shown = True

    def done(self) -> None:
        """Shown already (a resumed run)."""
        self.shown = True
