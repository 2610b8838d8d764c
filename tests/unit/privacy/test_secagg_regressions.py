"""Regression tests for the secure-aggregation cases of issue 12, each against the coordinator's
state machine (privacy/secagg/server.py) or an honest client's steps (privacy/secagg/client.py),
with the real encoded messages; the round-level versions over a Grid are in
tests/unit/coordinator/test_secagg_round.py. Run against the code before the fix, every test here
fails (RecursionError, ValueError from X25519, the accused excluded, ShamirError, ...) except
``test_any_decoder_failure_is_a_rejection_of_its_sender`` and
``test_an_honest_client_complains_about_undecryptable_shares_and_refuses_bad_requests``, which
pin behaviour that was already right, and the size-consistency check at the end."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from privacy.secagg import client as C
from privacy.secagg import shamir
from privacy.secagg.encoding import EncodingPlan, plan_encoding, quantize
from privacy.secagg.local import plaintext_ring_sum, run_round
from privacy.secagg.messages import (
    Advertise,
    KeyDirectory,
    MaskedHeader,
    SecAggError,
    Setup,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    from_bytes,
    to_bytes,
)
from privacy.secagg.primitives import secure_rng
from privacy.secagg.server import ADVERTISE, MASKED_INPUT, STAGES, UNMASK, ServerSession

L = 33
NESTED = {
    "5,000 nested [": b"[" * 5000,
    '3,000 nested {"a":': b'{"a":' * 3000,
}
# All-zero is the issue's key; the others are the rest of X25519's low-order points and encodings
# that name them or no curve point at all.
P25519 = (1 << 255) - 19
BAD_KEYS = {
    "all-zero": bytes(32),
    "u = 1": (1).to_bytes(32, "little"),
    "order 8": bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    "u = p (non-canonical zero)": P25519.to_bytes(32, "little"),
    "u = p + 1 (non-canonical one)": (P25519 + 1).to_bytes(32, "little"),
    "u = p - 1 (on the twist)": (P25519 - 1).to_bytes(32, "little"),
}


def fleet(n: int, seed: int = 0) -> tuple[dict[int, np.ndarray], EncodingPlan]:
    plan = plan_encoding(n, clip=0.1, weight_cap=1000)
    rng = np.random.default_rng(seed)
    nodes = sorted({int(x) + 2**63 for x in rng.integers(0, 2**62, size=n)})
    enc = {
        u: quantize(rng.normal(0, 0.03, L - 1), int(rng.integers(1, 2000)), plan, secure_rng())
        for u in nodes
    }
    return enc, plan


def assert_exact(result, enc, plan) -> None:  # type: ignore[no-untyped-def]
    want = plaintext_ring_sum(enc, result.contributors, plan.ring_bits)
    np.testing.assert_array_equal(result.ring_sum.astype(np.uint64), want)


def at(stage: str, node: int, fn: Callable[[bytes], bytes]) -> Callable[[str, int, bytes], bytes]:
    """A transport that rewrites ``node``'s reply at ``stage`` with ``fn``."""

    def transport(s: str, u: int, payload: bytes) -> bytes:
        return fn(payload) if (s, u) == (stage, node) else payload

    return transport


# -- "A client crashes the coordinator": 5,000 nested [ or 3,000 nested {"a": --------------------


@pytest.mark.parametrize("payload", NESTED.values(), ids=NESTED.keys())
@pytest.mark.parametrize(
    "cls",
    [Setup, Advertise, KeyDirectory, ShareBundle, ShareDelivery, MaskedHeader, UnmaskRequest,
     UnmaskResponse],
)  # fmt: skip
def test_deep_nesting_is_refused_before_parsing(cls: type, payload: bytes) -> None:
    with pytest.raises(SecAggError, match=f"{cls.__name__}: nested .* levels deep"):
        from_bytes(cls, payload)


@pytest.mark.parametrize("payload", NESTED.values(), ids=NESTED.keys())
@pytest.mark.parametrize("stage", STAGES)
def test_deeply_nested_reply_at_any_stage_is_a_rejection_of_its_sender(
    stage: str, payload: bytes
) -> None:
    enc, plan = fleet(6, seed=1)
    bad = sorted(enc)[2]
    res = run_round(enc, plan, transport=at(stage, bad, lambda _p: payload))
    assert_exact(res, enc, plan)
    if stage == UNMASK:  # its input is in; its shares are not used
        (ex,) = res.excluded
        assert ex.node == bad and "nested" in ex.reason and bad in res.contributors
    else:
        (d,) = res.dropouts
        assert (d.node, d.stage) == (bad, stage) and "nested" in d.reason
        assert bad not in res.contributors


