"""The client's side of secure aggregation on Flower: four message handlers (one per SecAgg+
stage) around the pure steps in ``privacy.secagg.client``. Between stages the protocol state and
the encoded update live in ``Context.state`` (kept per node by Flower in simulation and by the
SuperNode in deployment); the plaintext update never leaves this module.

Stage 1 also trains: the coordinator's first message carries the train instruction and the global
adapter, so a dropout during training is a dropout at stage 1.

A message that fails any check (malformed, tampered, replayed, for another session, naming an
invalid neighbour key, ...) is refused: the client forgets the round and answers with an error
reply that says why, instead of raising.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from privacy.distributed_dp import sample_skellam
from privacy.secagg import client as steps
from privacy.secagg.encoding import EncodingPlan, quantize, to_ring
from privacy.secagg.messages import (
    KeyDirectory,
    SecAggError,
    Setup,
    ShareDelivery,
    UnmaskRequest,
    from_bytes,
    to_bytes,
)
from privacy.secagg.primitives import secure_rng
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.codecs import CodecError
from protocol.codecs.secure import SecureLayout
from protocol.errors import UpdateRejected
from protocol.messages import ClientUpdate, TrainInstruction, decode_train_config
from protocol.ranks import HOLDERS, RankError, pad_to_rank

TrainFn = Callable[[Message, Context], ClientUpdate]

_STATE = "secagg-state"
_ENCODED = "secagg-encoded"


class InjectedDropout(RuntimeError):
    """Raised by a client told (in simulation) to crash at this stage."""


def _config(msg: Message) -> ConfigRecord:
    rec = msg.content.get(keys.SECAGG)
    if not isinstance(rec, ConfigRecord):
        raise SecAggError(f"{msg.metadata.message_type}: record {keys.SECAGG!r} is missing")
    return rec


def _payload(rec: ConfigRecord) -> bytes:
    value = rec.get(keys.SECAGG_PAYLOAD)
    if not isinstance(value, bytes):
        raise SecAggError(f"secagg record: {keys.SECAGG_PAYLOAD!r} must be bytes")
    return value


def _load_state(context: Context) -> steps.ClientState:
    rec = context.state.get(_STATE)
    if not isinstance(rec, ConfigRecord) or not isinstance(rec.get("state"), bytes):
        raise SecAggError("no secure-aggregation round in progress on this client")
    return from_bytes(steps.ClientState, rec["state"])  # type: ignore[arg-type]


def _save_state(context: Context, state: steps.ClientState) -> None:
    context.state[_STATE] = ConfigRecord({"state": to_bytes(state)})


def _clear(context: Context) -> None:
    for key in (_STATE, _ENCODED):
        if key in context.state:
            del context.state[key]


def _reply(
    msg: Message, payload: bytes, stage: str, cpu: float, extra: RecordDict | None = None
) -> Message:
    content = extra or RecordDict()
    content[keys.SECAGG] = ConfigRecord({keys.SECAGG_PAYLOAD: payload})
    metrics = content.get(keys.METRICS)
    cpu_key = f"secagg-cpu-{stage}"
    if isinstance(metrics, MetricRecord):
        metrics[cpu_key] = cpu
    else:
        content[keys.METRICS] = MetricRecord({cpu_key: cpu})
    return Message(content, reply_to=msg)


def _guarded(
    stage: str, fn: Callable[[Message, Context], Message]
) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        try:
            if _config(msg).get(keys.SECAGG_INJECT_DROPOUT) is True:
                _clear(context)
                return Message(
                    Error(
                        ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"injected dropout at stage {stage}"
                    ),
                    reply_to=msg,
                )
            return fn(msg, context)
        except SecAggError as exc:  # a tampered or inconsistent message: refuse it and say why
            _clear(context)
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"secagg {stage}: rejected: {exc}"),
                reply_to=msg,
            )

    return handler


def secure_vector(update: ClientUpdate, instr: TrainInstruction, plan: EncodingPlan) -> np.ndarray:
    """The float vector this client masks (``protocol.codecs.secure``): its delta, or the
    delta's sketch, padded to the global rank with its holder vector when ranks are mixed."""
    delta = dict(update.delta)
    holders = None
    try:
        if instr.global_rank:
            delta = pad_to_rank(delta, instr.global_rank)
            holders = delta.pop(HOLDERS)
        layout = SecureLayout(AdapterSpec.of(delta), instr.codec(), instr.global_rank)
        return layout.encode(
            delta,
            clip=instr.secagg_clip,
            plan_clip=plan.clip,
            l2=plan.l2_clip > 0,
            holders=holders,
        )
    except (CodecError, RankError, UpdateRejected) as exc:
        raise SecAggError(f"the update cannot be encoded: {exc}") from exc


