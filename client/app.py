"""The Flower ClientApp: a thin shell that decodes a message, calls ``client.train`` and encodes
the reply. The same app runs in simulation (Ray actors) and on devices (SuperNodes).

The base model and tokenized data are cached per process: a Ray actor serves many virtual
clients, and loading once per process instead of once per call is most of a round's time.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import secagg
from client.corrections import ProximalTerm, Scaffold, load_client_control, save_client_control
from client.data import (
    Record,
    TokenizedExample,
    heldout_split,
    load_records,
    records_seed,
    to_conversations,
    tokenize_all,
)
from client.defaults import base_held_in_bf16
from client.error_feedback import codec_rng, encode_delta
from client.identity import client_identity
from client.loss import HEAD_CHUNK_BYTES, SMALL_HEAD_CHUNK_BYTES, head_chunk
from client.memory import (
    MIB,
    MemoryPlan,
    ModelShape,
    client_plan,
    fitting_quantization,
    quantization_candidates,
    resident_mib,
)
from client.model import (
    ComputeDtype,
    LoadedBase,
    Quantization,
    activation_checkpointing,
    attach_lora,
    compute_precision,
    ensure_base,
    load_base,
    model_shape,
    pick_device,
    resolve_compute_dtype,
    resolve_model,
)
from client.rss import current_rss_mb, peak_rss_mb, reset_peak_rss, tune_allocator
from client.settings import ClientSettings
from client.shards import shard_records
from client.train import Correction, evaluate, train_round
from protocol.identity import encode_identity_reply, is_identity_query
from protocol.messages import (
    ClientUpdate,
    LoraSpec,
    TrainInstruction,
    decode_eval_instruction,
    decode_server_control,
    decode_train_config,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
)
from protocol.task_eval import decode_eval_task, encode_task_counts


@dataclass(frozen=True)
class LocalData:
    train: list[TokenizedExample]
    heldout: list[TokenizedExample]
    seed: int  # derived from the data, distinct per client, stable across runs
    heldout_records: list[Record] = field(default_factory=list)  # the rows of ``heldout``


@dataclass
class Runtime:
    """A loaded base model with LoRA attached, and the client datasets tokenized for it (the
    most recently used ``ClientSettings.data_cache`` of them: a worker serving thousands of
    virtual clients does not grow with the number it has seen)."""

    base: LoadedBase
    model: Any  # PeftModel wrapping base.model
    _data: OrderedDict[tuple[str, int, int, float], LocalData] = field(default_factory=OrderedDict)

    @property
    def pad_id(self) -> int:
        return int(self.base.tokenizer.pad_token_id)

    def local_data(self, settings: ClientSettings, seq_len: int) -> LocalData:
        data_path, shard = settings.data_path, settings.shard
        key = (data_path, shard, seq_len, settings.heldout_fraction)
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        if shard >= 0:
            records = shard_records(Path(data_path).parent, shard)
            where = f"{data_path} (shard {shard})"
        else:
            records = load_records(data_path)
            where = data_path
        seed = records_seed(records)
        train_idx, held_idx = heldout_split(len(records), settings.heldout_fraction, seed)
        convs = to_conversations(records, where)
        tok = self.base.tokenizer
        train = tokenize_all(tok, [convs[i] for i in train_idx], seq_len)
        heldout = tokenize_all(tok, [convs[i] for i in held_idx], seq_len)
        if not train:
            raise ValueError(
                f"{where}: no training example has a response within seq-len {seq_len}"
            )
        self._data[key] = LocalData(train, heldout, seed, [records[i] for i in held_idx])
        while len(self._data) > settings.data_cache:
            self._data.popitem(last=False)
        return self._data[key]


@dataclass
class Resident:
    """A base model loaded in this process, and the runtime using it (its current LoRA)."""

    base: LoadedBase
    runtime: Runtime | None = None
    lora: LoraSpec | None = None


@functools.lru_cache(maxsize=3)  # a mixed simulated fleet may use all three quantization modes
def load_resident(
    model: str, quantization: Quantization, cache_dir: Path, device: str, compute: ComputeDtype
) -> Resident:
    """The base model, loaded once per process for each (model, quantization, device) and the
    precision its products run in (an unquantized base is held in bf16 for bf16 products)."""
    before = current_rss_mb()
    base = load_base(
        resolve_model(model), quantization, cache_dir, pick_device(device), compute=compute
    )
    _LOADED[(model, quantization)] = before
    return Resident(base)


def get_runtime(
    model: str,
    quantization: Quantization,
    cache_dir: Path,
    device: str,
    lora: LoraSpec,
    compute: ComputeDtype,
) -> Runtime:
    """The base model with LoRA ``lora`` attached. A client whose LoRA differs from the last
    one's on the same base (a fleet of mixed ranks in one worker) has its LoRA attached in
    place of the last one's, on the same base: one base per process, not one per rank. The
    tokenized client data is kept (it does not depend on the LoRA)."""
    resident = load_resident(model, quantization, cache_dir, device, compute)
    if resident.runtime is None or resident.lora != lora:
        data: OrderedDict[tuple[str, int, int, float], LocalData] = OrderedDict()
        if resident.runtime is not None:
            resident.runtime.model.unload()  # the base's own layers back, in place
            data = resident.runtime._data
        peft_model = attach_lora(resident.base.model, lora)
        resident.runtime, resident.lora = Runtime(resident.base, peft_model, data), lora
    return resident.runtime


def _prepare(
    context: Context,
    lora: LoraSpec,
    defaults: Mapping[str, Any],
    seq_len: int,
    quantization: Quantization | None = None,
) -> tuple[ClientSettings, Runtime]:
    """Settings and the runtime in ``quantization`` (a training plan's), or else, under a memory
    budget, in the mode this node last trained in here (evaluation: the base its training
    fitted, whatever the process's RSS has grown to since) or the one that fits the budget
    (``client.memory.fitting_quantization``)."""
    settings = _settings(context, defaults)
    if quantization is None and settings.max_memory:
        candidates = quantization_candidates(settings.quantization, settings.quantize_to_fit)
        quantization = _TRAINED_IN.get((context.node_id, settings.model))
        if quantization not in candidates:
            shape = _shape(settings, lora)
            quantization = fitting_quantization(
                settings.max_memory / MIB,
                shape,
                seq_len=seq_len,
                resident_mb=_residents(settings, shape),
                quantizations=candidates,
                bf16_base=_bf16_base(settings),
            )
    if quantization is not None:
        settings = dataclasses.replace(settings, quantization=quantization)
    # The device's precision, also for a DP-SGD round (which computes in fp32 over the base as
    # held: client.model._FrozenLinear converts each held weight at use).
    compute = _compute(settings)
    runtime = get_runtime(
        settings.model, settings.quantization, settings.cache_dir, settings.device, lora, compute
    )
    return settings, runtime


def _settings(context: Context, defaults: Mapping[str, Any]) -> ClientSettings:
    settings = ClientSettings.resolve(context.node_config, {**defaults, **context.run_config})
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.max_memory:
        tune_allocator()  # client.rss: freed activations go back to the system at once
    return settings


_WEIGHT_BITS = {Quantization.NONE: 32, Quantization.INT8: 8, Quantization.NF4: 4}
_COMPUTE_BITS = {ComputeDtype.FP32: 32, ComputeDtype.BF16: 16}


# ------------------------------------------------------------ memory plan (client/memory.py)

# RSS of this process before each (model, quantization) base was loaded.
_LOADED: dict[tuple[str, Quantization], float] = {}
# The mode each (node, model) last trained in here: its evaluation under a budget uses that base.
_TRAINED_IN: dict[tuple[int, str], Quantization] = {}


@functools.lru_cache(maxsize=4)
def _model_shape(model: str, cache_dir: Path, lora: LoraSpec) -> ModelShape:
    return model_shape(ensure_base(resolve_model(model), cache_dir), lora)


def _shape(settings: ClientSettings, lora: LoraSpec) -> ModelShape:
    return _model_shape(settings.model, settings.cache_dir, lora)


def _compute(settings: ClientSettings) -> ComputeDtype:
    return resolve_compute_dtype(settings.compute_dtype, pick_device(settings.device))


def _bf16_base(settings: ClientSettings) -> bool:
    """Do products run in bf16 here, so that an unquantized base is held in bf16
    (``client.defaults.base_held_in_bf16``)?"""
    return _compute(settings) is ComputeDtype.BF16


def _weight_bits(settings: ClientSettings) -> int:
    """Bits per frozen linear weight as held."""
    if base_held_in_bf16(settings.quantization, _bf16_base(settings)):
        return 16
    return _WEIGHT_BITS[settings.quantization]


def _residents(settings: ClientSettings, shape: ModelShape) -> dict[Quantization, float]:
    """Each candidate mode's memory with its base loaded and used: estimated from the RSS before
    it was loaded (or from now, if it is not loaded yet), never below the RSS now."""
    now = current_rss_mb()
    half = _bf16_base(settings)
    out = {}
    for q in quantization_candidates(settings.quantization, settings.quantize_to_fit):
        before = _LOADED.get((settings.model, q))
        out[q] = (
            resident_mib(shape, q, now, half)
            if before is None
            else max(now, resident_mib(shape, q, before, half))
        )
    return out


def plan_round(settings: ClientSettings, instr: TrainInstruction) -> MemoryPlan:
    """How this client trains the round within its ``max-memory`` (the whole batch when it has
    none); raises ``client.memory.MemoryBudgetError`` before anything is loaded or trained."""
    if not settings.max_memory:
        return MemoryPlan.unplanned(settings.quantization, instr.batch_size)
    shape = _shape(settings, instr.lora)
    return client_plan(
        settings.max_memory / MIB,
        shape,
        preferred=settings.quantization,
        quantize_to_fit=settings.quantize_to_fit,
        batch_size=instr.batch_size,
        seq_len=instr.seq_len,
        resident_mb=_residents(settings, shape),
        dp_sgd=instr.sample_dp.enabled,
        bf16_base=_bf16_base(settings),
    )


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp. ``defaults`` sit under the run config (``fedtune simulate`` passes
    its resolved options here; deployments leave it empty)."""
    base_defaults = dict(defaults or {})
    app = ClientApp()

    def local_update(msg: Message, context: Context) -> ClientUpdate:
        """Decode the train instruction in ``msg``, train, and return the update with metrics."""
        t0 = time.perf_counter()
        reset_peak_rss()  # this client's peak, not the process's (client.rss)
        instr, global_adapter = decode_train_instruction(msg.content)
        plan = plan_round(_settings(context, base_defaults), instr)
        settings, runtime = _prepare(
            context, instr.lora, base_defaults, instr.seq_len, plan.quantization
        )
        _TRAINED_IN[(context.node_id, settings.model)] = plan.quantization
        t_load = time.perf_counter() - t0
        data = runtime.local_data(settings, instr.seq_len)
        corrections: list[Correction] = []
        if instr.proximal_mu > 0:  # FedProx
            trained = instr.trainable_keys or tuple(global_adapter)
            corrections.append(
                ProximalTerm(instr.proximal_mu, {k: global_adapter[k] for k in trained})
            )
        scaffold = None
        server_control = decode_server_control(msg.content, instr, global_adapter)
        if server_control is not None:
            scaffold = Scaffold(
                server_control, load_client_control(settings.state_dir, instr.round)
            )
            corrections.append(scaffold)
        if instr.sample_dp.enabled:  # DP-SGD, with this client's ledger in its state dir
            from client.dpsgd import private_round

            # Opacus's per-example gradients are fp32 only: DP-SGD computes in fp32 whatever
            # the setting (the run config refuses an explicit bf16 with --dp sample).
            computed = ComputeDtype.FP32
            update = private_round(
                runtime.model,
                data.train,
                instr,
                global_adapter,
                pad_id=runtime.pad_id,
                client_seed=data.seed,
                state_dir=settings.state_dir,
                corrections=corrections,
            )
        else:
            with (
                activation_checkpointing(runtime.model, plan.checkpointing),
                head_chunk(int(plan.head_chunk_mib * MIB)),
                compute_precision(settings.compute_dtype, runtime.base.model.device) as computed,
            ):
                update = train_round(
                    runtime.model,
                    data.train,
                    instr,
                    global_adapter,
                    pad_id=runtime.pad_id,
                    client_seed=data.seed,
                    corrections=corrections,
                    micro_batch=plan.micro_batch if plan.accumulation > 1 else 0,
                )
        if scaffold is not None:
            new_control = scaffold.new_client_control()
            delta = {**update.delta, **scaffold.control_delta(new_control)}
            save_client_control(settings.state_dir, new_control, instr.round)
            update = ClientUpdate(delta, update.num_examples, update.metrics)
        metrics = dict(update.metrics)
        metrics.update(
            {
                "load-seconds": t_load,
                "client-seconds": time.perf_counter() - t0,
                "peak-rss-mb": peak_rss_mb(),
                "weight-bits": _weight_bits(settings),
                "compute-bits": _COMPUTE_BITS[computed],
                **plan.metrics(),
            }
        )
        return ClientUpdate(delta=update.delta, num_examples=update.num_examples, metrics=metrics)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        update = local_update(msg, context)
        instr = decode_train_config(msg.content)
        payload = None
        if instr.compress != "none":  # protocol.codecs; the residual in the state directory
            state = _settings(context, base_defaults).state_dir if instr.error_feedback else None
            payload = encode_delta(
                instr.codec(), update.delta, codec_rng(instr, context), state_dir=state
            )
        return Message(encode_update(update, rnd=instr.round, payload=payload), reply_to=msg)

    # Secure aggregation: the same local update, sent masked over four stages (client/secagg.py).
    secagg.register(app, local_update)

    @app.query()
    def identity(msg: Message, context: Context) -> Message:
        """The coordinator's identity query: this client's stable name (client/identity.py)."""
        if not is_identity_query(msg.content):
            raise ValueError("query: not an identity query (the only query this client answers)")
        name = client_identity(context.node_config, {**base_defaults, **context.run_config})
        return Message(encode_identity_reply(name), reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        reset_peak_rss()
        instr, global_adapter = decode_eval_instruction(msg.content)
        settings, runtime = _prepare(context, instr.lora, base_defaults, instr.seq_len)
        data = runtime.local_data(settings, instr.seq_len)
        chunk = SMALL_HEAD_CHUNK_BYTES if settings.max_memory else HEAD_CHUNK_BYTES
        device = runtime.base.model.device
        with head_chunk(chunk), compute_precision(settings.compute_dtype, device):
            result = evaluate(
                runtime.model,
                data.heldout,
                batch_size=instr.batch_size,
                pad_id=runtime.pad_id,
                global_adapter=global_adapter,
            )
        task, counts = decode_eval_task(msg.content), None
        if task is not None:  # --eval-task-clients (client/local_task.py)
            from client.local_task import score_heldout

            t0 = time.perf_counter()
            counts = score_heldout(runtime.model, runtime.base.tokenizer, data.heldout_records,
                                   task, settings.data_path)  # fmt: skip
            task_seconds = time.perf_counter() - t0
        metrics = {**result.metrics, "eval-peak-rss-mb": peak_rss_mb()}
        if counts is not None:
            metrics["task-eval-seconds"] = task_seconds
            metrics["eval-seconds"] = metrics.get("eval-seconds", 0.0) + task_seconds
        result = dataclasses.replace(result, metrics=metrics)
        reply = encode_eval_result(result, rnd=instr.round)
        if counts is not None:
            encode_task_counts(reply, counts)
        return Message(reply, reply_to=msg)

    return app


# Loaded by SuperNodes (`[tool.flwr.app.components] clientapp`) and by `flwr run`.
app = make_client_app()
