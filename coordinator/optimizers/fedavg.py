"""FedAvg (McMahan et al. 2017) as a server optimizer: SGD on the mean delta,
x <- x + lr * mean_delta. With lr = 1 (the default) this is plain FedAvg."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from coordinator.optimizers.base import Arrays, apply, check_delta


def sgd_step(delta: np.ndarray, lr: float) -> np.ndarray:
    return lr * delta.astype(np.float64)


@dataclass
class FedAvg:
    learning_rate: float = 1.0
    name: str = "fedavg"

    def step(self, global_adapter: Arrays, mean_delta: Arrays) -> dict[str, np.ndarray]:
        check_delta(global_adapter, mean_delta)
        return apply(
            global_adapter, {k: sgd_step(d, self.learning_rate) for k, d in mean_delta.items()}
        )

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        return None

    def settings(self) -> dict[str, float]:
        return {"server_learning_rate": self.learning_rate}
