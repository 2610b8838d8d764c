"""The server-optimizer seam of the round pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

Arrays = Mapping[str, np.ndarray]


class ServerOptimizer(Protocol):
    """``step`` takes the global adapter and the round's mean delta (for the tensors clients
    trained; the others are kept) and returns the next global adapter. Its state (momentum,
    moments) is saved with every round and restored on resume."""

    name: str

    def step(self, global_adapter: Arrays, mean_delta: Arrays) -> dict[str, np.ndarray]: ...

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Array state, saved with the round (empty for stateless optimizers)."""
        ...

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None: ...

    def settings(self) -> dict[str, float]:
        """Hyper-parameters as used (recorded in config.json)."""
        ...


def check_delta(global_adapter: Arrays, mean_delta: Arrays) -> None:
    unknown = set(mean_delta) - set(global_adapter)
    if unknown:
        raise ValueError(f"delta names tensors not in the adapter: {sorted(unknown)[:3]}")
    for k, d in mean_delta.items():
        if d.shape != global_adapter[k].shape:
            raise ValueError(
                f"delta {k!r} has shape {d.shape}, the adapter {global_adapter[k].shape}"
            )


def apply(global_adapter: Arrays, step: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """global + step for the tensors in ``step`` (computed in float64, stored in the adapter's
    dtype); the other tensors are copied unchanged."""
    return {
        k: (v.astype(np.float64) + step[k]).astype(v.dtype) if k in step else v.copy()
        for k, v in global_adapter.items()
    }


def load_named(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``arrays`` saved under ``prefix`` + name, by name."""
    return {
        k[len(prefix) :]: np.asarray(v, np.float64)
        for k, v in arrays.items()
        if k.startswith(prefix)
    }
