"""Aggregation of client updates: pure functions over decoded arrays.

Clients send adapter *deltas* (trained - global). FedAvg (McMahan et al. 2017) is the
example-weighted mean of the deltas added to the global adapter, which equals the weighted mean of
the clients' adapters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Arrays = Mapping[str, np.ndarray]
Update = tuple[Arrays, float]  # (adapter delta, FedAvg weight)


def weighted_mean(updates: Sequence[tuple[Arrays, float]]) -> dict[str, np.ndarray]:
    """sum_k w_k * delta_k / sum_k w_k, tensor by tensor (accumulated in float64)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    weights = np.asarray([float(w) for _, w in updates], dtype=np.float64)
    if (weights <= 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"weights must be positive and finite, got {weights.tolist()}")
    names = list(updates[0][0])
    for delta, _ in updates[1:]:
        if list(delta) != names:
            raise ValueError("updates hold different tensors")
    total = weights.sum()
    out: dict[str, np.ndarray] = {}
    for name in names:
        acc = np.zeros(updates[0][0][name].shape, dtype=np.float64)
        for (delta, _), w in zip(updates, weights, strict=True):
            acc += w * delta[name]
        out[name] = (acc / total).astype(updates[0][0][name].dtype)
    return out


def apply_delta(global_adapter: Arrays, delta: Arrays) -> dict[str, np.ndarray]:
    """global + delta for the tensors in ``delta``; the others are kept as they are."""
    unknown = set(delta) - set(global_adapter)
    if unknown:
        raise ValueError(f"delta names tensors not in the adapter: {sorted(unknown)[:3]}")
    return {
        k: (v + delta[k]).astype(v.dtype) if k in delta else v.copy()
        for k, v in global_adapter.items()
    }


def fedavg(
    global_adapter: Arrays, updates: Sequence[tuple[Arrays, float]]
) -> dict[str, np.ndarray]:
    """The next global adapter: FedAvg of the clients' deltas, weighted by example counts."""
    return apply_delta(global_adapter, weighted_mean(updates))


class Aggregator(Protocol):
    """The round loop's aggregation step: (global adapter, decoded updates) -> (next global
    adapter, metrics for the round's row). Wrappers (client-level DP) take another Aggregator and
    change what it sees, as Flower's DP strategy wrappers do."""

    def __call__(
        self, global_adapter: Arrays, updates: Sequence[Update]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...


def fedavg_aggregator(
    global_adapter: Arrays, updates: Sequence[Update]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """FedAvg as an ``Aggregator``: no extra metrics."""
    return fedavg(global_adapter, updates), {}
