"""The names of simulated clients without asking them: Flower's simulation registers one node per
partition (``vce_api._register_nodes`` gives partition ids 0..n-1 to new random node ids, in
process, before any message), so the runner can read that mapping as it is made and give the
coordinator's roster (``coordinator.roster``) each node's partition name. Otherwise the
coordinator asks every node once (an identity query: about 15 ms per node in a local Ray
simulation here, 2.5 minutes for 10,000 clients).

This wraps a private Flower function; if a Flower release renames it, a warning says so and the
roster falls back to asking."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger("fedtune")

NodeNames = Callable[[Iterable[int]], Mapping[int, str]]


class SimulatedNodeNames:
    """node id -> partition name, for the nodes the simulation registers; a lookup waits (at
    most ``wait`` s) until the registration is complete."""

    def __init__(self, partition_names: Mapping[int, str], wait: float = 120.0) -> None:
        self.partition_names = dict(partition_names)
        self.wait = wait
        self.partitions: dict[int, int] = {}
        self.registered = threading.Event()

    def record(self, mapping: Mapping[int, int]) -> None:
        self.partitions.update({int(n): int(p) for n, p in mapping.items()})
        self.registered.set()

    def __call__(self, nodes: Iterable[int]) -> dict[int, str]:
        if not self.registered.wait(self.wait):
            return {}
        out = {}
        for node in nodes:
            pid = self.partitions.get(node)
            if pid is not None and pid in self.partition_names:
                out[node] = self.partition_names[pid]
        return out


@contextlib.contextmanager
def simulated_node_names(partition_names: Mapping[int, str]) -> Iterator[NodeNames | None]:
    """Within the block, record the node ids Flower's simulation gives the partitions; yields
    the lookup for ``coordinator.rounds.run_federation(node_names=...)`` (None if this Flower
    has no ``_register_nodes`` to read: the roster then asks the nodes)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = getattr(vce_api, "_register_nodes", None)
    if original is None:
        log.warning(
            "this Flower has no vce_api._register_nodes: simulated clients are asked their names"
        )
        yield None
        return
    names = SimulatedNodeNames(partition_names)

    def register(*args: Any, **kwargs: Any) -> Any:
        mapping = original(*args, **kwargs)
        names.record(mapping)
        return mapping

    vce_api._register_nodes = register
    try:
        yield names
    finally:
        vce_api._register_nodes = original
