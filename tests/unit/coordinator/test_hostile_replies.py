"""Plain (no --secagg) rounds with a hostile client over FakeGrid: a reply for another round, or
a malformed one, is a failure naming the client and the round goes on (issue 12, "Protocol")."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType

from coordinator.clock import VirtualClock
from coordinator.config import RunConfig
from coordinator.pipeline import NoPrivacy, PlainTransport
from coordinator.progress import Progress
from coordinator.rounds import Pipeline, federated_evaluate
from coordinator.strategies import Strategy, StrategySettings
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from tests.fakegrid import FakeGrid

NODES = [11, 22, 33, 44]
ADAPTER = {"l.lora_A": np.zeros((2, 4), np.float32), "l.lora_B": np.zeros((4, 2), np.float32)}
# FakeGrid answers at once; a long timeout keeps the test independent of the machine's speed.
CFG = RunConfig.from_mapping({"min-clients": 2, "clients-per-round": 4, "round-timeout": 300.0})


def node(i: int, *, reply_round: Any = None, schema: Any = None):  # type: ignore[no-untyped-def]
    """A client whose delta is i + 1 everywhere; ``reply_round``/``schema`` override what its
    reply-meta says."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            instr, _ = decode_eval_instruction(msg.content)
            content = encode_eval_result(EvalResult(1.0 + i, 10, 1), rnd=instr.round)
        else:
            instr, adapter = decode_train_instruction(msg.content)
            delta = {k: np.full_like(v, i + 1.0) for k, v in adapter.items()}
            content = encode_update(ClientUpdate(delta, 10, {}), rnd=instr.round)
        meta = dict(content[keys.REPLY_META])
        if reply_round is not None:
            meta[keys.ROUND] = reply_round
        if schema is not None:
            meta[keys.SCHEMA] = schema
        content[keys.REPLY_META] = ConfigRecord(meta)
        return Message(content, reply_to=msg)

    return handle


def test_a_reply_for_an_earlier_round_is_not_aggregated() -> None:
    grid = FakeGrid({n: node(i, reply_round=2 if i == 3 else None) for i, n in enumerate(NODES)})
    pipeline = Pipeline(
        NoPrivacy(4, 0),
        PlainTransport(CFG.round_timeout, VirtualClock()),
        Strategy.create(StrategySettings(), 4, 4),
        AdapterSpec.of(ADAPTER),
        CFG.min_clients,
    )
    new, result = pipeline.train(grid, CFG, NODES, ADAPTER, 3, Progress(3, live=False))
    m = result.to_row()
    assert m["status"] == "ok" and new is not None and m["clients_ok"] == 3
    (f,) = m["failures"]
    assert f["node"] == 44 and "reply is for round 2, this is round 3" in f["reason"]
    np.testing.assert_array_equal(new["l.lora_A"], np.full((2, 4), 2.0, np.float32))  # 1,2,3


def test_an_evaluation_reply_for_another_round_or_schema_is_not_counted() -> None:
    handlers = {n: node(i) for i, n in enumerate(NODES)}
    handlers[33] = node(2, reply_round=4)
    handlers[44] = node(3, schema=True)
    grid = FakeGrid(handlers)
    row, _d, _u = federated_evaluate(grid, CFG, NODES, ADAPTER, 3, Progress(3, live=False))
    assert row["eval_clients_ok"] == 2 and row["eval_loss"] == 1.5
    reasons = {f["node"]: f["reason"] for f in row["eval_failures"]}
    assert "reply is for round 4" in reasons[33] and "schema version True" in reasons[44]
