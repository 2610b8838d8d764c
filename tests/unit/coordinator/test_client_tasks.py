"""``--eval-task-clients``: pooling clients' task counts (coordinator/client_tasks.py) and their
wire form (protocol/task_eval.py). Expected values are computed by hand in the comments."""

from __future__ import annotations

import pytest
from flwr.app import MetricRecord, RecordDict

from coordinator.client_tasks import aggregate_task_counts, pooled_confusion
from protocol import keys
from protocol.errors import ProtocolError, UpdateRejected
from protocol.task_eval import (
    EvalTaskSpec,
    TaskCounts,
    decode_eval_task,
    decode_task_counts,
    encode_eval_task,
    encode_task_counts,
)

# Two clients of a 3-label task (rows: true class, columns: predicted).
A = TaskCounts(rows=4, unlabelled=2, invalid=0, classes=3, confusion=(2, 1, 0, 0, 1, 0, 0, 0, 0))
B = TaskCounts(rows=3, unlabelled=1, invalid=1, classes=3, confusion=(0, 0, 0, 1, 0, 0, 0, 0, 2))


def test_label_counts_pool_into_accuracy_and_macro_f1_of_the_summed_matrix() -> None:
    out = aggregate_task_counts("label", {9: B, 5: A}, ("x", "y", "z"))
    # Summed matrix [[2,1,0],[1,1,0],[0,0,2]]: 7 rows, 5 on the diagonal.
    assert out["client_task_confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert out["client_task_accuracy"] == pytest.approx(5 / 7)
    # F1 = 2TP / (2TP + FP + FN): x 4/6, y 2/4, z 4/4; macro (2/3 + 1/2 + 1) / 3 = 13/18.
    assert out["client_task_macro_f1"] == pytest.approx(13 / 18)
    # Not the mean of the clients' rates: accuracies 3/4 and 2/3 average 17/24; macro-F1s
    # (A: x 4/5, y 2/3, z absent -> 11/15; B: x 0, y 0, z 1 -> 1/3) average 8/15.
    assert out["client_task_accuracy"] != pytest.approx(17 / 24)
    assert out["client_task_macro_f1"] != pytest.approx(8 / 15)
    assert out["client_task_per_class_recall"] == pytest.approx({"x": 2 / 3, "y": 1 / 2, "z": 1.0})
    assert out["client_task_clients"] == 2
    assert out["client_task_rows_scored"] == 7
    assert out["client_task_rows_unlabelled"] == 3
    assert out["client_task_rows_invalid"] == 1
    per = out["client_task_per_client"]
    assert [c["node"] for c in per] == [5, 9]
    assert per[0]["rows"] == 4 and per[0]["accuracy"] == pytest.approx(3 / 4)
    assert per[0]["macro_f1"] == pytest.approx(11 / 15)
    assert per[1]["accuracy"] == pytest.approx(2 / 3) and per[1]["macro_f1"] == pytest.approx(1 / 3)
    assert (per[1]["unlabelled"], per[1]["invalid"]) == (1, 1)


def test_choice_matrices_of_different_widths_are_padded_before_summing() -> None:
    two = TaskCounts(rows=2, classes=2, confusion=(1, 0, 1, 0))  # [[1,0],[1,0]]
    three = TaskCounts(rows=3, classes=3, confusion=(1, 0, 0, 0, 0, 1, 0, 0, 1))
    assert pooled_confusion([two, three]).tolist() == [[2, 0, 0], [1, 0, 1], [0, 0, 1]]
    out = aggregate_task_counts("choice", {1: two, 2: three})
    assert out["client_task_accuracy"] == pytest.approx(3 / 5)
    # F1: A 4/5, B 0 (true twice, never predicted), C 2/3 -> (4/5 + 0 + 2/3) / 3 = 22/45.
    assert out["client_task_macro_f1"] == pytest.approx(22 / 45)
    assert "client_task_per_class_recall" not in out


def test_generate_counts_pool_exact_match_and_token_f1_over_rows() -> None:
    a = TaskCounts(rows=2, exact=1, token_f1_sum=1.5)
    b = TaskCounts(rows=1, exact=0, token_f1_sum=0.25, unlabelled=4)
    out = aggregate_task_counts("generate", {1: a, 2: b})
    assert out["client_task_accuracy"] == pytest.approx(1 / 3)
    assert out["client_task_exact_match"] == pytest.approx(1 / 3)
    assert out["client_task_token_f1"] == pytest.approx(1.75 / 3)
    assert out["client_task_rows_unlabelled"] == 4
    assert out["client_task_per_client"][0]["token_f1"] == pytest.approx(0.75)
    assert "client_task_macro_f1" not in out


def test_no_scored_rows_gives_no_rates() -> None:
    out = aggregate_task_counts("label", {3: TaskCounts(rows=0, unlabelled=5)}, ("x", "y"))
    assert out["client_task_accuracy"] is None and out["client_task_macro_f1"] is None
    assert out["client_task_rows_unlabelled"] == 5
    assert out["client_task_per_client"][0]["accuracy"] is None
    assert aggregate_task_counts("label", {})["client_task_clients"] == 0


def test_spec_and_counts_round_trip_on_the_wire() -> None:
    spec = EvalTaskSpec(kind="label", columns="text=q", labels="x,y,z", limit=5, seed=3)
    content = RecordDict()
    assert decode_eval_task(content) is None  # absent: no task
    encode_eval_task(content, spec)
    assert decode_eval_task(content) == spec
    reply = RecordDict()
    assert decode_task_counts(reply, "label", 3) is None
    encode_task_counts(reply, A)
    assert decode_task_counts(reply, "label", 3) == A
    gen = TaskCounts(rows=2, exact=1, token_f1_sum=1.5, unlabelled=1)
    reply = RecordDict()
    encode_task_counts(reply, gen)
    assert decode_task_counts(reply, "generate") == gen


@pytest.mark.parametrize(
    ("values", "kind", "message"),
    [
        ({"confusion": [1, 0, 0, 1]}, "label", "counts sum to 2, not rows = 3"),
        ({"rows": 4, "classes": 3, "confusion": [1, 0, 0, 1, 1, 1, 0, 0, 0]}, "label",
         "classes: 3, but the label set has 2 labels"),
        ({"rows": 2, "classes": 2, "confusion": [1, 0]}, "label", "holds 2 counts, expected 2^2"),
        ({"rows": 2.0}, "label", "rows: must be an int >= 0"),
        ({"rows": 3, "exact": 4}, "generate", "exact: 4 exceeds rows = 3"),
        ({"rows": 3, "token-f1-sum": 3.5}, "generate", "token-f1-sum: must be in [0, rows = 3]"),
        ({"rows": 3}, "label", "confusion: missing for 3 rows"),
        ({"rows": 1, "classes": 2, "confusion": [1, 0, 0, 0], "extra": 1}, "label",
         "unknown fields ['extra']"),
    ],
)  # fmt: skip
def test_bad_counts_are_rejected_naming_the_field(
    values: dict[str, object], kind: str, message: str
) -> None:
    base: dict[str, object] = {"rows": 3, "unlabelled": 0, "invalid": 0, "classes": 2,
                               "exact": 0, "token-f1-sum": 0.0}  # fmt: skip
    if kind == "generate":
        base["classes"] = 0
    reply = RecordDict({keys.TASK_COUNTS: MetricRecord({**base, **values})})  # type: ignore[dict-item]
    with pytest.raises(UpdateRejected) as err:
        decode_task_counts(reply, kind, 2)
    assert message in str(err.value) and keys.TASK_COUNTS in str(err.value)


def test_a_label_spec_needs_its_label_set() -> None:
    with pytest.raises(ProtocolError, match=r"labels: a label task needs 2\.\.26 labels, got 1"):
        EvalTaskSpec(kind="label", labels="x")
    with pytest.raises(ProtocolError, match="kind: 'rank' is not one of"):
        EvalTaskSpec(kind="rank")


def test_task_plot_names_both_sources_when_a_run_has_both(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from coordinator.report import RunData, plot_task

    rows = [
        {
            "round": r,
            "task_accuracy": 0.25 * r,
            "client_task_accuracy": 0.5,
            "client_task_macro_f1": 0.4,
        }
        for r in range(3)
    ]
    fig = plot_task([RunData(tmp_path, {}, rows)])
    assert fig is not None
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == [
        "coordinator task: accuracy",
        "clients' held-out: accuracy",
        "clients' held-out: macro_f1",
    ]
    assert fig.axes[0].get_title() == "Task metrics (coordinator task and clients' held-out)"
