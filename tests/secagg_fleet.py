"""A fleet of in-process clients running the real ClientApp SecAgg handlers (client/secagg.py)
behind ``FakeGrid``: each node has its own ``Context`` and a deterministic synthetic update, and a
transport hook may drop, tamper with or record any message in either direction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_instruction,
    decode_train_instruction,
    encode_eval_result,
)
from tests.fakegrid import FakeGrid

# hook(direction "down"|"up", node, message) -> message to deliver, or None to lose it
Hook = Callable[[str, int, Message], Message | None]


def synthetic_delta(node_index: int, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + node_index)
    return {k: rng.normal(0.0, 0.01, v.shape).astype(np.float32) for k, v in adapter.items()}


@dataclass
class Fleet:
    nodes: list[int]
    examples: dict[int, int]
    hook: Hook | None = None
    record: list[tuple[str, int, Message]] = field(default_factory=list)
    deltas: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.app = ClientApp()
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in self.nodes
        }

        def train(msg: Message, context: Context) -> ClientUpdate:
            _instr, adapter = decode_train_instruction(msg.content)
            i = self.nodes.index(context.node_id)
            delta = synthetic_delta(i, adapter)
            self.deltas[context.node_id] = delta
            return ClientUpdate(delta, self.examples[context.node_id], {"train-loss": 1.0 + i})

        secagg.register(self.app, train)

        @self.app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            i = self.nodes.index(context.node_id)
            res = EvalResult(loss=2.0 + i, num_tokens=10, num_examples=1)
            instr, _adapter = decode_eval_instruction(msg.content)
            return Message(encode_eval_result(res, rnd=instr.round), reply_to=msg)

    def handler(self, node: int) -> Callable[[Message], Message | None]:
        def handle(msg: Message) -> Message | None:
            if self.hook is not None:
                delivered = self.hook("down", node, msg)
                if delivered is None:
                    return None
                msg = delivered
            if msg.metadata.message_type == MessageType.TRAIN:
                raise AssertionError("plain train message sent in a --secagg run")
            reply = self.app(msg, self.contexts[node])
            self.record.append(("up", node, reply))
            if self.hook is not None:
                return self.hook("up", node, reply)
            return reply

        return handle

    def grid(self) -> FakeGrid:
        return FakeGrid({n: self.handler(n) for n in self.nodes})
