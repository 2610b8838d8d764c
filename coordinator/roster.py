"""Stable client names for Flower node ids.

Flower gives every simulated client a random 64-bit node id, new in every run, and a deployed
device one per registration. Sampling by node id therefore trains different clients from run to
run with the same ``--seed``. The roster asks each node once for its stable name (an identity
query, ``protocol.identity``: the partition name in simulation, the registered device name in
deployment), keeps the answer, and orders nodes by name: samplers draw indices into that order
with a generator seeded by (seed, round), so the same clients train whatever their node ids.
Metrics rows and progress lines name clients by the same names.

A node that cannot answer (an older client) keeps its node id as its name and sorts after the
named ones, by id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import MessageType
from flwr.serverapp import Grid

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.exchange import exchange, reply_reason
from protocol.errors import ProtocolError
from protocol.identity import check_identity, decode_identity_reply, encode_identity_query

log = logging.getLogger("fedtune")

# Keys of metrics-row lists that hold node ids, and of dicts (failures, client memory, secure
# aggregation's dropouts) whose "node" entry is one.
_NODE_LISTS = ("clients", "weights_capped", "recovered")


class Roster:
    """Node id -> stable client name, learned once per node (``learn``)."""

    def __init__(
        self,
        timeout: float,
        clock: Clock = SYSTEM_CLOCK,
        known: Callable[[Iterable[int]], Mapping[int, str]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.known = known  # names the caller knows without asking (the simulator's)
        self.names: dict[int, str] = {}
        self.unnamed: dict[int, str] = {}  # node -> why it has no name (it keeps its id)

    def learn(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Learn the name of every node not seen before: from ``known`` where it has it, else
        by asking (one batch of identity queries)."""
        new = sorted(n for n in nodes if n not in self.names and n not in self.unnamed)
        learned = set(new)
        if new and self.known is not None:
            given = {n: check_identity(name) for n, name in self.known(new).items()}
            self.names.update(given)
            if given:
                log.info("named %d node(s) from the simulation's partitions", len(given))
            new = [n for n in new if n not in given]
        if not new:
            self._check_duplicates(learned)
            return
        content = encode_identity_query()
        ex = exchange(
            grid, {n: content for n in new}, MessageType.QUERY, 0, self.timeout, clock=self.clock
        )
        log.info(
            "asked %d node(s) their client names in %.1fs (%d answered)",
            len(new),
            ex.seconds,
            len(ex.replies),
        )
        for node in ex.missing:
            self.unnamed[node] = f"no identity reply within {self.timeout:g}s"
        for node, reply in ex.replies.items():
            if not reply.has_content():
                self.unnamed[node] = reply_reason(reply)
                continue
            try:
                self.names[node] = decode_identity_reply(reply.content)
            except ProtocolError as exc:
                self.unnamed[node] = str(exc)
        for node in new:
            if node in self.unnamed:
                log.warning(
                    "node %d has no client name (%s); it is sampled and named by its node id, "
                    "which is not stable across runs",
                    node,
                    self.unnamed[node],
                )
        self._check_duplicates(learned)

    def _check_duplicates(self, new: set[int]) -> None:
        seen: dict[str, int] = {}
        for node, name in sorted(self.names.items()):
            if name in seen and node in new:
                log.warning(
                    "nodes %d and %d both call themselves %r; they are told apart by node id",
                    seen[name],
                    node,
                    name,
                )
            seen.setdefault(name, node)

    def name(self, node: int) -> str:
        return self.names.get(node, str(node))

    def key(self, node: int) -> tuple[int, str, int]:
        """The sort key: named nodes by name, then unnamed ones by id."""
        if node in self.names:
            return (0, self.names[node], node)
        return (1, "", node)

    def ordered(self, nodes: Iterable[int]) -> list[int]:
        """``nodes`` in their stable order (what the samplers draw indices from)."""
        return sorted(nodes, key=self.key)

    def nodes_named(self, names: Iterable[str], nodes: Iterable[int]) -> list[int]:
        """Those of ``nodes`` whose name is in ``names``, in stable order."""
        wanted = set(names)
        return self.ordered(n for n in nodes if self.name(n) in wanted)

    def label_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A metrics row with every node id replaced by the client's name: the lists in
        ``clients``, ``weights_capped`` and ``recovered``, and the ``node`` entry of any nested
        dict (which becomes ``client``). Lists of clients are ordered by name, so the row does
        not depend on the node ids of the run."""
        return {k: self._label(k, v) for k, v in row.items()}

    def _label(self, key: str, value: Any) -> Any:
        if key in _NODE_LISTS and isinstance(value, list):
            return sorted(self.name(int(n)) if _is_node(n) else str(n) for n in value)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k == "node" and _is_node(v):
                    out["client"] = self.name(int(v))
                else:
                    out[k] = self._label(k, v)
            return out
        if isinstance(value, list):
            out_list = [self._label(key, v) for v in value]
            if out_list and all(isinstance(v, dict) and "client" in v for v in out_list):
                out_list.sort(key=lambda v: str(v["client"]))  # by name, not by node id
            return out_list
        return value

    def node_named(self, name: str) -> int | None:
        """The node that calls itself ``name`` (the lowest id if several do), or None."""
        found = [n for n, got in self.names.items() if got == name]
        if not found and name.isdigit() and int(name) in self.unnamed:
            return int(name)
        return min(found) if found else None


def _is_node(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
