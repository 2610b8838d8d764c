"""What every update codec shares: the payload type, the ``Codec`` seam, flattening and checks.

A codec turns named adapter tensors (an update delta, or the global adapter on the way down) into
a ``Payload``: a few numpy arrays (they travel in a Flower ``ArrayRecord``) and a few scalars
(they travel in a ``ConfigRecord``). ``decode`` checks everything it reads against what the
decoding side expects (the ``AdapterSpec`` of the tensors and the codec's own settings) and raises
``UpdateRejected`` with a one-line reason; it never trusts a size, dtype or code read from the
payload.

Lossy codecs other than ``none`` send all tensors as one flat vector, in the order of the spec
(the order of the global adapter), plus a short digest of the layout (names, shapes) so that a
payload encoded for another layout is refused instead of being silently misread. Per-tensor keys
would cost ~190 bytes each (``.npy`` header + name), 20% of an int4 payload of the default adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol.adapter import AdapterSpec
from protocol.errors import UpdateRejected

Arrays = dict[str, np.ndarray]
MetaValue = int | float | str | bool

# Meta keys every codec writes.
CODEC = "codec"  # the codec's name
LAYOUT = "layout"  # digest of the tensor layout (flat codecs)


class CodecError(ValueError):
    """A codec is misconfigured, or asked to encode something it cannot (NaN, out of range)."""


@dataclass(frozen=True)
class Payload:
    """An encoded set of tensors: arrays for an ``ArrayRecord``, scalars for a ``ConfigRecord``."""

    arrays: Mapping[str, np.ndarray]
    meta: Mapping[str, MetaValue]


class Codec(Protocol):
    """Encode named float tensors into a ``Payload`` and back.

    ``encode`` gets the generator that drives any randomness (stochastic rounding); callers pass
    a seeded generator in tests and a cryptographically seeded one under secure aggregation.
    ``decode`` validates the payload against ``spec`` and the codec's settings and returns arrays
    with exactly the spec's names, shapes and dtypes, all finite; anything else raises
    ``UpdateRejected`` naming what was wrong.
    """

    @property
    def name(self) -> str: ...

    @property
    def linear(self) -> bool:
        """True if decode(sum of payload vectors) == sum of decodes (secure aggregation works)."""
        ...

    def encode(self, arrays: Mapping[str, np.ndarray], rng: np.random.Generator) -> Payload: ...

    def decode(self, payload: Payload, spec: AdapterSpec) -> Arrays: ...


# -- layout ----------------------------------------------------------------------------------------


def layout_digest(spec: AdapterSpec) -> str:
    """16 hex digits naming the tensors' order, names and shapes (not dtypes: wire dtypes vary)."""
    h = hashlib.sha256(b"fedtune-layout-v1")
    for name, t in spec.tensors:
        h.update(f"{name}:{','.join(map(str, t.shape))};".encode())
    return h.hexdigest()[:16]


def check_floats(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Encoder-side input check: float tensors, all finite, none empty."""
    if not arrays:
        raise CodecError(f"{what}: no tensors to encode")
    for name, arr in arrays.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise CodecError(f"{what}: tensor {name!r} has dtype {arr.dtype}, expected a float")
        if arr.size == 0:
            raise CodecError(f"{what}: tensor {name!r} is empty")
        if not np.isfinite(arr).all():
            raise CodecError(f"{what}: tensor {name!r} contains NaN or infinite values")


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float64 vector, in mapping order."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


def unflatten(flat: np.ndarray, spec: AdapterSpec) -> Arrays:
    """The inverse of ``flatten`` for ``spec``: named tensors in the spec's shapes and dtypes."""
    if flat.shape != (spec.numel,):
        raise UpdateRejected(f"decoded vector has {flat.size} values, expected {spec.numel}")
    out: Arrays = {}
    offset = 0
    for name, t in spec.tensors:
        out[name] = flat[offset : offset + t.numel].reshape(t.shape).astype(np.dtype(t.dtype))
        offset += t.numel
    return out


# -- validation of what was received -----------------------------------------------------------


def check_meta(payload: Payload, expected: Mapping[str, MetaValue], what: str) -> None:
    """Every expected meta value must be present and equal; unknown meta keys are refused."""
    for key, value in expected.items():
        got = payload.meta.get(key)
        # bool is an int subclass: compare types too, so True never passes for 1.
        if got is None or type(got) is not type(value) or got != value:
            raise UpdateRejected(f"{what}: meta {key!r} is {got!r}, expected {value!r}")
    extra = sorted(set(payload.meta) - set(expected))
    if extra:
        raise UpdateRejected(f"{what}: unexpected meta field {extra[0]!r}")


def check_array_keys(payload: Payload, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in payload.arrays]
    if missing:
        raise UpdateRejected(f"{what}: array {missing[0]!r} is missing")
    extra = sorted(set(payload.arrays) - set(names))
    if extra:
        raise UpdateRejected(f"{what}: unexpected array {extra[0]!r}")


def vector(payload: Payload, key: str, dtype: np.dtype, length: int, what: str) -> np.ndarray:
    """The 1-D array ``key`` of exactly ``dtype`` and ``length``."""
    arr = payload.arrays[key]
    if not isinstance(arr, np.ndarray):
        raise UpdateRejected(f"{what}: array {key!r} is a {type(arr).__name__}, not an array")
    if arr.dtype != dtype:
        raise UpdateRejected(f"{what}: array {key!r} has dtype {arr.dtype}, expected {dtype}")
    if arr.shape != (length,):
        raise UpdateRejected(
            f"{what}: array {key!r} has shape {tuple(arr.shape)}, expected ({length},)"
        )
    return arr


def finish(decoded: Arrays, spec: AdapterSpec, what: str) -> Arrays:
    """Final check of decoded tensors (names, shapes, dtypes, finiteness) against ``spec``."""
    spec.check(decoded, what=what)
    return decoded
