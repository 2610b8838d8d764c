"""Instruction data: reading files, turning rows into chats, tokenizing with loss masks.

Rows come from JSONL, JSON (a list of objects), CSV or Parquet files, or from a directory of such
files. Two row styles are understood:

* Alpaca/Dolly: ``instruction``, optional ``context`` or ``input``, and ``response`` or ``output``;
* chat: ``messages``, a list of ``{"role": ..., "content": ...}`` (roles system/user/assistant).

Every row becomes a list of chat messages, rendered with the tokenizer's chat template; only
assistant tokens carry a loss (all other labels are -100).

The built-in dataset (``--data builtin:chatterbot``) comes from the PyPI package
``chatterbot-corpus``: English question/answer pairs in 21 categories (one natural client each).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Record = dict[str, Any]
ChatMessage = dict[str, str]

BUILTIN_PREFIX = "builtin:"
BUILTIN_CHATTERBOT = "builtin:chatterbot"
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100

_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_CONTEXT_KEYS = ("context", "input")
_RESPONSE_KEYS = ("response", "output", "answer")
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or row cannot be used; the message names the file, row and field."""


# ------------------------------------------------------------------------------------ reading


def load_records(source: str | Path) -> list[Record]:
    """Read every row of a data file, a directory of data files, or a ``builtin:`` dataset."""
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        return load_builtin(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise DataError(f"data directory {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        records: list[Record] = []
        for f in files:
            rows = _read_file(f)
            # A directory of per-category files gives each row its file name as category.
            for r in rows:
                r.setdefault("category", f.stem)
            records.extend(rows)
        return records
    return _read_file(path)


def _read_file(path: Path) -> list[Record]:
    # Text is read as "utf-8-sig": a leading byte-order mark (Excel and Notepad write one) is
    # dropped instead of becoming part of the first column name or failing the JSON parser.
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        elif suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of objects")
            rows = data
        elif suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.DictReader(fh))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(
                f"{path}: unsupported file type {suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})"
            )
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i + 1} is a {type(row).__name__}, expected an object")
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def load_builtin(name: str) -> list[Record]:
    if name != BUILTIN_CHATTERBOT:
        raise DataError(f"unknown built-in dataset {name!r}; available: {BUILTIN_CHATTERBOT}")
    found = importlib.util.find_spec("chatterbot_corpus")
    if found is None or not found.submodule_search_locations:
        raise DataError(
            f"{name} needs the package chatterbot-corpus (pip install chatterbot-corpus)"
        )
    import yaml

    root = Path(next(iter(found.submodule_search_locations))) / "data" / "english"
    records: list[Record] = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            texts = [str(t).strip() for t in conv if isinstance(t, str | int | float)]
            # A conversation [q, a1, a2, ...] gives pairs (q, a1), (a1, a2), ... like the
            # chatterbot trainer does.
            for q, a in itertools.pairwise(texts):
                if q and a:
                    records.append({"instruction": q, "response": a, "category": f.stem})
    return records


# ------------------------------------------------------------------------------------ rows


def _first(row: Record, names: Sequence[str]) -> tuple[str | None, Any]:
    for n in names:
        if n in row and row[n] is not None:
            return n, row[n]
    return None, None


