from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol import keys
from protocol.adapter import (
    AdapterSpec,
    arrays_from_record,
    arrays_to_record,
    instruction_keys,
    trained_tensors,
)
from protocol.errors import ProtocolError, UpdateRejected
from protocol.messages import (
    ClientUpdate,
    EvalInstruction,
    EvalResult,
    LoraSpec,
    SampleDP,
    TrainInstruction,
    decode_eval_instruction,
    decode_eval_result,
    decode_train_instruction,
    decode_update,
    encode_eval_instruction,
    encode_eval_result,
    encode_train_instruction,
    encode_update,
)


def adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
        "layers.0.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
        "layers.1.v_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
    }


def roundtrip_record(content: RecordDict) -> RecordDict:
    """What the wire does: every record is deflated to bytes and inflated again."""
    out = RecordDict()
    for name, rec in content.items():
        cls = type(rec)
        if isinstance(rec, ArrayRecord):
            arrays = {
                k: Array(dtype=v.dtype, shape=v.shape, stype=v.stype, data=bytes(v.data))
                for k, v in rec.items()
            }
            out[name] = ArrayRecord(arrays)
        else:
            out[name] = cls(dict(rec))
    return out


# ------------------------------------------------------------------------------ round trips


def test_train_instruction_roundtrip_keeps_every_field_and_tensor() -> None:
    instr = TrainInstruction(
        round=3,
        lora=LoraSpec(
            rank=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "o_proj")
        ),
        local_steps=7,
        batch_size=2,
        seq_len=64,
        learning_rate=3e-4,
        max_grad_norm=0.5,
        seed=11,
        trainable_keys=("layers.0.q_proj.lora_B.weight",),
    )
    a = adapter()
    got_instr, got_adapter = decode_train_instruction(
        roundtrip_record(encode_train_instruction(instr, a))
    )
    assert got_instr == instr
    assert list(got_adapter) == list(a)
    for k in a:
        np.testing.assert_array_equal(got_adapter[k], a[k])


def test_empty_trainable_keys_roundtrip() -> None:
    instr = TrainInstruction(round=1, lora=LoraSpec())
    got, _ = decode_train_instruction(encode_train_instruction(instr, adapter()))
    assert got.trainable_keys == ()


def test_eval_roundtrip() -> None:
    instr = EvalInstruction(round=0, lora=LoraSpec(rank=2), batch_size=3, seq_len=32)
    got, a = decode_eval_instruction(roundtrip_record(encode_eval_instruction(instr, adapter())))
    assert got == instr and set(a) == set(adapter())
    res = EvalResult(loss=2.5, num_tokens=120, num_examples=7, metrics={"eval-seconds": 0.25})
    back = decode_eval_result(roundtrip_record(encode_eval_result(res, rnd=0)), rnd=0)
    assert back.loss == 2.5 and back.num_tokens == 120 and back.num_examples == 7
    assert back.metrics == {"eval-seconds": 0.25}


def test_update_roundtrip_is_exact() -> None:
    delta = adapter(1)
    up = ClientUpdate(
        delta=delta, num_examples=42, metrics={"train-loss": 1.25, "train-seconds": 3.0}
    )
    spec = AdapterSpec.of(delta)
    back = decode_update(roundtrip_record(encode_update(up, rnd=3)), spec, rnd=3)
    assert back.num_examples == 42
    assert back.metrics == {"train-loss": 1.25, "train-seconds": 3.0}
    for k in delta:
        assert back.delta[k].dtype == np.float32
        np.testing.assert_array_equal(back.delta[k], delta[k])


def test_adapter_record_preserves_order() -> None:
    a = adapter()
    assert list(arrays_from_record(arrays_to_record(a), what="x")) == list(a)


def test_ffa_lora_trains_only_the_b_matrices() -> None:
    spec = AdapterSpec.of(
        {
            "l.0.q_proj.lora_A.weight": np.zeros((2, 6), np.float32),
            "l.0.q_proj.lora_B.weight": np.zeros((6, 2), np.float32),
            "l.0.v_proj.lora_A.weight": np.zeros((2, 6), np.float32),
            "l.0.v_proj.lora_B.weight": np.zeros((4, 2), np.float32),
        }
    )
    assert trained_tensors(spec, False) == spec
    ffa = trained_tensors(spec, True)
    assert ffa.names == ("l.0.q_proj.lora_B.weight", "l.0.v_proj.lora_B.weight")
    assert ffa.numel == 6 * 2 + 4 * 2
    # The instruction names the trained tensors only when they are not all of them.
    assert instruction_keys(spec, spec.names) == ()
    assert instruction_keys(spec, reversed(spec.names)) == ()
    assert instruction_keys(ffa, spec.names) == ffa.names


# ------------------------------------------------------------------------------ rejections


def good_update() -> tuple[RecordDict, AdapterSpec]:
    delta = adapter(2)
    return encode_update(
        ClientUpdate(delta=delta, num_examples=5, metrics={"train-loss": 1.0}), rnd=1
    ), AdapterSpec.of(delta)


def _replace_tensor(content: RecordDict, name: str, value: np.ndarray) -> RecordDict:
    arrays = arrays_from_record(content[keys.UPDATE], what="t")
    arrays[name] = value
    content[keys.UPDATE] = arrays_to_record(arrays)
    return content


