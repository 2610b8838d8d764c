"""Names and defaults shared by light and heavy code: the default model, quantization modes and
the cache location. Only the standard library here, so command-line entry points and the device
supervisor can use them without importing torch (seconds and ~200 MB on a small device)."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

DEFAULT_MODEL = "smollm2"


class Quantization(StrEnum):
    """How the frozen base weights are held in memory during local training."""

    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"

    @classmethod
    def parse(cls, value: str, *, field: str = "quantization") -> Quantization:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(q.value for q in cls)
            raise ValueError(f"{field}: {value!r} is not one of {choices}") from None


def default_cache_dir() -> Path:
    env = os.environ.get("FEDTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedtune"
