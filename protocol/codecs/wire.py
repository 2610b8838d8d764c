"""Payloads as Flower records, and their size as Flower counts it.

A payload travels as an ``ArrayRecord`` (its arrays) and a ``ConfigRecord`` (its meta scalars).
``payload_bytes`` is ``ArrayRecord.count_bytes() + ConfigRecord.count_bytes()`` of exactly those
records: the serialised ``.npy`` bytes of every array plus its key, and 8 bytes per number (1 per
bool, the length of strings) plus the keys. ``fp32_adapter_bytes`` measures the same for the
uncompressed float32 tensors under their own names (how updates travel without a codec), the
baseline of every ratio.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from protocol.adapter import WIRE_DTYPE, AdapterSpec, arrays_from_record, arrays_to_record
from protocol.codecs.base import MetaValue, Payload
from protocol.errors import UpdateRejected


def to_records(payload: Payload) -> tuple[ArrayRecord, ConfigRecord]:
    return arrays_to_record(payload.arrays), ConfigRecord(dict(payload.meta))


def from_records(arrays: ArrayRecord, meta: ConfigRecord, *, what: str) -> Payload:
    """The payload inside two received records; meta values must be scalars (no lists)."""
    values: dict[str, MetaValue] = {}
    for k, v in meta.items():
        if not isinstance(v, int | float | str | bool):
            raise UpdateRejected(f"{what}: meta {k!r} must be a scalar, got {type(v).__name__}")
        values[k] = v
    return Payload(arrays_from_record(arrays, what=what), values)


def payload_bytes(payload: Payload) -> int:
    """Bytes of the payload's records as Flower counts them."""
    arrays, meta = to_records(payload)
    return int(arrays.count_bytes()) + int(meta.count_bytes())


def fp32_adapter_bytes(spec: AdapterSpec) -> int:
    """Bytes of the float32 tensors of ``spec`` in one ``ArrayRecord`` (no codec, no meta)."""
    zeros = {name: np.zeros(t.shape, dtype=WIRE_DTYPE) for name, t in spec.tensors}
    return int(arrays_to_record(zeros).count_bytes())


def bytes_ratio(payload: Payload, spec: AdapterSpec) -> float:
    """payload bytes / fp32 adapter bytes."""
    return payload_bytes(payload) / fp32_adapter_bytes(spec)
