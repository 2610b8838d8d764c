"""Task evaluation: accuracy of a base model (plus an adapter) on a held-out benchmark file.

Three kinds of task, read from JSONL, JSON, CSV or Parquet with ``client.data``'s loaders:

* ``choice``: a question, its choices and the right one (``answer`` is the index, the letter or
  the text of the right choice). Each choice is scored by the log-likelihood of its tokens as the
  assistant's reply to the prompt (the same tokens training puts a loss on, end-of-turn included),
  summed and divided by its token count; the prompt is run once and its KV cache shared by the
  choices. The prediction is the best length-normalised choice (the summed rule is reported too).
* ``label``: a text and its label from a fixed label set; the label words are the choices.
* ``generate``: an instruction and a reference response; greedy decoding, exact match and token F1.

Only the model-running functions import torch (lazily), so the run configuration can validate a
``TaskSpec`` without it. The metrics are the pure functions of ``client.task_metrics``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client import task_metrics as tm
from client.data import IGNORE_INDEX, DataError, Record, load_records, render_prompt, tokenize_many
from client.defaults import Choice

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TaskKind(Choice):
    CHOICE = "choice"
    LABEL = "label"
    GENERATE = "generate"


# Role -> default column. ``choices`` may name several columns joined by "|" (A|B|C|D).
DEFAULT_COLUMNS: dict[str, str] = {
    "question": "question",
    "choices": "choices",
    "answer": "answer",
    "text": "text",
    "label": "label",
    "instruction": "instruction",
    "context": "context",
    "response": "response",
}
ROLES_OF: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.CHOICE: ("question", "choices", "answer"),
    TaskKind.LABEL: ("text", "label"),
    TaskKind.GENERATE: ("instruction", "response"),
}
# Default prompts; {options} lists the choices as "A. ...", {labels} is the label set. Fields are
# the roles above and the row's own columns.
DEFAULT_TEMPLATES: dict[TaskKind, str] = {
    TaskKind.CHOICE: "{question}\n\nOptions:\n{options}\n\nAnswer with the right option.",
    TaskKind.LABEL: (
        "{text}\n\nWhich one of these labels fits the text above: {labels}? "
        "Answer with the label only."
    ),
    # Plus "\n\n{context}" when the row has a non-empty context (Dolly/Alpaca style).
    TaskKind.GENERATE: "{instruction}",
}
LETTERS = string.ascii_uppercase


def parse_columns(spec: str) -> dict[str, str]:
    """``"question=q,answer=gold"`` -> the default columns with those roles renamed."""
    out = dict(DEFAULT_COLUMNS)
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        role, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not column:
            raise ValueError(f"columns: {part!r} is not ROLE=COLUMN")
        if role not in DEFAULT_COLUMNS:
            raise ValueError(
                f"columns: unknown role {role!r} (roles: {', '.join(DEFAULT_COLUMNS)})"
            )
        out[role] = column
    return out


def template_fields(template: str, name: str = "template") -> list[str]:
    """The field names of a ``str.format`` template (ValueError naming ``name`` if malformed)."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{name}: not a valid template ({exc})") from None


