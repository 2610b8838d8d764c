from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from client.data import (
    IGNORE_INDEX,
    DataError,
    heldout_split,
    load_records,
    to_messages,
    tokenize_conversation,
)

ROWS = [
    {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"},
    {
        "instruction": "Summarize.",
        "context": "Cats sleep a lot.",
        "response": "Cats nap.",
        "category": "summarization",
    },
]


def write(path: Path, rows: list[dict]) -> Path:  # type: ignore[type-arg]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_reads_the_same_rows(tmp_path: Path, suffix: str) -> None:
    rows = load_records(write(tmp_path / f"d{suffix}", ROWS))
    assert [r["instruction"] for r in rows] == ["Name a color.", "Summarize."]
    assert [to_messages(r, "x")[1]["content"] for r in rows] == ["Blue.", "Cats nap."]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_byte_order_mark_is_dropped(tmp_path: Path, suffix: str) -> None:
    """Issue 12: a CSV saved with a UTF-8 byte-order mark (Excel) was refused with
    'found response, \\ufeffinstruction'; JSON files with one failed to parse."""
    plain = write(tmp_path / f"plain{suffix}", ROWS)
    bom = tmp_path / f"bom{suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    rows = load_records(bom)
    assert rows == load_records(plain)
    assert "instruction" in rows[0] and not any(k.startswith("\ufeff") for k in rows[0])
    assert [to_messages(r, "x")[1]["content"] for r in rows] == ["Blue.", "Cats nap."]


def test_directory_of_files_sets_category_from_file_name(tmp_path: Path) -> None:
    write(tmp_path / "poems.jsonl", [{"instruction": "a", "response": "b"}])
    write(tmp_path / "code.jsonl", [{"instruction": "c", "response": "d", "category": "mine"}])
    rows = load_records(tmp_path)
    assert [r["category"] for r in rows] == ["mine", "poems"]


def test_row_styles() -> None:
    dolly = to_messages({"instruction": "Q", "context": "C", "response": "A"}, "r")
    assert dolly == [{"role": "user", "content": "Q\n\nC"}, {"role": "assistant", "content": "A"}]
    alpaca = to_messages({"instruction": "Q", "input": "I", "output": "A"}, "r")
    assert alpaca[0]["content"] == "Q\n\nI" and alpaca[1]["content"] == "A"
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert to_messages({"messages": chat}, "r") == chat
    assert to_messages({"messages": json.dumps(chat)}, "r") == chat  # CSV/Parquet store it as text


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hello"}, "f.jsonl: row 3: no instruction field"),
        ({"instruction": "Q"}, "no response field"),
        ({"instruction": "  ", "response": "A"}, "field 'instruction' must be a non-empty string"),
        ({"instruction": "Q", "output": 5}, "field 'output' must be a non-empty string"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no non-empty assistant message"),
        ({"messages": "not json"}, "not a list of messages"),
    ],
)
def test_bad_rows_name_file_row_and_field(row: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(DataError) as err:
        to_messages(row, "f.jsonl: row 3")
    assert message in str(err.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(bad)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_records(tmp_path / "x.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"holds no \.jsonl"):
        load_records(empty)
    obj = tmp_path / "obj.json"
    obj.write_text('{"a": 1}')
    with pytest.raises(DataError, match="must hold a list of objects"):
        load_records(obj)
    with pytest.raises(DataError, match="unknown built-in dataset"):
        load_records("builtin:nope")


def test_builtin_chatterbot_comes_from_the_registry_package() -> None:
    rows = load_records("builtin:chatterbot")
    cats = {r["category"] for r in rows}
    assert len(cats) >= 15 and {"ai", "greetings", "science"} <= cats
    assert len(rows) > 1500
    for r in rows[:50]:
        to_messages(r, "builtin")


def test_loss_mask_covers_exactly_the_assistant_turns(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ex = tokenize_conversation(tok, msgs, seq_len=256)
    assert ex is not None
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    text = tok.decode(labelled)
    assert text == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    # The prompt (system/user turns, role headers) carries no loss.
    first = ex.labels.index(next(t for t in ex.labels if t != IGNORE_INDEX))
    assert "France" in tok.decode(list(ex.input_ids[:first]))
    assert len(ex.input_ids) == len(ex.labels)


def test_truncation_keeps_seq_len_and_drops_examples_without_targets(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    assert tokenize_conversation(tok, msgs, seq_len=32) is None
    short = tokenize_conversation(
        tok,
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 50}],
        24,
    )
    assert short is not None and len(short.input_ids) == 24


def test_heldout_split() -> None:
    tr, ho = heldout_split(100, 0.1, seed=3)
    assert len(ho) == 10 and len(tr) == 90 and not set(tr) & set(ho)
    _, ho2 = heldout_split(100, 0.1, seed=3)
    assert np.array_equal(ho, ho2)
    assert len(heldout_split(1, 0.5, 0)[1]) == 0  # a single row always trains
    assert len(heldout_split(5, 0.01, 0)[1]) == 1  # small clients still hold one row out
    with pytest.raises(ValueError, match="heldout_fraction"):
        heldout_split(10, 1.0, 0)
