"""The seams in Flower's simulation engine (simulations/engine.py)."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from simulations.engine import NodePartitions, fleet_engine, pending_nodes


def _msg(node: int, delivered: str = "") -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=delivered))


class FakeState:
    """The parts of flwr's InMemoryLinkState the dispatcher touches."""

    def __init__(self, messages: dict[str, Any]) -> None:
        self.message_ins_store = messages
        self.lock = threading.RLock()
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[Any]:
        self.asked.append(node_id)
        for m in self.message_ins_store.values():
            if m.metadata.dst_node_id == node_id and m.metadata.delivered_at == "":
                m.metadata.delivered_at = "now"
                return [m]
        return []


def test_pending_nodes_are_the_undelivered_destinations_in_order() -> None:
    state = FakeState({"a": _msg(7), "b": _msg(3, "earlier"), "c": _msg(9), "d": _msg(7)})
    assert pending_nodes(state) == [7, 9]
    assert pending_nodes(object()) is None  # not an in-memory link state


def test_the_dispatcher_asks_only_nodes_with_messages_and_delivers_them_all() -> None:
    state = FakeState({"a": _msg(7), "b": _msg(9), "c": _msg(7)})
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    with fleet_engine():
        dispatch = vce_api.add_messages_to_queue
        thread = threading.Thread(
            target=dispatch, args=(state, queue, {n: 0 for n in range(10_000)}, stop)
        )
        thread.start()
        got = [queue.get(timeout=60) for _ in range(3)]
        stop.set()
        thread.join(timeout=60)
    assert sorted(m.metadata.dst_node_id for m in got) == [7, 7, 9]
    assert set(state.asked) == {7, 9}  # never the other 9,998 nodes


def test_fleet_engine_records_registered_nodes_and_restores_flower() -> None:
    original = (vce_api._register_nodes, vce_api.add_messages_to_queue)
    registered = {}

    def fake_register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        return {1000 + i: i for i in range(num_nodes)}

    vce_api._register_nodes = fake_register
    try:
        with fleet_engine() as nodes:
            assert not nodes.ready.is_set()
            registered = vce_api._register_nodes(num_nodes=3, state_factory=None)
            assert nodes.ready.is_set() and nodes.partition(1002) == 2
        assert vce_api._register_nodes is fake_register
    finally:
        vce_api._register_nodes = original[0]
    assert registered == {1000: 0, 1001: 1, 1002: 2}
    assert vce_api.add_messages_to_queue is original[1]
    with pytest.raises(RuntimeError, match="the simulation registered no nodes within 0s"):
        NodePartitions().partition(1, timeout=0.0)


def test_node_ids_get_their_partition_names() -> None:
    original = vce_api._register_nodes

    def fake_register(num_nodes: int, state_factory: Any) -> dict[int, int]:
        return {1000 + 7 * i: i for i in range(num_nodes)}  # random ids in Flower

    vce_api._register_nodes = fake_register
    try:
        with fleet_engine() as nodes:
            names = nodes.names({0: "ai", 1: "law", 2: "math"})
            vce_api._register_nodes(num_nodes=3, state_factory=None)
            assert names([1014, 1000, 99]) == {1014: "math", 1000: "ai"}  # 99: not registered
            assert nodes.names({0: "ai"})([1007]) == {}  # a partition without a name
    finally:
        vce_api._register_nodes = original


def test_a_name_lookup_waits_for_the_registration() -> None:
    nodes = NodePartitions()

    def register() -> None:
        nodes.mapping.update({42: 0})
        nodes.ready.set()

    threading.Timer(0.05, register).start()
    assert nodes.names({0: "ai"}, timeout=30.0)([42]) == {42: "ai"}
    assert NodePartitions().names({0: "ai"}, timeout=0.0)([42]) == {}  # none: ask instead
