"""Run a whole SecAgg+ round in one process, clients and coordinator exchanging the real encoded
messages (bytes and unsigned arrays) through a pluggable ``Transport``. Used by tests (to drop,
tamper with or replay messages at any stage) and by the benchmark; the Flower integration runs the
same client and server steps over the Grid instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from privacy.secagg import client as C
from privacy.secagg.encoding import EncodingPlan
from privacy.secagg.messages import SecAggError, to_bytes
from privacy.secagg.server import (
    ADVERTISE,
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
    SecAggResult,
    ServerSession,
)

# transport(stage, node, payload) -> payload to deliver, or None to lose the reply
Transport = Callable[[str, int, bytes], bytes | None]


@dataclass
class LocalStats:
    client_seconds: dict[str, float] = field(default_factory=dict)  # summed over clients
    server_seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)


def run_round(
    encoded: Mapping[int, np.ndarray],
    plan: EncodingPlan,
    rnd: int = 1,
    *,
    drop: Mapping[str, set[int]] | None = None,
    transport: Transport | None = None,
    degree: int = 0,
    threshold: int = 0,
    min_survivors: int = 2,
    stats: LocalStats | None = None,
    server: ServerSession | None = None,
) -> SecAggResult:
    """One SecAgg+ round over ``encoded`` (node -> int64 vector). ``drop[stage]`` are clients that
    crash before replying at that stage (and stay gone)."""
    drop = drop or {}
    stats = stats or LocalStats()
    nodes = sorted(encoded)
    vector_len = len(next(iter(encoded.values())))
    sess = server or ServerSession(
        nodes,
        rnd,
        plan,
        vector_len,
        min_survivors=min_survivors,
        degree=degree,
        threshold=threshold,
    )
    gone: set[int] = set()
    states: dict[int, C.ClientState] = {}

    def deliver(stage: str, node: int, payload: bytes) -> bytes | None:
        return transport(stage, node, payload) if transport else payload

    def timed(kind: dict[str, float], stage: str, t0: float) -> None:
        kind[stage] = kind.get(stage, 0.0) + time.process_time() - t0

    def client_step(
        stage: str, node: int, fn: Callable[[], tuple[C.ClientState, bytes]]
    ) -> bytes | None:
        if node in gone or node in drop.get(stage, set()):
            gone.add(node)
            return None
        t0 = time.process_time()
        try:
            states[node], payload = fn()
        except SecAggError:
            gone.add(node)
            return None
        finally:
            timed(stats.client_seconds, stage, t0)
        stats.bytes_up[stage] = stats.bytes_up.get(stage, 0) + len(payload)
        return deliver(stage, node, payload)

    def collect(stage: str, out: Mapping[int, bytes | None]) -> dict[int, bytes]:
        return {n: p for n, p in out.items() if p is not None}

    # 1. setup -> advertise
    t0 = time.process_time()
    setups = sess.setup_messages()
    timed(stats.server_seconds, ADVERTISE, t0)
    replies = {}
    for u, s in setups.items():
        stats.bytes_down[ADVERTISE] = stats.bytes_down.get(ADVERTISE, 0) + len(to_bytes(s))

        def step1(s: object = s) -> tuple[C.ClientState, bytes]:
            st, adv = C.advertise(s)  # type: ignore[arg-type]
            return st, to_bytes(adv)

        replies[u] = client_step(ADVERTISE, u, step1)
    t0 = time.process_time()
    directories = sess.receive_advertise(collect(ADVERTISE, replies))
    timed(stats.server_seconds, ADVERTISE, t0)

    # 2. key directory -> share bundle
    replies = {}
    for u, d in directories.items():
        stats.bytes_down[SHARE_KEYS] = stats.bytes_down.get(SHARE_KEYS, 0) + len(to_bytes(d))

        def step2(u: int = u, d: object = d) -> tuple[C.ClientState, bytes]:
            st, bundle = C.share_keys(states[u], d)  # type: ignore[arg-type]
            return st, to_bytes(bundle)

        replies[u] = client_step(SHARE_KEYS, u, step2)
    t0 = time.process_time()
    deliveries = sess.receive_shares(collect(SHARE_KEYS, replies))
    timed(stats.server_seconds, SHARE_KEYS, t0)

    # 3. share delivery -> masked input
    vectors: dict[int, np.ndarray] = {}
    headers = {}
    for u, dl in deliveries.items():
        stats.bytes_down[MASKED_INPUT] = stats.bytes_down.get(MASKED_INPUT, 0) + len(to_bytes(dl))

        def step3(u: int = u, dl: object = dl) -> tuple[C.ClientState, bytes]:
            st, header, vec = C.masked_input(states[u], dl, encoded[u])  # type: ignore[arg-type]
            vectors[u] = vec
            return st, to_bytes(header)

        headers[u] = client_step(MASKED_INPUT, u, step3)
        if u in vectors:
            stats.bytes_up[MASKED_INPUT] += vectors[u].nbytes
    t0 = time.process_time()
    masked = {u: (h, vectors[u]) for u, h in collect(MASKED_INPUT, headers).items()}
    requests = sess.receive_masked(masked)
    timed(stats.server_seconds, MASKED_INPUT, t0)

    # 4. unmask request -> revealed shares
    replies = {}
    for u, r in requests.items():
        stats.bytes_down[UNMASK] = stats.bytes_down.get(UNMASK, 0) + len(to_bytes(r))

        def step4(u: int = u, r: object = r) -> tuple[C.ClientState, bytes]:
            st, resp = C.unmask(states[u], r)  # type: ignore[arg-type]
            return st, to_bytes(resp)

        replies[u] = client_step(UNMASK, u, step4)
    t0 = time.process_time()
    result = sess.receive_unmask(collect(UNMASK, replies))
    timed(stats.server_seconds, UNMASK, t0)
    return result


def plaintext_ring_sum(
    encoded: Mapping[int, np.ndarray], nodes: set[int] | tuple[int, ...], bits: int
) -> np.ndarray:
    """The reference: the exact sum of the chosen clients' encoded vectors, mod 2^bits."""
    acc = np.zeros(len(next(iter(encoded.values()))), dtype=np.int64)
    for u in nodes:
        acc = acc + encoded[u]
    return (acc.view(np.uint64) & np.uint64((1 << bits) - 1)).astype(np.uint64)
