"""A fast structural check of a GGUF file: does every tensor its header describes lie inside it?

A truncated download or a file that only starts with ``GGUF`` used to fail deep inside
transformers' loader (``cannot reshape array of size ... into shape ...``) after a cache entry had
been started. This walk reads only what locates the tensors (header, metadata lengths, tensor
infos) and compares the end of the last tensor with the file size.

gguf's own ``GGUFReader`` answers the same question, but it decodes every metadata value into
numpy views (the SmolLM2 vocabulary alone is ~100,000 strings) and took 7-8 s on the default model
on this project's 2-core machine; the walk below skips values and takes a fraction of a second.
Type codes, block sizes and the default alignment come from the gguf package.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_ALIGNMENT_KEY = "general.alignment"


class GGUFFormatError(ValueError):
    """The file is not a complete GGUF file; the message says what is wrong."""


@dataclass(frozen=True)
class GGUFLayout:
    version: int
    tensor_count: int
    data_offset: int  # where tensor data starts (aligned)
    data_end: int  # the byte just after the last tensor; the file must be at least this long


class _Cursor:
    def __init__(self, buf: Any, order: str) -> None:
        self.buf = buf
        self.pos = 0
        self.order = order

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str) -> int:
        try:
            (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"the header ends early, at byte {len(self.buf)}") from None
        self.pos += struct.calcsize(fmt)
        return int(value)

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise GGUFFormatError(f"the header ends early, at byte {len(self.buf)}")
        self.pos += n

    def string(self) -> bytes:
        n = self.unpack("Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start : start + n])

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.unpack("Q")
        if n * min_item_bytes > self.remaining():
            raise GGUFFormatError(
                f"{what} count {n} does not fit in the {self.remaining()} bytes that follow"
            )
        return n


def _value_type(code: int) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise GGUFFormatError(f"unknown metadata value type {code}") from None


def _skip_value(cur: _Cursor, kind: GGUFValueType) -> None:
    if kind is GGUFValueType.STRING:
        cur.skip(cur.unpack("Q"))
    elif kind is GGUFValueType.ARRAY:
        item = _value_type(cur.unpack("I"))
        if item is GGUFValueType.STRING:
            for _ in range(cur.count("string array", 8)):
                cur.skip(cur.unpack("Q"))
        elif item is GGUFValueType.ARRAY:
            for _ in range(cur.count("nested array", 12)):
                _skip_value(cur, GGUFValueType.ARRAY)
        else:
            size = _SCALAR_SIZES[item]
            cur.skip(cur.count("array", size) * size)
    else:
        cur.skip(_SCALAR_SIZES[kind])


def read_layout(buf: Any) -> GGUFLayout:
    """Locate the tensor data described by the GGUF header in ``buf`` (bytes, mmap, memoryview).

    Raises ``GGUFFormatError`` for anything that is not a well-formed GGUF header; does not look
    at the tensor data itself (the caller compares ``data_end`` with the file size).
    """
    if bytes(buf[:4]) != struct.pack("<I", GGUF_MAGIC):
        raise GGUFFormatError("it does not start with 'GGUF'")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4) if len(buf) >= 8 else (0,)
    if version and version & 0xFFFF == 0:  # written on a big-endian machine
        order = ">"
        version = struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    cur = _Cursor(buf, order)
    cur.pos = 8
    tensor_count = cur.count("tensor", 24)
    kv_count = cur.count("metadata", 12)
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cur.string()
        kind = _value_type(cur.unpack("I"))
        if key == _ALIGNMENT_KEY.encode():
            if kind is not GGUFValueType.UINT32:
                raise GGUFFormatError(f"{_ALIGNMENT_KEY} has type {kind.name}, expected UINT32")
            alignment = cur.unpack("I")
            if alignment == 0 or alignment & (alignment - 1):
                raise GGUFFormatError(f"{_ALIGNMENT_KEY} {alignment} is not a power of two")
        else:
            _skip_value(cur, kind)
    end = 0
    for _ in range(tensor_count):
        name = cur.string().decode("utf-8", "replace")
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions")
        shape = [cur.unpack("Q") for _ in range(n_dims)]
        code = cur.unpack("I")
        offset = cur.unpack("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(code)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name!r} has unknown type {code}") from None
        elements = math.prod(shape)
        if elements % block:
            raise GGUFFormatError(f"tensor {name!r}: {elements} values are not whole blocks")
        end = max(end, offset + elements // block * type_size)
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFLayout(version, tensor_count, data_offset, data_offset + end)


def check_gguf(path: Path) -> GGUFLayout:
    """Raise ``GGUFFormatError`` unless ``path`` is a GGUF file holding all its tensors."""
    size = path.stat().st_size
    if size < 8:
        raise GGUFFormatError(f"the file has {size} bytes")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        layout = read_layout(mm)
    if layout.data_end > size:
        raise GGUFFormatError(f"its tensors end at byte {layout.data_end}, the file has {size}")
    return layout
