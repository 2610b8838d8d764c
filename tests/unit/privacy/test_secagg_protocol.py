"""The SecAgg+ protocol end to end in one process (privacy/secagg/local.py): exact integer sums,
dropouts at every stage, threshold failures, tampered/replayed/malformed messages, bad shares."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from privacy.secagg import client as C
from privacy.secagg.encoding import EncodingPlan, plan_encoding, quantize
from privacy.secagg.local import plaintext_ring_sum, run_round
from privacy.secagg.messages import (
    SecAggAborted,
    SecAggError,
    UnmaskResponse,
    from_bytes,
    to_bytes,
)
from privacy.secagg.primitives import secure_rng
from privacy.secagg.server import ADVERTISE, MASKED_INPUT, SHARE_KEYS, STAGES, UNMASK

L = 257


def fleet(n: int, seed: int = 0) -> tuple[dict[int, np.ndarray], EncodingPlan]:
    plan = plan_encoding(n, clip=0.1, weight_cap=1000)
    rng = np.random.default_rng(seed)
    nodes = sorted({int(x) + 2**63 for x in rng.integers(0, 2**62, size=n)})  # 64-bit Flower ids
    enc = {
        u: quantize(rng.normal(0, 0.03, L), int(rng.integers(1, 2000)), plan, secure_rng())
        for u in nodes
    }
    return enc, plan


def assert_exact(result, enc, plan) -> None:  # type: ignore[no-untyped-def]
    want = plaintext_ring_sum(enc, result.contributors, plan.ring_bits)
    np.testing.assert_array_equal(result.ring_sum.astype(np.uint64), want)


def test_unmasked_sum_equals_the_plaintext_sum_exactly() -> None:
    enc, plan = fleet(12)
    res = run_round(enc, plan)
    assert res.contributors == tuple(sorted(enc)) and res.recovered == ()
    assert_exact(res, enc, plan)
    assert res.stage_counts == {"sampled": 12, **{s: 12 for s in STAGES}}


@pytest.mark.parametrize("stage", STAGES)
def test_thirty_percent_dropout_at_each_stage_gives_the_survivors_exact_sum(stage: str) -> None:
    enc, plan = fleet(20, seed=1)
    nodes = sorted(enc)
    rng = np.random.default_rng(7)
    gone = {nodes[int(i)] for i in rng.choice(20, size=6, replace=False)}  # 30%
    res = run_round(enc, plan, drop={stage: gone})
    if stage == UNMASK:  # inputs were in; their neighbours removed the masks
        assert set(res.contributors) == set(nodes)
    else:
        assert set(res.contributors) == set(nodes) - gone
    if stage == MASKED_INPUT:  # shared keys, then dropped: pairwise masks rebuilt from shares
        assert set(res.recovered) == gone
    assert {d.node for d in res.dropouts} == gone
    assert all(d.stage == stage and d.reason == "no reply" for d in res.dropouts)
    assert_exact(res, enc, plan)


def test_dropouts_spread_over_all_stages_with_a_sparse_graph() -> None:
    enc, plan = fleet(40, seed=2)
    nodes = sorted(enc)
    drop = {ADVERTISE: {nodes[0]}, SHARE_KEYS: {nodes[5]}, MASKED_INPUT: set(nodes[10:14]),
            UNMASK: {nodes[20], nodes[30]}}  # fmt: skip
    res = run_round(enc, plan, drop=drop, degree=16)
    assert len(res.contributors) == 40 - 6 and set(res.recovered) == set(nodes[10:14])
    assert_exact(res, enc, plan)


def test_below_threshold_the_round_fails_cleanly() -> None:
    enc, plan = fleet(10, seed=3)
    nodes = sorted(enc)
    # complete graph, k = 9, t = 5: after 5 leave at unmask only 4 neighbours can answer
    with pytest.raises(
        SecAggAborted, match=r"unmask: 4 neighbour\(s\) returned shares .*threshold is 5"
    ):
        run_round(enc, plan, drop={UNMASK: set(nodes[:5])})
    # min-survivors: fewer inputs than required
    with pytest.raises(SecAggAborted, match="masked-input: 3 client"):
        run_round(enc, plan, drop={MASKED_INPUT: set(nodes[:7])}, min_survivors=4)
    # too many leave before sharing: every client drops below t live neighbours
    with pytest.raises(SecAggAborted, match="advertise: 0 client"):
        run_round(enc, plan, drop={ADVERTISE: set(nodes[:6])})


def test_clients_refuse_to_reveal_both_shares_or_answer_twice() -> None:
    enc, plan = fleet(6, seed=4)
    from privacy.secagg.server import ServerSession

    sess = ServerSession(sorted(enc), 1, plan, L + 1)
    setups = sess.setup_messages()
    states, advs = {}, {}
    for u, s in setups.items():
        states[u], advs[u] = C.advertise(s)
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    bundles = {}
    for u, d in dirs.items():
        states[u], bundles[u] = C.share_keys(states[u], d)
    deliveries = sess.receive_shares({u: to_bytes(b) for u, b in bundles.items()})
    u0, u1 = sorted(enc)[:2]
    st, _h, _y = C.masked_input(states[u0], deliveries[u0], enc[u0])
    req = C.UnmaskRequest(st.setup.params.session, survivors=(u1,), dropped=(u1,))
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        C.unmask(st, req)
    others = tuple(sorted(set(enc) - {u0}))
    ok = C.UnmaskRequest(st.setup.params.session, survivors=others, dropped=())
    done, resp = C.unmask(st, ok)
    assert {s.kind for s in resp.shares} == {"b"} and done.sk_mask == b"" and done.b_seed == b""
    with pytest.raises(SecAggError, match="out of order"):
        C.unmask(done, replace(ok, survivors=(), dropped=others))
    stale = C.UnmaskRequest(b"\x00" * 16, survivors=others, dropped=())
    with pytest.raises(SecAggError, match="stale or replayed"):
        C.unmask(st, stale)


def test_tampered_ciphertext_is_rejected_and_its_sender_named() -> None:
    enc, plan = fleet(8, seed=5)
    nodes = sorted(enc)
    victim = nodes[2]

    def tamper(stage: str, node: int, payload: bytes) -> bytes:
        if stage == SHARE_KEYS and node == victim:
            raw = json.loads(payload)
            ct = bytearray(bytes.fromhex(raw["items"][0]["ciphertext"]))
            ct[20] ^= 0xFF
            raw["items"][0]["ciphertext"] = ct.hex()
            return json.dumps(raw).encode()
        return payload

    res = run_round(enc, plan, transport=tamper)
    assert_exact(res, enc, plan)  # one missing share of the victim's does not matter
    (ex,) = res.excluded
    assert ex.node == victim and "could not use its shares: authentication failed" in ex.reason


def test_replayed_message_from_an_earlier_round_is_rejected_with_the_client_named() -> None:
    enc, plan = fleet(8, seed=6)
    nodes = sorted(enc)
    old: dict[str, bytes] = {}

    def keep(stage: str, node: int, payload: bytes) -> bytes:
        if node == nodes[1]:
            old[stage] = payload
        return payload

    run_round(enc, plan, rnd=1, transport=keep)

    def replay(stage: str, node: int, payload: bytes) -> bytes:
        return old[stage] if (stage == SHARE_KEYS and node == nodes[1]) else payload

    res = run_round(enc, plan, rnd=2, transport=replay)
    d = {x.node: x for x in res.dropouts}[nodes[1]]
    assert d.stage == SHARE_KEYS and "replayed or stale" in d.reason
    assert_exact(res, enc, plan)


def test_malformed_replies_are_rejected_with_the_client_named() -> None:
    enc, plan = fleet(8, seed=7)
    nodes = sorted(enc)
    bad = {ADVERTISE: nodes[0], SHARE_KEYS: nodes[1], UNMASK: nodes[3]}

    def garble(stage: str, node: int, payload: bytes) -> bytes:
        if bad.get(stage) == node:
            if stage == UNMASK:
                raw = json.loads(payload)
                raw["shares"][0]["kind"] = "sk"  # asks for a share it was not asked for
                return json.dumps(raw).encode()
            return payload[: len(payload) // 2]
        return payload

    res = run_round(enc, plan, transport=garble)
    reasons = {d.node: d for d in res.dropouts}
    assert "malformed Advertise" in reasons[nodes[0]].reason
    assert "malformed ShareBundle" in reasons[nodes[1]].reason
    excluded = {d.node: d.reason for d in res.excluded}
    assert "was not asked" in excluded[nodes[3]]
    assert_exact(res, enc, plan)


def test_a_client_returning_a_wrong_share_is_excluded_and_the_sum_stays_exact() -> None:
    enc, plan = fleet(10, seed=8)
    nodes = sorted(enc)
    liar = nodes[4]

    def lie(stage: str, node: int, payload: bytes) -> bytes:
        if stage == UNMASK and node == liar:
            resp = from_bytes(UnmaskResponse, payload)
            s0 = resp.shares[0]
            y = bytearray(s0.y)
            y[-1] ^= 1
            forged = replace(resp, shares=(replace(s0, y=bytes(y)), *resp.shares[1:]))
            return to_bytes(forged)
        return payload

    res = run_round(enc, plan, transport=lie)
    (ex,) = res.excluded
    assert ex.node == liar and "does not match the commitment" in ex.reason
    assert_exact(res, enc, plan)


def test_a_client_dealing_inconsistent_shares_is_named_and_the_round_fails_cleanly() -> None:
    enc, plan = fleet(8, seed=9)
    nodes = sorted(enc)
    dealer = nodes[3]
    states: dict[int, C.ClientState] = {}
    real_share_keys = C.share_keys

    def bad_dealer(state: C.ClientState, directory):  # type: ignore[no-untyped-def]
        if state.setup.node != dealer:
            return real_share_keys(state, directory)
        # deal shares of a different seed than the one committed to
        evil = replace(state, b_seed=b"\x07" * 32)
        new, bundle = real_share_keys(evil, directory)
        states[dealer] = new
        return replace(new, b_seed=state.b_seed), bundle

    C.share_keys = bad_dealer  # type: ignore[assignment]
    try:
        with pytest.raises(SecAggAborted) as err:
            run_round(enc, plan)
    finally:
        C.share_keys = real_share_keys  # type: ignore[assignment]
    assert err.value.culprits == (dealer,)
    assert f"client {dealer}" in err.value.reason and "inconsistent shares" in err.value.reason


def test_masked_vector_of_the_wrong_shape_or_range_is_rejected() -> None:
    enc, plan = fleet(6, seed=10)
    nodes = sorted(enc)
    from privacy.secagg.server import ServerSession

    sess = ServerSession(nodes, 1, plan, L + 1)
    states, payloads = {}, {}
    for u, s in sess.setup_messages().items():
        states[u], adv = C.advertise(s)
        payloads[u] = to_bytes(adv)
    dirs = sess.receive_advertise(payloads)
    payloads = {}
    for u, d in dirs.items():
        states[u], b = C.share_keys(states[u], d)
        payloads[u] = to_bytes(b)
    dels = sess.receive_shares(payloads)
    masked = {}
    for u, dl in dels.items():
        states[u], h, y = C.masked_input(states[u], dl, enc[u])
        masked[u] = (to_bytes(h), y)
    masked[nodes[0]] = (masked[nodes[0]][0], masked[nodes[0]][1][:-1])
    masked[nodes[1]] = (masked[nodes[1]][0], masked[nodes[1]][1].astype(np.int64))
    sess.receive_masked(masked)
    reasons = {d.node: d.reason for d in sess.dropouts}
    assert "expected uint32[258]" in reasons[nodes[0]] and "expected uint32" in reasons[nodes[1]]
    assert sess.view.masked_sum is not None and sess.view.masked_sum.shape == (L + 1,)
