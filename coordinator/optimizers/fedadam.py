"""FedAdam (Reddi et al. 2021): see ``coordinator.optimizers.adaptive``."""

from __future__ import annotations

from coordinator.optimizers.adaptive import AdaptiveOptimizer, adam_v


def fedadam(learning_rate: float, beta1: float, beta2: float, tau: float) -> AdaptiveOptimizer:
    return AdaptiveOptimizer("fedadam", adam_v, learning_rate, beta1, beta2, tau)
