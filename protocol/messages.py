"""What a round sends and what a client returns, as frozen dataclasses with pure encode/decode.

A train round sends ``TrainInstruction`` + the global adapter; the client replies with a
``ClientUpdate`` (the adapter *delta* for the tensors it trained, its example count and metrics).
An evaluation round sends ``EvalInstruction`` + the global adapter; the client replies with an
``EvalResult``. Decoding validates everything and raises ``ProtocolError``/``UpdateRejected`` with
a message naming the field.

Types are exact: an int field refuses ``True`` and ``1.0`` (``schema-version`` included, which
``!=`` used to let through). Every reply carries, in its ``reply-meta`` record, the schema version
and the round it answers; the coordinator's decoders take the round they expect (``rnd=``) and
refuse a reply for any other, so a late or replayed reply from an earlier round is not aggregated.
Flower's records are dictionaries by the time they reach this module (its deserialiser keeps the
last of duplicated keys), so duplicate keys are refused where this project parses text itself: the
SecAgg JSON payloads (privacy/secagg/messages.py).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol import keys
from protocol.adapter import (
    MAX_HEADER_BYTES,
    AdapterSpec,
    Arrays,
    TensorSpec,
    arrays_from_record,
    arrays_to_record,
    check_declared,
)
from protocol.codecs import (
    Codec,
    CompressionConfig,
    NoneCodec,
    Payload,
    StochasticQuantizer,
    from_records,
    to_records,
)
from protocol.codecs.base import CODEC, CodecError
from protocol.codecs.floats import Fp16Codec
from protocol.codecs.quantized import BLOCK
from protocol.errors import ProtocolError, UpdateRejected, rejections

MetricValue = int | float | list[int] | list[float]


def _require(cond: bool, field_name: str, problem: str) -> None:
    if not cond:
        raise ProtocolError(f"{field_name}: {problem}")


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA configuration every participant must build identically."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(
            0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}"
        )
        _require(
            len(self.target_modules) > 0, "lora.target_modules", "must name at least one module"
        )


@dataclass(frozen=True)
class SampleDP:
    """Sample-level DP-SGD settings for local training; ``noise_multiplier == 0`` means off.

    Each local step Poisson-samples examples with rate batch_size / local examples, clips every
    example's gradient of the LoRA parameters to ``clip_norm`` and adds N(0, (noise_multiplier *
    clip_norm)^2). The client keeps its own ledger and refuses a round that would take its
    epsilon past ``max_epsilon`` (0: no limit)."""

    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    accountant: str = "rdp"

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            "sample_dp.noise_multiplier",
            f"must be >= 0, got {self.noise_multiplier}",
        )
        _require(self.clip_norm > 0, "sample_dp.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(0.0 < self.delta < 1.0, "sample_dp.delta", f"must be in (0, 1), got {self.delta}")
        _require(
            self.max_epsilon >= 0,
            "sample_dp.max_epsilon",
            f"must be >= 0, got {self.max_epsilon}",
        )
        _require(
            self.accountant in ("rdp", "pld"),
            "sample_dp.accountant",
            f"must be rdp or pld, got {self.accountant!r}",
        )


@dataclass(frozen=True)
class TrainInstruction:
    """One round of local training, as sent by the coordinator."""

    round: int
    lora: LoraSpec
    local_steps: int = 6
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    # Adapter tensors the client trains and returns; empty means all of them.
    trainable_keys: tuple[str, ...] = ()
    sample_dp: SampleDP = field(default_factory=SampleDP)
    # FedProx (Li et al. 2020): mu / 2 * ||w - w_global||^2 on the adapter tensors in the local
    # loss; 0 is plain local training.
    proximal_mu: float = 0.0
    # SCAFFOLD (Karimireddy et al. 2020): correct gradients by c - c_i (the server's control
    # variate travels in keys.SERVER_CONTROL) and return the control-variate delta.
    scaffold: bool = False
    # Local-prior logit adjustment (Menon et al. 2021 with the client's own prior, as in FedLC):
    # it trains on logits + tau * log p(v), p its smoothed reply-token frequencies; 0: off.
    logit_adjustment: float = 0.0
    # Update compression (protocol.codecs, ``--compress``): how the client encodes its delta.
    # The sketch's hashes are seeded by (seed, round), both chosen by the coordinator.
    compress: str = "none"
    compress_block_size: int = 0
    sketch_ratio: float = 0.25
    sketch_rows: int = 1
    error_feedback: bool = False
    # Per-client ranks (protocol.ranks): the global adapter's rank, 0 when every client trains
    # it whole. Under secure aggregation a client of lower rank pads its delta to it and adds
    # the holder vector, so every masked vector has the same length.
    global_rank: int = 0
    # Secure aggregation: the per-value clip before encoding (a sketch is taken of the clipped
    # values, so the client needs it to build its masked vector).
    secagg_clip: float = 0.5
    schema_version: int = keys.SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(self.round >= 1, "round", f"must be >= 1, got {self.round}")
        self.compression()  # CodecError (a ValueError) names the bad field
        _require(
            self.global_rank == 0 or self.global_rank >= self.lora.rank,
            "global_rank",
            f"must be 0 or >= lora.rank {self.lora.rank}, got {self.global_rank}",
        )
        _require(self.local_steps >= 1, "local_steps", f"must be >= 1, got {self.local_steps}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "learning_rate",
            f"must be a positive number, got {self.learning_rate}",
        )
        _require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(
            math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
            "proximal_mu",
            f"must be >= 0, got {self.proximal_mu}",
        )
        _require(
            math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0,
            "logit_adjustment",
            f"must be >= 0, got {self.logit_adjustment}",
        )
        _require(
            not (self.logit_adjustment > 0 and self.sample_dp.enabled),
            "logit_adjustment",
            "the prior is counted over all local rows, which DP-SGD's per-example bound does "
            "not cover; it needs sample_dp off",
        )

    def compression(self) -> CompressionConfig:
        return CompressionConfig.of(self)

    def codec(self) -> Codec:
        """This round's update codec (the sketch seeded by the coordinator's seed and round)."""
        return self.compression().build(seed=self.seed, rnd=self.round)


@dataclass(frozen=True)
class EvalInstruction:
    """Evaluate the global adapter on the client's held-out split."""

    round: int
    lora: LoraSpec
    batch_size: int = 8
    seq_len: int = 128
    schema_version: int = keys.SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(self.round >= 0, "round", f"must be >= 0, got {self.round}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply to a train round."""

    delta: Arrays  # trained adapter tensors minus the global adapter the client received
    num_examples: int  # size of the local training split (FedAvg weight)
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean loss per response token on the held-out split
    num_tokens: int
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# dataclass <-> ConfigRecord. Field names become kebab-case keys; nested dataclasses are
# flattened with their field name as prefix (``lora.rank`` -> ``lora-rank``).

_T = TypeVar("_T")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}{name.replace('_', '-')}"


