"""Issue 13 point 4: the plain transport folds each update into the running sum as it arrives and
drops it. Its sum equals the batch sum of the same updates, and the coordinator's memory during a
1,000-client round is O(adapter), not O(clients x adapter): measured with tracemalloc over the
transport's ``collect`` on a grid that makes each reply only when it is pulled (as replies
arrive over the network), compared with a 100-client round and with the adapter's size."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.clock import VirtualClock
from coordinator.ordered_fold import OrderedFold
from coordinator.pipeline import Contribution, NoPrivacy, PlainTransport, Prepare
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

    def __init__(
        self, nodes: Iterable[int], per_pull: int = 1, shuffle: random.Random | None = None
    ) -> None:
        super().__init__({n: (lambda msg: None) for n in nodes})
        self.per_pull = per_pull
        # Replies come back in a random order, as from 4 workers: any of the first 4 pending.
        self.shuffle = shuffle
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
        ids = list(message_ids)
        if self.shuffle is not None:
            first = ids[:4]
            self.shuffle.shuffle(first)
            ids = first + ids[4:]
        for mid in ids[: self.per_pull]:
            msg = self.waiting.pop(mid)
            delta, n = client_update(int(msg.metadata.dst_node_id))
            content = encode_update(ClientUpdate(delta, n, {"train-loss": 1.0}), rnd=1)
            out.append(Message(content, reply_to=msg))
            self.made += 1
        return out


def clip_like(update: Mapping[str, np.ndarray], weight: float) -> tuple[dict, float]:
    """A prepare step like client DP's clipping: float64 updates scaled by a non-dyadic factor
    (full 53-bit mantissas, so the order of the additions shows in the sum's last bits; sums
    of float32 x integer products are often exact whatever the order)."""
    return {k: np.asarray(v, np.float64) * (1 / 3) for k, v in update.items()}, 1.0


def collect(
    nodes: list[int], shuffle: random.Random | None = None, prepare: Prepare | None = None
) -> Contribution:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    grid = ArrivingGrid(nodes, shuffle=shuffle)
    transport = PlainTransport(1e9, VirtualClock())
    spec = AdapterSpec.of({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    c = transport.collect(
        grid,
        nodes,
        RecordDict(),
        spec,
        1,
        Progress(1, live=False, quiet=True),
        prepare or NoPrivacy(len(nodes), 0).prepare,
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
        # and exactly the sequential fold, in sampled order
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


def test_the_sum_does_not_depend_on_the_order_replies_arrive_in() -> None:
    """Clients finishing in another order (several workers, devices) give the same bits: the
    fold follows the sampled order (coordinator/ordered_fold.py)."""
    nodes = list(range(1, 31))
    in_order = collect(nodes, prepare=clip_like)
    for seed in (1, 2):
        shuffled = collect(nodes, shuffle=random.Random(seed), prepare=clip_like)
        assert "fold_out_of_order" not in shuffled.extra
        for k in SHAPES:
            np.testing.assert_array_equal(shuffled.weighted_sum[k], in_order.weighted_sum[k])


def test_ordered_fold_adds_in_sampled_order_and_bounds_its_buffer() -> None:
    added: list[int] = []
    fold = OrderedFold([5, 3, 9, 1], added.append, window=4)
    fold.offer(9, 9)
    fold.offer(1, 1)
    assert added == []  # 5 and 3 come first
    fold.skip(5)  # failed
    assert added == []
    fold.offer(3, 3)
    assert added == [3, 9, 1] and fold.in_order and fold.peak_waiting == 3

    added.clear()
    order = list(range(10))
    fold = OrderedFold(order, added.append, window=4)
    for node in reversed(order[1:]):  # node 0 never answers
        fold.offer(node, node)
        assert len(fold.waiting) <= 4  # memory stays bounded
    fold.finish()
    assert sorted(added) == order[1:] and not fold.in_order  # overflowed: said so
