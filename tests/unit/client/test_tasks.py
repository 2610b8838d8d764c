"""Task evaluation on the tiny random model, against scores computed here independently: each
chat rendered with the tokenizer's own chat template and run through the model in one piece, no
KV cache, no code shared with client.tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client import task_metrics as tm
from client.data import DataError
from client.tasks import (
    TaskKind,
    TaskSpec,
    evaluate_task,
    load_eval_model,
    load_task,
    result_table,
    score_choices,
)

CHOICE_ROWS = [
    # answers as index, letter, text and digit string; choices of different token lengths
    {"question": "What is the capital of France?", "choices": ["Paris", "The capital of France is Paris.", "red"], "answer": 0},  # noqa: E501
    {"question": "Name three colors.", "choices": ["Red, green and blue.", "Paris"], "answer": "B"},
    {"question": "How do I reset my password?", "choices": ["Open settings.", "machine learning", "hi"], "answer": "hi"},  # noqa: E501
    {"question": "Tell me a joke.", "choices": ["Why did the chicken cross the road?", "no"], "answer": "1"},  # noqa: E501
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, model_cache: Path) -> tuple[Any, Any]:
    return load_eval_model(str(tiny_model_dir), None, cache_dir=model_cache)


def reference_logprobs(model: Any, tok: Any, prompt: str, reply: str) -> np.ndarray:
    """Log-probs of the reply's tokens (end of turn included) from one uncached forward pass."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": reply}], tokenize=False)
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(head_ids)] == head_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return np.array([float(lp[t - 1, ids[t]]) for t in range(len(head_ids), len(ids))])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cache_shared_scoring_equals_independent_scoring(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    prompt = "What is the capital of France?"
    choices = ["Paris", "The capital of France is Paris.", "red", "Paris"]
    got = score_choices(model, tok, prompt, choices)
    lengths = [len(g) for g in got]
    assert len(set(lengths)) > 1, lengths  # choices of different token lengths share one batch
    for choice, lp in zip(choices, got, strict=True):
        np.testing.assert_allclose(lp, reference_logprobs(model, tok, prompt, choice), atol=1e-5)
    np.testing.assert_array_equal(got[0], got[3])  # the same reply scores the same


def test_choice_task_against_independent_scores(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    path = write_jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS)
    task = load_task(path, TaskSpec(kind=TaskKind.CHOICE))
    assert [it.answer for it in task.items] == [0, 1, 2, 1]  # type: ignore[union-attr]
    assert task.classes == ("A", "B", "C")
    result = evaluate_task(model, tok, task)

    expected_pred, expected_pred_sum = [], []
    for item, row in zip(task.items, result.rows, strict=True):
        lps = [reference_logprobs(model, tok, item.prompt, c) for c in item.choices]  # type: ignore[union-attr]
        summed = [float(lp.sum()) for lp in lps]
        normalised = [float(lp.mean()) for lp in lps]
        np.testing.assert_allclose(row["scores_summed"], summed, atol=1e-4)
        np.testing.assert_allclose(row["scores_normalised"], normalised, atol=1e-5)
        expected_pred.append(int(np.argmax(normalised)))
        expected_pred_sum.append(int(np.argmax(summed)))
    answers = np.array([0, 1, 2, 1])
    assert [r["prediction"] for r in result.rows] == ["ABC"[p] for p in expected_pred]
    assert result.metrics["accuracy"] == pytest.approx(np.mean(np.array(expected_pred) == answers))
    assert result.metrics["accuracy_summed"] == pytest.approx(
        np.mean(np.array(expected_pred_sum) == answers)
    )
    assert result.metrics["chance_baseline"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert result.metrics["majority_baseline"] == pytest.approx(2 / 4)  # B twice
    out = result.to_json(task=str(path))
    assert out["accuracy"] == result.metrics["accuracy"] and "macro_f1" in out
    assert "mean_ovr_auc" not in out  # a choice task's rows have their own options


def test_label_task_from_csv(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    path = tmp_path / "labels.csv"
    path.write_text(
        "text,label\n"
        '"Why did the chicken cross the road?",joke\n'
        "What is machine learning?,question\n"
        '"Red, green and blue.",colors\n'
        "Tell me a joke.,joke\n"
    )
    task = load_task(path, TaskSpec(kind=TaskKind.LABEL))
    assert task.classes == ("colors", "joke", "question")  # inferred, sorted
    result = evaluate_task(model, tok, task)
    preds, normalised = [], []
    for item in task.items:
        lps = [reference_logprobs(model, tok, item.prompt, c) for c in task.classes]
        normalised.append([float(lp.mean()) for lp in lps])
        preds.append(int(np.argmax(normalised[-1])))
    truth = [1, 2, 0, 1]
    # Classes "joke" (two rows) against the rest, "colors" and "question" (one row each).
    assert result.metrics["mean_ovr_auc"] == pytest.approx(
        tm.mean_one_vs_rest_auc(truth, np.array(normalised)), abs=1e-4
    )
    assert "mean one-vs-rest AUC" in result_table(result)
    cm = np.zeros((3, 3), dtype=int)
    for t, p in zip(truth, preds, strict=True):
        cm[t, p] += 1
    assert result.confusion == cm.tolist()
    assert result.metrics["accuracy"] == pytest.approx(np.trace(cm) / 4)
    assert result.majority_class == "joke" and result.metrics["majority_baseline"] == 0.5
    assert result.per_class_recall["joke"] == pytest.approx(cm[1, 1] / 2)
    assert result.metrics["chance_baseline"] == pytest.approx(1 / 3)
    assert task.items[0].prompt.endswith(  # type: ignore[union-attr]
        "Which one of these labels fits the text above: colors, joke, question? "
        "Answer with the label only."
    )


def test_generate_task_exact_match_and_token_f1(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    model, tok = load_eval_model(str(tiny_model_dir), None, cache_dir=model_cache)
    # The random model's hidden state points at the last input token (tied embeddings), so
    # greedy decoding repeats the prompt's final "\n". Make " France" a scaled copy of "\n":
    # its logit is then the largest, and it keeps predicting itself.
    newline, france = tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("ĠFrance")
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[france] = 3.0 * emb[newline]
    rows = [
        {"instruction": "Name three colors.", "response": "France France France France"},
        {"instruction": "Tell me a joke.", "response": "the France sat"},
        {"instruction": "What is the capital?", "context": "Europe.", "response": "Paris"},
    ]
    task = load_task(
        write_jsonl(tmp_path / "gen.jsonl", rows), TaskSpec(kind="generate", max_new_tokens=4)
    )
    assert task.items[2].prompt == "What is the capital?\n\nEurope."  # type: ignore[union-attr]
    result = evaluate_task(model, tok, task)
    assert [r["prediction"] for r in result.rows] == ["France France France France"] * 3
    assert [r["exact_match"] for r in result.rows] == [1.0, 0.0, 0.0]
    # row 2: normalised "france france france france" vs "france sat": P 1/4, R 1/2 -> F1 1/3
    np.testing.assert_allclose([r["token_f1"] for r in result.rows], [1.0, 1 / 3, 0.0])
    assert result.metrics["exact_match"] == pytest.approx(1 / 3)
    assert result.metrics["accuracy"] == result.metrics["exact_match"]
    assert result.metrics["token_f1"] == pytest.approx((1 + 1 / 3) / 3)


def test_limit_takes_a_seeded_subset(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", CHOICE_ROWS)
    a = load_task(path, TaskSpec(kind="choice", limit=2, seed=0))
    b = load_task(path, TaskSpec(kind="choice", limit=2, seed=0))
    expected = sorted(int(i) + 1 for i in np.random.default_rng(0).choice(4, 2, replace=False))
    assert [it.row for it in a.items] == [it.row for it in b.items] == expected
    assert a.total_rows == 4
    seeds = {tuple(it.row for it in load_task(path, TaskSpec("choice", limit=2, seed=s)).items)
             for s in range(8)}  # fmt: skip
    assert len(seeds) > 1
    assert len(load_task(path, TaskSpec(kind="choice", limit=10)).items) == 4


def test_columns_multi_column_choices_and_template(tmp_path: Path) -> None:
    path = tmp_path / "mmlu.csv"
    path.write_text("q,A,B,C,gold\nWhat is 2+2?,3,4,5,B\n")
    spec = TaskSpec(
        kind="choice", columns="question=q,choices=A|B|C,answer=gold", template="Q: {q}\n{options}"
    )
    item = load_task(path, spec).items[0]
    assert item.choices == ("3", "4", "5") and item.answer == 1  # type: ignore[union-attr]
    assert item.prompt == "Q: What is 2+2?\nA. 3\nB. 4\nC. 5"


@pytest.mark.parametrize(
    ("kind", "rows", "spec", "message"),
    [
        ("choice", [{"question": "q", "answer": 0}], {}, "row 1: field 'choices' is missing"),
        ("choice", [{"question": "q", "choices": ["a", "b"], "answer": 2}], {},
         "row 1: field 'answer': index 2 is not in 0..1"),
        ("choice", [{"question": "q", "choices": ["a", "b"], "answer": "zz"}], {},
         "row 1: field 'answer': 'zz' is neither an index (0..1), a letter (A..B) nor the text"),
        ("choice", [{"question": "q", "choices": "nope", "answer": 0}], {},
         "row 1: field 'choices' must be a list of choices"),
        ("choice", [{"question": "q", "choices": ["a", ""], "answer": 0}], {},
         "row 1: field 'choices'[1] must be non-empty text"),
        ("choice", [{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": " ",
         "choices": ["a", "b"], "answer": 0}], {}, "row 2: field 'question' is empty"),
        ("label", [{"text": "t", "label": "x"}, {"text": "u", "label": "z"}],
         {"labels": "x,y"}, "row 2: field 'label': 'z' is not one of the labels x, y"),
        ("label", [{"text": "t", "label": "x"}], {},
         "field 'label' holds 1 distinct label(s)"),
        ("label", [{"text": "t", "cat": "x"}], {"labels": "x,y"},
         "row 1: field 'label' is missing"),
        ("generate", [{"instruction": "i"}], {}, "row 1: field 'response' is missing"),
        ("generate", [{"instruction": "i", "response": "r"}], {"template": "{nope}"},
         "row 1: template field {nope} is not a column of this row"),
    ],
)  # fmt: skip
def test_bad_rows_are_named(
    tmp_path: Path, kind: str, rows: list[dict[str, Any]], spec: dict[str, Any], message: str
) -> None:
    path = write_jsonl(tmp_path / "task.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_task(path, TaskSpec(kind=kind, **spec))  # type: ignore[arg-type]
    assert str(err.value).startswith(str(path)), str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "regression"}, "kind: 'regression' is not one of choice, label, generate"),
        ({"kind": "choice", "columns": "bogus=x"}, "columns: unknown role 'bogus'"),
        ({"kind": "choice", "columns": "question"}, "columns: 'question' is not ROLE=COLUMN"),
        ({"kind": "label", "labels": "a"}, "labels: need at least two labels"),
        ({"kind": "choice", "limit": -1}, "limit: must be >= 0"),
        ({"kind": "choice", "template": "{question"}, "template: not a valid template"),
    ],
)
def test_bad_specs_name_the_option(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        TaskSpec(**spec)
    assert message in str(err.value)
