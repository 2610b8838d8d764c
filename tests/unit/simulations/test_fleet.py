"""Device profiles in the round loop (simulations/fleet.py through coordinator/rounds.py):
unavailable clients are absent from their rounds (training and evaluation), and each round's
simulated wall-clock is the slowest sampled client's compute + transfer under its profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType

from client.profiles import Fleet, available, parse_profiles
from coordinator.config import RunConfig
from coordinator.exchange import payload_bytes, sample_nodes
from coordinator.progress import Progress
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from simulations.engine import NodePartitions
from simulations.fleet import DeviceFleet
from tests.fakegrid import FakeGrid, run_virtual

PROFILES = parse_profiles(
    {
        "pi4": {"share": 0.5, "tokens_per_second": 8, "availability": 0.5,
                "uplink_mbps": 5, "downlink_mbps": 20},
        "laptop": {"share": 0.5, "tokens_per_second": 100, "availability": 0.9,
                   "uplink_mbps": 50, "downlink_mbps": 100},
    },
    "test",
)  # fmt: skip
NUM = 24
NODES = [2**63 + 7919 * i for i in range(NUM)]  # random-looking 64-bit ids, partition i
EVAL_CLIENTS = 10


def client(pid: int):  # type: ignore[no-untyped-def]
    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            ev, _ = decode_eval_instruction(msg.content)
            res = EvalResult(loss=1.0, num_tokens=10, num_examples=2)
            return Message(encode_eval_result(res, rnd=ev.round), reply_to=msg)
        instr, adapter = decode_train_instruction(msg.content)
        delta = {k: np.full_like(v, 1e-3) for k, v in adapter.items()}
        tokens = 100.0 * (pid + 1)  # each client reports a different amount of training
        # ... and sends a reply of its own size (as ranks and codecs make them differ)
        padding = {f"pad-{j}": 0.0 for j in range(40 * (pid % 3))}
        up = ClientUpdate(delta, 10, {"train-loss": 1.0, "train-tokens": tokens, **padding})
        return Message(encode_update(up, rnd=instr.round), reply_to=msg)

    return handle


@pytest.fixture
def fleet_run(tiny_model_dir: Path, model_cache: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = RunConfig.from_mapping(
        {"model": str(tiny_model_dir), "quantization": "none", "cache-dir": str(model_cache),
         "output-dir": str(tmp_path / "run"), "rounds": 4, "clients-per-round": 6,
         "min-clients": 1, "eval-clients": EVAL_CLIENTS, "lora-rank": 2, "seed": 11}
    )  # fmt: skip
    fleet = Fleet.build(PROFILES, NUM, seed=11)
    nodes = NodePartitions({n: i for i, n in enumerate(NODES)})
    nodes.ready.set()
    grid = FakeGrid({n: client(i) for i, n in enumerate(NODES)})
    names = [f"client-{i:03d}" for i in range(NUM)]
    rows = run_virtual(
        grid, cfg, tmp_path / "run", progress=Progress(4, live=False),
        fleet=DeviceFleet(fleet, nodes, names), node_names=nodes.names(dict(enumerate(names))),
    )  # fmt: skip
    return grid, fleet, rows


def test_unavailable_clients_are_absent_from_their_rounds(fleet_run) -> None:  # type: ignore[no-untyped-def]
    grid, fleet, rows = fleet_run
    pid = {n: i for i, n in enumerate(NODES)}
    trained: dict[int, set[int]] = {}
    for msg in grid.sent:
        if msg.metadata.message_type == MessageType.TRAIN:
            trained.setdefault(int(msg.metadata.group_id), set()).add(pid[msg.metadata.dst_node_id])
    assert sorted(trained) == [1, 2, 3, 4]
    for rnd, clients in trained.items():
        up = {c for c in range(NUM) if available(11, rnd, c, fleet.profile(c).availability)}
        assert clients <= up and len(clients) == 6
        row = rows[rnd]
        assert row["clients_unavailable"] == NUM - len(up) > 0
        assert {c["partition_id"] for c in row["client_profiles"]} == clients
        for c in row["client_profiles"]:
            assert c["profile"] == fleet.profile(c["partition_id"]).name
            assert c["client"] == f"client-{c['partition_id']:03d}"
    # Which clients are up changes from round to round.
    assert len({frozenset(c) for c in trained.values()}) > 1


def test_simulated_round_time_comes_from_the_profiles(fleet_run) -> None:  # type: ignore[no-untyped-def]
    grid, fleet, rows = fleet_run
    # Each client's own bytes, replayed here: the train message it got and the reply it sent.
    sizes: dict[tuple[int, int], tuple[int, int]] = {}
    for msg in grid.sent:
        if msg.metadata.message_type == MessageType.TRAIN:
            pid = NODES.index(msg.metadata.dst_node_id)
            reply = client(pid)(msg)
            key = (int(msg.metadata.group_id), pid)
            sizes[key] = (payload_bytes(msg.content), payload_bytes(reply.content))
    for rnd, row in enumerate(rows[1:], start=1):
        assert row["clients_sampled"] == 6 and row["clients_ok"] == 6
        assert row["client_bytes_down"] > 0 and row["client_bytes_up"] > 0
        assert len({sizes[rnd, c["partition_id"]][1] for c in row["client_profiles"]}) > 1
        expected = []
        for c in row["client_profiles"]:
            down, up = sizes[rnd, c["partition_id"]]
            assert (c["bytes_down"], c["bytes_up"]) == (down, up)
            p = fleet.profile(c["partition_id"])
            tokens = 100.0 * (c["partition_id"] + 1)  # what this client reported
            seconds = (
                tokens / p.tokens_per_second
                + down * 8 / (p.downlink_mbps * 1e6)
                + up * 8 / (p.uplink_mbps * 1e6)
            )
            assert c["simulated_seconds"] == pytest.approx(seconds, rel=1e-12)
            expected.append(seconds)
        assert row["simulated_seconds"] == pytest.approx(max(expected), rel=1e-12)
        assert row["seconds"] >= 0  # the real time stays beside it


def test_only_the_available_clients_of_the_fixed_set_evaluate(fleet_run) -> None:  # type: ignore[no-untyped-def]
    grid, fleet, rows = fleet_run
    pid = {n: i for i, n in enumerate(NODES)}
    # The fixed evaluation set: drawn once from the clients in their stable order (by name,
    # client-000 ... client-023: the partition order here).
    fixed = {pid[n] for n in sample_nodes(NODES, EVAL_CLIENTS, 11, 0)}
    evaluated: dict[int, set[int]] = {rnd: set() for rnd in range(5)}
    for msg in grid.sent:
        if msg.metadata.message_type == MessageType.EVALUATE:
            evaluated[int(msg.metadata.group_id)].add(pid[msg.metadata.dst_node_id])
    left_out = 0
    for rnd, clients in evaluated.items():
        up = {c for c in fixed if available(11, rnd, c, fleet.profile(c).availability)}
        assert clients == up, rnd
        assert rows[rnd]["eval_clients_unavailable"] == len(fixed - up)
        assert rows[rnd]["eval_clients_ok"] == len(up)
        left_out += len(fixed - up)
    assert left_out > 0  # some member of the set was down in some round
