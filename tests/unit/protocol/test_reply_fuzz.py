"""Hypothesis fuzzing of the coordinator's reply decoders, ``decode_update`` and
``decode_eval_result`` (issue 12, item 6): whatever a client sends, the decoder returns a value
that satisfies the contract or raises ``UpdateRejected``, nothing else. Bounded: max_examples set,
deadline=None."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.errors import UpdateRejected
from protocol.messages import decode_eval_result, decode_update
from tests import wire_fuzz as W

ADAPTER = {"m.lora_A": np.zeros((2, 5), np.float32), "m.lora_B": np.zeros((5, 2), np.float32)}
SPEC = AdapterSpec.of(ADAPTER)
RND = 6
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = (
    st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.integers(-5, 5), max_size=3)
    | st.lists(st.floats(allow_nan=True), max_size=3)
)
config_values = numbers | st.booleans() | st.text(max_size=5) | st.binary(max_size=5)
names = st.sampled_from(
    [keys.SCHEMA, keys.ROUND, keys.NUM_EXAMPLES, keys.NUM_TOKENS, keys.LOSS, "train-loss", "x"]
)


@st.composite
def arrays(draw: st.DrawFn) -> Array:
    """An Array that may lie in its metadata, carry any dtype/shape, or hold arbitrary bytes."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        shape = draw(st.sampled_from([(2, 5), (5, 2), (10,), (0,), (1, 2, 5)]))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int8, np.float16]))
        fill = draw(st.floats(allow_nan=True, allow_infinity=True, width=16))
        return Array(np.full(shape, fill).astype(dtype))
    data = draw(st.binary(max_size=300))
    return Array(
        dtype=draw(st.sampled_from(["float32", "<f4", "object", "x"])),
        shape=draw(st.sampled_from([(2, 5), (5, 2), (2**40,)])),
        stype=draw(st.sampled_from(["numpy.ndarray", "", "torch.Tensor"])),
        data=data,
    )


@st.composite
def records(draw: st.DrawFn) -> RecordDict:
    """A RecordDict with any mix of the records a reply may hold, with fuzzed contents."""
    out = RecordDict()
    for name in draw(st.sets(st.sampled_from([keys.REPLY_META, keys.METRICS, keys.UPDATE, "x"]))):
        kind = draw(st.sampled_from(["config", "metric", "array"]))
        if kind == "config":
            items = draw(st.dictionaries(names, config_values, max_size=4))
            out[name] = ConfigRecord(items)
        elif kind == "metric":
            items = draw(st.dictionaries(names, numbers, max_size=4))
            out[name] = MetricRecord(items)
        else:
            keys_ = draw(st.sets(st.sampled_from([*ADAPTER, "zz"]), max_size=3))
            out[name] = ArrayRecord({k: draw(arrays()) for k in keys_})
    return out


def check_update(content: RecordDict) -> None:
    try:
        up = decode_update(content, SPEC, rnd=RND)
    except UpdateRejected:
        return
    # Accepted: then it is a well-formed update for this round.
    meta = content[keys.REPLY_META]
    assert type(meta[keys.SCHEMA]) is int and meta[keys.SCHEMA] == keys.SCHEMA_VERSION
    assert type(meta[keys.ROUND]) is int and meta[keys.ROUND] == RND
    assert type(up.num_examples) is int and up.num_examples > 0
    SPEC.check(up.delta, what="accepted")
    assert all(math.isfinite(v) for v in up.metrics.values())


def check_eval(content: RecordDict) -> None:
    try:
        res = decode_eval_result(content, rnd=RND)
    except UpdateRejected:
        return
    assert content[keys.REPLY_META][keys.ROUND] == RND
    assert type(res.num_tokens) is int and res.num_tokens >= 0
    assert res.num_tokens == 0 or (math.isfinite(res.loss) and res.loss >= 0)


@FUZZ
@given(records())
def test_any_record_dict_is_a_valid_update_or_rejected(content: RecordDict) -> None:
    check_update(content)
    check_eval(content)


@FUZZ
@given(st.randoms(use_true_random=False), st.booleans())
def test_every_damaged_honest_reply_is_rejected(rnd: random.Random, evaluation: bool) -> None:
    content = W.honest_eval(RND) if evaluation else W.honest_update(RND, ADAPTER, 0)
    t = W.tamper_plain_reply(content, RND, rnd)
    assert t.invalid
    decode: Any = (
        (lambda c: decode_eval_result(c, rnd=RND))
        if evaluation
        else (lambda c: decode_update(c, SPEC, rnd=RND))
    )
    decode(content)  # the honest reply passes
    try:
        decode(t.payload)
    except UpdateRejected:
        return
    raise AssertionError(f"accepted: {t.kind}")
