"""The two float codecs: ``none`` (fp32, today's wire form) and ``fp16`` (round to nearest).

``none`` keeps one array per tensor under its PEFT name, exactly as updates travel without a
codec, so its byte count is the fp32 baseline every ratio is taken against. ``fp16`` sends the
flat vector in IEEE half precision: relative error <= 2^-11 for |x| >= 2^-14 (normal range) and
absolute error <= 2^-25 below it (half the subnormal spacing); |x| > 65504 cannot be encoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.adapter import WIRE_DTYPE, AdapterSpec
from protocol.codecs.base import (
    CODEC,
    LAYOUT,
    Arrays,
    CodecError,
    Payload,
    check_array_keys,
    check_floats,
    check_meta,
    finish,
    flatten,
    layout_digest,
    unflatten,
    vector,
)
from protocol.errors import UpdateRejected

FP16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass(frozen=True)
class NoneCodec:
    """No compression: float32 tensors under their own names."""

    @property
    def name(self) -> str:
        return "none"

    @property
    def linear(self) -> bool:
        return True

    def encode(self, arrays: Mapping[str, np.ndarray], rng: np.random.Generator) -> Payload:
        check_floats(arrays, "none codec")
        out = {k: np.ascontiguousarray(v, dtype=WIRE_DTYPE) for k, v in arrays.items()}
        for k, v in out.items():
            if not np.isfinite(v).all():
                raise CodecError(f"none codec: tensor {k!r} overflows float32")
        return Payload(out, {CODEC: self.name})

    def decode(self, payload: Payload, spec: AdapterSpec) -> Arrays:
        what = "none codec"
        check_meta(payload, {CODEC: self.name}, what)
        check_array_keys(payload, spec.names, what)
        return finish({k: payload.arrays[k] for k in spec.names}, spec, what)


@dataclass(frozen=True)
class Fp16Codec:
    """IEEE half precision, round to nearest even, all tensors as one flat vector."""

    @property
    def name(self) -> str:
        return "fp16"

    @property
    def linear(self) -> bool:
        return False  # rounding is not linear; sums of fp16 payloads are not fp16 payloads

    def encode(self, arrays: Mapping[str, np.ndarray], rng: np.random.Generator) -> Payload:
        check_floats(arrays, "fp16 codec")
        flat = flatten(arrays)
        worst = float(np.abs(flat).max())
        if worst > FP16_MAX:
            raise CodecError(
                f"fp16 codec: a value of magnitude {worst:.4g} exceeds the fp16 range {FP16_MAX:g}"
            )
        spec = AdapterSpec.of(arrays)
        return Payload(
            {"values": flat.astype(np.float16)}, {CODEC: self.name, LAYOUT: layout_digest(spec)}
        )

    def decode(self, payload: Payload, spec: AdapterSpec) -> Arrays:
        what = "fp16 codec"
        check_meta(payload, {CODEC: self.name, LAYOUT: layout_digest(spec)}, what)
        check_array_keys(payload, ("values",), what)
        values = vector(payload, "values", np.dtype(np.float16), spec.numel, what)
        if not np.isfinite(values).all():
            raise UpdateRejected(f"{what}: array 'values' contains NaN or infinite values")
        return finish(unflatten(values.astype(np.float64), spec), spec, what)
