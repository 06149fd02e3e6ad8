"""Task's targets and losses: labels, multi-hot rows and soft (mixed) rows give the losses they must."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from disttrain.task import Task

C = 5


def _logits(n=8, seed=0):
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed)) * 3


def _labels(n=8):
    return torch.arange(n) % C


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_on_soft_one_hot_rows_equals_ce_on_labels_with_smoothing(eps):
    task = Task(classes=C, smoothing=eps)
    logits, labels = _logits(), _labels()
    on_labels = task.loss(logits, labels)
    soft = task.soft_targets(labels)
    on_soft = task.loss(logits, soft)
    # computed a third way, by hand: -sum(target * log_softmax), averaged
    by_hand = -(soft * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(on_labels, F.cross_entropy(logits, labels, label_smoothing=eps))  # the labels' path is as before
    assert torch.allclose(on_soft, on_labels, atol=1e-6)
    assert torch.allclose(by_hand, on_labels, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_soft_targets_of_labels_are_smoothed_one_hot_rows_summing_to_one(eps):
    soft = Task(classes=C, smoothing=eps).soft_targets(_labels())
    assert soft.dtype == torch.float32 and soft.shape == (8, C)
    assert torch.allclose(soft.sum(dim=1), torch.ones(8))
    assert torch.allclose(soft[torch.arange(8), _labels()], torch.full((8,), 1 - eps + eps / C))
    assert soft.min().item() == pytest.approx(eps / C)


def test_soft_targets_leave_float_rows_as_they_are():
    rows = torch.softmax(_logits(), dim=1)
    assert torch.equal(Task(classes=C, smoothing=0.1).soft_targets(rows), rows)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bce_on_labels_equals_bce_on_their_smoothed_one_hot_rows(eps):
    task = Task(classes=C, smoothing=eps, loss_kind="bce")
    logits, labels = _logits(), _labels()
    one_hot = F.one_hot(labels, C).float() * (1 - eps) + eps / C
    expected = F.binary_cross_entropy_with_logits(logits, one_hot)
    assert torch.allclose(task.loss(logits, labels), expected)
    assert torch.allclose(task.loss(logits, task.soft_targets(labels)), expected)
    assert not torch.allclose(task.loss(logits, labels), Task(classes=C, smoothing=eps).loss(logits, labels))  # not ce


def test_multi_label_loss_is_bce_on_the_smoothed_multi_hot_rows_whatever_the_loss_kind():
    eps = 0.1
    hot = (torch.rand(8, C, generator=torch.Generator().manual_seed(1)) < 0.4).to(torch.uint8)
    logits = _logits()
    expected = F.binary_cross_entropy_with_logits(logits, hot.float() * (1 - eps) + eps / C)
    for kind in ("ce", "bce"):
        task = Task(True, C, eps, loss_kind=kind)
        assert torch.equal(task.loss(logits, hot), expected)
        assert torch.allclose(task.loss(logits, task.soft_targets(hot)), expected)


def test_soft_rows_are_not_smoothed_again():
    task = Task(classes=C, smoothing=0.2)
    logits, rows = _logits(), torch.softmax(_logits(seed=3), dim=1)
    assert torch.allclose(task.loss(logits, rows), F.cross_entropy(logits, rows))
    bce = dataclasses.replace(task, loss_kind="bce")
    assert torch.allclose(bce.loss(logits, rows), F.binary_cross_entropy_with_logits(logits, rows))


def test_with_threshold_carries_every_other_field():
    task = Task(True, 7, 0.1, "auto", 1.0, "bce")
    moved = task.with_threshold(0.3)
    assert moved.threshold == 0.3
    for field in dataclasses.fields(Task):
        if field.name != "threshold":
            assert getattr(moved, field.name) == getattr(task, field.name), field.name


def test_saved_task_reads_back_and_an_older_entry_still_reads():
    task = Task(True, 4, 0.1, 0.4, 1.0, "bce")
    back = Task.from_saved({"task": task.to_saved()}, 4)
    assert (back.multi_label, back.classes, back.threshold, back.beta, back.loss_kind) == (True, 4, 0.4, 1.0, "ce")
    assert Task.from_saved({}, 3) == Task(classes=3)


def test_unknown_loss_kind_and_labels_without_classes_are_errors():
    with pytest.raises(ValueError, match="train.loss"):
        Task(classes=C, loss_kind="focal")
    with pytest.raises(ValueError, match="classes"):
        Task().soft_targets(_labels())