@dataclass(frozen=True)
class TaskSpec:
    """How to read and score a task file. Strings, so a run's flat config can carry it."""

    kind: TaskKind
    columns: str = ""  # ROLE=COLUMN overrides of DEFAULT_COLUMNS, comma-separated
    labels: str = ""  # label kind: the label set, comma-separated ("" = the file's labels)
    template: str = ""  # the user prompt as a str.format template ("" = the kind's default)
    limit: int = 0  # score a seeded subset of this many rows (0 = every row)
    seed: int = 0
    max_new_tokens: int = 64  # generate kind

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TaskKind.parse(str(self.kind), field="kind"))
        parse_columns(self.columns)
        if self.limit < 0:
            raise ValueError(f"limit: must be >= 0 (0 = every row), got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        for f in template_fields(self.template):
            if not f or not f.isidentifier():
                raise ValueError(f"template: field {{{f}}} must be a column or role name")
        if self.labels and len(self.label_set()) < 2:
            raise ValueError(f"labels: need at least two labels, got {self.labels!r}")

    def column(self, role: str) -> str:
        return parse_columns(self.columns)[role]

    def label_set(self) -> tuple[str, ...]:
        labels = tuple(x.strip() for x in self.labels.split(",") if x.strip())
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels: {self.labels!r} names a label twice")
        return labels


@dataclass(frozen=True)
class ChoiceItem:
    """One row of a choice or label task: the prompt, the candidate replies, the right one."""

    row: int  # 1-based row number in the file
    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class GenerateItem:
    row: int
    prompt: str
    reference: str


@dataclass(frozen=True)
class Task:
    path: str
    spec: TaskSpec
    items: tuple[ChoiceItem, ...] | tuple[GenerateItem, ...]
    classes: tuple[str, ...]  # label names (label), answer letters (choice), () (generate)
    total_rows: int  # rows in the file (items may be a --limit subset)


# ------------------------------------------------------------------------------ reading


def _text(row: Record, column: str, where: str) -> str:
    if column not in row or row[column] is None:
        found = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: field {column!r} is missing (columns: {found})")
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {column!r} must be text, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: field {column!r} is empty")
    return text


def _choices(row: Record, spec: str, where: str) -> tuple[str, ...]:
    if "|" in spec:  # one column per choice, e.g. A|B|C|D
        return tuple(_text(row, c.strip(), where) for c in spec.split("|"))
    if spec not in row or row[spec] is None:
        raise DataError(f"{where}: field {spec!r} is missing (columns: {', '.join(sorted(row))})")
    raw = row[spec]
    if isinstance(raw, str):  # CSV: a JSON list in a cell
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: field {spec!r} must be a list of choices (a JSON list in a CSV cell)"
            ) from None
    if not isinstance(raw, list | tuple) or len(raw) < 2:
        raise DataError(f"{where}: field {spec!r} must be a list of at least two choices")
    out = []
    for j, c in enumerate(raw):
        if isinstance(c, bool) or not isinstance(c, str | int | float) or not str(c).strip():
            raise DataError(f"{where}: field {spec!r}[{j}] must be non-empty text, got {c!r}")
        out.append(str(c).strip())
    return tuple(out)


def resolve_answer(raw: Any, choices: Sequence[str], column: str, where: str) -> int:
    """The index of the right choice from an index (0-based), a letter (A = first) or the text of
    a choice; text that equals a choice wins over a letter or a digit."""
    k = len(choices)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool):
        if 0 <= raw < k:
            return raw
        raise DataError(f"{where}: field {column!r}: index {raw} is not in 0..{k - 1}")
    if isinstance(raw, str) and raw.strip():
        s = raw.strip()
        if s in choices:
            return list(choices).index(s)
        if len(s) == 1 and s.upper() in LETTERS[:k]:
            return LETTERS.index(s.upper())
        if s.isdigit() and int(s) < k:
            return int(s)
    raise DataError(
        f"{where}: field {column!r}: {raw!r} is neither an index (0..{k - 1}), a letter "
        f"(A..{LETTERS[k - 1]}) nor the text of a choice"
    )


def _format(template: str, row: Record, extra: Mapping[str, str], where: str) -> str:
    values = {k: str(v) for k, v in row.items() if isinstance(k, str) and v is not None}
    values.update(extra)
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise DataError(
            f"{where}: template field {{{exc.args[0]}}} is not a column of this row "
            f"(columns: {', '.join(sorted(values))})"
        ) from None
    except (ValueError, IndexError) as exc:
        raise DataError(f"{where}: template cannot be filled ({exc})") from None


def _options(choices: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(choices))


