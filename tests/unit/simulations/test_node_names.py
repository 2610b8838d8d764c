"""The simulator reads which partition each simulated node serves as Flower registers them, so
the coordinator names clients without asking each one (simulations/node_names.py)."""

from __future__ import annotations

import threading

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from simulations.node_names import SimulatedNodeNames, simulated_node_names


def test_node_ids_get_their_partition_names(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_register(num_nodes: int, state_factory: object) -> dict[int, int]:
        return {1000 + 7 * i: i for i in range(num_nodes)}  # random ids in Flower

    monkeypatch.setattr(vce_api, "_register_nodes", fake_register)
    with simulated_node_names({0: "ai", 1: "law", 2: "math"}) as names:
        assert names is not None
        assert vce_api._register_nodes is not fake_register  # wrapped inside the block
        mapping = vce_api._register_nodes(num_nodes=3, state_factory=None)
        assert mapping == {1000: 0, 1007: 1, 1014: 2}  # what Flower gets is unchanged
        assert names([1014, 1000, 99]) == {1014: "math", 1000: "ai"}
    assert vce_api._register_nodes is fake_register  # restored after


def test_a_lookup_waits_for_the_registration() -> None:
    names = SimulatedNodeNames({0: "ai"}, wait=30.0)
    threading.Timer(0.05, names.record, args=({42: 0},)).start()
    assert names([42]) == {42: "ai"}
    assert SimulatedNodeNames({0: "ai"}, wait=0.0)([42]) == {}  # never registered: ask instead
