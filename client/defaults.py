"""Names and defaults shared by light and heavy code: the default model, quantization modes and
the cache location. Only the standard library here, so command-line entry points and the device
supervisor can use them without importing torch (seconds and ~200 MB on a small device)."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Self

DEFAULT_MODEL = "smollm2"


class Choice(StrEnum):
    """A string option with a fixed set of values; ``parse`` names the option in its error."""

    @classmethod
    def parse(cls, value: str, *, field: str | None = None) -> Self:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            name = field or cls.__name__.lower()
            raise ValueError(f"{name}: {value!r} is not one of {choices}") from None


class Quantization(Choice):
    """How the frozen base weights are held in memory during local training."""

    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class ComputeDtype(Choice):
    """The precision of a client's matrix products in training and evaluation. The adapters,
    their gradients and the optimizer state stay fp32 either way; ``bf16`` runs the linear
    layers under bfloat16 autocast (mixed precision), ``auto`` does so only where the device
    multiplies bfloat16 natively (CPUs with AMX or AVX512-BF16, CUDA GPUs that support it)."""

    FP32 = "fp32"
    BF16 = "bf16"
    AUTO = "auto"


def base_held_in_bf16(quantization: Quantization, bf16_products: bool) -> bool:
    """Is the frozen base held in bf16? An unquantized one is when its products run in bf16
    (``client.model.load_base``: rounded once instead of at every use); the quantized modes keep
    their own formats. The loader, the memory plan and the reported weight bits follow this."""
    return quantization is Quantization.NONE and bf16_products


def default_cache_dir() -> Path:
    env = os.environ.get("FEDTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "max-memory") -> int:
    """Bytes from ``3GB``, ``512m``, ``2GiB`` or a plain number of bytes (multiples are 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{what}: expected a size such as 3GB or 512MB, got {text!r}")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))