def test_any_decoder_failure_is_a_rejection_of_its_sender() -> None:
    """Other hostile texts the decoder used to pass on or choke on."""
    for text in [
        b'{"node": NaN}',
        b"1e999",
        b'{"node": ' + b"9" * 5000 + b"}",  # past Python's int digit limit
        "\u00e9".encode(),
        b"\xff\xfe",
    ]:
        with pytest.raises(SecAggError):
            from_bytes(Advertise, text)


# -- "An all-zero X25519 public key makes every honest client fail" ------------------------------


@pytest.mark.parametrize("which", ["pk_enc", "pk_mask"])
@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_public_key_excludes_its_sender_and_the_round_goes_on(which: str, key: bytes) -> None:
    enc, plan = fleet(6, seed=2)
    bad = sorted(enc)[1]

    def swap(payload: bytes) -> bytes:
        raw = json.loads(payload)
        raw[which] = key.hex()
        return json.dumps(raw).encode()

    res = run_round(enc, plan, transport=at(ADVERTISE, bad, swap))
    assert set(res.contributors) == set(enc) - {bad}
    (ex,) = res.excluded
    assert ex.node == bad and ex.stage == ADVERTISE and which.replace("_", "-") in ex.reason
    assert_exact(res, enc, plan)


def test_a_key_from_an_earlier_round_excludes_its_sender() -> None:
    enc, plan = fleet(6, seed=3)
    nodes = sorted(enc)
    first = ServerSession(nodes, 1, plan, L)
    res1 = run_round(enc, plan, server=first)
    assert res1.excluded == ()
    honest = first.view.public_keys[nodes[0]]
    replayer = nodes[4]

    def replay(payload: bytes) -> bytes:
        raw = json.loads(payload)
        raw["pk_mask"] = honest.pk_mask.hex()  # an honest client's key of round 1
        return json.dumps(raw).encode()

    second = ServerSession(nodes, 2, plan, L, known_keys=first.advertised_keys())
    res2 = run_round(enc, plan, rnd=2, server=second, transport=at(ADVERTISE, replayer, replay))
    (ex,) = res2.excluded
    assert ex.node == replayer and "earlier round" in ex.reason
    assert set(res2.contributors) == set(nodes) - {replayer}
    assert_exact(res2, enc, plan)


def test_an_honest_client_refuses_a_directory_with_a_bad_key_instead_of_crashing() -> None:
    enc, plan = fleet(4, seed=4)
    nodes = sorted(enc)
    sess = ServerSession(nodes, 1, plan, L)
    states, advs = {}, {}
    for u, s in sess.setup_messages().items():
        states[u], advs[u] = C.advertise(s)
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    victim, liar = nodes[0], dirs[nodes[0]].entries[0].node
    for key in BAD_KEYS.values():
        entries = tuple(
            replace(e, pk_mask=key) if e.node == liar else e for e in dirs[victim].entries
        )
        with pytest.raises(SecAggError, match=f"neighbour {liar}: public key"):
            C.share_keys(states[victim], replace(dirs[victim], entries=entries))


# -- "A false complaint gets an honest client excluded for the rest of the run" -----------------


def test_a_false_complaint_excludes_nobody_and_costs_the_accuser_its_round() -> None:
    enc, plan = fleet(8, seed=5)
    nodes = sorted(enc)
    liar = nodes[3]
    accused: list[int] = []

    def complain(payload: bytes) -> bytes:
        raw = json.loads(payload)
        target = next(n for n in nodes if n != liar)
        accused.append(target)
        raw["complaints"] = [{"node": target, "reason": "cannot open its shares"}]
        return json.dumps(raw).encode()

    sess = ServerSession(nodes, 1, plan, L)
    res = run_round(enc, plan, server=sess, transport=at(MASKED_INPUT, liar, complain))
    assert res.excluded == ()  # the accused is not excluded
    assert set(res.contributors) == set(nodes) - {liar, accused[0]}  # both leave the round
    assert set(res.recovered) == {liar, accused[0]}
    assert sess.complaints == {(liar, accused[0])}
    assert_exact(res, enc, plan)


