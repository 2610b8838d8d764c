"""Server optimizers: what turns a round's mean client delta into the next global adapter.

One file per optimizer, each a small state machine over a pure numpy update rule (FedOpt, Reddi et
al. 2021, "Adaptive Federated Optimization"). FedAvg is SGD with server learning rate 1. The
registry below maps the ``--strategy`` names to optimizers; the client-side part of a strategy
(FedProx's proximal term, SCAFFOLD's control variates) is in ``coordinator.strategies``.
"""

from coordinator.optimizers.base import ServerOptimizer

__all__ = ["ServerOptimizer"]
