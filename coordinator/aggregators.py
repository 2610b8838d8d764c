"""How the plain transport folds client updates: bounded influence and robust aggregation.

``Bounds`` applies to every update in plaintext mode before anything else sees it: a client's
weight (its reported example count) is capped at ``max-client-weight``, and an update whose L2
norm (over all its tensors) is above ``max-update-norm`` is rejected with the reason in the round's
``failures``. Both defaults are derived, never unbounded: the weight cap is the largest client's
training rows in simulation (65,536 in deployment, the secure-aggregation weight cap), and the norm
bound is what AdamW can move an adapter in a round, ``4 * learning-rate * local-steps *
sqrt(trained values)`` (each Adam step moves a coordinate by at most about 3.2 x lr with the
default betas; the factor 4 leaves headroom), so an honest client cannot exceed it.

``--aggregator`` picks how accepted updates become the round's aggregate: ``mean`` (the weighted
running sum, one update of memory) or a robust rule from ``coordinator.robust`` over the kept
updates (coordinate-wise median, trimmed mean, Krum, Multi-Krum; unweighted, O(clients) memory).
Robust rules need the individual updates, so they are refused with ``--secagg`` and ``--dp
client`` (whose noise calibration assumes the sum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.robust import (
    coordinate_median,
    multi_krum,
    trimmed_mean,
    update_norm,
)
from protocol.adapter import AdapterSpec

Arrays = Mapping[str, np.ndarray]
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
DEPLOYMENT_WEIGHT_CAP = 65536


class UpdateOutOfBounds(ValueError):
    """An update is refused by the round's bounds (the message says which and why)."""


def default_norm_bound(learning_rate: float, local_steps: int, numel: int) -> float:
    """The largest L2 norm an honest AdamW client's round can reach (see the module doc)."""
    return 4.0 * learning_rate * local_steps * math.sqrt(max(1, numel))


@dataclass(frozen=True)
class Bounds:
    max_weight: int
    max_norm: float

    def apply(self, update: Arrays, weight: float) -> tuple[dict[str, np.ndarray], float]:
        """The update (refused if its norm is out of bounds) and its capped weight."""
        norm = update_norm(update)
        if norm > self.max_norm:
            raise UpdateOutOfBounds(
                f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:.4g}"
            )
        return dict(update), float(min(weight, self.max_weight))


class Accumulator:
    """The weighted running sum (``mean``): memory is one update, whatever the clients."""

    def __init__(self, spec: AdapterSpec) -> None:
        self.sum = {name: np.zeros(t.shape, np.float64) for name, t in spec.tensors}
        self.weight = 0.0

    def add(self, update: Arrays, weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        for k, acc in self.sum.items():
            acc += weight * np.asarray(update[k], np.float64)
        self.weight += weight

    def result(self) -> tuple[dict[str, np.ndarray], float]:
        """(sum of weighted updates, total weight)."""
        return self.sum, self.weight


Rule = Callable[[Sequence[Arrays]], dict[str, np.ndarray]]


class RobustCollector(Accumulator):
    """Keeps every accepted update; the result is the robust aggregate times the number of
    updates with total weight = that number (each client counts once), so the privacy stage's
    sum / weight is the robust aggregate."""

    def __init__(self, spec: AdapterSpec, rule: Rule) -> None:
        super().__init__(spec)
        self.rule = rule
        self.updates: list[dict[str, np.ndarray]] = []

    def add(self, update: Arrays, weight: float) -> None:
        self.updates.append({k: np.asarray(update[k]) for k in self.sum})

    def result(self) -> tuple[dict[str, np.ndarray], float]:
        if not self.updates:
            return self.sum, 0.0
        agg = self.rule(self.updates)
        n = float(len(self.updates))
        return {k: np.asarray(v, np.float64) * n for k, v in agg.items()}, n


def make_accumulator(
    name: str, *, trim_fraction: float, krum_f: int, krum_m: int
) -> Callable[[AdapterSpec], Accumulator]:
    """A factory for the transport: one accumulator per round."""
    rules: dict[str, Rule] = {
        "median": coordinate_median,
        "trimmed-mean": lambda us: trimmed_mean(us, trim_fraction),
        "krum": lambda us: multi_krum(us, krum_f, 1)[0],
        "multi-krum": lambda us: multi_krum(us, krum_f, krum_m or max(1, len(us) - krum_f))[0],
    }
    if name == "mean":
        return Accumulator
    if name not in rules:
        raise ValueError(f"aggregator: {name!r} is not one of {', '.join(AGGREGATORS)}")
    rule = rules[name]
    return lambda spec: RobustCollector(spec, rule)
