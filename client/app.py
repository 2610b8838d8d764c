"""The Flower ClientApp: a thin shell that decodes a message, calls ``client.train`` and encodes
the reply. The same app runs in simulation (Ray actors) and on devices (SuperNodes).

The base model and tokenized data are cached per process: a Ray actor serves many virtual
clients, and loading once per process instead of once per call is most of a round's time.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
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
    TokenizedExample,
    heldout_split,
    load_records,
    records_seed,
    to_conversations,
    tokenize_all,
)
from client.model import (
    LoadedBase,
    Quantization,
    attach_lora,
    load_base,
    pick_device,
    resolve_model,
)
from client.settings import ClientSettings
from client.train import Correction, evaluate, train_round
from protocol.messages import (
    ClientUpdate,
    LoraSpec,
    decode_eval_instruction,
    decode_server_control,
    decode_train_instruction,
    encode_eval_result,
    encode_update,
    train_instruction_round,
)


@dataclass(frozen=True)
class LocalData:
    train: list[TokenizedExample]
    heldout: list[TokenizedExample]
    seed: int  # derived from the data, distinct per client, stable across runs


@dataclass
class Runtime:
    """A loaded base model with LoRA attached, and the client datasets tokenized for it."""

    base: LoadedBase
    model: Any  # PeftModel wrapping base.model
    _data: dict[tuple[str, int, float], LocalData] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return int(self.base.tokenizer.pad_token_id)

    def local_data(self, data_path: str, seq_len: int, heldout_fraction: float) -> LocalData:
        key = (data_path, seq_len, heldout_fraction)
        if key not in self._data:
            records = load_records(data_path)
            seed = records_seed(records)
            train_idx, held_idx = heldout_split(len(records), heldout_fraction, seed)
            convs = to_conversations(records, data_path)
            tok = self.base.tokenizer
            train = tokenize_all(tok, [convs[i] for i in train_idx], seq_len)
            heldout = tokenize_all(tok, [convs[i] for i in held_idx], seq_len)
            if not train:
                raise ValueError(
                    f"{data_path}: no training example has a response within seq-len {seq_len}"
                )
            self._data[key] = LocalData(train, heldout, seed)
        return self._data[key]


@functools.lru_cache(maxsize=3)  # a mixed simulated fleet may use all three quantization modes
def get_runtime(
    model: str, quantization: Quantization, cache_dir: Path, device: str, lora: LoraSpec
) -> Runtime:
    """The base model with LoRA attached, loaded once per process for each configuration."""
    base = load_base(resolve_model(model), quantization, cache_dir, pick_device(device))
    return Runtime(base, attach_lora(base.model, lora))


def _prepare(
    context: Context, lora: LoraSpec, defaults: Mapping[str, Any]
) -> tuple[ClientSettings, Runtime]:
    settings = ClientSettings.resolve(context.node_config, {**defaults, **context.run_config})
    if settings.threads:
        torch.set_num_threads(settings.threads)
    runtime = get_runtime(
        settings.model, settings.quantization, settings.cache_dir, settings.device, lora
    )
    return settings, runtime


_WEIGHT_BITS = {Quantization.NONE: 32, Quantization.INT8: 8, Quantization.NF4: 4}


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp. ``defaults`` sit under the run config (``fedtune simulate`` passes
    its resolved options here; deployments leave it empty)."""
    base_defaults = dict(defaults or {})
    app = ClientApp()

    def local_update(msg: Message, context: Context) -> ClientUpdate:
        """Decode the train instruction in ``msg``, train, and return the update with metrics."""
        t0 = time.perf_counter()
        instr, global_adapter = decode_train_instruction(msg.content)
        settings, runtime = _prepare(context, instr.lora, base_defaults)
        t_load = time.perf_counter() - t0
        data = runtime.local_data(settings.data_path, instr.seq_len, settings.heldout_fraction)
        corrections: list[Correction] = []
        if instr.proximal_mu > 0:  # FedProx
            trained = instr.trainable_keys or tuple(global_adapter)
            corrections.append(
                ProximalTerm(instr.proximal_mu, {k: global_adapter[k] for k in trained})
            )
        scaffold = None
        server_control = decode_server_control(msg.content, instr, global_adapter)
        if server_control is not None:
            scaffold = Scaffold(server_control, load_client_control(settings.state_dir))
            corrections.append(scaffold)
        if instr.sample_dp.enabled:  # DP-SGD, with this client's ledger in its state dir
            from client.dpsgd import private_round

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
            update = train_round(
                runtime.model,
                data.train,
                instr,
                global_adapter,
                pad_id=runtime.pad_id,
                client_seed=data.seed,
                corrections=corrections,
            )
        if scaffold is not None:
            new_control = scaffold.new_client_control()
            delta = {**update.delta, **scaffold.control_delta(new_control)}
            save_client_control(settings.state_dir, new_control)
            update = ClientUpdate(delta, update.num_examples, update.metrics)
        metrics = dict(update.metrics)
        metrics.update(
            {
                "load-seconds": t_load,
                "client-seconds": time.perf_counter() - t0,
                "peak-rss-mb": _peak_rss_mb(),
                "weight-bits": _WEIGHT_BITS[settings.quantization],
            }
        )
        return ClientUpdate(delta=update.delta, num_examples=update.num_examples, metrics=metrics)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        update = local_update(msg, context)
        return Message(
            encode_update(update, rnd=train_instruction_round(msg.content)), reply_to=msg
        )

    # Secure aggregation: the same local update, sent masked over four stages (client/secagg.py).
    secagg.register(app, local_update)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        instr, global_adapter = decode_eval_instruction(msg.content)
        settings, runtime = _prepare(context, instr.lora, base_defaults)
        data = runtime.local_data(settings.data_path, instr.seq_len, settings.heldout_fraction)
        result = evaluate(
            runtime.model,
            data.heldout,
            batch_size=instr.batch_size,
            pad_id=runtime.pad_id,
            global_adapter=global_adapter,
        )
        return Message(encode_eval_result(result, rnd=instr.round), reply_to=msg)

    return app


# Loaded by SuperNodes (`[tool.flwr.app.components] clientapp`) and by `flwr run`.
app = make_client_app()
