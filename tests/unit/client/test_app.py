"""The ClientApp shell, called the way Flower calls it (a Message and a Context)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.model import (
    ComputeDtype,
    Quantization,
    attach_lora,
    get_adapter,
    load_base,
    resolve_model,
)
from protocol.adapter import AdapterSpec
from protocol.messages import (
    EvalInstruction,
    LoraSpec,
    TrainInstruction,
    decode_eval_result,
    decode_update,
    encode_eval_instruction,
    encode_train_instruction,
)

LORA = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture
def setup(tiny_model_dir: Path, model_cache: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    data = tmp_path / "shard.jsonl"
    rows = [
        {"instruction": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_config = {
        "model": str(tiny_model_dir),
        "quantization": "none",
        "cache-dir": str(model_cache),
    }
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(data)}, state=RecordDict(),
                      run_config=run_config)  # fmt: skip
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    adapter = get_adapter(attach_lora(base.model, LORA, seed=5))
    client_app.load_resident.cache_clear()
    client_app._LOADED.clear()
    client_app._TRAINED_IN.clear()
    return context, adapter


def _message(content: RecordDict, kind: str) -> Message:
    msg = Message(content=content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m-" + kind
    return msg


def test_train_and_evaluate_handlers_load_the_model_once(setup) -> None:  # type: ignore[no-untyped-def]
    context, adapter = setup
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=2, batch_size=4, seq_len=48)
    for rnd in (1, 2):
        instr = TrainInstruction(round=rnd, lora=LORA, local_steps=2, batch_size=4, seq_len=48)
        reply = app(_message(encode_train_instruction(instr, adapter), MessageType.TRAIN), context)
        update = decode_update(reply.content, AdapterSpec.of(adapter), rnd=rnd)
        assert update.num_examples == 36  # 40 rows minus a 10% held-out split
        assert update.metrics["train-seconds"] > 0 and update.metrics["peak-rss-mb"] > 0
        assert any(np.abs(v).max() > 0 for v in update.delta.values())
    ev = app(_message(encode_eval_instruction(EvalInstruction(round=2, lora=LORA), adapter),
                      MessageType.EVALUATE), context)  # fmt: skip
    result = decode_eval_result(ev.content, rnd=2)
    assert result.num_examples == 4 and result.num_tokens > 0 and np.isfinite(result.loss)
    info = client_app.load_resident.cache_info()
    assert info.misses == 1 and info.hits == 2, "one model load per process, reused by every call"


def test_a_bad_message_raises_a_protocol_error(setup) -> None:  # type: ignore[no-untyped-def]
    context, _ = setup
    app = client_app.make_client_app()
    with pytest.raises(ValueError, match="record 'train-config' is missing"):
        app(_message(RecordDict(), MessageType.TRAIN), context)


def test_missing_data_path_names_the_file(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    context, adapter = setup
    context.node_config["data-path"] = str(tmp_path / "gone.jsonl")
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=1, batch_size=2, seq_len=48)
    with pytest.raises(ValueError, match=r"data path .*gone\.jsonl does not exist"):
        app(_message(encode_train_instruction(instr, adapter), MessageType.TRAIN), context)


def test_a_memory_budget_plans_micro_batches_with_the_same_update(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a budget that the whole batch would exceed the client trains in micro-batches of
    the same effective batch: the update is the unbudgeted one, and the reply says how."""
    from client.memory import MemoryBudgetError, resident_mib, step_mib

    context, adapter = setup
    # Equal within fp32 rounding; bf16 products round differently for other micro-batch widths
    # (tests/unit/client/test_precision.py).
    context.run_config["compute-dtype"] = "fp32"
    monkeypatch.setattr(client_app, "current_rss_mb", lambda: 300.0)  # a steady process
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=2, batch_size=4, seq_len=48)
    content = encode_train_instruction(instr, adapter)
    plain = decode_update(
        app(_message(content, MessageType.TRAIN), context).content, AdapterSpec.of(adapter), rnd=1
    )
    assert plain.metrics["plan-micro-batch"] == 4 and plain.metrics["max-memory-mb"] == 0

    shape = client_app._shape(client_app._settings(context, {}), LORA)
    resident = resident_mib(shape, Quantization.NONE, 300.0)
    whole, half = (step_mib(shape, rows, 48, False, head_chunk_mib=8.0) for rows in (4, 2))
    budget = resident + (whole + half) / 2  # (with 8 MiB head chunks: the tiny vocabulary)
    context.node_config["max-memory"] = int(budget * 2**20)
    planned = decode_update(
        app(_message(content, MessageType.TRAIN), context).content, AdapterSpec.of(adapter), rnd=1
    )
    m = planned.metrics
    assert (m["plan-micro-batch"], m["plan-accumulation"], m["plan-checkpointing"]) == (2, 2, 0)
    assert m["plan-head-chunk-mb"] == 8
    assert m["plan-estimated-mb"] <= m["max-memory-mb"] == pytest.approx(budget, abs=1e-3)
    assert m["peak-rss-mb"] > 0 and m["weight-bits"] == 32
    for k in plain.delta:
        np.testing.assert_allclose(planned.delta[k], plain.delta[k], rtol=1e-4, atol=1e-7)

    # The process grew after training (allocator caches, the data): evaluation uses the base
    # this node trained in instead of planning a training footprint again (which no longer fits).
    monkeypatch.setattr(client_app, "current_rss_mb", lambda: 300.0 + budget)
    evaluate = encode_eval_instruction(EvalInstruction(round=1, lora=LORA, seq_len=48), adapter)
    reply = app(_message(evaluate, MessageType.EVALUATE), context)
    result = decode_eval_result(reply.content, rnd=1)
    assert result.num_tokens > 0 and np.isfinite(result.loss)
    assert client_app.load_resident.cache_info().misses == 1, "the trained base, not another"
    other = Context(run_id=1, node_id=8, node_config=dict(context.node_config),
                    state=RecordDict(), run_config=context.run_config)  # fmt: skip
    with pytest.raises(MemoryBudgetError, match="training cannot fit"):
        app(_message(evaluate, MessageType.EVALUATE), other)  # never trained here: planned


