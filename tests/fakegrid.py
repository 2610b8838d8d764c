"""An in-process ``Grid`` whose nodes are plain functions: the round loop without Ray."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Error, Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from coordinator.clock import VirtualClock
from coordinator.rounds import run_federation
from protocol.identity import encode_identity_reply

Handler = Callable[[Message], Message | None]  # None: the node never answers


def run_virtual(grid: Grid, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """``run_federation`` on virtual time: replies computed in-process (real training included)
    take no time, so a phase deadline fires only for a node that never answers, however busy
    the machine is."""
    return run_federation(grid, *args, clock=VirtualClock(), **kwargs)


class FakeGrid(Grid):
    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        # The Flower runtime sets the process's task identity before a ServerApp runs; Message()
        # needs it. This grid stands in for that runtime.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(
            content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self.sent.append(msg)
            try:
                reply = self.handlers[msg.metadata.dst_node_id](msg)
            except Exception as exc:  # as Flower does: a raising ClientApp sends an error reply
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))


def named(name: str, handler: Handler) -> Handler:
    """``handler`` for a client that answers the identity query with ``name``."""

    def handle(msg: Message) -> Message | None:
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(encode_identity_reply(name), reply_to=msg)
        return handler(msg)

    return handle


def random_nodes(handlers: dict[str, Handler], node_seed: int | None = None) -> FakeGrid:
    """A grid of ``handlers`` under random 64-bit node ids (drawn from ``node_seed``, or fresh
    each call), registered in a shuffled order: what Flower's simulation does, new every run.
    The handlers answer the identity query themselves."""
    rng = random.Random(node_seed)
    ids: list[int] = []
    while len(ids) < len(handlers):
        node = rng.getrandbits(64)
        if node and node not in ids:
            ids.append(node)
    items = list(handlers.values())
    rng.shuffle(items)
    return FakeGrid(dict(zip(ids, items, strict=True)))


def named_grid(handlers: dict[str, Handler], node_seed: int | None = None) -> FakeGrid:
    """``random_nodes`` of ``handlers``, each answering the identity query with its key."""
    return random_nodes({name: named(name, h) for name, h in handlers.items()}, node_seed)
