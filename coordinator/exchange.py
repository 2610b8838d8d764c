"""Talking to client nodes over Flower's ``Grid``: send a batch of messages and collect the
replies within a deadline, wait for nodes, and draw seeded samples of them. Every wait is
bounded and measured on a ``Clock`` (virtual in tests)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.progress import Progress
from protocol.errors import ProtocolError

log = logging.getLogger("fedtune")

T = TypeVar("T")


class FederationError(RuntimeError):
    """The run cannot go on (not enough nodes, every round failing, ...)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the records' payload (arrays, config and metric values) as Flower counts them."""
    return sum(int(rec.count_bytes()) for rec in content.values())


class ByteCounts:
    """Bytes down and up of what a round sent, totalled from each node's ``(down, up)``."""

    node_bytes: dict[int, tuple[int, int]]

    @property
    def bytes_down(self) -> int:
        return sum(down for down, _ in self.node_bytes.values())

    @property
    def bytes_up(self) -> int:
        return sum(up for _, up in self.node_bytes.values())


@dataclass
class Exchange(ByteCounts):
    """Replies gathered for one batch of messages, keyed by destination node."""

    replies: dict[int, Message] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # nodes whose reply was not kept
    node_bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # node: (down, up)
    seconds: float = 0.0  # wall time from push to the last reply (or the timeout)
    timeout: float = 0.0

    def collect(
        self, decode: Callable[[RecordDict], T]
    ) -> tuple[dict[int, T], list[dict[str, Any]]]:
        """Decode every reply; error replies, undecodable ones and missing ones become failures
        with their reason."""
        results: dict[int, T] = {}
        failures = [
            {"node": n, "reason": f"no reply within {self.timeout:g}s"} for n in self.missing
        ]
        for node, reply in sorted(self.replies.items()):
            if not reply.has_content():
                failures.append({"node": node, "reason": reply_reason(reply)})
                continue
            try:
                results[node] = decode(reply.content)
            except ProtocolError as exc:
                failures.append({"node": node, "reason": str(exc)})
        return results, failures


def exchange(
    grid: Grid,
    contents: dict[int, RecordDict],
    message_type: str,
    rnd: int,
    timeout: float,
    on_reply: Callable[[int, Message], None] | None = None,
    poll_interval: float = 0.5,
    clock: Clock = SYSTEM_CLOCK,
    keep: bool = True,
) -> Exchange:
    """Send one message per node and wait (at most ``timeout`` s of ``clock``) for the
    replies. With ``keep=False`` a reply is handed to ``on_reply`` and then dropped (streaming
    consumers: memory does not grow with the number of replies); ``replies`` then maps each
    answering node to an empty reply marker only."""
    out = Exchange(timeout=timeout)
    if not contents:  # e.g. an empty Poisson-sampled cohort under client-level DP
        return out
    t0 = clock.now()
    messages = []
    for node, content in contents.items():
        out.node_bytes[node] = (payload_bytes(content), 0)
        messages.append(
            Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(rnd))
        )
    deadline = clock.now() + timeout
    ids = _retry_until(
        clock, deadline, poll_interval, "send", lambda: list(grid.push_messages(messages))
    )
    pending = {
        mid: msg.metadata.dst_node_id for mid, msg in zip(ids or [], messages, strict=False) if mid
    }
    if ids is None:  # never sent: every node counts as missing, the warning said why
        pending = {str(i): msg.metadata.dst_node_id for i, msg in enumerate(messages)}
    while ids is not None and pending and clock.now() < deadline:
        pulled = _retry_until(
            clock,
            deadline,
            poll_interval,
            "collect replies",
            lambda: grid.pull_messages(list(pending)),
        )
        for reply in pulled or []:
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            node = pending.pop(mid)
            if keep:
                out.replies[node] = reply
            else:
                out.answered.append(node)
            if reply.has_content():
                out.node_bytes[node] = (out.node_bytes[node][0], payload_bytes(reply.content))
            if on_reply:
                on_reply(node, reply)
        if pending:
            clock.sleep(poll_interval)
    out.missing = sorted(pending.values())
    out.seconds = clock.now() - t0
    return out


R = TypeVar("R")


def _retry_until(
    clock: Clock, deadline: float, pause: float, what: str, call: Callable[[], R]
) -> R | None:
    """``call()``, retried after transient transport errors (a busy SuperLink answers 500 when
    its database is locked) until ``deadline``; None if it never succeeded."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:  # HTTP/gRPC errors of whichever Grid is in use
            failures += 1
            if failures == 1:
                log.warning("could not %s (%s); retrying until the round timeout", what, exc)
            if clock.now() + pause >= deadline:
                log.error("gave up trying to %s after %d attempts: %s", what, failures, exc)
                return None
            clock.sleep(pause)


def broadcast(
    grid: Grid,
    nodes: Sequence[int],
    content: RecordDict,
    message_type: str,
    rnd: int,
    timeout: float,
    progress: Progress,
    clock: Clock = SYSTEM_CLOCK,
) -> Exchange:
    """The same content to every node in ``nodes``, with progress shown as replies arrive."""
    progress.phase(rnd, message_type, len(nodes))
    return exchange(
        grid,
        {n: content for n in nodes},
        message_type,
        rnd,
        timeout,
        on_reply=lambda n, r: progress.client_done(n, not r.has_error()),
        clock=clock,
    )


def wait_for_nodes(
    grid: Grid, needed: int, timeout: float, poll: float = 1.0, clock: Clock = SYSTEM_CLOCK
) -> list[int]:
    nodes = live_nodes(grid, needed, timeout, poll, clock)
    if len(nodes) < needed:
        raise FederationError(
            f"only {len(nodes)} client node(s) connected after {timeout:.0f}s; "
            f"min-clients is {needed}"
        )
    return nodes


def live_nodes(
    grid: Grid, needed: int, timeout: float, poll: float = 1.0, clock: Clock = SYSTEM_CLOCK
) -> list[int]:
    """The connected nodes, once at least ``needed`` are (or whoever is there after
    ``timeout`` s)."""
    deadline = clock.now() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or clock.now() >= deadline:
            return nodes
        clock.sleep(min(poll, max(0.0, deadline - clock.now())))


# Streams of the per-round generators (``round_rng``): the training sample of round r is
# (seed, r) (kept from before there were streams), client DP's cohort and noise the others.
SAMPLE_STREAM = 1
NOISE_STREAM = 2


def round_rng(seed: int, rnd: int, stream: int) -> np.random.Generator:
    """The generator of round ``rnd``'s ``stream``: a function of (seed, round, stream) alone,
    so a run reproduces, and a resumed run draws what an uninterrupted one would."""
    return np.random.default_rng([seed, rnd, stream])


def sample_nodes(nodes: Sequence[int], k: int, seed: int, stream: int) -> list[int]:
    """``k`` distinct nodes, a deterministic function of (the order of ``nodes``, seed,
    stream).

    ``nodes`` come in their stable order (``coordinator.roster.Roster.ordered``: by client
    name), so the same clients are drawn whatever node ids Flower gave them; the picks keep that
    order. Indices are sampled, not ids (node ids are unsigned 64-bit). ``stream`` is the round
    number for training samples (0 for the fixed evaluation set).
    """
    rng = np.random.default_rng([seed, stream])
    picks = rng.choice(len(nodes), size=min(k, len(nodes)), replace=False)
    return [nodes[int(i)] for i in sorted(picks)]


def reply_reason(reply: Message) -> str:
    if reply.has_error():
        return reply.error.reason or f"client error code {reply.error.code}"
    return "reply without content"
