"""The adaptive server optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization",
Algorithm 2), sharing one state machine; they differ only in the second-moment rule:

    m <- beta1 * m + (1 - beta1) * d
    v <- v + d^2                                         FedAdagrad
    v <- v - (1 - beta2) * d^2 * sign(v - d^2)           FedYogi
    v <- beta2 * v + (1 - beta2) * d^2                   FedAdam
    x <- x + lr * m / (sqrt(v) + tau)

with m and v starting at 0 and tau^2 (the paper's v_{-1} >= tau^2), no bias correction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from coordinator.optimizers.base import Arrays, apply, check_delta, load_named

SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (v, d, beta2) -> v


def adagrad_v(v: np.ndarray, d: np.ndarray, beta2: float) -> np.ndarray:
    return np.asarray(v + d * d, np.float64)


def yogi_v(v: np.ndarray, d: np.ndarray, beta2: float) -> np.ndarray:
    d2 = d * d
    return np.asarray(v - (1.0 - beta2) * d2 * np.sign(v - d2), np.float64)


def adam_v(v: np.ndarray, d: np.ndarray, beta2: float) -> np.ndarray:
    return np.asarray(beta2 * v + (1.0 - beta2) * d * d, np.float64)


def adaptive_step(
    delta: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    second_moment: SecondMoment,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, new m, new v) for one tensor (float64)."""
    d = delta.astype(np.float64)
    m = beta1 * m + (1.0 - beta1) * d
    v = second_moment(v, d, beta2)
    return lr * m / (np.sqrt(v) + tau), m, v


@dataclass
class AdaptiveOptimizer:
    name: str
    second_moment: SecondMoment
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, global_adapter: Arrays, mean_delta: Arrays) -> dict[str, np.ndarray]:
        check_delta(global_adapter, mean_delta)
        steps = {}
        for k, d in mean_delta.items():
            m0 = self.m.get(k, np.zeros(d.shape, np.float64))
            v0 = self.v.get(k, np.full(d.shape, self.tau**2, np.float64))
            steps[k], self.m[k], self.v[k] = adaptive_step(
                d,
                m0,
                v0,
                lr=self.learning_rate,
                beta1=self.beta1,
                beta2=self.beta2,
                tau=self.tau,
                second_moment=self.second_moment,
            )
        return apply(global_adapter, steps)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            **{f"m/{k}": a for k, a in self.m.items()},
            **{f"v/{k}": a for k, a in self.v.items()},
        }

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = load_named("m/", arrays)
        self.v = load_named("v/", arrays)

    def settings(self) -> dict[str, float]:
        return {
            "server_learning_rate": self.learning_rate,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }
