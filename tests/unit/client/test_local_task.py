"""A client's held-out rows scored as a task (client/local_task.py, --eval-task-clients)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.local_task import counts_of, heldout_task, score_heldout, task_spec
from client.model import Quantization, attach_lora, load_base, resolve_model
from client.tasks import ChoiceItem, TaskKind, TaskSpec, evaluate_task, load_task
from protocol.messages import LoraSpec
from protocol.task_eval import EvalTaskSpec

ROWS = [
    {"instruction": "What is 2 plus 2?", "response": "4", "category": "math"},
    {"instruction": "Say hello to Ann.", "response": "Hello Ann!", "category": "greeting"},
    {"instruction": "What is 3 times 3?", "response": "9"},  # no label: skipped, counted
    {"instruction": "Wave at Bob.", "response": "Hi Bob!", "category": ""},  # empty: unlabelled
    {"instruction": "Halve 10.", "response": "5", "category": "poetry"},  # not in the set
    {"response": "Good day!", "category": "greeting"},  # labelled, no text: unreadable
    {"instruction": "What is 7 minus 1?", "response": "6", "category": "math"},
]
LABEL = EvalTaskSpec(kind="label", columns="text=instruction,label=category",
                     labels="greeting,math")  # fmt: skip


def test_rows_without_a_label_are_skipped_and_counted() -> None:
    local = heldout_task(ROWS, task_spec(LABEL), "shard.jsonl")
    assert (local.unlabelled, local.invalid) == (2, 2)
    assert [i.row for i in local.task.items] == [1, 2, 7]
    items = [i for i in local.task.items if isinstance(i, ChoiceItem)]
    assert [i.answer for i in items] == [1, 0, 1]  # greeting = 0, math = 1
    assert local.task.classes == ("greeting", "math")
    assert local.first_error is not None
    assert "shard.jsonl (held-out): row 5: field 'category': 'poetry'" in local.first_error
    limited = heldout_task(ROWS, TaskSpec(TaskKind.LABEL, LABEL.columns, LABEL.labels, limit=2),
                           "shard.jsonl")  # fmt: skip
    assert len(limited.task.items) == 2 and limited.unlabelled == 2
    generate = heldout_task(ROWS, TaskSpec(TaskKind.GENERATE), "shard.jsonl")
    assert (generate.unlabelled, generate.invalid) == (0, 1)  # every row has a response


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path, model_cache: Path):  # type: ignore[no-untyped-def]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    net = attach_lora(base.model, LoraSpec(rank=2, alpha=4.0), seed=1)
    return net, base.tokenizer


def _file(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_counts_equal_scoring_the_labelled_rows_as_a_task_file(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net, tok = model
    counts = score_heldout(net, tok, ROWS, LABEL, "shard.jsonl")
    readable = [ROWS[0], ROWS[1], ROWS[6]]
    spec = TaskSpec(TaskKind.LABEL, LABEL.columns, LABEL.labels)
    direct = evaluate_task(net, tok, load_task(_file(tmp_path, readable), spec))
    assert counts.rows == 3 and (counts.unlabelled, counts.invalid) == (2, 2)
    assert counts.classes == 2
    assert [list(counts.confusion[:2]), list(counts.confusion[2:])] == direct.confusion
    correct = counts.confusion[0] + counts.confusion[3]
    assert correct / counts.rows == pytest.approx(direct.metrics["accuracy"])


def test_generate_counts_are_sums_over_rows(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net, tok = model
    spec = EvalTaskSpec(kind="generate", max_new_tokens=3)
    counts = score_heldout(net, tok, ROWS[:3], spec, "shard.jsonl")
    direct = evaluate_task(net, tok, load_task(_file(tmp_path, ROWS[:3]), task_spec(spec)))
    assert counts.rows == 3 and counts.confusion == ()
    assert counts.exact == round(3 * direct.metrics["exact_match"])
    assert counts.token_f1_sum == pytest.approx(3 * direct.metrics["token_f1"])
    assert counts_of(direct).token_f1_sum == pytest.approx(counts.token_f1_sum)


def test_no_labelled_rows_scores_nothing(model) -> None:  # type: ignore[no-untyped-def]
    net, tok = model
    counts = score_heldout(net, tok, [ROWS[2], ROWS[3]], LABEL, "shard.jsonl")
    assert (counts.rows, counts.unlabelled, counts.confusion) == (0, 2, ())
