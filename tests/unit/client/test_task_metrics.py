"""Task metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from client import task_metrics as tm

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_rows_are_truth() -> None:
    cm = tm.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.dtype == np.int64


def test_accuracy_recall_f1_by_hand() -> None:
    cm = tm.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert tm.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    np.testing.assert_allclose(tm.per_class_recall(cm), [1 / 2, 1.0, 1 / 2])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FN 1 -> 2/3
    np.testing.assert_allclose(tm.per_class_f1(cm), [0.5, 0.8, 2 / 3])
    assert tm.macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_absent_class_is_left_out_of_macro_f1_and_has_no_recall() -> None:
    cm = tm.confusion_matrix(Y_TRUE, Y_PRED, 4)  # class 3 never true nor predicted
    assert math.isnan(tm.per_class_recall(cm)[3]) and math.isnan(tm.per_class_f1(cm)[3])
    assert tm.macro_f1(cm) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # A class only ever predicted counts with F1 0.
    cm2 = tm.confusion_matrix([0, 0], [0, 1], 2)
    assert tm.macro_f1(cm2) == pytest.approx((2 / 3 + 0.0) / 2)


def test_majority_and_chance_baselines() -> None:
    assert tm.majority_baseline([2, 2, 1], 3) == (2, pytest.approx(2 / 3))
    assert tm.majority_baseline(Y_TRUE, 3) == (0, pytest.approx(2 / 6))  # tie: lowest id
    assert tm.chance_baseline([2, 4]) == pytest.approx(0.375)
    assert math.isnan(tm.majority_baseline([], 3)[1])


def test_one_vs_rest_auc_by_hand() -> None:
    # Two classes, probabilities of class 0 per row: 0.9, 0.6 (class 0), 0.6, 0.2 (class 1).
    # Class 0: pairs (0.9, 0.6) 1, (0.9, 0.2) 1, (0.6, 0.6) a tie 1/2, (0.6, 0.2) 1 -> 3.5 / 4.
    # Class 1 ranks by 1 - p0: (0.4, 0.4) 1/2, (0.4, 0.1) 1, (0.8, 0.4) 1, (0.8, 0.1) 1 -> 3.5 / 4.
    p0 = np.array([0.9, 0.6, 0.6, 0.2])
    scores = np.log(np.stack([p0, 1 - p0], axis=1))
    y = [0, 0, 1, 1]
    np.testing.assert_allclose(tm.one_vs_rest_auc(y, scores), [0.875, 0.875])
    # Log-likelihoods are compared as probabilities: a constant per row changes nothing (no
    # ties here, which rounding could break). p0 0.9, 0.4 (class 0) against 0.6, 0.2: 3 of 4.
    scores = np.log(np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]]))
    shifted = scores + np.array([[-3.0], [5.0], [0.5], [-7.0]])
    np.testing.assert_allclose(tm.one_vs_rest_auc(y, scores), [0.75, 0.75])
    np.testing.assert_allclose(tm.one_vs_rest_auc(y, shifted), [0.75, 0.75])
    # Perfectly ranked and perfectly reversed.
    assert tm.mean_one_vs_rest_auc([0, 1], np.log([[0.9, 0.1], [0.2, 0.8]])) == 1.0
    assert tm.mean_one_vs_rest_auc([1, 0], np.log([[0.9, 0.1], [0.2, 0.8]])) == 0.0


def test_one_vs_rest_auc_leaves_out_a_class_with_no_rows() -> None:
    # Three classes, class 2 never true: its AUC is undefined and left out of the mean.
    scores = np.log([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]])
    auc = tm.one_vs_rest_auc([0, 1, 1], scores)
    # class 0: 0.7 against 0.3 and 0.5 -> 1; class 1: p1 0.6, 0.4 against 0.2 -> 1
    np.testing.assert_allclose(auc[:2], [1.0, 1.0])
    assert math.isnan(auc[2])
    assert tm.mean_one_vs_rest_auc([0, 1, 1], scores) == 1.0
    assert math.isnan(tm.mean_one_vs_rest_auc([], np.zeros((0, 3))))
    with pytest.raises(ValueError, match="y_true has 2 entries, scores 3 rows"):
        tm.one_vs_rest_auc([0, 1], scores)


def test_one_vs_rest_auc_equals_the_pairwise_count() -> None:
    """Against the definition, pair by pair, on random scores with ties."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=60)
    scores = np.round(rng.normal(size=(60, 4)), 1)  # rounded: ties occur
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    prob = z / z.sum(axis=1, keepdims=True)
    for k, got in enumerate(tm.one_vs_rest_auc(y, scores)):
        pos, neg = prob[y == k, k], prob[y != k, k]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert got == pytest.approx(wins / (pos.size * neg.size), abs=1e-12), k


def test_bad_class_ids_are_refused() -> None:
    with pytest.raises(ValueError, match=r"y_pred: class ids must be in \[0, 2\)"):
        tm.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="y_true has 2 entries, y_pred 1"):
        tm.confusion_matrix([0, 1], [0], 2)


def test_sequence_scores_and_ties() -> None:
    assert tm.sequence_scores(np.array([-1.0, -2.0, -3.0])) == (-6.0, -2.0)
    assert tm.argmax_first([-1.0, -0.5, -0.5]) == 1
    with pytest.raises(ValueError, match="non-empty vector"):
        tm.sequence_scores(np.array([]))


@pytest.mark.parametrize(
    ("pred", "ref", "em", "f1"),
    [
        ("The Cat!", "cat", 1.0, 1.0),
        ("the cat sat", "a cat sat down", 0.0, 0.8),  # shared 2: P 1, R 2/3
        ("France France France France", "the France sat", 0.0, 1 / 3),  # shared 1: P 1/4, R 1/2
        ("blue", "red", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("an", "red", 0.0, 0.0),  # "an" normalises to nothing
    ],
)
def test_exact_match_and_token_f1(pred: str, ref: str, em: float, f1: float) -> None:
    assert tm.exact_match(pred, ref) == em
    assert tm.token_f1(pred, ref) == pytest.approx(f1)


def test_normalize_answer() -> None:
    assert tm.normalize_answer("  The  quick, brown FOX.  ") == "quick brown fox"
