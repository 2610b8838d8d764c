"""Device profiles in a simulated run (``--device-profiles``): the ``coordinator.fleet.FleetModel``
of ``fedtune simulate``, over the partition ids Flower's simulation engine gives its nodes.

Flower registers each virtual client as a node with a random 64-bit id and the partition id in
its node config, which the ServerApp never sees. ``node_partitions`` records the mapping as the
engine registers the nodes (in this process), so profiles and availability follow the stable
partition id, never the node id.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.profiles import Fleet
from coordinator.pipeline import Contribution

REGISTRATION_TIMEOUT = 600.0


@dataclass
class NodePartitions:
    """node id -> partition id of the simulated nodes, filled once the engine registered them."""

    mapping: dict[int, int] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)

    def partition(self, node: int, timeout: float = REGISTRATION_TIMEOUT) -> int:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"the simulation registered no nodes within {timeout:g}s")
        return self.mapping[int(node)]


@contextlib.contextmanager
def node_partitions() -> Iterator[NodePartitions]:
    """Record the node -> partition mapping of the simulation run inside the block (wraps the
    engine's ``_register_nodes``; flwr 1.39)."""
    from flwr.server.superlink.fleet.vce import vce_api

    out = NodePartitions()
    original = vce_api._register_nodes

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping: dict[int, int] = original(num_nodes=num_nodes, state_factory=state_factory)
        out.mapping.update(mapping)
        out.ready.set()
        return mapping

    vce_api._register_nodes = register
    try:
        yield out
    finally:
        vce_api._register_nodes = original


@dataclass
class DeviceFleet:
    """Profiles assigned to partitions (``client.profiles.Fleet``), seen through node ids."""

    fleet: Fleet
    nodes: NodePartitions
    names: Sequence[str]  # client name of each partition id
    unavailable: dict[int, int] = field(default_factory=dict)  # round -> clients left out

    def available(self, nodes: Sequence[int], rnd: int) -> list[int]:
        out = [n for n in nodes if self.fleet.is_available(self.nodes.partition(n), rnd)]
        self.unavailable[rnd] = len(nodes) - len(out)
        return out

    def round_metrics(self, rnd: int, c: Contribution) -> dict[str, Any]:
        return round_metrics(
            self.fleet,
            {n: self.nodes.partition(n) for n in c.nodes},
            self.names,
            c,
            self.unavailable.get(rnd, 0),
        )


def round_metrics(
    fleet: Fleet,
    partitions: dict[int, int],
    names: Sequence[str],
    c: Contribution,
    unavailable: int,
) -> dict[str, Any]:
    """The metrics row fields of a round on ``fleet``: each sampled client's profile and the
    seconds its round would take on that device (its reported training tokens at the
    profile's tokens/s, plus the adapter down and the update up at its link speeds); the
    round's simulated wall-clock is the slowest contributing client's. Bytes per client are
    the round's bytes shared equally (every client gets the same adapter and returns the same
    tensors)."""
    down = c.bytes_down / len(c.nodes) if c.nodes else 0.0
    up = c.bytes_up / len(c.contributors) if c.contributors else 0.0
    contributed = set(c.contributors)
    clients = []
    slowest: float | None = None
    for node in sorted(c.nodes, key=lambda n: partitions[n]):
        pid = partitions[node]
        profile = fleet.profile(pid)
        tokens = c.client_metrics.get(node, {}).get("train-tokens")
        seconds = None
        if node in contributed and tokens is not None:
            seconds = profile.round_seconds(float(tokens), down, up)
            slowest = seconds if slowest is None else max(slowest, seconds)
        clients.append(
            {
                "client": names[pid],
                "partition_id": pid,
                "profile": profile.name,
                "simulated_seconds": seconds,
            }
        )
    return {
        "simulated_seconds": slowest,
        "clients_unavailable": unavailable,
        "client_profiles": clients,
    }
