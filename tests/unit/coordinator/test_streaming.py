"""Issue 13 point 4: the plain transport folds each update into the running sum as it arrives and
drops it. Its sum equals the batch sum of the same updates, and the coordinator's memory during a
1,000-client round is O(adapter), not O(clients x adapter): measured with tracemalloc over the
transport's ``collect`` on a grid that makes each reply only when it is pulled (as replies
arrive over the network), compared with a 100-client round and with the adapter's size."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterable

import numpy as np
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.clock import VirtualClock
from coordinator.pipeline import Contribution, NoPrivacy, PlainTransport
from coordinator.progress import Progress
from protocol.adapter import AdapterSpec
from protocol.messages import ClientUpdate, encode_update
from tests.fakegrid import FakeGrid

SHAPES = {f"layers.{i}.lora_{ab}.weight": (256, 128) for i in range(4) for ab in "AB"}
ADAPTER_BYTES = sum(4 * a * b for a, b in SHAPES.values())  # float32: 1 MiB


def client_update(node: int) -> tuple[dict[str, np.ndarray], int]:
    """Client ``node``'s update, made again from its seed whenever asked (never stored)."""
    rng = np.random.default_rng(node)
    delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
    return delta, int(rng.integers(1, 50))


class ArrivingGrid(FakeGrid):
    """Replies are made when pulled, one per pull, in the order messages were sent: nothing
    of a reply exists before the coordinator receives it."""

    def __init__(self, nodes: Iterable[int], per_pull: int = 1) -> None:
        super().__init__({n: (lambda msg: None) for n in nodes})
        self.per_pull = per_pull
        self.waiting: dict[str, Message] = {}
        self.made = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{i}"
            msg.metadata.__dict__["_message_id"] = mid
            self.waiting[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in list(message_ids)[: self.per_pull]:
            msg = self.waiting.pop(mid)
            delta, n = client_update(int(msg.metadata.dst_node_id))
            content = encode_update(ClientUpdate(delta, n, {"train-loss": 1.0}), rnd=1)
            out.append(Message(content, reply_to=msg))
            self.made += 1
        return out


def collect(nodes: list[int]) -> Contribution:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    grid = ArrivingGrid(nodes)
    transport = PlainTransport(1e9, VirtualClock())
    spec = AdapterSpec.of({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    c = transport.collect(
        grid,
        nodes,
        RecordDict(),
        spec,
        1,
        Progress(1, live=False, quiet=True),
        NoPrivacy(len(nodes), 0).prepare,
    )
    assert grid.made == len(nodes) and len(c.contributors) == len(nodes)
    return c


def test_the_streaming_sum_equals_the_batch_sum() -> None:
    nodes = list(range(1, 41))
    c = collect(nodes)
    updates = [client_update(n) for n in nodes]
    # The batch computation: every update held at once, summed in one go.
    stacked = {k: np.stack([n * d[k].astype(np.float64) for d, n in updates]) for k in SHAPES}
    assert c.total_weight == sum(n for _, n in updates)
    for k in SHAPES:
        np.testing.assert_allclose(c.weighted_sum[k], stacked[k].sum(axis=0), rtol=1e-12, atol=0)
        # and exactly the sequential fold, in the order the replies arrived
        want = np.zeros(SHAPES[k], np.float64)
        for d, n in updates:
            want += n * d[k].astype(np.float64)
        np.testing.assert_array_equal(c.weighted_sum[k], want)


def peak_bytes(nodes: list[int]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        c = collect(nodes)
        peak = tracemalloc.get_traced_memory()[1] - before
        del c
    finally:
        tracemalloc.stop()
    return peak


def test_a_1000_client_round_holds_o_adapter_memory() -> None:
    peak_bytes(list(range(1, 6)))  # first-use allocations (imports, caches) out of the way
    small = peak_bytes(list(range(1, 101)))
    large = peak_bytes(list(range(1, 1001)))
    held_all = 1000 * ADAPTER_BYTES  # what holding every update would take: 1000 MiB
    per_client = (large - small) / 900
    print(
        f"peak over collect: 100 clients {small / 2**20:.2f} MiB, 1000 clients "
        f"{large / 2**20:.2f} MiB (+{per_client:.0f} B per client); adapter "
        f"{ADAPTER_BYTES / 2**20:.2f} MiB; holding every update: {held_all / 2**20:.0f} MiB"
    )
    # The sum (float64: 2 adapters) and one reply being decoded (encoded + decoded: 2 more):
    # a few adapters, not a thousand.
    assert large < 8 * ADAPTER_BYTES, (large, ADAPTER_BYTES)
    # What grows with the clients is bookkeeping (ids, messages sent, metrics): under 1% of an
    # adapter per client, never a copy of its update.
    assert per_client < ADAPTER_BYTES / 100, per_client
