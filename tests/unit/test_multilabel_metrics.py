"""The multi-label metrics (disttrain/multilabel.py): small cases worked out by hand in the comments,
the threshold search, and the same figures, bit for bit, whether the rows are held by 1, 2 or 3 ranks
in any partition and order (the ranks are threads exchanging their values through a barrier, the
`gather` and `reduce_sum` the result is given, as the collectives of a process group would)."""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch

from disttrain.multilabel import (THRESHOLDS, MultiLabelSums, accuracy_multi, average_precision, best_threshold,
                                  fbeta_samples, mean_ap, per_class_scores, per_class_table)

# 3 samples x 4 tags. At threshold 0.5 (a tag is predicted when its probability is strictly above it):
#   sample 0: predicted {0, 1}, true {0, 2}: tp 1, fp 1, fn 1 -> F2 = 5*1 / (5*1 + 4*1 + 1) = 1/2
#   sample 1: predicted {1, 2}, true {1, 2, 3}: tp 2, fp 0, fn 1 -> F2 = 5*2 / (5*2 + 4*1 + 0) = 5/7
#   sample 2: predicted {} (0.5 is not above 0.5), true {}: 0/0 -> 0 (sklearn's zero_division)
#   F2 = (1/2 + 5/7 + 0) / 3 = 17/42
#   cells right: sample 0: tags 0 and 3 (2), sample 1: tags 0, 1, 2 (3), sample 2: all 4 -> 9/12
PROBS = [[0.9, 0.6, 0.2, 0.1],
         [0.3, 0.8, 0.7, 0.4],
         [0.1, 0.2, 0.5, 0.4]]
TARGETS = [[1, 0, 1, 0],
           [0, 1, 1, 1],
           [0, 0, 0, 0]]


def test_f2_averaged_over_samples_matches_the_hand_computed_value():
    assert fbeta_samples(torch.tensor(PROBS), torch.tensor(TARGETS, dtype=torch.uint8), 0.5, 2.0) == pytest.approx(
        17 / 42, rel=1e-15)
    # beta 1 on sample 1: 2*2 / (2*2 + 1 + 0) = 4/5; sample 0: 2 / (2 + 1 + 1) = 1/2
    assert fbeta_samples(PROBS, TARGETS, 0.5, 1.0) == pytest.approx((1 / 2 + 4 / 5) / 3, rel=1e-15)
    # at 0.05 every tag is predicted: sample 0 tp 2 fp 2 -> 10/(10+2) = 5/6, sample 1 tp 3 fp 1 -> 15/16,
    # sample 2 tp 0 fp 4 -> 0
    assert fbeta_samples(PROBS, TARGETS, 0.05, 2.0) == pytest.approx((5 / 6 + 15 / 16) / 3, rel=1e-15)


def test_accuracy_multi_counts_the_cells_right_at_the_threshold():
    assert accuracy_multi(PROBS, TARGETS, 0.5) == 9 / 12
    # at 0.35 sample 1's tag 3 (0.4) and sample 2's tag 3 (0.4) and tag 2 (0.5) are predicted: +1 right, -2 right
    assert accuracy_multi(PROBS, TARGETS, 0.35) == 8 / 12
    assert math.isnan(accuracy_multi(np.zeros((0, 4)), np.zeros((0, 4)), 0.5))