def subset(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``limit`` of ``n`` rows (all rows if limit is 0 or
    at least n)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


# The role whose column holds a row's right answer: a row without it has nothing to score against.
ANSWER_ROLE: dict[TaskKind, str] = {
    TaskKind.CHOICE: "answer",
    TaskKind.LABEL: "label",
    TaskKind.GENERATE: "response",
}


def has_answer(row: Record, spec: TaskSpec) -> bool:
    """Does ``row`` carry its answer (the label, answer or response column, non-empty)?"""
    value = row.get(spec.column(ANSWER_ROLE[spec.kind]))
    return value is not None and not (isinstance(value, str) and not value.strip())


def parse_item(
    row: Record, number: int, spec: TaskSpec, labels: Sequence[str], source: str
) -> ChoiceItem | GenerateItem:
    """One row (1-based ``number``) as an item of ``spec``'s kind; ``labels`` is the label set of
    a label task. A bad row raises ``DataError`` naming the file, the row and the field."""
    cols = parse_columns(spec.columns)
    template = spec.template or DEFAULT_TEMPLATES[spec.kind]
    where = f"{source}: row {number}"
    if spec.kind is TaskKind.LABEL:
        text = _text(row, cols["text"], where)
        label = _text(row, cols["label"], where)
        if label not in labels:
            raise DataError(
                f"{where}: field {cols['label']!r}: {label!r} is not one of the labels "
                f"{', '.join(labels)}"
            )
        extra = {"text": text, "label": label, "labels": ", ".join(labels)}
        return ChoiceItem(number, _format(template, row, extra, where), tuple(labels),
                          list(labels).index(label))  # fmt: skip
    if spec.kind is TaskKind.CHOICE:
        question = _text(row, cols["question"], where)
        choices = _choices(row, cols["choices"], where)
        if len(choices) > len(LETTERS):
            raise DataError(f"{where}: field {cols['choices']!r} has over 26 choices")
        if cols["answer"] not in row or row[cols["answer"]] is None:
            raise DataError(f"{where}: field {cols['answer']!r} is missing")
        answer = resolve_answer(row[cols["answer"]], choices, cols["answer"], where)
        extra = {"question": question, "options": _options(choices)}
        return ChoiceItem(number, _format(template, row, extra, where), choices, answer)
    instruction = _text(row, cols["instruction"], where)
    reference = _text(row, cols["response"], where)
    extra = {"instruction": instruction, "response": reference}
    prompt = _format(template, row, extra, where)
    context = row.get(cols["context"])
    if not spec.template and isinstance(context, str) and context.strip():
        prompt = f"{prompt}\n\n{context.strip()}"
    return GenerateItem(number, prompt, reference)


def item_classes(spec: TaskSpec, labels: Sequence[str], items: Sequence[Any]) -> tuple[str, ...]:
    """The classes of a task's confusion matrix: the label set (label), the answer letters up to
    the widest row's (choice), none (generate)."""
    if spec.kind is TaskKind.LABEL:
        return tuple(labels)
    if spec.kind is TaskKind.CHOICE:
        return tuple(LETTERS[: max((len(i.choices) for i in items), default=0)])
    return ()


def load_task(path: str | Path, spec: TaskSpec) -> Task:
    """Read and check every row of a task file, then keep the ``spec.limit`` subset.

    A bad row raises ``DataError`` naming the file, the row (1-based) and the field."""
    source = str(path)
    records = load_records(source)
    labels: tuple[str, ...] = ()
    if spec.kind is TaskKind.LABEL:
        labels = spec.label_set()
        if not labels:  # the distinct labels of the whole file, sorted
            column = spec.column("label")
            found = {_text(r, column, f"{source}: row {i + 1}") for i, r in enumerate(records)}
            labels = tuple(sorted(found))
            if len(labels) < 2:
                raise DataError(
                    f"{source}: field {column!r} holds {len(labels)} distinct label(s); "
                    "a label task needs at least two (or pass --labels)"
                )
    items = [parse_item(r, i + 1, spec, labels, source) for i, r in enumerate(records)]
    keep = subset(len(items), spec.limit, spec.seed)
    classes = item_classes(spec, labels, items)
    return Task(source, spec, tuple(items[int(j)] for j in keep), classes, len(records))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the model


def _reply_tokens(
    tokenizer: PreTrainedTokenizerBase, prompt: str, replies: Sequence[str]
) -> list[tuple[list[int], int]]:
    """For each reply: the token ids of the whole chat (user prompt, assistant reply) and the
    position of the reply's first token, tokenized as training tokenizes (client.data)."""
    chats = [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": r}] for r in replies
    ]
    out = []
    for reply, ex in zip(replies, tokenize_many(tokenizer, chats, seq_len=1 << 30), strict=True):
        if ex is None:
            raise DataError(f"choice {reply!r} has no tokens")
        start = next(t for t in range(1, len(ex.labels)) if ex.labels[t] != IGNORE_INDEX)
        out.append((list(ex.input_ids), start))
    return out


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for t in range(n):
        if any(s[t] != seqs[0][t] for s in seqs[1:]):
            return t
    return n


def _forward_parameters(model: Any) -> Mapping[str, Any]:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _cache_argument(model: Any) -> str:
    """The name of the KV-cache argument (and output): transformers 5.x renamed
    ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def score_choices(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, choices: Sequence[str]
) -> list[np.ndarray]:
    """Per-token log-probabilities of each choice as the assistant's reply to ``prompt``.

    The tokens the choices share (the rendered prompt) go through the model once; its KV cache
    is repeated for the choices, which then run as one right-padded batch. Returns one float64
    vector per choice, one entry per reply token."""
    import torch

    seqs = _reply_tokens(tokenizer, prompt, choices)
    starts = [s for _, s in seqs]
    # The shared prefix stops before the first scored token of every choice (a tokenizer may
    # merge across the prompt/reply boundary, so it is computed, not assumed).
    shared = min(_common_prefix([ids for ids, _ in seqs]), *starts)
    device = next(model.parameters()).device
    with torch.no_grad():
        prefix = torch.tensor([seqs[0][0][:shared]], device=device)
        # Only the last prompt position's logits are needed: skip the output head elsewhere.
        keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
        out = model(input_ids=prefix, use_cache=True, **keep)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts position `shared`
        name = _cache_argument(model)
        cache = out.get(name)
        tails = [ids[shared:] for ids, _ in seqs]
        width = max(len(t) for t in tails)
        pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        batch = torch.full((len(tails), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(tails), shared + width), dtype=torch.long, device=device)
        mask[:, :shared] = 1
        for i, t in enumerate(tails):
            batch[i, : len(t)] = torch.tensor(t, device=device)
            mask[i, shared : shared + len(t)] = 1
        cache.batch_repeat_interleave(len(tails))
        logits = model(
            input_ids=batch, attention_mask=mask, use_cache=True, **{name: cache}
        ).logits  # (C, W, V): row i, column j predicts position shared + j + 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    result = []
    for i, (ids, start) in enumerate(seqs):
        lp = [float(first[ids[shared]])] + [
            float(logprobs[i, p - shared - 1, ids[p]]) for p in range(shared + 1, len(ids))
        ]
        result.append(np.asarray(lp[start - shared :], dtype=np.float64))
    return result


def generate_reply(
    model: Any, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """The model's greedy reply to ``prompt`` (at most ``max_new_tokens`` tokens)."""
    import torch

    text = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class TaskResult:
    kind: TaskKind
    metrics: dict[str, float]  # scalar metrics; `accuracy` always, `macro_f1` for choice/label
    classes: tuple[str, ...] = ()
    confusion: list[list[int]] | None = None  # rows: true class, columns: predicted
    per_class_recall: dict[str, float | None] = field(default_factory=dict)
    majority_class: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, **header: Any) -> dict[str, Any]:
        """The result file: ``header`` (task, model, ...), then the metrics at top level."""
        out: dict[str, Any] = {**header, "kind": self.kind.value, **self.metrics}
        if self.classes:
            out["classes"] = list(self.classes)
        if self.majority_class is not None:
            out["majority_class"] = self.majority_class
        if self.per_class_recall:
            out["per_class_recall"] = self.per_class_recall
        if self.confusion is not None:
            out["confusion_matrix"] = self.confusion
        out["rows"] = self.rows
        return out


