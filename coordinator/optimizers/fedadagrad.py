"""FedAdagrad (Reddi et al. 2021): see ``coordinator.optimizers.adaptive``."""

from __future__ import annotations

from coordinator.optimizers.adaptive import AdaptiveOptimizer, adagrad_v


def fedadagrad(learning_rate: float, beta1: float, beta2: float, tau: float) -> AdaptiveOptimizer:
    return AdaptiveOptimizer("fedadagrad", adagrad_v, learning_rate, beta1, beta2, tau)
