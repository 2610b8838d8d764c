"""Bounded influence for plaintext aggregation: pure functions over decoded updates.

Each update is a ``dict[str, np.ndarray]`` (an adapter delta; every update holds the same tensor
names and shapes). Without them one client decides the aggregate: its example count is its FedAvg
weight, and nothing bounds the size of its delta. These functions are the pieces the round
pipeline composes:

- ``cap_weight``: a client's FedAvg weight is ``min(num_examples, cap)``;
- ``clip_to_norm``: scale an update down to a maximum L2 norm over all its tensors;
- robust aggregators that need no trust in any one update, each returning the aggregate delta:
  ``coordinate_median``, ``trimmed_mean`` and ``multi_krum`` (Krum when m = 1);
- ``require_finite``: refuse a non-finite aggregate with a typed error, so that a round fails
  cleanly and the global adapter is kept.

Sums and distances are taken in float64; results are cast back to the updates' dtype. The robust
aggregators need the individual updates, so they cannot run under secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Update = Mapping[str, np.ndarray]


class RobustAggregationError(ValueError):
    """The updates or parameters cannot be aggregated as asked (the message says why)."""


class NonFiniteError(RobustAggregationError):
    """An update or aggregate holds NaN or infinite values."""


def cap_weight(num_examples: int, cap: int) -> int:
    """The FedAvg weight of a client reporting ``num_examples``: ``min(num_examples, cap)``."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise RobustAggregationError(f"max-client-weight: must be an int >= 1, got {cap!r}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise RobustAggregationError(f"num-examples: must be an int >= 1, got {num_examples!r}")
    return min(num_examples, cap)


def require_finite(arrays: Update, what: str = "aggregate") -> None:
    """Raise ``NonFiniteError`` naming the first tensor of ``arrays`` with NaN or inf values."""
    for name, arr in arrays.items():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise NonFiniteError(
                f"{what}: tensor {name!r} holds {bad} NaN or infinite value(s) of {np.size(arr)}"
            )


def update_norm(update: Update) -> float:
    """The L2 norm of all of ``update``'s values together, without overflow (values are scaled
    by their largest magnitude first, so float32 max or 1e200 in float64 still give a finite
    norm)."""
    require_finite(update, "update")
    peak = max((float(np.max(np.abs(v), initial=0.0)) for v in update.values()), default=0.0)
    if peak == 0.0:
        return 0.0
    total = sum(float(np.sum((v.astype(np.float64) / peak) ** 2)) for v in update.values())
    return peak * math.sqrt(total)


def clip_to_norm(update: Update, max_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` scaled by ``max_norm / ||update||`` if its L2 norm (over all tensors) is above
    ``max_norm``; returns the (possibly) clipped update and whether it was clipped. Tensors keep
    their dtype; an update within the bound comes back unchanged (as copies)."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise RobustAggregationError(
            f"max-update-norm: must be a finite number > 0, got {max_norm}"
        )
    norm = update_norm(update)
    if norm <= max_norm:
        return {k: np.array(v, copy=True) for k, v in update.items()}, False
    scale = max_norm / norm
    return {k: (v.astype(np.float64) * scale).astype(v.dtype) for k, v in update.items()}, True


def _check(updates: Sequence[Update]) -> list[str]:
    if not updates:
        raise RobustAggregationError("no updates to aggregate")
    names = list(updates[0])
    for i, u in enumerate(updates):
        if list(u) != names:
            raise RobustAggregationError(f"update {i} holds other tensors than update 0")
        for name in names:
            if u[name].shape != updates[0][name].shape:
                raise RobustAggregationError(
                    f"update {i}: tensor {name!r} has shape {u[name].shape}, update 0 has "
                    f"{updates[0][name].shape}"
                )
        require_finite(u, f"update {i}")
    return names


def _stack(updates: Sequence[Update], name: str) -> np.ndarray:
    """(n, *shape) float64: tensor ``name`` of every update."""
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def coordinate_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """The coordinate-wise median (Yin et al. 2018), unweighted: with an even count, the mean of
    the two middle values."""
    names = _check(updates)
    return {
        name: np.median(_stack(updates, name), axis=0).astype(updates[0][name].dtype)
        for name in names
    }


def trimmed_mean(updates: Sequence[Update], beta: float) -> dict[str, np.ndarray]:
    """The coordinate-wise beta-trimmed mean (Yin et al. 2018), unweighted: at each coordinate
    the ``floor(beta * n)`` smallest and as many largest values are dropped and the rest
    averaged. ``beta`` in [0, 0.5); at least one value must remain."""
    n = len(updates)
    if not (0.0 <= beta < 0.5):
        raise RobustAggregationError(f"trim-beta: must be in [0, 0.5), got {beta}")
    names = _check(updates)
    cut = math.floor(beta * n)
    if n - 2 * cut < 1:
        raise RobustAggregationError(f"trim-beta {beta} leaves no update of {n}")
    out = {}
    for name in names:
        ordered = np.sort(_stack(updates, name), axis=0)
        out[name] = ordered[cut : n - cut].mean(axis=0).astype(updates[0][name].dtype)
    return out


def krum_scores(updates: Sequence[Update], f: int) -> np.ndarray:
    """Krum scores (Blanchard et al. 2017): for each update, the sum of squared L2 distances
    (over all tensors) to its ``n - f - 2`` nearest other updates. Needs n >= 2f + 3."""
    n = len(updates)
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise RobustAggregationError(f"krum f: must be an int >= 0, got {f!r}")
    names = _check(updates)
    if n < 2 * f + 3:
        raise RobustAggregationError(
            f"Krum with f = {f} needs at least 2f + 3 = {2 * f + 3} updates, got {n}"
        )
    flat = np.stack(
        [np.concatenate([np.ravel(u[k]).astype(np.float64) for k in names]) for u in updates]
    )
    dist = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = flat[i] - flat[j]
            dist[i, j] = dist[j, i] = float(diff @ diff)
    closest = n - f - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def multi_krum(
    updates: Sequence[Update],
    f: int,
    m: int = 1,
    weights: Sequence[float] | None = None,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the ``m`` updates with the
    lowest Krum scores (ties: the lower index), and their mean, weighted by ``weights`` (e.g.
    capped example counts) when given. ``m = 1`` is Krum. Returns (aggregate, chosen indices in
    ascending order)."""
    n = len(updates)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n - f:
        raise RobustAggregationError(f"krum m: must be an int in [1, n - f = {n - f}], got {m!r}")
    if weights is not None:
        if len(weights) != n:
            raise RobustAggregationError(f"{len(weights)} weights for {n} updates")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise RobustAggregationError("weights must be finite and > 0")
    scores = krum_scores(updates, f)
    chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])
    w = np.asarray([1.0 if weights is None else float(weights[i]) for i in chosen])
    out = {}
    for name in updates[0]:
        acc = np.zeros(np.shape(updates[0][name]), dtype=np.float64)
        for wi, i in zip(w, chosen, strict=True):
            acc += wi * np.asarray(updates[i][name], dtype=np.float64)
        out[name] = (acc / w.sum()).astype(updates[0][name].dtype)
    return out, chosen
