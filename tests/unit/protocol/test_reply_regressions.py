"""Regression tests for the protocol cases of issue 12: exact types, the round bound into every
reply, duplicate keys. The behaviour each pins was wrong before the fix (checked on that code:
``schema-version`` True and 1.0 accepted by decode_update and decode_eval_result at version 1,
replies carrying no round, a duplicated SecAgg key keeping its last copy); the tests use the new
``rnd=`` API, so on that code they fail at the call already."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from privacy.secagg.messages import Advertise, MaskedHeader, SecAggError, from_bytes, to_bytes
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.errors import UpdateRejected
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_result,
    decode_update,
    encode_eval_result,
    encode_update,
)

DELTA = {"l.lora_A": np.ones((2, 3), np.float32), "l.lora_B": np.zeros((3, 2), np.float32)}
SPEC = AdapterSpec.of(DELTA)


def update_reply(rnd: int = 4) -> object:
    return encode_update(ClientUpdate(DELTA, 7, {"train-loss": 1.0}), rnd=rnd)


@pytest.mark.parametrize("version", [True, 1.0, "1"], ids=repr)
def test_schema_version_must_be_an_int_not_a_bool_or_float(
    version: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``True == 1`` and ``1.0 == 1``: the version check used ``!=`` and let both through for
    version 1 (the version this bug was found at; pinned here so the test keeps its meaning)."""
    monkeypatch.setattr(keys, "SCHEMA_VERSION", 1)
    for content, decode in (
        (update_reply(), lambda c: decode_update(c, SPEC, rnd=4)),
        (encode_eval_result(EvalResult(1.0, 3, 1), rnd=4), lambda c: decode_eval_result(c, rnd=4)),
    ):
        assert content[keys.REPLY_META][keys.SCHEMA] == 1
        decode(content)  # the honest reply passes
        content[keys.REPLY_META] = ConfigRecord({keys.SCHEMA: version, keys.ROUND: 4})
        with pytest.raises(UpdateRejected, match="schema version"):
            decode(content)


def test_a_reply_for_another_round_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="reply is for round 3, this is round 4"):
        decode_update(update_reply(rnd=3), SPEC, rnd=4)
    with pytest.raises(UpdateRejected, match="reply is for round 5, this is round 4"):
        decode_eval_result(encode_eval_result(EvalResult(1.0, 3, 1), rnd=5), rnd=4)
    assert decode_update(update_reply(rnd=4), SPEC, rnd=4).num_examples == 7


@pytest.mark.parametrize("bad", [True, 4.0, "4", None])
def test_the_round_of_a_reply_must_be_an_int(bad: object) -> None:
    content = update_reply()
    meta = dict(content[keys.REPLY_META])
    if bad is None:
        del meta[keys.ROUND]
    else:
        meta[keys.ROUND] = bad
    content[keys.REPLY_META] = ConfigRecord(meta)
    with pytest.raises(UpdateRejected, match="round must be an int"):
        decode_update(content, SPEC, rnd=4)


def test_a_duplicated_key_in_a_secagg_payload_is_rejected() -> None:
    """json.loads keeps the last copy of a duplicated key: a reply could show one value to a
    check and another to the code that uses it."""
    honest = to_bytes(MaskedHeader(5, b"\x01" * 16, 2))
    assert from_bytes(MaskedHeader, honest).node == 5
    for dup in (b'{"node":5,' + honest[1:], b'{"node":6,' + honest[1:]):
        with pytest.raises(SecAggError, match="duplicate key 'node'"):
            from_bytes(MaskedHeader, dup)
    nested = honest.replace(b'"complaints":[]', b'"complaints":[{"node":1,"node":2,"reason":"x"}]')
    with pytest.raises(SecAggError, match="duplicate key 'node'"):
        from_bytes(MaskedHeader, nested)


def test_secagg_replies_carry_the_round_and_types_are_exact() -> None:
    adv = Advertise(3, b"\x02" * 16, 7, b"\x03" * 32, b"\x04" * 32, b"\x05" * 32)
    raw = to_bytes(adv)
    assert b'"round":7' in raw and from_bytes(Advertise, raw) == adv
    for bad in (b'"round":true', b'"round":7.0', b'"round":"7"'):
        with pytest.raises(SecAggError, match="round: expected an int"):
            from_bytes(Advertise, raw.replace(b'"round":7', bad))