NAME = "layers.0.q_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c: c.pop(keys.UPDATE), "record 'update' is missing"),
        (lambda c: c.pop(keys.METRICS), "record 'metrics' is missing"),
        (lambda c: c.pop(keys.REPLY_META), "record 'reply-meta' is missing"),
        (
            lambda c: c.__setitem__(keys.REPLY_META, ConfigRecord({keys.SCHEMA: 99})),
            "schema version 99",
        ),
        (
            lambda c: c.__setitem__(keys.METRICS, MetricRecord({keys.NUM_EXAMPLES: 0})),
            "num-examples must be a positive int",
        ),
        (
            lambda c: c.__setitem__(keys.METRICS, MetricRecord({keys.NUM_EXAMPLES: 2.5})),
            "num-examples must be a positive int",
        ),
        (
            lambda c: c.__setitem__(
                keys.METRICS, MetricRecord({keys.NUM_EXAMPLES: 3, "train-loss": float("nan")})
            ),
            "metric 'train-loss' must be a finite number",
        ),
        (
            lambda c: _replace_tensor(c, NAME, np.zeros((4, 16), np.float32)),
            "has shape (4, 16), expected (16, 4)",
        ),
        (
            lambda c: _replace_tensor(c, NAME, np.zeros((16, 4), np.float64)),
            "has dtype float64, expected float32",
        ),
        (
            lambda c: _replace_tensor(c, NAME, np.full((16, 4), np.nan, np.float32)),
            "NaN or infinite",
        ),
        (
            lambda c: _replace_tensor(c, NAME, np.full((16, 4), np.inf, np.float32)),
            "NaN or infinite",
        ),
        (
            lambda c: _replace_tensor(c, "extra.weight", np.zeros(3, np.float32)),
            "unexpected tensor(s), e.g. 'extra.weight'",
        ),
    ],
)
def test_bad_updates_are_rejected_with_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    content, spec = good_update()
    mutate(content)
    with pytest.raises(UpdateRejected) as err:
        decode_update(content, spec, rnd=1)
    assert reason in err.value.reason


def test_missing_tensor_is_rejected() -> None:
    content, spec = good_update()
    arrays = arrays_from_record(content[keys.UPDATE], what="t")
    del arrays[NAME]
    content[keys.UPDATE] = arrays_to_record(arrays)
    with pytest.raises(UpdateRejected, match="missing 1 tensor"):
        decode_update(content, spec, rnd=1)


def test_pickled_payload_is_refused() -> None:
    content, spec = good_update()
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    rec = content[keys.UPDATE]
    # declared as the expected float32 (16, 4), so the check before decoding lets it through
    rec[NAME] = Array(dtype="float32", shape=(16, 4), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(UpdateRejected, match="cannot be decoded"):
        decode_update(content, spec, rnd=1)


def test_train_message_errors_name_the_field() -> None:
    content = encode_train_instruction(TrainInstruction(round=1, lora=LoraSpec()), adapter())
    cfg = content[keys.TRAIN_CONFIG]
    del cfg["local-steps"]
    with pytest.raises(ProtocolError, match="local-steps: missing"):
        decode_train_instruction(content)

    content = encode_train_instruction(TrainInstruction(round=1, lora=LoraSpec()), adapter())
    content[keys.TRAIN_CONFIG]["batch-size"] = "four"
    with pytest.raises(ProtocolError, match="batch-size: expected an int"):
        decode_train_instruction(content)

    content = encode_train_instruction(TrainInstruction(round=1, lora=LoraSpec()), adapter())
    content[keys.TRAIN_CONFIG]["lora-rank"] = 0
    with pytest.raises(ProtocolError, match=r"lora\.rank: must be >= 1"):
        decode_train_instruction(content)

    content = encode_train_instruction(TrainInstruction(round=1, lora=LoraSpec()), adapter())
    content[keys.TRAIN_CONFIG][keys.SCHEMA] = 0
    with pytest.raises(ProtocolError, match="schema version 0 is not supported"):
        decode_train_instruction(content)

    content = encode_train_instruction(TrainInstruction(round=1, lora=LoraSpec()), adapter())
    content[keys.TRAIN_CONFIG]["trainable-keys"] = ["nope"]
    with pytest.raises(ProtocolError, match="trainable-keys names tensors not in the adapter"):
        decode_train_instruction(content)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"round": 0}, "round: must be >= 1"),
        ({"local_steps": 0}, "local_steps: must be >= 1"),
        ({"seq_len": 4}, "seq_len: must be >= 8"),
        ({"learning_rate": float("nan")}, "learning_rate: must be a positive number"),
        ({"logit_adjustment": -0.5}, "logit_adjustment: must be >= 0"),
        (
            {"logit_adjustment": 1.0, "sample_dp": SampleDP(noise_multiplier=1.0)},
            "logit_adjustment: the prior is counted over all local rows",
        ),
    ],
)
def test_train_instruction_validates(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    base = {"round": 1, "lora": LoraSpec()}
    with pytest.raises(ProtocolError, match=message):
        TrainInstruction(**{**base, **kwargs})


def test_eval_result_rejections() -> None:
    content = encode_eval_result(EvalResult(loss=1.0, num_tokens=3, num_examples=1), rnd=1)
    content[keys.METRICS] = MetricRecord(
        {keys.LOSS: float("inf"), keys.NUM_TOKENS: 3, keys.NUM_EXAMPLES: 1}
    )
    with pytest.raises(UpdateRejected, match="loss must be a finite number"):
        decode_eval_result(content, rnd=1)
    content[keys.METRICS] = MetricRecord(
        {keys.LOSS: 1.0, keys.NUM_TOKENS: -1, keys.NUM_EXAMPLES: 1}
    )
    with pytest.raises(UpdateRejected, match="num-tokens must be an int >= 0"):
        decode_eval_result(content, rnd=1)
