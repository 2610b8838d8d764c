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
from privacy.secagg.server import (
    ADVERTISE,
    MASKED_INPUT,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    ServerSession,
)

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


@pytest.mark.parametrize("stage", STAGES)
def test_three_clients_with_default_k_and_t_survive_one_dropout_at_each_stage(stage: str) -> None:
    """The default cohort: 3 clients, complete graph k = 2, t = 2. A survivor whose other
    neighbour dropped has one neighbour's share of its self-mask seed plus the one it kept."""
    enc, plan = fleet(3, seed=11)
    nodes = sorted(enc)
    gone = nodes[1]
    sess = ServerSession(nodes, 1, plan, L + 1)
    assert (sess.graph.degree(), sess.threshold) == (2, 2)
    res = run_round(enc, plan, drop={stage: {gone}}, server=sess)
    rest = [u for u in nodes if u != gone]
    assert list(res.contributors) == (nodes if stage == UNMASK else rest)
    assert res.recovered == ((gone,) if stage == MASKED_INPUT else ())
    assert [(d.node, d.stage) for d in res.dropouts] == [(gone, stage)]
    assert_exact(res, enc, plan)
    revealed = {k: set(v) for k, v in sess.view.revealed.items()}
    if stage == UNMASK:  # the dropped client's b from the two others, theirs from both of them
        assert revealed == {(u, "b"): set(rest) for u in nodes}
    else:  # each survivor's b: the other survivor's share and its own
        want = {(u, "b"): set(rest) for u in rest}
        if stage == MASKED_INPUT:  # it shared keys and left: its key from the two survivors
            want[(gone, "sk")] = set(rest)
        assert revealed == want


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        (ADVERTISE, r"advertise: 0 client\(s\) left, at least 2 needed"),
        (SHARE_KEYS, r"share-keys: 0 client\(s\) left, at least 2 needed"),
        (MASKED_INPUT, r"masked-input: 1 client\(s\) left, at least 2 needed"),
        (UNMASK, r"unmask: 1 share\(s\) of client \d+'s self-mask seed came back, threshold is 2"),
    ],
)
def test_three_clients_with_two_dropped_fail_cleanly(stage: str, reason: str) -> None:
    enc, plan = fleet(3, seed=12)
    nodes = sorted(enc)
    sess = ServerSession(nodes, 1, plan, L + 1)
    with pytest.raises(SecAggAborted, match=reason) as err:
        run_round(enc, plan, drop={stage: set(nodes[:2])}, server=sess)
    assert err.value.culprits == ()
    # the lone survivor's self-mask seed was never rebuilt: at most its one share came back
    assert all(len(v) < sess.threshold for v in sess.view.revealed.values())


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
    # complete graph, k = 9, t = 6 (a strict majority of the 10 holders of a client's shares):
    # after 4 leave at unmask, a survivor's b has 5 live neighbours' shares plus its own = t
    res = run_round(enc, plan, drop={UNMASK: set(nodes[:4])})
    assert len(res.contributors) == 10
    assert_exact(res, enc, plan)
    # after 5 leave, a dropped client's b has only 5 (its neighbours'), a survivor's 4 + its own
    with pytest.raises(
        SecAggAborted,
        match=r"unmask: 5 share\(s\) of client \d+'s self-mask seed came back, "
        r"threshold is 6",
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
    not_me = C.UnmaskRequest(st.setup.params.session, survivors=others, dropped=())
    with pytest.raises(SecAggError, match="not listed as a survivor"):
        C.unmask(st, not_me)
    everyone = tuple(sorted(enc))
    ok = C.UnmaskRequest(st.setup.params.session, survivors=everyone, dropped=())
    done, resp = C.unmask(st, ok)
    # one b-share per survivor, its own included; never a share of its own masking key
    assert sorted((s.target, s.kind) for s in resp.shares) == [(u, "b") for u in everyone]
    assert done.sk_mask == b"" and done.b_seed == b"" and done.own_b_y == b""
    with pytest.raises(SecAggError, match="out of order"):
        C.unmask(done, replace(ok, survivors=(), dropped=others))
    stale = C.UnmaskRequest(b"\x00" * 16, survivors=everyone, dropped=())
    with pytest.raises(SecAggError, match="stale or replayed"):
        C.unmask(st, stale)


def test_tampered_ciphertext_takes_both_parties_of_the_complaint_out_of_the_round() -> None:
    """The receiver cannot open the dealer's bundle and complains. The coordinator cannot tell
    which of the two lies, so both leave the round (their masks are removed through their
    neighbours' key shares) and neither is excluded on one complaint."""
    enc, plan = fleet(8, seed=5)
    nodes = sorted(enc)
    victim = nodes[2]
    receiver: list[int] = []

    def tamper(stage: str, node: int, payload: bytes) -> bytes:
        if stage == SHARE_KEYS and node == victim:
            raw = json.loads(payload)
            receiver.append(raw["items"][0]["dst"])
            ct = bytearray(bytes.fromhex(raw["items"][0]["ciphertext"]))
            ct[20] ^= 0xFF
            raw["items"][0]["ciphertext"] = ct.hex()
            return json.dumps(raw).encode()
        return payload

    sess = ServerSession(nodes, 1, plan, L + 1)
    res = run_round(enc, plan, transport=tamper, server=sess)
    assert res.excluded == ()
    assert set(res.contributors) == set(nodes) - {victim, receiver[0]}
    assert set(res.recovered) == {victim, receiver[0]}
    left = {d.node: d.reason for d in res.dropouts}
    assert "could not use its shares: authentication failed" in left[victim]
    assert f"complained about client {victim}" in left[receiver[0]]
    assert sess.complaints == {(receiver[0], victim)}
    assert_exact(res, enc, plan)


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


def test_a_client_returning_a_wrong_share_of_its_own_seed_is_excluded() -> None:
    """The b-share a client keeps is checked against the commitment it sent with its bundle."""
    enc, plan = fleet(10, seed=13)
    liar = sorted(enc)[6]

    def lie(stage: str, node: int, payload: bytes) -> bytes:
        if stage == UNMASK and node == liar:
            resp = from_bytes(UnmaskResponse, payload)
            (own,) = [s for s in resp.shares if s.target == liar]
            y = bytearray(own.y)
            y[-1] ^= 1
            shares = tuple(replace(s, y=bytes(y)) if s is own else s for s in resp.shares)
            return to_bytes(replace(resp, shares=shares))
        return payload

    res = run_round(enc, plan, transport=lie)
    (ex,) = res.excluded
    assert ex.node == liar and f"share of client {liar} that does not match" in ex.reason
    assert liar in res.contributors  # its seed is rebuilt from its 9 neighbours' shares
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


def test_complaint_ledger_excludes_at_the_limit_of_distinct_counterparts() -> None:
    from privacy.secagg.server import ComplaintLedger

    ledger = ComplaintLedger()  # limit 2: tolerates one hostile client
    h1, h2, h3, m, m2 = 1, 2, 3, 66, 77
    for rnd in (1, 2, 3):  # the same pair, round after round: nobody excluded
        assert ledger.record(rnd, [(m, h1)]) == []
    (ex,) = ledger.record(4, [(m, h2)])  # a second counterpart: the hostile one is out
    assert ex.node == m and "client 1 (round 1), client 2 (round 4)" in ex.reason
    assert ledger.record(5, [(h3, m)]) == []  # already past the limit: reported once

    mass = ComplaintLedger()  # complaining about many at once excludes the accuser alone
    assert [d.node for d in mass.record(1, [(m, h1), (m, h2), (m, h3)])] == [m]

    # The limit is the number of hostile clients tolerated plus one: two colluders accusing the
    # same client exclude it under limit 2, not under limit 3.
    assert [d.node for d in ComplaintLedger(2).record(1, [(m, h1), (m2, h1)])] == [h1]
    assert ComplaintLedger(3).record(1, [(m, h1), (m2, h1)]) == []
    with pytest.raises(ValueError, match="limit must be >= 2"):
        ComplaintLedger(1)
