"""benchmarks/tasks.py: held-out rows never reach train/, the files load as tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from benchmarks.tasks import LABELS, build, label_training_rows
from client.data import to_messages
from client.tasks import TaskSpec, load_task


def records() -> list[dict[str, str]]:
    out = []
    for cat in LABELS:
        for i in range(12):
            ctx = f"context {i}" if cat == "closed_qa" else ""
            out.append({"instruction": f"{cat} question {i}?", "context": ctx,
                        "response": f"{cat} answer {i}", "category": cat})  # fmt: skip
    out.append(dict(out[0]))  # an exact duplicate of a row that may be held out
    return out


def test_heldout_rows_are_not_trained_on_and_load_as_tasks(tmp_path: Path) -> None:
    recs = records()
    labels, choices, train = build(recs, per_category=3, choice_rows=5, seed=0)
    assert Counter(r["label"] for r in labels) == {v: 3 for v in LABELS.values()}
    assert len(choices) == 5
    for c in choices:
        assert len(c["choices"]) == 4 and len(set(c["choices"])) == 4
        right = c["choices"][c["answer"]]
        assert right.replace("answer", "question") + "?" == c["question"].split("\n\n")[0]
    held_text = {r["text"] for r in labels} | {c["question"].split("\n\n")[0] for c in choices}
    trained = [r for rows in train.values() for r in rows]
    assert not held_text & {r["instruction"] for r in trained}
    # 8 * 12 + 1 rows; 7 * 3 + 5 held out; the duplicate of row 0 goes with it if held out
    held_out_dup = recs[0]["instruction"] in held_text
    assert len(trained) == 97 - 26 - int(held_out_dup)

    path = tmp_path / "label.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labels))
    assert len(load_task(path, TaskSpec(kind="label")).classes) == 8
    path = tmp_path / "choice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in choices))
    task = load_task(path, TaskSpec(kind="choice"))
    assert [it.answer for it in task.items] == [c["answer"] for c in choices]  # type: ignore[union-attr]


def test_label_training_rows_ask_what_the_label_task_scores(tmp_path: Path) -> None:
    labels, _, train = build(records(), per_category=3, choice_rows=5, seed=0)
    as_labels = label_training_rows(train)
    assert {c: len(v) for c, v in as_labels.items()} == {c: len(v) for c, v in train.items()}
    path = tmp_path / "label.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labels))
    task = load_task(path, TaskSpec(kind="label"))
    # A held-out row scored by the task and a training row of the same text and category: the
    # same user prompt, and the training reply is the label the task counts as right.
    item = task.items[0]
    row = labels[0]
    cat = next(c for c, v in LABELS.items() if v == row["label"])
    twin = label_training_rows({cat: [{"instruction": row["text"], "response": "x"}]})[cat][0]
    user, reply = to_messages(twin, "twin")
    assert user["content"] == item.prompt
    assert reply["content"] == item.choices[item.answer] == row["label"]  # type: ignore[union-attr]
    # Every training row names its own category's label, and no held-out text is trained on.
    for c, rows in as_labels.items():
        assert {r["response"] for r in rows} == {LABELS[c]}
    held = {r["text"] for r in labels}
    assert not any(h in r["instruction"] for rows in as_labels.values() for r in rows for h in held)