def test_per_class_precision_recall_f1_support_and_ap():
    # tag 0: predicted [1,0,0], true [1,0,0]: P 1, R 1, F1 1; scores .9 (pos) .3 .1: AP 1
    # tag 1: predicted [1,1,0], true [0,1,0]: P 1/2, R 1, F1 2/3; the positive has the top score: AP 1
    # tag 2: predicted [0,1,0], true [1,1,0]: P 1, R 1/2, F1 2/3; ranked .7 (pos, P 1), .5, .2 (pos, P 2/3):
    #        AP (1 + 2/3) / 2 = 5/6
    # tag 3: nothing predicted, true [0,1,0]: P 0 (0/0), R 0, F1 0; .4 (pos) and .4 (neg) tie: one group,
    #        precision 1/2 at recall 1: AP 1/2
    scores = per_class_scores(PROBS, TARGETS, 0.5)
    expected = [(1, 1, 1, 1, 1), (1 / 2, 1, 2 / 3, 1, 1), (1, 1 / 2, 2 / 3, 2, 5 / 6), (0, 0, 0, 1, 1 / 2)]
    for got, (precision, recall, f1, support, ap) in zip(scores, expected, strict=True):
        assert got["precision"] == pytest.approx(precision, rel=1e-15)
        assert got["recall"] == pytest.approx(recall, rel=1e-15)
        assert got["f1"] == pytest.approx(f1, rel=1e-15)
        assert got["support"] == support
        assert got["ap"] == pytest.approx(ap, rel=1e-15)
    assert mean_ap(average_precision(PROBS, TARGETS)) == pytest.approx((1 + 1 + 5 / 6 + 1 / 2) / 4, rel=1e-15)


def test_a_class_without_positives_has_no_ap_and_is_left_out_of_the_mean():
    ap = average_precision([[0.9, 0.2], [0.1, 0.8]], [[0, 1], [0, 1]])
    assert math.isnan(ap[0]) and ap[1] == 1.0
    assert mean_ap(ap) == 1.0
    assert per_class_scores([[0.9, 0.2], [0.1, 0.8]], [[0, 1], [0, 1]], 0.5)[0] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "ap": None}


def ap_by_definition(scores: list[float], true: list[int]) -> Fraction:
    """Average precision from its definition, in exact fractions: for each distinct score, from the
    highest, every image scoring at least that much is predicted; sum of precision x recall added."""
    positives, total, seen_tp = sum(true), Fraction(0), 0
    for level in sorted(set(scores), reverse=True):
        tp = sum(t for s, t in zip(scores, true) if s >= level)
        predicted = sum(1 for s in scores if s >= level)
        total += Fraction(tp, predicted) * Fraction(tp - seen_tp, positives)
        seen_tp = tp
    return total


def test_average_precision_groups_equal_scores_whatever_their_order():
    scores, true = [0.9, 0.5, 0.5, 0.5, 0.1], [0, 1, 0, 1, 1]
    # groups: {.9}: tp 0 of 1; {.5 x 3}: tp 2 of 4 -> P 1/2, recall +2/3; {.1}: tp 3 of 5 -> P 3/5, +1/3
    # AP = 1/2 * 2/3 + 3/5 * 1/3 = 8/15 (with the tied positives ranked first it would be 0.589: not this)
    assert ap_by_definition(scores, true) == Fraction(8, 15)
    rng = np.random.default_rng(0)
    values = set()
    for _ in range(20):
        order = rng.permutation(len(scores))
        column = np.array(scores)[order][:, None]
        values.add(float(average_precision(column, np.array(true)[order][:, None])[0]))
    assert values == {float(average_precision(np.array(scores)[:, None], np.array(true)[:, None])[0])}
    assert values.pop() == pytest.approx(8 / 15, rel=1e-15)
    # a larger column with many ties: exact fractions again
    scores = (rng.integers(0, 6, 200) / 5).tolist()
    true = (rng.random(200) < 0.3).astype(int).tolist()
    got = average_precision(np.array(scores)[:, None], np.array(true)[:, None])[0]
    assert got == pytest.approx(float(ap_by_definition(scores, true)), rel=1e-14)