def _to_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_to_config(value, _key(prefix, f.name) + "-"))
        elif isinstance(value, tuple):
            # Flower cannot type or size an empty list, so an empty tuple is left out and read
            # back as empty.
            if value:
                out[_key(prefix, f.name)] = list(value)
        else:
            out[_key(prefix, f.name)] = value
    return out


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = get_args(annotation)
        _require(
            isinstance(value, list | tuple), name, f"expected a list, got {type(value).__name__}"
        )
        return tuple(_coerce(v, item_type, name) for v in value)
    if annotation is bool:
        _require(isinstance(value, bool), name, f"expected a bool, got {value!r}")
        return value
    if annotation is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            name,
            f"expected an int, got {value!r}",
        )
        return value
    if annotation is float:
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            name,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if annotation is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {annotation!r} for {name}")  # programming error


def _from_config(cls: type[_T], record: Mapping[str, Any], prefix: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        annotation = hints[f.name]
        key = _key(prefix, f.name)
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            kwargs[f.name] = _from_config(annotation, record, key + "-")
            continue
        if key not in record:
            if get_origin(annotation) is tuple:
                kwargs[f.name] = ()
                continue
            raise ProtocolError(f"{key}: missing from the message")
        kwargs[f.name] = _coerce(record[key], annotation, key)
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(str(exc)) from exc


def _exact_int(value: Any) -> bool:
    return type(value) is int  # not bool (a subclass), not float, not numpy


def _check_schema(version: Any, what: str) -> None:
    if not _exact_int(version) or version != keys.SCHEMA_VERSION:
        raise ProtocolError(
            f"{what}: schema version {version!r} is not supported (this side speaks "
            f"{keys.SCHEMA_VERSION}); upgrade the older side"
        )


def _record(content: RecordDict, key: str, kind: type, what: str) -> Any:
    if key not in content:
        raise ProtocolError(f"{what}: record {key!r} is missing")
    rec = content[key]
    if not isinstance(rec, kind):
        raise ProtocolError(
            f"{what}: record {key!r} is a {type(rec).__name__}, expected {kind.__name__}"
        )
    return rec


# -- train ----------------------------------------------------------------------------------------


def _encode_instruction(
    instr: Any,
    config_key: str,
    global_adapter: Arrays,
    down: Codec | None = None,
    rng: np.random.Generator | None = None,
) -> RecordDict:
    content = RecordDict({config_key: ConfigRecord(_to_config(instr))})
    if down is None or down.name == "none":
        content[keys.GLOBAL_ADAPTER] = arrays_to_record(global_adapter)
        return content
    # Downlink compression: the codec's payload, plus the layout (the client cannot know the
    # shapes of a flat vector before it has decoded it).
    payload = down.encode(global_adapter, rng if rng is not None else np.random.default_rng())
    arrays, meta = to_records(payload)
    meta[_DOWN_NAMES] = list(global_adapter)
    meta[_DOWN_NDIMS] = [int(v.ndim) for v in global_adapter.values()]
    meta[_DOWN_SHAPES] = [int(d) for v in global_adapter.values() for d in v.shape]
    content[keys.GLOBAL_ADAPTER] = arrays
    content[keys.GLOBAL_ADAPTER_CODEC] = meta
    return content


_DOWN_NAMES, _DOWN_NDIMS, _DOWN_SHAPES = "layout-names", "layout-ndims", "layout-shapes"
_MAX_DOWN_VALUES = 1 << 31


def _down_codec(meta: Mapping[str, Any], what: str) -> Codec:
    name = meta.get(CODEC)
    if name == "fp16":
        return Fp16Codec()
    if name in ("int8", "int4"):
        block = meta.get(BLOCK)
        if not (isinstance(block, int) and _exact_int(block) and block >= 0):
            raise ProtocolError(f"{what} {BLOCK}: must be an int >= 0, got {block!r}")
        return StochasticQuantizer(8 if name == "int8" else 4, block)
    raise ProtocolError(f"{what}: global adapter codec {name!r} is not fp16, int8 or int4")


def _decode_global_adapter(content: RecordDict, what: str) -> Arrays:
    arrays_rec = _record(content, keys.GLOBAL_ADAPTER, ArrayRecord, what)
    if keys.GLOBAL_ADAPTER_CODEC not in content:
        return arrays_from_record(arrays_rec, what=what)
    meta = dict(_record(content, keys.GLOBAL_ADAPTER_CODEC, ConfigRecord, what))
    names, ndims, dims = (meta.pop(k, None) for k in (_DOWN_NAMES, _DOWN_NDIMS, _DOWN_SHAPES))
    ok = (
        isinstance(names, list)
        and isinstance(ndims, list)
        and isinstance(dims, list)
        and len(names) == len(ndims)
        and all(isinstance(n, str) for n in names)
        and len(set(names)) == len(names)
        and all(_exact_int(d) and 1 <= d <= 8 for d in ndims)
        and all(_exact_int(d) and d >= 1 for d in dims)
        and sum(ndims) == len(dims)
    )
    _require(ok, f"{what} {keys.GLOBAL_ADAPTER_CODEC}", "layout lists are malformed")
    assert isinstance(names, list) and isinstance(ndims, list) and isinstance(dims, list)
    shapes, start = [], 0
    for nd in ndims:
        shapes.append(tuple(dims[start : start + nd]))
        start += nd
    spec = AdapterSpec(tuple((n, TensorSpec(s)) for n, s in zip(names, shapes, strict=True)))
    _require(spec.numel <= _MAX_DOWN_VALUES, what, f"global adapter of {spec.numel} values")
    codec = _down_codec(meta, what)
    try:
        payload = from_records(arrays_rec, ConfigRecord(meta), what=what)
        return dict(codec.decode(payload, spec))
    except UpdateRejected as exc:
        raise ProtocolError(f"{what}: global adapter: {exc}") from exc


def _decode_instruction(
    content: RecordDict, cls: type[_T], config_key: str, what: str
) -> tuple[_T, Arrays]:
    instr = _decode_config(content, cls, config_key, what)
    return instr, _decode_global_adapter(content, what)


def _decode_config(content: RecordDict, cls: type[_T], config_key: str, what: str) -> _T:
    cfg = _record(content, config_key, ConfigRecord, what)
    _check_schema(cfg.get(keys.SCHEMA), what)
    return _from_config(cls, cfg)


def encode_train_instruction(
    instr: TrainInstruction,
    global_adapter: Arrays,
    server_control: Arrays | None = None,
    *,
    down: Codec | None = None,
    rng: np.random.Generator | None = None,
) -> RecordDict:
    """A train message; ``down`` (fp16, int8, int4) compresses the global adapter."""
    content = _encode_instruction(instr, keys.TRAIN_CONFIG, global_adapter, down, rng)
    if server_control is not None:
        content[keys.SERVER_CONTROL] = arrays_to_record(server_control)
    return content


def decode_server_control(
    content: RecordDict, instr: TrainInstruction, global_adapter: Arrays
) -> Arrays | None:
    """SCAFFOLD's server control variate: one tensor per trained adapter tensor (None when the
    instruction is not SCAFFOLD's)."""
    what = "train message"
    if not instr.scaffold:
        return None
    control = arrays_from_record(
        _record(content, keys.SERVER_CONTROL, ArrayRecord, what), what=what
    )
    spec = AdapterSpec.of(global_adapter)
    trained = instr.trainable_keys or spec.names
    try:
        spec.subset(trained).check(control, what=f"{what} {keys.SERVER_CONTROL}")
    except UpdateRejected as exc:
        raise ProtocolError(str(exc)) from exc
    return control


def decode_train_instruction(content: RecordDict) -> tuple[TrainInstruction, Arrays]:
    what = "train message"
    instr, adapter = _decode_instruction(content, TrainInstruction, keys.TRAIN_CONFIG, what)
    unknown = set(instr.trainable_keys) - set(adapter)
    if unknown:
        raise ProtocolError(
            f"{what}: trainable-keys names tensors not in the adapter: {sorted(unknown)[:3]}"
        )
    return instr, adapter


def decode_train_config(content: RecordDict) -> TrainInstruction:
    """The train instruction alone (the global adapter is not decoded)."""
    return _decode_config(content, TrainInstruction, keys.TRAIN_CONFIG, "train message")


def train_instruction_round(content: RecordDict) -> int:
    """The round a train message is for (what its reply must name); ``ProtocolError`` if it
    names none."""
    cfg = _record(content, keys.TRAIN_CONFIG, ConfigRecord, "train message")
    rnd = cfg.get(keys.ROUND)
    _require(_exact_int(rnd) and rnd >= 1, keys.ROUND, f"must be an int >= 1, got {rnd!r}")
    return int(rnd)


def _reply_meta(rnd: int) -> ConfigRecord:
    return ConfigRecord({keys.SCHEMA: keys.SCHEMA_VERSION, keys.ROUND: int(rnd)})


def _check_reply(content: RecordDict, what: str, rnd: int) -> None:
    """The reply-meta record: this schema version and the round the coordinator expects."""
    meta = _record(content, keys.REPLY_META, ConfigRecord, what)
    _check_schema(meta.get(keys.SCHEMA), what)
    got = meta.get(keys.ROUND)
    if not _exact_int(got):
        raise UpdateRejected(f"{what}: {keys.ROUND} must be an int, got {got!r}")
    if got != rnd:
        raise UpdateRejected(f"{what}: reply is for round {got}, this is round {rnd}")


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def encode_update(update: ClientUpdate, *, rnd: int, payload: Payload | None = None) -> RecordDict:
    """A train reply for round ``rnd`` (the round of the instruction it answers). ``payload``:
    the delta encoded by the round's codec (``protocol.codecs``), sent instead of the fp32
    tensors, its scalars in the ``update-codec`` record."""
    metrics: dict[str, MetricValue] = {keys.NUM_EXAMPLES: int(update.num_examples)}
    metrics.update({k: float(v) for k, v in update.metrics.items()})
    content = RecordDict({keys.METRICS: MetricRecord(metrics), keys.REPLY_META: _reply_meta(rnd)})
    if payload is None or payload.meta.get(CODEC) == "none":
        content[keys.UPDATE] = arrays_to_record(update.delta)
    else:
        content[keys.UPDATE], content[keys.UPDATE_CODEC] = to_records(payload)
    return content


def decode_update(
    content: RecordDict, expected: AdapterSpec, *, rnd: int, codec: Codec | None = None
) -> ClientUpdate:
    """Decode and validate a train reply to round ``rnd`` (encoded by ``codec``, the round's
    codec; None or ``none``: fp32 tensors). Raises ``UpdateRejected`` with the reason, and
    nothing else whatever the content."""
    what = "update"
    with rejections(what):
        return _decode_update(content, expected, rnd, what, codec)


def _check_codec_declared(expected: AdapterSpec, record: ArrayRecord, what: str) -> None:
    """Before any array of a compressed update is decoded: a few arrays, none carrying more
    bytes than the codecs' largest (a float32 value per adapter value, plus a sketch's
    rounding of each tensor's width)."""
    if len(record) > 4:
        raise UpdateRejected(f"{what}: {len(record)} arrays, a codec payload has at most 4")
    limit = (expected.numel + 64 * len(expected.tensors)) * 4 + MAX_HEADER_BYTES
    for name, arr in record.items():
        if len(arr.data) > limit:
            raise UpdateRejected(
                f"{what}: array {name[:40]!r} carries {len(arr.data)} bytes, at most {limit}"
            )


def _decode_update(
    content: RecordDict, expected: AdapterSpec, rnd: int, what: str, codec: Codec | None = None
) -> ClientUpdate:
    _check_reply(content, what, rnd)
    metrics_rec = _record(content, keys.METRICS, MetricRecord, what)
    arrays_rec = _record(content, keys.UPDATE, ArrayRecord, what)
    num_examples = metrics_rec.get(keys.NUM_EXAMPLES)
    if not _exact_int(num_examples) or num_examples <= 0:
        raise UpdateRejected(
            f"{what}: {keys.NUM_EXAMPLES} must be a positive int, got {num_examples!r}"
        )
    metrics: dict[str, float] = {}
    for k, v in metrics_rec.items():
        if k == keys.NUM_EXAMPLES:
            continue
        if not _finite_number(v):
            raise UpdateRejected(f"{what}: metric {k!r} must be a finite number, got {v!r}")
        metrics[k] = float(v)
    if codec is None or isinstance(codec, NoneCodec):
        if keys.UPDATE_CODEC in content:
            raise UpdateRejected(
                f"{what}: record {keys.UPDATE_CODEC!r} sent, but this round has no codec"
            )
        check_declared(expected, arrays_rec, what=what)  # before decoding any bytes
        delta = arrays_from_record(arrays_rec, what=what)
    else:
        meta = _record(content, keys.UPDATE_CODEC, ConfigRecord, what)
        _check_codec_declared(expected, arrays_rec, what)
        try:
            delta = dict(codec.decode(from_records(arrays_rec, meta, what=what), expected))
        except CodecError as exc:
            raise UpdateRejected(f"{what}: {exc}") from exc
    expected.check(delta, what=what)
    return ClientUpdate(delta=delta, num_examples=int(num_examples), metrics=metrics)


# -- evaluate -------------------------------------------------------------------------------------


def encode_eval_instruction(
    instr: EvalInstruction,
    global_adapter: Arrays,
    *,
    down: Codec | None = None,
    rng: np.random.Generator | None = None,
) -> RecordDict:
    """An evaluate message; ``down`` (fp16, int8, int4) compresses the global adapter."""
    return _encode_instruction(instr, keys.EVAL_CONFIG, global_adapter, down, rng)


def decode_eval_instruction(content: RecordDict) -> tuple[EvalInstruction, Arrays]:
    return _decode_instruction(content, EvalInstruction, keys.EVAL_CONFIG, "evaluate message")


def encode_eval_result(result: EvalResult, *, rnd: int) -> RecordDict:
    """An evaluation reply for round ``rnd`` (the round of the instruction it answers)."""
    metrics: dict[str, MetricValue] = {
        keys.LOSS: float(result.loss),
        keys.NUM_TOKENS: int(result.num_tokens),
        keys.NUM_EXAMPLES: int(result.num_examples),
    }
    metrics.update({k: float(v) for k, v in result.metrics.items()})
    return RecordDict(
        {
            keys.METRICS: MetricRecord(metrics),
            keys.REPLY_META: _reply_meta(rnd),
        }
    )


def decode_eval_result(content: RecordDict, *, rnd: int) -> EvalResult:
    """Decode and validate an evaluation reply to round ``rnd``. Raises ``UpdateRejected`` with
    the reason, and nothing else whatever the content."""
    what = "evaluation reply"
    with rejections(what):
        return _decode_eval_result(content, rnd, what)


def _decode_eval_result(content: RecordDict, rnd: int, what: str) -> EvalResult:
    _check_reply(content, what, rnd)
    rec = _record(content, keys.METRICS, MetricRecord, what)
    loss = rec.get(keys.LOSS)
    num_tokens = rec.get(keys.NUM_TOKENS)
    num_examples = rec.get(keys.NUM_EXAMPLES)
    if not _exact_int(num_tokens) or num_tokens < 0:
        raise UpdateRejected(f"{what}: {keys.NUM_TOKENS} must be an int >= 0, got {num_tokens!r}")
    if not _exact_int(num_examples) or num_examples < 0:
        raise UpdateRejected(
            f"{what}: {keys.NUM_EXAMPLES} must be an int >= 0, got {num_examples!r}"
        )
    # A client with no held-out tokens reports loss 0 (or NaN: nothing to average); it is not
    # used in the weighted mean.
    if (
        not isinstance(loss, int | float)
        or isinstance(loss, bool)
        or (num_tokens > 0 and not (math.isfinite(loss) and loss >= 0))
    ):
        raise UpdateRejected(f"{what}: {keys.LOSS} must be a finite number >= 0, got {loss!r}")
    extra = {}
    for k, v in rec.items():
        if k in (keys.LOSS, keys.NUM_TOKENS, keys.NUM_EXAMPLES):
            continue
        if not _finite_number(v):
            raise UpdateRejected(f"{what}: metric {k!r} must be a finite number, got {v!r}")
        extra[k] = float(v)
    return EvalResult(float(loss), int(num_tokens), int(num_examples), extra)


def to_config_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as the flat kebab-case dict used on the wire (for logs and config.json)."""
    return _to_config(obj)
