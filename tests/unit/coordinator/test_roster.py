"""The roster (coordinator/roster.py): node ids -> stable client names, the order samplers draw
from, and metrics rows relabelled by name; the identity query on the wire (protocol/identity.py)
and on the client (client/identity.py); secure aggregation's run state saved by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.identity import client_identity
from coordinator.clock import VirtualClock
from coordinator.config import RunConfig
from coordinator.exchange import sample_nodes
from coordinator.roster import Roster
from coordinator.secagg_round import SecureTransport
from protocol import keys
from protocol.errors import ProtocolError
from protocol.identity import (
    check_identity,
    decode_identity_reply,
    encode_identity_reply,
)
from tests.fakegrid import FakeGrid, named, named_grid

NAMES = ["ai", "art", "law", "math", "music"]


def silent(msg: Message) -> Message | None:
    return None


def test_identity_round_trip_and_bad_names() -> None:
    assert decode_identity_reply(encode_identity_reply("science")) == "science"
    for bad, why in (("", "non-empty"), ("a\nb", "control characters"), ("x" * 201, "longer")):
        with pytest.raises(ProtocolError, match=why):
            check_identity(bad)
    with pytest.raises(ProtocolError, match="record 'identity' is missing"):
        decode_identity_reply(RecordDict())
    old = RecordDict({keys.IDENTITY: ConfigRecord({keys.SCHEMA: 1, keys.IDENTITY_NAME: "ai"})})
    with pytest.raises(ProtocolError, match="schema version 1"):
        decode_identity_reply(old)


def test_same_names_same_sample_whatever_the_node_ids() -> None:
    picks = []
    for node_seed in (1, 2, 3):
        grid = named_grid({n: silent for n in NAMES}, node_seed)
        roster = Roster(10.0, VirtualClock())
        roster.learn(grid, grid.get_node_ids())
        ordered = roster.ordered(grid.get_node_ids())
        assert [roster.name(n) for n in ordered] == sorted(NAMES)
        picks.append([roster.name(n) for n in sample_nodes(ordered, 2, seed=4, stream=3)])
    assert picks[0] == picks[1] == picks[2]
    assert len(picks[0]) == 2 and picks[0] == sorted(picks[0])


def test_a_node_without_a_name_keeps_its_id_and_is_asked_once() -> None:
    grid = FakeGrid({11: named("law", silent), 7: silent, 5: named("ai", silent)})
    roster = Roster(3.0, VirtualClock())
    roster.learn(grid, [11, 7, 5])
    assert (
        roster.names == {11: "law", 5: "ai"} and "no identity reply within 3s" in roster.unnamed[7]
    )
    assert roster.ordered([7, 11, 5]) == [5, 11, 7]  # named by name, then unnamed by id
    sent = len(grid.sent)
    roster.learn(grid, [11, 7, 5])
    assert len(grid.sent) == sent  # asked once per node
    assert roster.node_named("law") == 11 and roster.node_named("7") == 7
    assert roster.node_named("nobody") is None


def test_rows_name_clients_and_do_not_depend_on_node_ids() -> None:
    grid = FakeGrid({900: named("law", silent), 100: named("ai", silent)})
    roster = Roster(3.0, VirtualClock())
    roster.learn(grid, [900, 100])
    row = {
        "round": 1,
        "clients": [100, 900],
        "weights_capped": [900],
        "failures": [{"node": 100, "reason": "x"}, {"node": 900, "reason": "y"}],
        "client_memory": [{"node": 900, "peak_rss_mb": 1.0}, {"node": 100, "peak_rss_mb": 2.0}],
        "secagg": {"recovered": [900], "excluded": [{"node": 900, "reason": "z"}]},
        "num_examples": 5,
    }
    assert roster.label_row(row) == {
        "round": 1,
        "clients": ["ai", "law"],
        "weights_capped": ["law"],
        "failures": [{"client": "ai", "reason": "x"}, {"client": "law", "reason": "y"}],
        "client_memory": [
            {"client": "ai", "peak_rss_mb": 2.0},
            {"client": "law", "peak_rss_mb": 1.0},
        ],
        "secagg": {"recovered": ["law"], "excluded": [{"client": "law", "reason": "z"}]},
        "num_examples": 5,
    }


def test_client_identity_from_device_name_or_partition(tmp_path: Path) -> None:
    assert client_identity({"device-name": "pi-kitchen"}, {}) == "pi-kitchen"
    parts = tmp_path / "partitions"
    parts.mkdir()
    index = [{"partition_id": 0, "name": "ai", "rows": 3}, {"partition_id": 1, "name": "law"}]
    (parts / "index.json").write_text(json.dumps(index))
    assert client_identity({"partition-id": 1}, {"partition-dir": str(parts)}) == "law"
    assert client_identity({"partition-id": 4}, {}) == "partition-4"
    with pytest.raises(ValueError, match="device-name: this node has no name"):
        client_identity({}, {})


def test_secure_aggregation_state_is_saved_by_name_and_restored_under_new_ids() -> None:
    cfg = RunConfig.from_mapping({"secagg": True, "clients-per-round": 3, "min-clients": 2})
    before = SecureTransport(cfg, clock=VirtualClock())
    before.excluded = {11: "tampered shares"}
    before.complaint_ledger.counterparts = {11: {5: 2}, 5: {11: 2}}
    before.seen_keys = {b"\x01" * 64}
    old_names = {11: "law", 5: "ai"}
    saved = json.loads(json.dumps(before.state_dict(old_names.__getitem__)))
    assert saved["excluded"] == {"law": "tampered shares"}

    new_ids = {"law": 42, "ai": 43}  # the restarted simulation's node ids
    after = SecureTransport(cfg, clock=VirtualClock())
    after.load_state_dict(saved, new_ids.get)
    assert after.excluded == {42: "tampered shares"}
    assert after.complaint_ledger.counterparts == {42: {43: 2}, 43: {42: 2}}
    assert after.seen_keys == before.seen_keys


def test_names_the_caller_knows_are_not_asked_for() -> None:
    grid = FakeGrid({11: named("law", silent), 5: named("ai", silent), 8: named("art", silent)})
    roster = Roster(
        3.0, VirtualClock(), known=lambda nodes: {n: "sim-" + str(n) for n in nodes if n != 8}
    )
    roster.learn(grid, [11, 5, 8])
    assert roster.names == {11: "sim-11", 5: "sim-5", 8: "art"}
    assert [m.metadata.dst_node_id for m in grid.sent] == [8]  # only the one it did not know
