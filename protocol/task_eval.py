"""The wire form of task evaluation on the clients' held-out rows (``--eval-task-clients``).

The coordinator adds an ``EvalTaskSpec`` to an evaluate message (record ``keys.EVAL_TASK``); a
client scores its held-out rows that carry an answer and adds ``TaskCounts`` to its reply (record
``keys.TASK_COUNTS``). Counts, not rates, travel, so the coordinator can pool clients exactly:
accuracy is summed correct rows over summed rows, macro-F1 comes from the summed confusion matrix.
Both records are optional: absent means off (see ``protocol.keys``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from protocol import keys
from protocol.errors import ProtocolError, UpdateRejected
from protocol.messages import MetricValue, _exact_int, _from_config, _record, to_config_dict

TASK_KINDS = ("choice", "label", "generate")
MAX_CLASSES = 26  # a choice task's answer letters A..Z; label sets are held to the same bound


def _require(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ProtocolError(f"{name}: {problem}")


@dataclass(frozen=True)
class EvalTaskSpec:
    """How a client reads and scores its held-out rows as a task (as ``client.tasks.TaskSpec``;
    strings so the record stays flat). A label task carries its label set: every client's
    confusion matrix has the same classes in the same order."""

    kind: str
    columns: str = ""  # ROLE=COLUMN overrides, comma-separated
    labels: str = ""  # label kind: the label set, comma-separated
    template: str = ""  # the user prompt ("" = the kind's default)
    limit: int = 0  # score a seeded subset of this many rows (0 = every labelled row)
    seed: int = 0
    max_new_tokens: int = 64  # generate kind

    def __post_init__(self) -> None:
        _require(self.kind in TASK_KINDS, "kind", f"{self.kind!r} is not one of {TASK_KINDS}")
        _require(self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")
        _require(
            self.max_new_tokens >= 1, "max-new-tokens", f"must be >= 1, got {self.max_new_tokens}"
        )
        if self.kind == "label":
            n = len(self.label_set())
            _require(
                2 <= n <= MAX_CLASSES,
                "labels",
                f"a label task needs 2..{MAX_CLASSES} labels, got {n}",
            )

    def label_set(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())


@dataclass(frozen=True)
class TaskCounts:
    """What one client scored. ``confusion`` is the row-major ``classes x classes`` matrix of a
    choice/label task (row: true class, column: predicted), its sum being ``rows``; a generate
    task sends ``exact`` (exact matches) and ``token_f1_sum`` instead."""

    rows: int  # held-out rows scored
    unlabelled: int = 0  # held-out rows without the answer column: skipped
    invalid: int = 0  # held-out rows with an answer that could not be read: skipped
    classes: int = 0
    confusion: tuple[int, ...] = ()
    exact: int = 0
    token_f1_sum: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rows", "unlabelled", "invalid", "classes", "exact"):
            v = getattr(self, name)
            _require(_exact_int(v) and v >= 0, name, f"must be an int >= 0, got {v!r}")
        _require(
            self.classes <= MAX_CLASSES, "classes", f"must be <= {MAX_CLASSES}, got {self.classes}"
        )
        _require(
            len(self.confusion) == (self.classes**2 if self.confusion else 0),
            "confusion",
            f"holds {len(self.confusion)} counts, expected {self.classes}^2 = {self.classes**2}",
        )
        _require(
            all(_exact_int(c) and c >= 0 for c in self.confusion),
            "confusion",
            "counts must be ints >= 0",
        )
        _require(
            not self.confusion or sum(self.confusion) == self.rows,
            "confusion",
            f"counts sum to {sum(self.confusion)}, not rows = {self.rows}",
        )
        _require(self.exact <= self.rows, "exact", f"{self.exact} exceeds rows = {self.rows}")
        f1 = self.token_f1_sum
        _require(
            isinstance(f1, int | float) and not isinstance(f1, bool) and math.isfinite(f1)
            and 0.0 <= f1 <= self.rows + 1e-6,
            "token-f1-sum",
            f"must be in [0, rows = {self.rows}], got {f1!r}",
        )  # fmt: skip

    def check_kind(self, kind: str, n_labels: int = 0) -> None:
        """Refuse counts that do not fit ``kind`` (and a label task's ``n_labels`` classes)."""
        if kind == "generate":
            _require(not self.confusion, "confusion", "a generate task sends no confusion matrix")
            return
        _require(
            self.exact == 0 and self.token_f1_sum == 0,
            "exact",
            f"a {kind} task sends a confusion matrix",
        )
        _require(
            self.rows == 0 or bool(self.confusion), "confusion", f"missing for {self.rows} rows"
        )
        if kind == "label" and self.confusion:
            _require(
                self.classes == n_labels,
                "classes",
                f"{self.classes}, but the label set has {n_labels} labels",
            )


def encode_eval_task(content: RecordDict, spec: EvalTaskSpec) -> None:
    """Add ``spec`` to an evaluate message's ``content``."""
    # Empty strings are left out: Flower's ConfigRecord.count_bytes (1.39) refuses a value of 0
    # bytes; decoding reads an absent text field as "".
    record = {k: v for k, v in to_config_dict(spec).items() if v != ""}
    content[keys.EVAL_TASK] = ConfigRecord(record)


def decode_eval_task(content: RecordDict) -> EvalTaskSpec | None:
    """The task an evaluate message asks for, None if it asks for none."""
    if keys.EVAL_TASK not in content:
        return None
    rec = dict(_record(content, keys.EVAL_TASK, ConfigRecord, "evaluate message"))
    for name in ("columns", "labels", "template"):
        rec.setdefault(name, "")
    return _from_config(EvalTaskSpec, rec)


def encode_task_counts(content: RecordDict, counts: TaskCounts) -> None:
    """Add ``counts`` to an evaluation reply's ``content``."""
    values: dict[str, MetricValue] = {
        "rows": counts.rows,
        "unlabelled": counts.unlabelled,
        "invalid": counts.invalid,
        "classes": counts.classes,
        "exact": counts.exact,
        "token-f1-sum": float(counts.token_f1_sum),
    }
    if counts.confusion:  # Flower cannot type an empty list
        values["confusion"] = list(counts.confusion)
    content[keys.TASK_COUNTS] = MetricRecord(values)


def decode_task_counts(content: RecordDict, kind: str, n_labels: int = 0) -> TaskCounts | None:
    """A reply's task counts (None if it carries none), checked against ``kind``. Raises
    ``UpdateRejected`` with the reason, and nothing else whatever the content."""
    what = "evaluation reply"
    if keys.TASK_COUNTS not in content:
        return None
    try:
        rec = _record(content, keys.TASK_COUNTS, MetricRecord, what)
        fields = ("rows", "unlabelled", "invalid", "classes", "exact", "token-f1-sum")
        missing = [k for k in fields if k not in rec]
        _require(not missing, keys.TASK_COUNTS, f"missing {missing}")
        unknown = sorted(set(rec) - {*fields, "confusion"})
        _require(not unknown, keys.TASK_COUNTS, f"unknown fields {unknown}")
        confusion = rec.get("confusion", [])
        _require(isinstance(confusion, list), "confusion", "must be a list of ints")
        counts = TaskCounts(
            rows=rec["rows"],
            unlabelled=rec["unlabelled"],
            invalid=rec["invalid"],
            classes=rec["classes"],
            confusion=tuple(confusion),
            exact=rec["exact"],
            token_f1_sum=rec["token-f1-sum"],
        )
        counts.check_kind(kind, n_labels)
        return counts
    except ProtocolError as exc:
        raise UpdateRejected(f"{what}: {keys.TASK_COUNTS}: {exc}") from exc
    except Exception as exc:  # whatever else a hostile reply provokes is still a rejection
        raise UpdateRejected(
            f"{what}: {keys.TASK_COUNTS}: malformed ({type(exc).__name__}: {exc})"
        ) from exc
