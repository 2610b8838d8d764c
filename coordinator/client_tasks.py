"""``--eval-task-clients``: pooling the clients' task counts into ``client_task_*`` metrics.

Each evaluating client scores its own held-out rows that carry an answer and replies with counts
(``protocol.task_eval.TaskCounts``). Pooled exactly, as if one model had scored every client's rows
in one file:

    client_task_accuracy   sum of correct rows / sum of rows scored (not a mean of client rates)
    client_task_macro_f1   macro-F1 of the summed confusion matrix (not a mean of client F1s)
    client_task_exact_match, client_task_token_f1   generate: sums over rows / rows

Choice tasks' matrices are over answer positions A, B, ...; a client whose widest row has fewer
choices sends a smaller matrix, padded here with zeros (those letters never occur for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from client import task_metrics as tm
from protocol.task_eval import TaskCounts


def pooled_confusion(counts: list[TaskCounts]) -> np.ndarray:
    """The sum of the clients' confusion matrices, each padded to the widest (int64)."""
    n = max((c.classes for c in counts if c.confusion), default=0)
    total = np.zeros((n, n), dtype=np.int64)
    for c in counts:
        if c.confusion:
            k = c.classes
            total[:k, :k] += np.asarray(c.confusion, dtype=np.int64).reshape(k, k)
    return total


def _client_metrics(kind: str, c: TaskCounts) -> dict[str, Any]:
    row: dict[str, Any] = {"rows": c.rows, "unlabelled": c.unlabelled, "invalid": c.invalid}
    if kind == "generate":
        row["accuracy"] = c.exact / c.rows if c.rows else None
        row["token_f1"] = c.token_f1_sum / c.rows if c.rows else None
        return row
    cm = pooled_confusion([c])
    row["accuracy"] = int(np.trace(cm)) / c.rows if c.rows else None
    row["macro_f1"] = tm.macro_f1(cm) if c.rows else None
    return row


def aggregate_task_counts(
    kind: str, counts: Mapping[int, TaskCounts], classes: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The ``client_task_*`` metrics of one evaluation from each replying client's counts (by
    node id). Rates are None where no client scored a row. ``classes`` names the label set of a
    label task (for the per-class recall of the pooled matrix)."""
    nodes = sorted(counts)
    all_counts = [counts[n] for n in nodes]
    rows = sum(c.rows for c in all_counts)
    out: dict[str, Any] = {
        "client_task_clients": len(nodes),
        "client_task_rows_scored": rows,
        "client_task_rows_unlabelled": sum(c.unlabelled for c in all_counts),
        "client_task_rows_invalid": sum(c.invalid for c in all_counts),
    }
    if kind == "generate":
        exact = sum(c.exact for c in all_counts)
        f1 = sum(c.token_f1_sum for c in all_counts)
        out["client_task_accuracy"] = exact / rows if rows else None
        out["client_task_exact_match"] = exact / rows if rows else None
        out["client_task_token_f1"] = f1 / rows if rows else None
    else:
        cm = pooled_confusion(all_counts)
        out["client_task_accuracy"] = int(np.trace(cm)) / rows if rows else None
        out["client_task_macro_f1"] = tm.macro_f1(cm) if rows else None
        out["client_task_confusion"] = cm.tolist()
        if kind == "label" and rows and len(classes) == cm.shape[0]:
            recall = tm.per_class_recall(cm)
            out["client_task_per_class_recall"] = {
                c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall, strict=True)
            }
    out["client_task_per_client"] = [{"node": n, **_client_metrics(kind, counts[n])} for n in nodes]
    return out
