"""Two seams in Flower's simulation engine (flwr 1.39, ``flwr.server.superlink.fleet.vce``)
that a fleet of thousands of virtual clients needs, applied only inside ``fleet_engine()``:

* ``_register_nodes``: Flower registers each virtual client as a node with a random 64-bit id
  and puts the partition id in its node config, which the ServerApp never sees. The mapping is
  recorded as the engine registers the nodes (in this process, before any message:
  ``NodePartitions``), so the coordinator can name clients (``NodePartitions.names``: the
  roster then need not ask every node, about 15 ms per node in a local Ray simulation, 2.5
  minutes for 10,000 clients) and profile them by their stable partition id.
* ``add_messages_to_queue``: the engine's dispatcher asks the link state for messages of every
  registered node, one call per node, every 0.1 s; each call scans every stored message. With
  10,000 nodes and a round of 100 messages in flight that is 10,000 scans of 100 messages per
  sweep, and measured here it kept a core busy (35% of a shared core against 17% for the
  training worker). The replacement asks only for the nodes that have an undelivered message:
  the same messages, delivered in the same way (at most one per node per sweep, by
  ``LinkState.get_message_ins``), found in one scan.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

log = logging.getLogger("fedtune")

REGISTRATION_TIMEOUT = 600.0
NAMES_TIMEOUT = 120.0  # then the roster asks the nodes their names instead
SWEEP_SECONDS = 0.1  # as Flower's dispatcher


@dataclass
class NodePartitions:
    """node id -> partition id of the simulated nodes, filled once the engine registered them."""

    mapping: dict[int, int] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)

    def partition(self, node: int, timeout: float = REGISTRATION_TIMEOUT) -> int:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"the simulation registered no nodes within {timeout:g}s")
        return self.mapping[int(node)]

    def names(
        self, partition_names: Mapping[int, str], timeout: float = NAMES_TIMEOUT
    ) -> Callable[[Iterable[int]], dict[int, str]]:
        """The lookup node ids -> client names for ``coordinator.rounds.run_federation(
        node_names=...)``: the name of each node's partition (``partition_names``). A lookup
        waits at most ``timeout`` s for the registration and gives no names if none came (the
        roster then asks the nodes); nodes of unknown partitions get none either."""

        def lookup(nodes: Iterable[int]) -> dict[int, str]:
            if not self.ready.wait(timeout):
                return {}
            out = {}
            for node in nodes:
                pid = self.mapping.get(int(node))
                if pid is not None and pid in partition_names:
                    out[node] = partition_names[pid]
            return out

        return lookup


def pending_nodes(state: Any) -> list[int] | None:
    """Destination nodes of the undelivered messages in an in-memory link state, in the order
    they were stored (each once); None if ``state`` is not one (then nothing is patched)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        nodes = [m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""]
    return list(dict.fromkeys(nodes))


@contextlib.contextmanager
def fleet_engine() -> Iterator[NodePartitions]:
    """Inside the block, Flower's simulation engine records node -> partition ids (yielded)
    and dispatches messages with one scan per sweep."""
    from flwr.server.superlink.fleet.vce import vce_api

    out = NodePartitions()
    register_nodes = vce_api._register_nodes
    add_messages = vce_api.add_messages_to_queue

    def register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping: dict[int, int] = register_nodes(num_nodes=num_nodes, state_factory=state_factory)
        out.mapping.update(mapping)
        out.ready.set()
        return mapping

    def dispatch(
        state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        if pending_nodes(state) is None:  # another link state: Flower's own dispatcher
            log.debug("simulation link state %s: Flower's dispatcher", type(state).__name__)
            add_messages(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for node_id in pending_nodes(state) or []:
                if node_id in nodes_mapping:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(SWEEP_SECONDS)

    vce_api._register_nodes = register
    vce_api.add_messages_to_queue = dispatch
    try:
        yield out
    finally:
        vce_api._register_nodes = register_nodes
        vce_api.add_messages_to_queue = add_messages
