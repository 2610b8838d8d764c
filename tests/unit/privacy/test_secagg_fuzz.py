"""Hypothesis fuzzing of SecAgg+ message decoding, the coordinator's state machine and honest
clients' handling of tampered messages (issue 12, item 6). Bounded: every test sets max_examples,
and deadline=None (the shared machine's speed is not what is tested). benchmarks/fuzz.py runs the
same generators at scale and prints the figures."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    json_depth,
)
from privacy.secagg.server import STAGES, ComplaintLedger
from protocol import keys
from tests import wire_fuzz as W

CLASSES = [Setup, Advertise, KeyDirectory, ShareBundle, ShareDelivery, MaskedHeader,
           UnmaskRequest, UnmaskResponse]  # fmt: skip
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUNDS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet='[]{}"\\:,ab0 \u00e9', max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet='ab"\\[{', max_size=4), children, max_size=4)
    ),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def decode_or_refuse(cls: type, data: bytes, **kw: Any) -> object | None:
    """The decoder's contract: an instance of ``cls`` or SecAggError, nothing else."""
    try:
        msg = from_bytes(cls, data, **kw)
    except SecAggError:
        return None
    assert isinstance(msg, cls)
    return msg


@FAST
@given(st.binary(max_size=3000), st.sampled_from(CLASSES))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes, cls: type) -> None:
    decode_or_refuse(cls, data)


@FAST
@given(json_values, st.sampled_from(CLASSES))
def test_arbitrary_json_decodes_or_is_refused(value: Any, cls: type) -> None:
    decode_or_refuse(cls, json.dumps(value).encode())
    decode_or_refuse(cls, json.dumps(value, ensure_ascii=False).encode())


@FAST
@given(json_values)
def test_json_depth_is_exact_for_valid_json(value: Any) -> None:
    assert json_depth(json.dumps(value).encode()) == depth(value)


@FAST
@given(st.integers(1, 30000), st.sampled_from(["[", '{"a":']), st.sampled_from(CLASSES))
def test_any_nesting_deeper_than_the_type_is_refused(n: int, opener: str, cls: type) -> None:
    data = (opener * n).encode()
    msg = decode_or_refuse(cls, data)
    assert msg is None


@pytest.fixture(scope="module")
def honest_messages() -> dict[type, bytes]:
    """One honest message of each type, from a real round."""
    return W.honest_messages(*W.fleet(4, 9, seed=1))


@FAST
@given(st.sampled_from(CLASSES), st.randoms(use_true_random=False))
def test_structurally_damaged_honest_messages_are_all_refused(
    honest_messages: dict[type, bytes], cls: type, rnd: random.Random
) -> None:
    honest = honest_messages[cls]
    assert decode_or_refuse(cls, honest) is not None
    limit = 2 * len(honest) + 64
    t = W.structural(honest, rnd, limit)
    assert t.invalid
    assert decode_or_refuse(cls, t.payload, max_bytes=limit) is None, t.kind


@ROUNDS
@given(st.sampled_from(STAGES), st.integers(0, 4), st.randoms(use_true_random=False))
def test_a_hostile_client_never_crashes_the_round_nor_corrupts_the_sum(
    stage: str, who: int, rnd: random.Random
) -> None:
    enc, plan = W.fleet(5, 9, seed=2)
    hostile = sorted(enc)[who]
    out = W.hostile_round(enc, plan, 3, hostile, stage, rnd, ledger=ComplaintLedger())
    if out.completed:
        assert out.sum_exact, out.kind
    if out.invalid:  # refused: dropped, excluded or named as the culprit of an abort
        assert out.hostile_rejected, out.kind
    assert out.honest_harmed == 0, out.kind  # honest clients leave only by the dispute rule
    assert all(d.node == hostile for d in out.excluded), (out.kind, out.excluded)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_a_hostile_client_over_a_run_never_gets_an_honest_one_excluded(rnd: random.Random) -> None:
    """Four rounds with one hostile client tampering at a random stage each round; the dispute
    ledger and the keys seen so far carry over, as in SecureAggregation."""
    enc, plan = W.fleet(5, 9, seed=3)
    hostile = sorted(enc)[rnd.randrange(5)]
    ledger, known, excluded = ComplaintLedger(), set(), set()
    for r in range(1, 5):
        if hostile in excluded:
            break
        out = W.hostile_round(enc, plan, r, hostile, rnd.choice(STAGES), rnd, ledger=ledger,
                              known_keys=known, excluded=excluded)  # fmt: skip
        known |= out.advertised
        excluded |= {d.node for d in out.excluded}
        if out.completed:
            assert out.sum_exact
    assert excluded <= {hostile}


@FAST
@given(st.sampled_from(W.DOWN_KINDS), st.randoms(use_true_random=False))
def test_an_honest_client_refuses_or_complains_about_any_tampered_message(
    kind: type, rnd: random.Random
) -> None:
    enc, plan = W.fleet(4, 9, seed=4)
    out = W.honest_client_case(enc, plan, kind, rnd)  # raises HonestClientCrash otherwise
    if out.invalid:
        assert out.refused or out.complained, out.kind


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(keys.SECAGG_ACTIONS), st.binary(max_size=400) | st.just(b"[" * 5000))
def test_the_client_app_answers_a_garbled_stage_message_with_an_error_reply(
    action: str, payload: bytes
) -> None:
    """client/secagg.py: whatever arrives, the handler answers (an error reply naming the
    problem) instead of raising."""
    from tests.fakegrid import FakeGrid
    from tests.secagg_fleet import Fleet

    FakeGrid({})  # sets the task identity Message() needs
    fleet = Fleet([7], {7: 1})
    msg = Message(
        RecordDict({keys.SECAGG: ConfigRecord({keys.SECAGG_PAYLOAD: payload})}),
        dst_node_id=7,
        message_type=f"train.{action}",
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    context: Context = fleet.contexts[7]
    reply = fleet.app(msg, context)
    assert reply.has_error() and "rejected" in reply.error.reason
