"""FedYogi (Reddi et al. 2021): see ``coordinator.optimizers.adaptive``."""

from __future__ import annotations

from coordinator.optimizers.adaptive import AdaptiveOptimizer, yogi_v


def fedyogi(learning_rate: float, beta1: float, beta2: float, tau: float) -> AdaptiveOptimizer:
    return AdaptiveOptimizer("fedyogi", yogi_v, learning_rate, beta1, beta2, tau)
