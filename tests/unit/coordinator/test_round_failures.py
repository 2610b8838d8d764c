"""A failed round is recorded with its reason; the run then continues or stops as configured."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType
from safetensors.numpy import load_file

from coordinator.clock import VirtualClock
from coordinator.config import ConfigError, RunConfig
from coordinator.progress import Progress
from coordinator.rounds import FederationError
from tests.fakegrid import FakeGrid, run_virtual
from tests.unit.coordinator.test_rounds import NODES, cfg_for, client


def flaky(node_index: int, fail_rounds: set[str]):  # type: ignore[no-untyped-def]
    """A client that answers train messages of ``fail_rounds`` with an error reply."""
    ok = client(node_index)

    def handle(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id in fail_rounds:
            return Message(Error(code=2, reason="device rebooted"), reply_to=msg)
        return ok(msg)

    return handle


class ShrinkingGrid(FakeGrid):
    """Nodes listed in ``leave_after`` disconnect once a round with that number was sent."""

    def __init__(self, handlers, leave_after: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
        super().__init__(handlers)
        self.leave_after = leave_after

    def get_node_ids(self) -> Iterable[int]:
        sent_rounds = {int(m.metadata.group_id) for m in self.sent}
        last = max(sent_rounds, default=-1)
        return [n for n in self.handlers if self.leave_after.get(n, 10**9) > last]


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="on-round-failure: must be one of continue, stop"):
        RunConfig.from_mapping({"on-round-failure": "retry"})


def test_failed_round_is_recorded_and_the_run_continues(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({NODES[0]: flaky(0, {"1"}), NODES[1]: flaky(1, {"1"})})
    cfg = cfg_for(tiny_model_dir, model_cache, out, **{"clients-per-round": 2})
    rows = run_virtual(grid, cfg, out, progress=Progress(2, live=False))

    assert [r["round"] for r in rows] == [0, 1, 2]
    r1, r2 = rows[1], rows[2]
    assert r1["status"] == "failed" and r1["clients_ok"] == 0
    assert r1["reason"] == "0 usable update(s), min-clients is 2"
    assert {f["reason"] for f in r1["failures"]} == {"device rebooted"}
    assert r1["update_norm"] is None  # every row has the same fields; no update was applied
    assert r2["status"] == "ok" and r2["clients_ok"] == 2
    # Only round 2 moved the adapter: FedAvg of deltas 1 (10 ex.) and 2 (20 ex.) = 5/3.
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model

    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    initial = get_adapter(attach_lora(base.model, cfg.lora, seed=cfg.seed))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in initial:
        np.testing.assert_allclose(saved[k], initial[k] + 5 / 3, rtol=1e-5, atol=1e-5)


def test_failed_round_stops_the_run_when_configured(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = FakeGrid({NODES[0]: flaky(0, {"1"}), NODES[1]: client(1)})
    cfg = cfg_for(
        tiny_model_dir,
        model_cache,
        out,
        rounds=3,
        **{"clients-per-round": 2, "on-round-failure": "stop"},
    )
    with pytest.raises(
        FederationError, match=r"round 1 failed: 1 usable update\(s\), min-clients is 2; stopping"
    ):
        run_virtual(grid, cfg, out, progress=Progress(3, live=False))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["status"] == "failed"
    assert json.loads((out / "state.json").read_text())["round"] == 1
    assert not [m for m in grid.sent if m.metadata.group_id == "2"]


def test_round_without_enough_connected_nodes_fails_with_the_reason(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # NODES[1] and NODES[2] disconnect after round 1 was sent: round 2 finds one node.
    grid = ShrinkingGrid(
        {n: client(i) for i, n in enumerate(NODES[:3])}, leave_after={NODES[1]: 1, NODES[2]: 1}
    )
    cfg = cfg_for(tiny_model_dir, model_cache, out, **{"clients-per-round": 3})
    rows = run_virtual(grid, cfg, out, progress=Progress(2, live=False))
    assert rows[1]["status"] == "ok" and rows[1]["clients_ok"] == 3
    r2 = rows[2]
    assert r2["status"] == "failed" and r2["clients_sampled"] == 0
    assert r2["reason"] == "only 1 client node(s) connected after waiting 1s; min-clients is 2"
    assert not [
        m for m in grid.sent if m.metadata.group_id == "2" and m.metadata.message_type == "train"
    ]


class BusyGrid(FakeGrid):
    """A coordinator whose database is briefly locked: some pushes and pulls fail."""

    def __init__(self, handlers, fail_push: int, fail_pull: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(handlers)
        self.fail_push, self.fail_pull = fail_push, fail_pull

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        if self.fail_push:
            self.fail_push -= 1
            raise RuntimeError("500 Internal Server Error: database is locked")
        return super().push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        if self.fail_pull:
            self.fail_pull -= 1
            raise RuntimeError("500 Internal Server Error: database is locked")
        return super().pull_messages(message_ids)


def test_transient_transport_errors_do_not_end_the_run(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    from flwr.app import RecordDict

    from coordinator.exchange import exchange

    grid = BusyGrid({n: client(i) for i, n in enumerate(NODES[:2])}, fail_push=1, fail_pull=2)
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run", rounds=1,
                  **{"clients-per-round": 2, "round-timeout": 10.0})  # fmt: skip
    rows = run_virtual(grid, cfg, tmp_path / "run", progress=Progress(1, live=False))
    assert rows[1]["status"] == "ok" and rows[1]["clients_ok"] == 2
    assert grid.fail_push == 0 and grid.fail_pull == 0

    # A coordinator that stays down: the phase ends at its timeout with every node missing.
    down = BusyGrid({NODES[0]: client(0)}, fail_push=10**6, fail_pull=0)
    ex = exchange(down, {NODES[0]: RecordDict()}, MessageType.TRAIN, 1, timeout=0.3,
                  poll_interval=0.05, clock=VirtualClock())  # fmt: skip
    assert ex.replies == {} and ex.missing == [NODES[0]]