def test_best_threshold_picks_the_lowest_grid_value_with_the_best_f2():
    # true {0, 1}. Below 0.10 tags 0, 1, 2 are predicted: F2 = 10/11. At 0.10 and 0.11 (0.10 is not above
    # 0.10) tags 0 and 1: F2 = 1. From 0.12 to 0.29 tag 0 only: 5/9. From 0.30 none: 0.
    probs, targets = [[0.30, 0.12, 0.10, 0.02]], [[1, 1, 0, 0]]
    assert best_threshold(probs, targets, 2.0) == (0.10, 1.0)
    assert best_threshold(np.zeros((0, 4)), np.zeros((0, 4)), 2.0)[0] == 0.5
    assert len(THRESHOLDS) == 91 and THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95 and 0.1 in THRESHOLDS


def test_the_figures_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    probs = rng.random((300, 6)).round(2)  # many ties
    true = rng.random((300, 6)) < np.linspace(0.05, 0.6, 6)
    true[:3] = False  # samples without tags
    predicted = probs > 0.4
    expected_f2 = metrics.fbeta_score(true, predicted, beta=2, average="samples", zero_division=0)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(true, predicted, zero_division=0)
    assert fbeta_samples(probs, true, 0.4, 2.0) == pytest.approx(expected_f2, rel=1e-12)
    assert accuracy_multi(probs, true, 0.4) == metrics.accuracy_score(true.ravel(), predicted.ravel())
    got = per_class_scores(probs, true, 0.4)
    for c in range(6):
        assert got[c]["precision"] == pytest.approx(precision[c], rel=1e-12)
        assert got[c]["recall"] == pytest.approx(recall[c], rel=1e-12)
        assert got[c]["f1"] == pytest.approx(f1[c], rel=1e-12)
        assert got[c]["support"] == support[c]
        assert got[c]["ap"] == pytest.approx(metrics.average_precision_score(true[:, c], probs[:, c]), rel=1e-12)


