"""``int8`` and ``int4``: unbiased stochastic quantisation with per-tensor or per-block scales.

All tensors are flattened (spec order) and cut into segments: one per tensor (``block_size`` 0)
or blocks of ``block_size`` values inside each tensor (the last block of a tensor may be shorter;
blocks never span two tensors, whose scales can differ by orders of magnitude, e.g. LoRA's A and
B). Each segment gets a float32 scale s = max|x| / L, with L = 127 (int8) or 7 (int4), rounded up
to the next float32 if needed so that |x| / s <= L holds exactly. Each value is sent as an integer
q in [-L, L]: q = floor(x / s) + 1 with probability frac(x / s), else floor(x / s). Hence

- E[q s] = x (unbiased; the randomness is the caller's generator),
- |q s - x| < s for every value (strictly below one step),
- Var[q s] = s^2 f (1 - f) <= s^2 / 4, f = frac(x / s).

Wire form: ``q`` (int8 codes; for int4 two codes per byte, code = q + 8 in 1..15, the first value
in the low nibble; an odd count pads one nibble with 8, i.e. q = 0) and ``scale`` (float32, one
per segment). Decoding refuses codes outside [-L, L] (int8 -128, int4 nibble 0), a non-zero pad
nibble, and negative or non-finite scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.adapter import AdapterSpec
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

BLOCK = "block-size"  # meta: 0 = per-tensor scales


def segment_lengths(spec: AdapterSpec, block_size: int) -> np.ndarray:
    """Lengths of the scale segments over the flat vector: whole tensors, or blocks in each."""
    lengths: list[int] = []
    for _, t in spec.tensors:
        if block_size <= 0:
            lengths.append(t.numel)
        else:
            full, rest = divmod(t.numel, block_size)
            lengths.extend([block_size] * full)
            if rest:
                lengths.append(rest)
    return np.asarray(lengths, dtype=np.int64)


def segment_scales(flat: np.ndarray, lengths: np.ndarray, levels: int) -> np.ndarray:
    """float32 scale per segment with max|x| / scale <= levels exactly (0 for all-zero segments)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    amax = np.maximum.reduceat(np.abs(flat), starts)
    scale = (amax / levels).astype(np.float32)
    # float32 rounding may have gone down; one ulp up restores amax <= levels * scale.
    low = amax > scale.astype(np.float64) * levels
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    return scale


def stochastic_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(y) + Bernoulli(frac(y)), as float64 integers: E = y, error < 1."""
    low = np.floor(y)
    rounded: np.ndarray = low + (rng.random(y.shape) < (y - low))
    return rounded


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Codes q in [-7, 7] -> bytes holding two codes (q + 8) each, first value low nibble."""
    codes = (q.astype(np.int16) + 8).astype(np.uint8)
    if codes.size % 2:
        codes = np.concatenate([codes, np.array([8], dtype=np.uint8)])
    return (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """Bytes -> the first ``count`` codes as int8 q = nibble - 8."""
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return (codes[:count].astype(np.int16) - 8).astype(np.int8)


@dataclass(frozen=True)
class StochasticQuantizer:
    """Unbiased ``bits``-bit quantisation (8 or 4) with per-tensor (``block_size`` 0) or
    per-block scales."""

    bits: int
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise CodecError(f"quantizer bits: must be 4 or 8, got {self.bits}")
        if self.block_size < 0:
            raise CodecError(f"compress-block-size: must be >= 0, got {self.block_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def linear(self) -> bool:
        return False  # each client picks its own scales

    @property
    def levels(self) -> int:
        return (1 << (self.bits - 1)) - 1  # 127 or 7: symmetric codes, no -128 / -8

    def _meta(self, spec: AdapterSpec) -> dict[str, str | int]:
        return {CODEC: self.name, LAYOUT: layout_digest(spec), BLOCK: self.block_size}

    def encode(self, arrays: Mapping[str, np.ndarray], rng: np.random.Generator) -> Payload:
        check_floats(arrays, f"{self.name} codec")
        spec = AdapterSpec.of(arrays)
        flat = flatten(arrays)
        lengths = segment_lengths(spec, self.block_size)
        scale = segment_scales(flat, lengths, self.levels)
        per_value = np.repeat(scale.astype(np.float64), lengths)
        y = np.divide(flat, per_value, out=np.zeros_like(flat), where=per_value > 0)
        q = np.clip(stochastic_round(y, rng), -self.levels, self.levels).astype(np.int8)
        packed = pack_int4(q) if self.bits == 4 else q
        return Payload({"q": packed, "scale": scale}, self._meta(spec))

    def codes(self, payload: Payload, spec: AdapterSpec) -> tuple[np.ndarray, np.ndarray]:
        """Validated (q as int8, per-segment float32 scales) of a payload."""
        what = f"{self.name} codec"
        check_meta(payload, self._meta(spec), what)
        check_array_keys(payload, ("q", "scale"), what)
        n = spec.numel
        lengths = segment_lengths(spec, self.block_size)
        scale = vector(payload, "scale", np.dtype(np.float32), lengths.size, what)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise UpdateRejected(f"{what}: array 'scale' holds a negative or non-finite scale")
        if self.bits == 8:
            q = vector(payload, "q", np.dtype(np.int8), n, what)
            if (q < -self.levels).any():
                raise UpdateRejected(f"{what}: code -128 is outside [-127, 127]")
        else:
            packed = vector(payload, "q", np.dtype(np.uint8), (n + 1) // 2, what)
            all_codes = unpack_int4(packed, 2 * packed.size)
            if (all_codes < -self.levels).any():
                raise UpdateRejected(f"{what}: nibble 0 (code -8) is outside [-7, 7]")
            if n % 2 and all_codes[-1] != 0:
                raise UpdateRejected(f"{what}: the padding nibble is not 8 (code 0)")
            q = all_codes[:n]
        return q, scale

    def decode(self, payload: Payload, spec: AdapterSpec) -> Arrays:
        what = f"{self.name} codec"
        q, scale = self.codes(payload, spec)
        lengths = segment_lengths(spec, self.block_size)
        values = q.astype(np.float64) * np.repeat(scale.astype(np.float64), lengths)
        return finish(unflatten(values, spec), spec, what)