def setup_stage(train: TrainFn) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        setup = from_bytes(Setup, _payload(_config(msg)))
        if setup.node != msg.metadata.dst_node_id:
            raise SecAggError(f"setup is for client {setup.node}, not {msg.metadata.dst_node_id}")
        update = train(msg, context)
        t0 = time.process_time()
        params = setup.params
        flat = secure_vector(update, decode_train_config(msg.content), params.plan)
        if flat.size != params.vector_len - 1:
            raise SecAggError(
                f"update has {flat.size} values, the round expects {params.vector_len - 1}"
            )
        rng = secure_rng()
        encoded = quantize(flat, update.num_examples, params.plan, rng)
        if params.noise_mu > 0:
            encoded[:-1] += sample_skellam(params.noise_mu, flat.size, rng)
        state, advert = steps.advertise(setup)
        _save_state(context, state)
        context.state[_ENCODED] = ArrayRecord(
            {"encoded": Array(to_ring(encoded, params.plan.ring_bits))}
        )
        metrics: dict[str, int | float | list[int] | list[float]] = {
            k: float(v) for k, v in update.metrics.items()
        }
        out = RecordDict({keys.METRICS: MetricRecord(metrics)})
        return _reply(msg, to_bytes(advert), "advertise", time.process_time() - t0, out)

    return handle


def share_stage(msg: Message, context: Context) -> Message:
    t0 = time.process_time()
    directory = from_bytes(KeyDirectory, _payload(_config(msg)))
    state, bundle = steps.share_keys(_load_state(context), directory)
    _save_state(context, state)
    return _reply(msg, to_bytes(bundle), "share-keys", time.process_time() - t0)


def mask_stage(msg: Message, context: Context) -> Message:
    t0 = time.process_time()
    delivery = from_bytes(ShareDelivery, _payload(_config(msg)))
    rec = context.state.get(_ENCODED)
    if not isinstance(rec, ArrayRecord):
        raise SecAggError("masked input: this client holds no encoded update")
    encoded = rec["encoded"].numpy().astype(np.int64)
    state, header, masked = steps.masked_input(_load_state(context), delivery, encoded)
    _save_state(context, state)
    del context.state[_ENCODED]
    out = RecordDict({keys.SECAGG_MASKED: ArrayRecord({"masked": Array(masked)})})
    return _reply(msg, to_bytes(header), "masked-input", time.process_time() - t0, out)


def unmask_stage(msg: Message, context: Context) -> Message:
    t0 = time.process_time()
    request = from_bytes(UnmaskRequest, _payload(_config(msg)))
    _state, response = steps.unmask(_load_state(context), request)
    _clear(context)  # the round is over for this client; its secrets are gone
    return _reply(msg, to_bytes(response), "unmask", time.process_time() - t0)


def register(app: ClientApp, train: TrainFn) -> None:
    """Add the four SecAgg+ stage handlers to ``app`` (``train`` produces the local update)."""
    setup_action, share_action, mask_action, unmask_action = keys.SECAGG_ACTIONS
    app.train(setup_action)(_guarded("advertise", setup_stage(train)))
    app.train(share_action)(_guarded("share-keys", share_stage))
    app.train(mask_action)(_guarded("masked-input", mask_stage))
    app.train(unmask_action)(_guarded("unmask", unmask_stage))
