"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"): server
momentum on the mean delta, v <- momentum * v + mean_delta, x <- x + lr * v."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from coordinator.optimizers.base import Arrays, apply, check_delta, load_named


def momentum_step(
    delta: np.ndarray, velocity: np.ndarray, lr: float, momentum: float
) -> tuple[np.ndarray, np.ndarray]:
    """(step, new velocity) for one tensor."""
    v = momentum * velocity + delta.astype(np.float64)
    return lr * v, v


@dataclass
class FedAvgM:
    learning_rate: float = 1.0
    momentum: float = 0.9
    name: str = "fedavgm"
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, global_adapter: Arrays, mean_delta: Arrays) -> dict[str, np.ndarray]:
        check_delta(global_adapter, mean_delta)
        steps = {}
        for k, d in mean_delta.items():
            v0 = self.velocity.get(k, np.zeros(d.shape, np.float64))
            steps[k], self.velocity[k] = momentum_step(d, v0, self.learning_rate, self.momentum)
        return apply(global_adapter, steps)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.velocity = load_named("velocity/", arrays)

    def settings(self) -> dict[str, float]:
        return {"server_learning_rate": self.learning_rate, "server_momentum": self.momentum}