def test_a_budget_with_bf16_products_is_planned_for_the_base_held_in_bf16(  # type: ignore[no-untyped-def]
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With bf16 products the unquantized base is held in bf16: the plan's estimate counts its
    weights at two bytes (an fp32 count would over-estimate by half the model)."""
    from client.memory import resident_mib, step_mib

    context, adapter = setup
    monkeypatch.setattr(client_app, "current_rss_mb", lambda: 300.0)
    context.node_config["max-memory"] = 64 * 2**30  # room for the whole batch
    shape = client_app._shape(client_app._settings(context, {}), LORA)
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=1, batch_size=4, seq_len=48)
    content = encode_train_instruction(instr, adapter)
    for dtype, half in (("fp32", False), ("bf16", True)):
        context.run_config["compute-dtype"] = dtype
        client_app._LOADED.clear()
        reply = app(_message(content, MessageType.TRAIN), context)
        m = decode_update(reply.content, AdapterSpec.of(adapter), rnd=1).metrics
        expected = resident_mib(shape, Quantization.NONE, 300.0, half) + step_mib(
            shape, 4, 48, False, bf16_base=half
        )
        assert m["plan-estimated-mb"] == pytest.approx(expected), dtype
        assert m["weight-bits"] == (16 if half else 32)


def test_an_impossible_budget_is_refused_before_loading(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    from client.memory import MemoryBudgetError

    context, adapter = setup
    context.node_config["max-memory"] = 64 * 2**20
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=1, batch_size=4, seq_len=48)
    with pytest.raises(
        MemoryBudgetError,
        match=r"^max-memory 64 MiB: training cannot fit; the smallest footprint this client can "
        r"reach is ~\d+ MiB \(none, micro-batch 1, checkpointing\)$",
    ):
        app(_message(encode_train_instruction(instr, adapter), MessageType.TRAIN), context)
    assert client_app.load_resident.cache_info().currsize == 0, "refused before loading the model"


def test_clients_of_two_ranks_share_one_base_and_train_as_alone(  # type: ignore[no-untyped-def]
    setup, tiny_model_dir: Path, model_cache: Path
) -> None:
    """A worker serving a fleet of mixed ranks loads the base once: the LoRA of the other rank
    is attached in place of the last one. Each rank's update equals that of a process that
    only ever served that rank."""
    context, _ = setup
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    wide = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    adapters = {
        spec.rank: get_adapter(attach_lora(base.model, spec, seed=5)) for spec in (LORA, wide)
    }
    app = client_app.make_client_app()

    def train(spec: LoraSpec) -> dict[str, np.ndarray]:
        instr = TrainInstruction(round=1, lora=spec, local_steps=2, batch_size=4, seq_len=48)
        content = encode_train_instruction(instr, adapters[spec.rank])
        reply = app(_message(content, MessageType.TRAIN), context)
        return decode_update(reply.content, AdapterSpec.of(adapters[spec.rank]), rnd=1).delta

    mixed = [train(LORA), train(wide), train(LORA)]
    assert client_app.load_resident.cache_info().misses == 1, "one base for both ranks"
    alone = {}
    for spec in (LORA, wide):
        client_app.load_resident.cache_clear()
        alone[spec.rank] = train(spec)
    for got, rank in zip(mixed, (2, 4, 2), strict=True):
        assert got.keys() == alone[rank].keys()
        assert {v.shape[0] for k, v in got.items() if "lora_A" in k} == {rank}
        for k in got:
            np.testing.assert_array_equal(got[k], alone[rank][k])


def test_compute_dtype_reaches_training_and_the_reply_says_which(  # type: ignore[no-untyped-def]
    setup,
) -> None:
    """``compute-dtype bf16`` trains under bf16 autocast (another update than fp32's, close to
    it); DP-SGD computes in fp32 whatever the setting; the reply's ``compute-bits`` says which."""
    from protocol.messages import SampleDP

    context, adapter = setup
    app = client_app.make_client_app()
    instr = TrainInstruction(round=1, lora=LORA, local_steps=2, batch_size=4, seq_len=48)
    content = encode_train_instruction(instr, adapter)
    updates = {}
    for dtype in ("fp32", "bf16"):
        context.run_config["compute-dtype"] = dtype
        reply = app(_message(content, MessageType.TRAIN), context)
        updates[dtype] = decode_update(reply.content, AdapterSpec.of(adapter), rnd=1)
    assert updates["fp32"].metrics["compute-bits"] == 32
    assert updates["bf16"].metrics["compute-bits"] == 16
    # ... and weight-bits says how the frozen base was held (bf16 for bf16 products).
    assert updates["fp32"].metrics["weight-bits"] == 32
    assert updates["bf16"].metrics["weight-bits"] == 16
    # One resident base per precision: the unquantized base is held in bf16 for bf16 products.
    assert client_app.load_resident.cache_info().misses == 2
    held = {
        dtype: client_app.load_resident(
            str(context.run_config["model"]), Quantization.NONE,
            Path(context.run_config["cache-dir"]), "auto", ComputeDtype(dtype),
        ).base.model.model.layers[0].mlp.down_proj.weight.dtype
        for dtype in ("fp32", "bf16")
    }  # fmt: skip
    assert held == {"fp32": torch.float32, "bf16": torch.bfloat16}
    assert client_app.load_resident.cache_info().misses == 2
    flat = {d: np.concatenate([u.delta[k].ravel() for k in sorted(u.delta)])
            for d, u in updates.items()}  # fmt: skip
    assert not np.array_equal(flat["fp32"], flat["bf16"])
    cos = flat["fp32"] @ flat["bf16"] / np.linalg.norm(flat["fp32"]) / np.linalg.norm(flat["bf16"])
    assert cos > 0.9

    dp = SampleDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-3)
    private = TrainInstruction(round=1, lora=LORA, local_steps=1, batch_size=4, seq_len=48,
                               sample_dp=dp)  # fmt: skip
    context.node_config["state-dir"] = str(Path(context.node_config["data-path"]).parent / "st")
    reply = app(_message(encode_train_instruction(private, adapter), MessageType.TRAIN), context)
    dp_update = decode_update(reply.content, AdapterSpec.of(adapter), rnd=1)
    assert dp_update.metrics["compute-bits"] == 32
    assert dp_update.metrics["weight-bits"] == 16  # over the base as held
