"""Adapter tensors on the wire: a named, ordered set of float32 arrays.

An adapter travels as a Flower ``ArrayRecord`` whose keys are PEFT's state-dict names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ...). Arrays are serialised by
Flower with ``np.save(allow_pickle=False)``; nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from protocol.errors import ProtocolError, UpdateRejected

Arrays = dict[str, np.ndarray]

WIRE_DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = WIRE_DTYPE.str  # numpy dtype string, e.g. '<f4'

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class AdapterSpec:
    """The expected names, shapes and dtypes of an adapter, in a fixed order."""

    tensors: tuple[tuple[str, TensorSpec], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> AdapterSpec:
        return cls(
            tuple(
                (k, TensorSpec(tuple(int(d) for d in v.shape), v.dtype.str))
                for k, v in arrays.items()
            )
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)

    @property
    def numel(self) -> int:
        return sum(spec.numel for _, spec in self.tensors)

    def subset(self, names: Iterable[str]) -> AdapterSpec:
        wanted = set(names)
        unknown = wanted - set(self.names)
        if unknown:
            raise ProtocolError(f"unknown adapter tensors: {sorted(unknown)[:3]}")
        return AdapterSpec(tuple((n, s) for n, s in self.tensors if n in wanted))

    def check(self, arrays: Mapping[str, np.ndarray], *, what: str) -> None:
        """Raise ``UpdateRejected`` naming the first tensor that does not match this spec.

        Checks the set of names, each shape and dtype, and that every value is finite.
        """
        expected = dict(self.tensors)
        _check_names(expected, arrays, what)
        for name, spec in expected.items():
            arr = arrays[name]
            if tuple(arr.shape) != spec.shape:
                raise UpdateRejected(
                    f"{what}: tensor {name!r} has shape {tuple(arr.shape)}, expected {spec.shape}"
                )
            if arr.dtype.str != spec.dtype:
                expected_dtype = np.dtype(spec.dtype)
                raise UpdateRejected(
                    f"{what}: tensor {name!r} has dtype {arr.dtype}, expected {expected_dtype}"
                )
            if not np.isfinite(arr).all():
                raise UpdateRejected(f"{what}: tensor {name!r} contains NaN or infinite values")


def trained_tensors(spec: AdapterSpec, ffa_lora: bool) -> AdapterSpec:
    """The adapter tensors clients train and send: all of them, or with FFA-LoRA (Sun et al.
    2024: A stays at the shared initialisation) only the B matrices."""
    return spec.subset(n for n in spec.names if ".lora_B." in n) if ffa_lora else spec


def instruction_keys(trained: AdapterSpec, names: Iterable[str]) -> tuple[str, ...]:
    """A train instruction's ``trainable_keys`` when clients train ``trained`` out of the
    adapter's ``names``: () (the wire default: all of them) when it is all of them, so that a
    run training the whole adapter sends the instructions it always sent."""
    return () if set(trained.names) == set(names) else trained.names


def _check_names(expected: Mapping[str, object], got: Iterable[str], what: str) -> None:
    """Raise ``UpdateRejected`` if ``got`` misses a name of ``expected`` or has another (a
    name quoted at most 80 characters long: it may come from a hostile reply)."""
    names = list(got)
    present = set(names)
    missing = [n for n in expected if n not in present]
    extra = [n for n in names if n not in expected]
    if missing:
        raise UpdateRejected(f"{what}: missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if extra:
        raise UpdateRejected(f"{what}: {len(extra)} unexpected tensor(s), e.g. {extra[0][:80]!r}")


# np.save's header is 128 bytes for an adapter tensor; anything beyond the data plus this is refused
# before decoding.
MAX_HEADER_BYTES = 4096


def check_declared(spec: AdapterSpec, record: ArrayRecord, *, what: str) -> None:
    """Before any array is decoded: the record names exactly ``spec``'s tensors, each Array
    declares the expected shape and dtype, and carries no more bytes than that needs (plus
    ``MAX_HEADER_BYTES``). Raises ``UpdateRejected`` naming the first tensor that does not."""
    expected = dict(spec.tensors)
    _check_names(expected, record, what)
    for name, t in expected.items():
        arr = record[name]
        shape = tuple(arr.shape) if isinstance(arr.shape, list | tuple) else arr.shape
        if shape != t.shape:
            raise UpdateRejected(
                f"{what}: tensor {name!r} has shape {shape!r:.80}, expected {t.shape}"
            )
        try:
            dtype = np.dtype(arr.dtype)
        except Exception:
            raise UpdateRejected(f"{what}: tensor {name!r} has dtype {arr.dtype!r:.40}") from None
        if dtype != np.dtype(t.dtype):
            raise UpdateRejected(
                f"{what}: tensor {name!r} has dtype {dtype}, expected {np.dtype(t.dtype)}"
            )
        limit = t.numel * dtype.itemsize + MAX_HEADER_BYTES
        if len(arr.data) > limit:
            raise UpdateRejected(
                f"{what}: tensor {name!r} carries {len(arr.data)} bytes, at most {limit} expected"
            )


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Encode named arrays as an ``ArrayRecord``, keeping their order."""
    record = ArrayRecord()
    for name, arr in arrays.items():
        record[name] = Array(np.ascontiguousarray(arr))
    return record


def arrays_from_record(record: ArrayRecord, *, what: str) -> Arrays:
    """Decode an ``ArrayRecord`` into named numpy arrays (order preserved)."""
    out: Arrays = {}
    for name, arr in record.items():
        try:
            out[name] = arr.numpy()
        except Exception as exc:  # corrupt bytes, pickled payload refused by numpy, ...
            raise UpdateRejected(f"{what}: tensor {name!r} cannot be decoded: {exc}") from exc
    return out