def classification_result(
    kind: TaskKind,
    classes: Sequence[str],
    answers: Sequence[int],
    summed: Sequence[Sequence[float]],
    normalised: Sequence[Sequence[float]],
    rows: Sequence[int] = (),
) -> TaskResult:
    """Metrics of a choice/label task from each row's right answer and its choices' scores."""
    n_classes = len(classes)
    pred = np.array([tm.argmax_first(s) for s in normalised], dtype=np.int64)
    pred_sum = np.array([tm.argmax_first(s) for s in summed], dtype=np.int64)
    y = np.asarray(answers, dtype=np.int64)
    cm = tm.confusion_matrix(y, pred, n_classes)
    cm_sum = tm.confusion_matrix(y, pred_sum, n_classes)
    majority, majority_acc = tm.majority_baseline(y, n_classes)
    metrics = {
        "accuracy": tm.accuracy(y, pred),
        "macro_f1": tm.macro_f1(cm),
        "accuracy_summed": tm.accuracy(y, pred_sum),
        "macro_f1_summed": tm.macro_f1(cm_sum),
        "majority_baseline": majority_acc,
        "chance_baseline": tm.chance_baseline([len(s) for s in normalised]),
        "rows_scored": float(len(y)),
    }
    if kind is TaskKind.LABEL:  # every row scores the same classes
        metrics["mean_ovr_auc"] = tm.mean_one_vs_rest_auc(
            y, np.reshape(normalised, (-1, n_classes))
        )
    recall = tm.per_class_recall(cm)
    per_row = [
        {
            "row": int(rows[i]) if rows else i + 1,
            "answer": classes[int(y[i])],
            "prediction": classes[int(pred[i])],
            "prediction_summed": classes[int(pred_sum[i])],
            "scores_normalised": [float(v) for v in normalised[i]],
            "scores_summed": [float(v) for v in summed[i]],
        }
        for i in range(len(y))
    ]
    return TaskResult(
        kind=kind,
        metrics=metrics,
        classes=tuple(classes),
        confusion=cm.tolist(),
        per_class_recall={
            c: (None if np.isnan(r) else float(r)) for c, r in zip(classes, recall, strict=True)
        },
        majority_class=classes[majority] if len(y) else None,
        rows=per_row,
    )


