"""What the Trainer logs (disttrain/train/step_log.py): the train/* and valid/* rows, the log window's
checkpoint state, and the samples shown once."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from disttrain.metrics import EvalResult
from disttrain.train.step_log import SAMPLE_GRID, LogWindow, SampleLog, epoch_metrics, train_metrics


def test_one_lr_series_where_every_group_shares_it_else_one_per_layer_group():
    shared = train_metrics(0.5, 64, 2.0, 1.25, [0.1, 0.1], None, None, {})
    assert shared == {"train/loss": 0.5, "train/images_per_sec": 32.0, "epoch": 1.25, "train/lr": 0.1}
    grouped = train_metrics(0.5, 64, 2.0, 1.25, [0.01, 0.01, 0.1], [0, 0, 1], torch.tensor(3.0), {"stage": 1})
    assert grouped["train/lr/group0"] == 0.01 and grouped["train/lr/group1"] == 0.1 and "train/lr" not in grouped
    assert grouped["train/grad_norm"] == 3.0 and grouped["stage"] == 1


def test_epoch_row_carries_top5_only_when_measured():
    result = EvalResult(loss=0.25, accuracy=0.9, correct=9, count=10)
    assert epoch_metrics(result, 3.0, 4, {}) == {"valid/loss": 0.25, "valid/accuracy": 0.9, "epoch_time_sec": 3.0, "epoch": 5}


def test_the_window_takes_its_sums_once_and_round_trips_through_a_checkpoint():
    window = LogWindow(torch.device("cpu"))
    window.resume()
    window.add(torch.tensor(6.0, dtype=torch.float64), 3)
    state = window.state_dict()
    again = LogWindow(torch.device("cpu"))
    again.load_state_dict(state)
    assert float(again.loss) == 6.0 and again.images == 3
    loss, images, seconds, stop = again.take(Accelerator(cpu=True), flag=True)
    assert (loss, images, stop) == (2.0, 3, True) and seconds > 0
    assert float(again.loss) == 0.0 and again.images == 0, "taken: the next window starts empty"


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_samples(self, images, mean, std, step):
        self.logged.append((images.shape[0], step))


def test_samples_are_shown_once_and_not_by_a_resumed_run():
    tracker = _Tracker()
    samples = SampleLog(tracker, [0.5], [0.5])
    samples.show(torch.zeros(SAMPLE_GRID + 4, 3, 8, 8), step=0)
    samples.show(torch.zeros(2, 3, 8, 8), step=1)
    assert tracker.logged == [(SAMPLE_GRID, 0)]
    resumed = SampleLog(tracker, [0.5], [0.5])
    resumed.done()
    resumed.show(torch.zeros(2, 3, 8, 8), step=5)
    assert tracker.logged == [(SAMPLE_GRID, 0)]
    SampleLog(None, None, None).show(torch.zeros(2, 3, 8, 8), step=0)  # no tracker: nothing to show it to
