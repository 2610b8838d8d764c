"""Device profiles in a simulated run (``--device-profiles``): the ``coordinator.fleet.FleetModel``
of ``fedtune simulate``, over the partition ids Flower's simulation engine gives its nodes
(``simulations.engine.NodePartitions``): profiles and availability follow the stable partition
id, never the random node id, and so does each client's LoRA rank when the profiles set ranks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from client.profiles import Fleet
from coordinator.pipeline import Contribution
from simulations.engine import NodePartitions


@dataclass
class DeviceFleet:
    """Profiles assigned to partitions (``client.profiles.Fleet``), seen through node ids."""

    fleet: Fleet
    nodes: NodePartitions
    names: Sequence[str]  # client name of each partition id
    lora_rank: int | None = None  # the run's: the rank of a profile without one (metrics)

    def available(self, nodes: Sequence[int], rnd: int) -> list[int]:
        return [n for n in nodes if self.fleet.is_available(self.nodes.partition(n), rnd)]

    def rank(self, node: int) -> int | None:
        return self.fleet.profile(self.nodes.partition(node)).rank

    def round_metrics(self, rnd: int, c: Contribution) -> dict[str, Any]:
        return round_metrics(
            self.fleet,
            {n: self.nodes.partition(n) for n in c.nodes},
            self.names,
            c,
            self.lora_rank,
        )


def round_metrics(
    fleet: Fleet,
    partitions: dict[int, int],
    names: Sequence[str],
    c: Contribution,
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """The metrics row fields of a round on ``fleet``: each sampled client's profile and the
    seconds its round would take on that device (its reported training tokens at the
    profile's tokens/s, plus the adapter down and the update up at its link speeds); the
    round's simulated wall-clock is the slowest contributing client's. Each client is charged
    the bytes of its own messages (ranks and codecs make them differ). When the profiles set
    ranks, each client also carries the rank it trained (a profile without one:
    ``lora_rank``)."""
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
        node_down, node_up = c.node_bytes.get(node, (0, 0))  # (none: never sent to)
        if node in contributed and tokens is not None:
            seconds = profile.round_seconds(float(tokens), node_down, node_up)
            slowest = seconds if slowest is None else max(slowest, seconds)
        entry: dict[str, Any] = {
            "client": names[pid],
            "partition_id": pid,
            "profile": profile.name,
            "simulated_seconds": seconds,
            "bytes_down": node_down,
            "bytes_up": node_up,
        }
        if fleet.ranked:
            entry["rank"] = profile.rank if profile.rank is not None else lora_rank
        clients.append(entry)
    return {
        "simulated_seconds": slowest,
        "client_bytes_down": down,
        "client_bytes_up": up,
        "client_profiles": clients,
    }