class Ranks:
    """`n` threads standing for `n` ranks: `exchange(rank, value)` returns every rank's value in rank
    order once all have given theirs (an all-gather)."""

    def __init__(self, n: int):
        self.values: list = [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def exchange(self, rank: int, value):
        self.values[rank] = value
        self.barrier.wait()
        out = list(self.values)
        self.barrier.wait()  # no rank overwrites its value before every one has read them all
        return out


def evaluate(parts: list[list[tuple]], skipped: list[int], **options):
    """Each part's batches (logits, targets, TTA probabilities) added on its own rank; every rank's result."""
    ranks, results, errors = Ranks(len(parts)), [None] * len(parts), []

    def rank_main(rank: int):
        try:
            sums = MultiLabelSums(CLASSES, torch.device("cpu"), **options)
            for logits, targets, tta in parts[rank]:
                sums.add(logits, targets, tta if options.get("tta") else None)
            results[rank] = sums.result(lambda t: sum(ranks.exchange(rank, t)), skipped[rank],
                                        gather=lambda value: ranks.exchange(rank, value))
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            errors.append(error)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


CLASSES = 7


def rows(n: int = 211):
    """Logits on a coarse grid (many equal scores), targets with a class never positive and samples
    without tags, TTA probabilities; as numpy arrays, one row per sample."""
    rng = np.random.default_rng(2)
    logits = (rng.integers(-8, 9, (n, CLASSES)) / 4).astype(np.float32)
    targets = (rng.random((n, CLASSES)) < np.linspace(0.0, 0.7, CLASSES)).astype(np.uint8)
    targets[:5] = 0
    tta = rng.random((n, CLASSES)).astype(np.float32).round(1)
    tta[:2, :2] = (0.0, 1.0)  # clamped in the TTA loss
    return logits, targets, tta


def split(indices: np.ndarray, sizes: list[int], batch: int) -> list[list[tuple]]:
    """The rows `indices` in consecutive parts of `sizes` rows, each cut in batches of `batch`."""
    logits, targets, tta = rows()
    parts, start = [], 0
    for size in sizes:
        mine = indices[start:start + size]
        start += size
        parts.append([(torch.from_numpy(logits[b]), torch.from_numpy(targets[b]), torch.from_numpy(tta[b]))
                      for b in (mine[i:i + batch] for i in range(0, len(mine), batch))])
    return parts


@pytest.mark.parametrize("threshold", [0.5, 0.3, "auto"])
def test_one_two_and_three_ranks_in_any_partition_give_identical_figures(threshold):
    n = len(rows()[0])
    rng = np.random.default_rng(3)
    same = np.arange(n)
    layouts = [
        (split(same, [n], 64), [6]),
        (split(same, [100, n - 100], 32), [2, 4]),
        (split(rng.permutation(n), [n - 150, 50, 100], 17), [1, 2, 3]),
        (split(rng.permutation(n), [0, 120, n - 120], 5), [3, 0, 3]),  # a rank without samples
        (split(rng.permutation(n), [n], 1), [6]),
    ]
    results = [evaluate(parts, skipped, threshold=threshold, tta=True) for parts, skipped in layouts]
    first = results[0][0]
    for on_ranks in results:
        for result in on_ranks:
            assert result == first  # every field, floats compared with ==
    assert first.count == n and first.cells == n * CLASSES and first.skipped == 6
    assert first.per_class[0]["ap"] is None and not math.isnan(first.mean_ap)

    logits, targets, tta = rows()
    probs = torch.sigmoid(torch.from_numpy(logits).double()).numpy()
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits).double(), torch.from_numpy(targets).double()).item()
    assert first.loss == pytest.approx(expected_loss, rel=1e-12)
    used = best_threshold(probs, targets, 2.0)[0] if threshold == "auto" else threshold
    assert first.threshold == used
    assert first.fbeta == pytest.approx(fbeta_samples(probs, targets, used, 2.0), rel=1e-14)
    assert first.accuracy == first.correct / first.cells == accuracy_multi(probs, targets, used)
    assert first.tta_fbeta == pytest.approx(fbeta_samples(tta, targets, used, 2.0), rel=1e-14)
    assert first.tta_accuracy == accuracy_multi(tta, targets, used)
    p, y = torch.from_numpy(tta).double(), torch.from_numpy(targets).double()  # TTA probabilities of 0 and 1 too
    tta_loss = -(y * p.clamp_min(1e-12).log() + (1 - y) * (1 - p).clamp_min(1e-12).log()).mean().item()
    assert first.tta_loss == pytest.approx(tta_loss, rel=1e-12)
    table = per_class_table(first, [f"tag{c}" for c in range(CLASSES)])
    assert list(table) == [f"tag{c}" for c in range(CLASSES)] and table["tag3"] == first.per_class[3]


def test_without_tta_the_tta_figures_are_none_and_an_empty_evaluation_is_nan():
    parts = split(np.arange(30), [30], 8)
    result = evaluate(parts, [0])[0]
    assert (result.tta_loss, result.tta_accuracy, result.tta_fbeta, result.tta_correct) == (None,) * 4
    empty = evaluate([[], []], [1, 0], threshold="auto")[0]
    assert empty.count == 0 and empty.skipped == 1 and empty.threshold == 0.5
    assert all(math.isnan(value) for value in (empty.loss, empty.accuracy, empty.fbeta, empty.mean_ap))


def test_bad_arguments_fail_early_with_the_key_to_fix():
    with pytest.raises(ValueError, match="train.threshold"):
        MultiLabelSums(CLASSES, torch.device("cpu"), threshold=1.5)
    with pytest.raises(ValueError, match="train.fbeta"):
        MultiLabelSums(CLASSES, torch.device("cpu"), beta=0)
    sums = MultiLabelSums(CLASSES, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"expected both \(batch, 7\)"):
        sums.add(torch.zeros(4, CLASSES), torch.zeros(4, CLASSES - 1))
    with pytest.raises(ValueError, match="same"):
        fbeta_samples([[0.5, 0.5]], [[1]], 0.5, 2.0)
    with pytest.raises(ValueError, match="2 class names"):
        per_class_table(evaluate([split(np.arange(10), [10], 4)[0]], [0])[0], ["a", "b"])
