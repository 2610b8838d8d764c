"""Task files for ``fedtune eval`` / ``--eval-task`` built from Dolly-15k's held-out rows.

Writes, into ``--out``:

    dolly_label.jsonl   label task: {"text": instruction, "label": category}; ``--per-category``
                        rows of each of Dolly's 8 categories (balanced, so the majority-class and
                        chance baselines are both 1/8)
    dolly_choice.jsonl  choice task: a closed-QA instruction with its Wikipedia context, the
                        human-written answer and three answers to other held-out closed-QA
                        questions as distractors (``--choice-rows`` rows; chance 1/4)
    train/<category>.jsonl  every other row, for training runs that must not see the held-out
                        rows (``fedtune simulate --data OUT/train``)
    train_label/<category>.jsonl  the same rows as label-task examples: the instruction asked
                        in the label task's own prompt, the category's label as the response,
                        so that training targets what the label task scores
    README.md           provenance and licence

Rows are drawn with ``--seed``; exact duplicates of a held-out row are removed from train/ too.

Dolly-15k: (c) 2023 Databricks, Inc., CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/);
Wikipedia passages in its contexts CC BY-SA 3.0, (c) Wikipedia contributors. The files written
here are derived from it and are under the same licence.

    python benchmarks/tasks.py --data /work/shared/data/dolly15k/by_category --out tasks/dolly
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.data import load_records  # noqa: E402
from client.tasks import ChoiceItem, TaskSpec, parse_item  # noqa: E402

# Dolly's category ids as label words a model can read.
LABELS = {
    "brainstorming": "brainstorming",
    "classification": "classification",
    "closed_qa": "closed question answering",
    "creative_writing": "creative writing",
    "general_qa": "general question answering",
    "information_extraction": "information extraction",
    "open_qa": "open question answering",
    "summarization": "summarization",
}
ATTRIBUTION = """\
# Task files derived from databricks-dolly-15k

Built by `benchmarks/tasks.py` (fedtune) from {source} with seed {seed}.

- `dolly_label.jsonl`: {label_rows} held-out rows ({per_category} per category); `text` is
  the instruction, `label` its Dolly category ({labels}).
- `dolly_choice.jsonl`: {choice_rows} held-out closed-QA rows; `question` is the instruction
  and its context, `choices` the human answer and three answers to other held-out closed-QA
  questions, `answer` the index of the right one.
- `train/`: the {train_rows} remaining rows by category (held-out rows and their exact
  duplicates removed).
- `train_label/`: the same rows as label-task examples (the instruction in the label task's
  prompt, the category's label as the response).

## Licence and attribution

databricks-dolly-15k was developed at Databricks (https://www.databricks.com) and its use is
subject to the CC BY-SA 3.0 license (https://creativecommons.org/licenses/by-sa/3.0/).
Copyright (2023) Databricks, Inc. Certain categories of material in the dataset include
materials from Wikipedia (various pages, https://www.wikipedia.org/), licensed under CC BY-SA 3.0,
Copyright (c) Wikipedia editors and contributors.

These files are adapted from that dataset (rows selected and reformatted; no text changed) and
are distributed under the same licence, CC BY-SA 3.0.
"""


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return (str(r.get("instruction")), str(r.get("context") or ""), str(r.get("response")))


def build(
    records: list[dict[str, Any]], per_category: int, choice_rows: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(label rows, choice rows, training rows by category) from Dolly records."""
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[str(r["category"])].append(i)
    unknown = set(by_cat) - set(LABELS)
    if unknown:
        raise ValueError(f"category: {sorted(unknown)} are not Dolly categories")
    held: dict[str, list[int]] = {}
    for cat in sorted(by_cat):
        take = per_category if cat != "closed_qa" else max(per_category, choice_rows)
        if take > len(by_cat[cat]):
            raise ValueError(f"{cat}: {take} held-out rows asked, {len(by_cat[cat])} exist")
        held[cat] = rng.permutation(by_cat[cat])[:take].tolist()

    label_rows = []
    for cat in sorted(held):
        for i in held[cat][:per_category]:
            label_rows.append({"text": records[i]["instruction"].strip(), "label": LABELS[cat]})
    label_rows = [label_rows[int(j)] for j in rng.permutation(len(label_rows))]

    qa = held["closed_qa"][:choice_rows]
    choice_rows_out = []
    for n, i in enumerate(qa):
        r = records[i]
        right = r["response"].strip()
        others = [records[j]["response"].strip() for j in qa if j != i]
        others = [o for o in dict.fromkeys(others) if o != right]
        wrong = [others[int(k)] for k in rng.choice(len(others), size=3, replace=False)]
        choices = [right, *wrong]
        order = rng.permutation(4)
        question = r["instruction"].strip()
        if str(r.get("context") or "").strip():
            question += "\n\n" + r["context"].strip()
        choice_rows_out.append(
            {
                "id": n,
                "question": question,
                "choices": [choices[int(k)] for k in order],
                "answer": int(np.flatnonzero(order == 0)[0]),
            }
        )

    taken = {_key(records[i]) for v in held.values() for i in v}
    train: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if _key(r) not in taken:
            train[str(r["category"])].append(r)
    return label_rows, choice_rows_out, dict(train)


def label_training_rows(train: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Training rows as label-task examples: the instruction in the prompt ``fedtune eval``
    scores a label task with (``client.tasks.parse_item``: its default template, the file's
    sorted label set) and the category's label as the response, so a model trained on them
    learns what the task asks."""
    spec, labels = TaskSpec(kind="label"), tuple(sorted(LABELS.values()))

    def example(row: dict[str, Any], cat: str) -> dict[str, Any]:
        item = parse_item({"text": row["instruction"], "label": LABELS[cat]}, 1, spec, labels, cat)
        assert isinstance(item, ChoiceItem)
        return {"instruction": item.prompt, "response": item.choices[item.answer], "category": cat}

    return {cat: [example(r, cat) for r in rows] for cat, rows in train.items()}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/dolly15k/by_category")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--choice-rows", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    records = load_records(args.data)
    labels, choices, train = build(records, args.per_category, args.choice_rows, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "dolly_label.jsonl", labels)
    _write_jsonl(args.out / "dolly_choice.jsonl", choices)
    (args.out / "train").mkdir(exist_ok=True)
    (args.out / "train_label").mkdir(exist_ok=True)
    for cat, rows in sorted(train.items()):
        _write_jsonl(args.out / "train" / f"{cat}.jsonl", rows)
    for cat, rows in sorted(label_training_rows(train).items()):
        _write_jsonl(args.out / "train_label" / f"{cat}.jsonl", rows)
    n_train = sum(len(v) for v in train.values())
    (args.out / "README.md").write_text(
        ATTRIBUTION.format(
            source=args.data,
            seed=args.seed,
            label_rows=len(labels),
            per_category=args.per_category,
            labels=", ".join(LABELS.values()),
            choice_rows=len(choices),
            train_rows=n_train,
        )
    )
    print(f"{args.out / 'dolly_label.jsonl'}: {len(labels)} rows")
    print(f"{args.out / 'dolly_choice.jsonl'}: {len(choices)} rows")
    print(f"{args.out / 'train'}: {n_train} rows in {len(train)} category files")
    print(f"{args.out / 'train_label'}: the same rows as label-task examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
