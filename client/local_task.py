"""Task evaluation on a client's own held-out rows (``--eval-task-clients``).

The coordinator sends an ``EvalTaskSpec`` with the evaluate message; the client reads its
held-out rows (the same rows its held-out loss uses) as a task of that kind with the same column
options as ``--eval-task``, scores them with the global adapter by ``client.tasks``'s scoring and
replies with counts (``protocol.task_eval.TaskCounts``) that the coordinator pools.

A row without the answer column (label, answer or response, by kind) is skipped and counted as
unlabelled: a client's data need not carry labels. A row that has one but cannot be read as the
task (a label outside the label set, a missing text field) is skipped and counted as invalid, and
the first such row is logged with its file, row and field: one bad row does not cost the client
its whole evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client.data import DataError, Record
from client.tasks import (
    ChoiceItem,
    GenerateItem,
    Task,
    TaskKind,
    TaskResult,
    TaskSpec,
    evaluate_task,
    has_answer,
    item_classes,
    parse_item,
    subset,
)
from protocol.task_eval import EvalTaskSpec, TaskCounts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("fedtune")


def task_spec(spec: EvalTaskSpec) -> TaskSpec:
    """The ``client.tasks.TaskSpec`` of a wire spec (its checks applied)."""
    return TaskSpec(
        kind=TaskKind.parse(spec.kind, field="kind"),
        columns=spec.columns,
        labels=spec.labels,
        template=spec.template,
        limit=spec.limit,
        seed=spec.seed,
        max_new_tokens=spec.max_new_tokens,
    )


@dataclass(frozen=True)
class HeldoutTask:
    task: Task
    unlabelled: int  # rows without the answer column
    invalid: int  # rows with an answer that could not be read as the task
    first_error: str | None  # the first invalid row's error (file, row, field)


def heldout_task(records: Sequence[Record], spec: TaskSpec, source: str) -> HeldoutTask:
    """``records`` (a client's held-out rows, numbered 1.. in that order) as a task of ``spec``:
    rows without an answer and rows that cannot be read are skipped and counted; then the
    ``spec.limit`` seeded subset of the rest."""
    labels = spec.label_set()
    if spec.kind is TaskKind.LABEL and len(labels) < 2:
        raise ValueError("labels: a client's label task needs the label set (2 or more labels)")
    items: list[ChoiceItem | GenerateItem] = []
    unlabelled = invalid = 0
    first_error = None
    for i, row in enumerate(records):
        if not has_answer(row, spec):
            unlabelled += 1
            continue
        try:
            items.append(parse_item(row, i + 1, spec, labels, f"{source} (held-out)"))
        except DataError as exc:
            invalid += 1
            first_error = first_error or str(exc)
    keep = subset(len(items), spec.limit, spec.seed)
    kept = tuple(items[int(j)] for j in keep)
    # The classes of every client's matrix: the label set, or letters up to this client's widest
    # row (the coordinator pads narrower matrices with zeros).
    classes = item_classes(spec, labels, kept)
    task = Task(source, spec, kept, classes, len(records))  # type: ignore[arg-type]
    return HeldoutTask(task, unlabelled, invalid, first_error)


def counts_of(result: TaskResult, unlabelled: int = 0, invalid: int = 0) -> TaskCounts:
    """The counts the coordinator pools, from a scored task's result."""
    rows = len(result.rows)
    if result.kind is TaskKind.GENERATE:
        return TaskCounts(
            rows=rows,
            unlabelled=unlabelled,
            invalid=invalid,
            exact=int(sum(round(r["exact_match"]) for r in result.rows)),
            token_f1_sum=float(sum(r["token_f1"] for r in result.rows)),
        )
    cm = np.asarray(result.confusion if result.confusion is not None else [], dtype=np.int64)
    return TaskCounts(
        rows=rows,
        unlabelled=unlabelled,
        invalid=invalid,
        classes=len(result.classes) if rows else 0,
        confusion=tuple(int(c) for c in cm.ravel()) if rows else (),
    )


def score_heldout(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    spec: EvalTaskSpec,
    source: str,
) -> TaskCounts:
    """Score a client's held-out ``records`` as the task ``spec`` with ``model`` as it is (the
    caller has loaded the global adapter)."""
    local = heldout_task(records, task_spec(spec), source)
    if local.invalid:
        log.warning(
            "%d held-out row(s) skipped as unreadable for the %s task; the first: %s",
            local.invalid,
            spec.kind,
            local.first_error,
        )
    if not local.task.items:
        return TaskCounts(rows=0, unlabelled=local.unlabelled, invalid=local.invalid)
    result = evaluate_task(model, tokenizer, local.task)
    return counts_of(result, local.unlabelled, local.invalid)
