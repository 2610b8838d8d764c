"""The seam through which a simulated fleet's devices shape rounds (``fedtune simulate
--device-profiles``; ``simulations/fleet.py`` implements it): who is reachable in a round (the
training sample is drawn from them, and only they of the fixed evaluation set evaluate), which
LoRA rank each device trains, and what the round would have cost on those devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from coordinator.pipeline import Contribution


class FleetModel(Protocol):
    def available(self, nodes: Sequence[int], rnd: int) -> list[int]:
        """The nodes of ``nodes`` that are reachable in round ``rnd`` (a pure function of the
        run's seed, the round and each node's stable identity)."""
        ...

    def rank(self, node: int) -> int | None:
        """The LoRA rank ``node``'s device trains (its profile's ``rank``), or None: the run's
        ``lora-rank``. Used when the run's profiles set ranks (``coordinator.update_wire``);
        a pure function of the node's stable identity, so a resumed run agrees."""
        ...

    def round_metrics(self, rnd: int, c: Contribution) -> dict[str, Any]:
        """Metrics row fields for the round ``c`` was collected in: each sampled client's
        profile and the simulated wall-clock of the round on those devices."""
        ...