def generation_result(
    predictions: Sequence[str], references: Sequence[str], rows: Sequence[int] = ()
) -> TaskResult:
    em = [tm.exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    f1 = [tm.token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
    n = len(em)

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    metrics = {
        "accuracy": mean(em),
        "exact_match": mean(em),
        "token_f1": mean(f1),
        "rows_scored": n,
    }
    per_row = [
        {
            "row": int(rows[i]) if rows else i + 1,
            "prediction": predictions[i],
            "reference": references[i],
            "exact_match": em[i],
            "token_f1": f1[i],
        }
        for i in range(n)
    ]
    return TaskResult(TaskKind.GENERATE, {k: float(v) for k, v in metrics.items()}, rows=per_row)


def evaluate_task(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    on_row: Callable[[int, int], None] | None = None,
) -> TaskResult:
    """Score every item of ``task`` with ``model`` (in eval mode, gradients off).
    ``on_row(done, total)`` is called after each row."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    total = len(task.items)
    try:
        if task.spec.kind is TaskKind.GENERATE:
            preds, refs, rows = [], [], []
            for i, item in enumerate(task.items):
                assert isinstance(item, GenerateItem)
                preds.append(
                    generate_reply(model, tokenizer, item.prompt, task.spec.max_new_tokens)
                )
                refs.append(item.reference)
                rows.append(item.row)
                if on_row:
                    on_row(i + 1, total)
            return generation_result(preds, refs, rows)
        summed, normalised, answers, rows = [], [], [], []
        for i, item in enumerate(task.items):
            assert isinstance(item, ChoiceItem)
            scores = [
                tm.sequence_scores(lp)
                for lp in score_choices(model, tokenizer, item.prompt, item.choices)
            ]
            summed.append([s for s, _ in scores])
            normalised.append([m for _, m in scores])
            answers.append(item.answer)
            rows.append(item.row)
            if on_row:
                on_row(i + 1, total)
        return classification_result(
            task.spec.kind, task.classes, answers, summed, normalised, rows
        )
    finally:
        if was_training:
            model.train()


def load_eval_model(
    model: str,
    adapter_dir: Path | None,
    *,
    quantization: str = "none",
    cache_dir: Path | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The base model (``--model``), with the PEFT adapter in ``adapter_dir`` if given, in eval
    mode, and its tokenizer."""
    from client.model import Quantization, default_cache_dir, load_base, resolve_model

    base = load_base(
        resolve_model(model), Quantization.parse(quantization, field="quantization"),
        cache_dir or default_cache_dir(),
    )  # fmt: skip
    net: Any = base.model
    if adapter_dir is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(base.model, str(adapter_dir))
    net.eval()
    return net, base.tokenizer


def result_table(result: TaskResult, *, title: str = "") -> str:
    """The result as a plain-text table for a terminal."""
    m = result.metrics
    lines = [title] if title else []
    rows: list[tuple[str, float]] = []
    if result.kind is TaskKind.GENERATE:
        rows += [("exact match", m["exact_match"]), ("token F1", m["token_f1"])]
    else:
        majority = f" ({result.majority_class})" if result.majority_class else ""
        rows += [
            ("accuracy (length-normalised)", m["accuracy"]),
            ("accuracy (summed log-likelihood)", m["accuracy_summed"]),
            ("macro-F1 (length-normalised)", m["macro_f1"]),
            ("macro-F1 (summed log-likelihood)", m["macro_f1_summed"]),
            *([("mean one-vs-rest AUC", m["mean_ovr_auc"])] if "mean_ovr_auc" in m else []),
            (f"majority-class baseline{majority}", m["majority_baseline"]),
            ("chance baseline", m["chance_baseline"]),
        ]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in rows]
    lines.append(f"  {'rows scored':<{width}}  {int(m['rows_scored'])}")
    if result.confusion is not None and result.kind is TaskKind.LABEL:
        cm = np.asarray(result.confusion)
        name_w = max(len(c) for c in result.classes)
        cell = max(3, len(str(int(cm.max(initial=0)))))
        lines.append("")
        lines.append(
            f"  {'class':<{name_w}}  support  recall   confusion (columns: predicted class #)"
        )
        header = " ".join(f"{j:>{cell}}" for j in range(len(result.classes)))
        lines.append(f"  {'':<{name_w}}  {'':>7}  {'':>6}   {header}")
        for i, c in enumerate(result.classes):
            recall = result.per_class_recall.get(c)
            shown = "-" if recall is None else f"{recall:.4f}"
            counts = " ".join(f"{int(v):>{cell}}" for v in cm[i])
            lines.append(f"  {c:<{name_w}}  {int(cm[i].sum()):>7}  {shown:>6}   {counts}  #{i}")
    return "\n".join(lines)