# -- "Honest clients crashed on tampered inputs" -------------------------------------------------


def _round_to_delivery(n: int, seed: int):  # type: ignore[no-untyped-def]
    enc, plan = fleet(n, seed=seed)
    nodes = sorted(enc)
    sess = ServerSession(nodes, 1, plan, L)
    states, advs = {}, {}
    for u, s in sess.setup_messages().items():
        states[u], advs[u] = C.advertise(s)
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    bundles = {}
    for u, d in dirs.items():
        states[u], bundles[u] = C.share_keys(states[u], d)
    dels = sess.receive_shares({u: to_bytes(b) for u, b in bundles.items()})
    return enc, plan, sess, states, dels


def test_an_honest_client_complains_about_undecryptable_shares_and_refuses_bad_requests() -> None:
    enc, _plan, sess, states, dels = _round_to_delivery(5, seed=6)
    victim = sorted(enc)[0]
    d = dels[victim]
    item = d.items[0]
    for flip in (0, 20, len(item.ciphertext) - 1):  # nonce, body, tag
        bad = bytearray(item.ciphertext)
        bad[flip] ^= 0x40
        tampered = replace(d, items=(replace(item, ciphertext=bytes(bad)), *d.items[1:]))
        _st, header, _y = C.masked_input(states[victim], tampered, enc[victim])
        (c,) = header.complaints
        assert c.node == item.src and "authentication failed" in c.reason
    st, header, _y = C.masked_input(states[victim], d, enc[victim])
    assert header.complaints == ()
    session = sess.params.session
    for req, reason in [
        (UnmaskRequest(session, survivors=(victim, 5), dropped=()), "not a masking partner"),
        (UnmaskRequest(session, survivors=(), dropped=(victim,)), "listed as dropped"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            C.unmask(st, req)


# -- found while fuzzing: a share outside the field crashed the unmask stage --------------------


def test_an_own_share_outside_the_field_is_a_rejection_not_a_crash() -> None:
    """A client may commit to any value for the b-share it keeps; revealing a value >= p used
    to raise ShamirError out of receive_unmask."""
    enc, plan = fleet(5, seed=7)
    nodes = sorted(enc)
    bad = nodes[2]
    y_bad = shamir.share_to_bytes(shamir.PRIME + 5)
    sess = ServerSession(nodes, 1, plan, L)
    states, advs = {}, {}
    for u, s in sess.setup_messages().items():
        states[u], advs[u] = C.advertise(s)
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    bundles = {}
    for u, d in dirs.items():
        states[u], bundles[u] = C.share_keys(states[u], d)
    st = states[bad]
    states[bad] = replace(st, own_b_y=y_bad)
    bundles[bad] = replace(
        bundles[bad],
        own_b_hash=C.share_hash("b", sess.params.session, bad, bad, y_bad, st.own_b_salt),
    )
    dels = sess.receive_shares({u: to_bytes(b) for u, b in bundles.items()})
    masked = {}
    for u, dl in dels.items():
        states[u], h, y = C.masked_input(states[u], dl, enc[u])
        masked[u] = (to_bytes(h), y)
    reqs = sess.receive_masked(masked)
    replies = {}
    for u, r in reqs.items():
        states[u], resp = C.unmask(states[u], r)
        replies[u] = to_bytes(resp)
    res = sess.receive_unmask(replies)
    (ex,) = res.excluded
    assert ex.node == bad and "outside the field" in ex.reason
    assert_exact(res, enc, plan)  # its seed came back from its neighbours' shares


def test_the_fixed_ciphertext_size_matches_what_clients_seal() -> None:
    from privacy.secagg import primitives as P
    from privacy.secagg.messages import CIPHERTEXT_BYTES, NONCE_BYTES, SEALED_PLAIN_BYTES

    assert C._PLAIN.size == SEALED_PLAIN_BYTES and P.NONCE_BYTES == NONCE_BYTES
    sealed = P.seal(b"k" * 32, b"p" * SEALED_PLAIN_BYTES, b"aad")
    assert len(sealed) == CIPHERTEXT_BYTES
