"""Task metrics as pure functions: numpy arrays in, numbers and arrays out (no torch, no model).

Class ids are integers ``0 .. n_classes - 1`` (label indices, or answer positions of a multiple
choice). Text answers are compared after SQuAD's normalisation (lower case, no punctuation, no
articles, single spaces), as exact match and token F1 are defined by SQuAD v1.1's script.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def as_classes(values: Sequence[int] | np.ndarray, n_classes: int, name: str) -> np.ndarray:
    """``values`` as an int64 vector, every entry in ``[0, n_classes)``."""
    arr = np.asarray(values, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a vector of class ids, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name}: class ids must be in [0, {n_classes}), got {arr.tolist()}")
    return arr


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    t = as_classes(y_true, n_classes, "y_true")
    p = as_classes(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries, y_pred {p.size}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Fraction of rows predicted right (nan for no rows)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} entries, y_pred {p.size}")
    return float(np.mean(t == p)) if t.size else float("nan")


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sum); nan for a class with no true rows."""
    support = cm.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class, 2 TP / (2 TP + FP + FN); nan for a class neither true nor predicted."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # (TP + FP) + (TP + FN)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes that occur as truth or prediction
    (scikit-learn's ``f1_score(average="macro")`` without ``labels=``); nan for no rows."""
    f1 = per_class_f1(cm)
    present = ~np.isnan(f1)
    return float(f1[present].mean()) if present.any() else float("nan")


def majority_baseline(y_true: Sequence[int] | np.ndarray, n_classes: int) -> tuple[int, float]:
    """(most frequent true class, the accuracy of always predicting it); ties go to the lowest
    class id. (0, nan) for no rows."""
    t = as_classes(y_true, n_classes, "y_true")
    if not t.size:
        return 0, float("nan")
    counts = np.bincount(t, minlength=n_classes)
    best = int(np.argmax(counts))
    return best, float(counts[best] / t.size)


def chance_baseline(num_choices: Sequence[int] | np.ndarray) -> float:
    """Expected accuracy of a uniform random pick: mean of 1 / (choices of each row)."""
    k = np.asarray(num_choices, dtype=np.float64)
    return float(np.mean(1.0 / k)) if k.size else float("nan")


def one_vs_rest_auc(
    y_true: Sequence[int] | np.ndarray, scores: np.ndarray | Sequence[Sequence[float]]
) -> np.ndarray:
    """Per class k, the area under its one-vs-rest ROC curve: the chance that a row of class k
    gets a higher probability of k than a row of another class (ties count half). Each row's
    scores (N, n_classes; log-likelihoods) become probabilities by a softmax over the classes,
    so a constant added to one row's scores changes nothing. Threshold-free: it measures how
    well the classes are ranked apart from the prior that decides the argmax. nan for a class
    with no rows, or with every row."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores: expected (rows, classes), got shape {s.shape}")
    t = as_classes(y_true, s.shape[1], "y_true")
    if t.shape[0] != s.shape[0]:
        raise ValueError(f"y_true has {t.size} entries, scores {s.shape[0]} rows")
    out = np.full(s.shape[1], np.nan)
    if not s.size:
        return out
    z = np.exp(s - s.max(axis=1, keepdims=True))
    prob = z / z.sum(axis=1, keepdims=True)
    for k in range(s.shape[1]):
        pos, neg = prob[t == k, k], np.sort(prob[t != k, k])
        if pos.size and neg.size:
            below = np.searchsorted(neg, pos, side="left")
            tied = np.searchsorted(neg, pos, side="right") - below
            out[k] = float((below + 0.5 * tied).sum()) / (pos.size * neg.size)
    return out


def mean_one_vs_rest_auc(
    y_true: Sequence[int] | np.ndarray, scores: np.ndarray | Sequence[Sequence[float]]
) -> float:
    """Unweighted mean of ``one_vs_rest_auc`` over the classes it is defined for (nan if
    none)."""
    auc = one_vs_rest_auc(y_true, scores)
    defined = ~np.isnan(auc)
    return float(auc[defined].mean()) if defined.any() else float("nan")


def sequence_scores(token_logprobs: np.ndarray) -> tuple[float, float]:
    """(summed, length-normalised) log-likelihood of one reply from its per-token log-probs."""
    lp = np.asarray(token_logprobs, dtype=np.float64)
    if lp.ndim != 1 or not lp.size:
        raise ValueError(f"token_logprobs: expected a non-empty vector, got shape {lp.shape}")
    total = float(lp.sum())
    return total, total / lp.size


def argmax_first(scores: Sequence[float] | np.ndarray) -> int:
    """Index of the highest score, the lowest index on ties."""
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


# ------------------------------------------------------------------------------ text answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, punctuation removed, articles removed, whitespace
    collapsed."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between normalised strings: the harmonic mean of token precision and recall
    over the multiset of shared tokens. Two empty strings score 1, one empty string 0."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)