def to_messages(row: Record, where: str) -> list[ChatMessage]:
    """One row as chat messages, or ``DataError`` naming ``where`` and the offending field."""
    if "messages" in row:
        msgs = row["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: field 'messages' is not a list of messages") from exc
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list")
        out: list[ChatMessage] = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{j}] needs a string 'content'")
            role = m.get("role")
            if role not in _ROLES:
                raise DataError(
                    f"{where}: messages[{j}].role is {role!r}, expected one of {_ROLES}"
                )
            out.append({"role": str(role), "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise DataError(f"{where}: field 'messages' has no non-empty assistant message")
        return out

    ikey, instruction = _first(row, _INSTRUCTION_KEYS)
    rkey, response = _first(row, _RESPONSE_KEYS)
    if ikey is None:
        raise DataError(
            f"{where}: no instruction field (expected one of {', '.join(_INSTRUCTION_KEYS)}, "
            "or 'messages'); found " + ", ".join(sorted(row))
            if row
            else f"{where}: empty row"
        )
    if rkey is None:
        raise DataError(
            f"{where}: no response field (expected one of {', '.join(_RESPONSE_KEYS)}); found "
            + ", ".join(sorted(row))
        )
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field {ikey!r} must be a non-empty string")
    if not isinstance(response, str) or not response.strip():
        raise DataError(f"{where}: field {rkey!r} must be a non-empty string")
    _, context = _first(row, _CONTEXT_KEYS)
    user = instruction.strip()
    if isinstance(context, str) and context.strip():
        user = f"{user}\n\n{context.strip()}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response.strip()}]


def to_conversations(records: Sequence[Record], source: str) -> list[list[ChatMessage]]:
    return [to_messages(r, f"{source}: row {i + 1}") for i, r in enumerate(records)]


# ------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on every token that carries no loss

    @property
    def num_target_tokens(self) -> int:
        # Labels are shifted inside the loss: position t predicts token t + 1.
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


# ChatML, used when a tokenizer has no template of its own.
_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], *, generation_prompt: bool
) -> str:
    template = tokenizer.chat_template or _FALLBACK_TEMPLATE
    return str(
        tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=template,
        )
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> str:
    """The chat so far plus the assistant's generation prompt, rendered exactly as training
    renders the prefix of a reply (the text a model continues when it answers)."""
    return _render(tokenizer, messages, generation_prompt=True)


def _texts(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[str]:
    """The full chat, then for each assistant turn i the two prefixes bounding it:
    "messages[:i] + generation prompt" and "messages[:i+1]" (chat templates render prefixes
    consistently). The last turn's end is the full chat, so it is not rendered twice."""
    texts = [_render(tokenizer, messages, generation_prompt=False)]
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            texts.append(_render(tokenizer, messages[:i], generation_prompt=True))
            if i != last:
                texts.append(_render(tokenizer, messages[: i + 1], generation_prompt=False))
    return texts


def _example(
    messages: list[ChatMessage], ids: list[list[int]], seq_len: int
) -> TokenizedExample | None:
    full, bounds = ids[0], iter(ids[1:])
    labels = [IGNORE_INDEX] * len(full)
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(next(bounds))
        end = len(full) if i == last else len(next(bounds))
        labels[start:end] = full[start:end]
    ids_, labels = full[:seq_len], labels[:seq_len]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        return None
    return TokenizedExample(tuple(ids_), tuple(labels))


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], seq_len: int
) -> TokenizedExample | None:
    """Tokenize one chat; labels keep only the assistant turns. ``None`` if nothing trainable
    survives truncation to ``seq_len`` tokens."""
    return tokenize_many(tokenizer, [messages], seq_len)[0]


def tokenize_many(
    tokenizer: PreTrainedTokenizerBase, conversations: Iterable[list[ChatMessage]], seq_len: int
) -> list[TokenizedExample | None]:
    """Tokenize many chats in one batched tokenizer call, aligned with the input (``None`` for a
    chat with nothing trainable within ``seq_len``)."""
    convs = list(conversations)
    per_conv = [_texts(tokenizer, c) for c in convs]
    flat = [t for texts in per_conv for t in texts]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out: list[TokenizedExample | None] = []
    pos = 0
    for conv, texts in zip(convs, per_conv, strict=True):
        out.append(_example(conv, [list(x) for x in encoded[pos : pos + len(texts)]], seq_len))
        pos += len(texts)
    return out


def tokenize_all(
    tokenizer: PreTrainedTokenizerBase, conversations: Iterable[list[ChatMessage]], seq_len: int
) -> list[TokenizedExample]:
    """The trainable examples among ``conversations`` (chats with no target within ``seq_len``
    are dropped)."""
    return [ex for ex in tokenize_many(tokenizer, conversations, seq_len) if ex is not None]


# ------------------------------------------------------------------------------------ splits


def heldout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the local (train, held-out) split: a seeded permutation, at least one train row.

    With ``n >= 2`` and ``fraction > 0`` the held-out split has at least one row.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = 0 if n < 2 or fraction == 0 else min(n - 1, max(1, round(n * fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])


def records_seed(records: Sequence[Record]) -> int:
    """A stable seed derived from the data itself, so each client splits the same way every run."""
    h = hashlib.sha256()
    for r in records[:64]:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    h.update(str(len(records)).encode())
    return int.from_bytes(h.digest()[:4], "little")
