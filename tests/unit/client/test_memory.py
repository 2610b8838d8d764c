"""The memory planner: exact arithmetic, the plan it picks under a budget, and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from client.data import load_records, to_conversations, tokenize_all
from client.memory import (
    ALLOCATOR_SLACK,
    HALF_HEAD_SLICE_MIB,
    HEAD_CHUNKS_MIB,
    LOAD_OVERHEAD_MIB,
    MIB,
    TRANSIENT_PER_TOKEN,
    MemoryBudgetError,
    MemoryPlan,
    ModelShape,
    client_plan,
    micro_batch_sizes,
    plan_memory,
    quantization_candidates,
    resident_mib,
    saved_activation_floats,
    step_mib,
    weights_mib,
)
from client.model import (
    ComputeDtype,
    Quantization,
    activation_checkpointing,
    attach_lora,
    ensure_base,
    load_base,
    model_shape,
    resolve_model,
)
from client.train import backward_mean_loss, collate
from protocol.messages import LoraSpec
from tests.tiny_model import build_tiny_model

NONE, INT8, NF4 = Quantization.NONE, Quantization.INT8, Quantization.NF4
LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
# SmolLM2-135M as the planner sees it (client.model.model_shape on the real checkpoint).
SMOLLM2 = ModelShape(
    layers=30,
    hidden=576,
    intermediate=1536,
    heads=9,
    vocab=49152,
    linear_params=106_168_320,
    embedding_params=28_311_552,
    other_params=35_136,
    adapter_values=460_800,
)


def test_step_estimate_is_the_documented_arithmetic() -> None:
    s = SMOLLM2
    tok = 2 * 128
    per_layer = 7 * 576 + 3 * 1536 + 9 + 2  # 8651 floats per token and layer
    mask = 2 * tok * 128
    assert saved_activation_floats(s, 2, 128, checkpointing=False) == tok * 30 * per_layer + mask
    assert saved_activation_floats(s, 2, 128, checkpointing=True) == (
        tok * (30 * 576 + per_layer) + mask
    )
    rest = tok * TRANSIENT_PER_TOKEN * 1536 + tok * 576 + 3 * 460_800
    expected = ALLOCATOR_SLACK * (
        4 * (tok * (30 * 576 + per_layer) + mask + rest) / MIB
        + HEAD_CHUNKS_MIB[0]
        + HALF_HEAD_SLICE_MIB
    )
    assert step_mib(s, 2, 128, True, NF4) == pytest.approx(expected)
    assert step_mib(s, 2, 128, True, NONE) == pytest.approx(
        expected - ALLOCATOR_SLACK * HALF_HEAD_SLICE_MIB
    )
    # fp32: 4 bytes per weight; NF4: 0.5 + one fp32 absmax per 64; embedding in bf16.
    assert weights_mib(s, NONE) == pytest.approx(4 * (106_168_320 + 28_311_552 + 35_136) / MIB)
    assert weights_mib(s, NF4) == pytest.approx(
        (106_168_320 * (0.5 + 4 / 64) + 2 * 28_311_552 + 4 * 35_136) / MIB
    )
    assert resident_mib(s, INT8, 250.0) == pytest.approx(
        250.0 + LOAD_OVERHEAD_MIB[INT8] + (106_168_320 + 2 * 28_311_552 + 4 * 35_136) / MIB
    )
    assert micro_batch_sizes(4) == [4, 2, 1]
    assert micro_batch_sizes(8) == [8, 4, 3, 2, 1]
    # With bf16 products an unquantized base is held in bf16 (linears and embedding), and its
    # head computes from a half-precision weight; the quantized modes are held the same.
    assert weights_mib(s, NONE, True) == pytest.approx(
        (2 * (106_168_320 + 28_311_552) + 4 * 35_136) / MIB
    )
    assert step_mib(s, 2, 128, True, NONE, bf16_base=True) == pytest.approx(expected)
    assert resident_mib(s, NONE, 250.0, True) == pytest.approx(
        250.0 + LOAD_OVERHEAD_MIB[NONE] + weights_mib(s, NONE, True)
    )
    for q in (INT8, NF4):
        assert weights_mib(s, q, True) == weights_mib(s, q)
        assert step_mib(s, 2, 128, True, q, bf16_base=True) == step_mib(s, 2, 128, True, q)


def _plan(budget: float, **kw: object) -> MemoryPlan:
    resident = {q: resident_mib(SMOLLM2, q, 250.0) for q in Quantization}
    args: dict = {"batch_size": 4, "seq_len": 128, "resident_mb": resident, "quantizations": [NF4]}  # type: ignore[type-arg]
    args.update(kw)
    return plan_memory(budget, SMOLLM2, **args)


def test_the_fastest_plan_that_fits_is_chosen() -> None:
    resident = resident_mib(SMOLLM2, NF4, 250.0)

    def est(micro: int, ckpt: bool, chunk: float = HEAD_CHUNKS_MIB[0]) -> float:
        return resident + step_mib(SMOLLM2, micro, 128, ckpt, NF4, chunk)

    whole, whole_small_head = est(4, False), est(4, False, HEAD_CHUNKS_MIB[1])
    half, ckpt = est(2, False), est(4, True)
    assert whole > whole_small_head > half > ckpt  # the 30 layers' activations dominate

    assert _plan(whole + 1) == MemoryPlan(NF4, 4, 1, False, whole, whole + 1, 32.0)
    p = _plan(whole - 1)  # the whole batch fits only with small head chunks
    assert (p.micro_batch, p.checkpointing, p.head_chunk_mib) == (4, False, 8.0)
    assert p.estimated_mb == pytest.approx(whole_small_head) and p.lean_allocator
    p = _plan(whole_small_head - 1)  # no longer: two micro-batches of two rows
    assert (p.micro_batch, p.accumulation, p.checkpointing, p.head_chunk_mib) == (2, 2, False, 32)
    assert p.estimated_mb == pytest.approx(half) and p.estimated_mb <= p.budget_mb
    p = _plan(ckpt + 1)  # only checkpointing fits; then the whole batch again
    assert (p.micro_batch, p.accumulation, p.checkpointing) == (4, 1, True)
    unbudgeted = _plan(0)  # no budget: no change, default allocator
    assert unbudgeted == MemoryPlan(NF4, 4, 1, False, whole, 0, 32.0)
    assert not unbudgeted.lean_allocator
    assert p.metrics() == {
        "plan-micro-batch": 4.0,
        "plan-accumulation": 1.0,
        "plan-checkpointing": 1.0,
        "plan-estimated-mb": p.estimated_mb,
        "plan-head-chunk-mb": 32.0,
        "max-memory-mb": ckpt + 1,
    }


def test_an_impossible_budget_is_refused_with_the_smallest_footprint() -> None:
    smallest = resident_mib(SMOLLM2, NF4, 250.0) + step_mib(SMOLLM2, 1, 128, True, NF4, 8.0)
    with pytest.raises(MemoryBudgetError) as err:
        _plan(512)
    assert str(err.value) == (
        f"max-memory 512 MiB: training cannot fit; the smallest footprint this client can "
        f"reach is ~{smallest:.0f} MiB (nf4, micro-batch 1, checkpointing)"
    )
    # DP-SGD trains its Poisson batch whole: its smallest footprint is that batch's.
    whole = resident_mib(SMOLLM2, NF4, 250.0) + step_mib(SMOLLM2, 4, 128, False, NF4, 8.0)
    with pytest.raises(MemoryBudgetError, match=f"~{whole:.0f} MiB \\(nf4, micro-batch 4\\)"):
        _plan(1024, allow_checkpointing=False, allow_micro_batches=False)


def test_quantize_to_fit_falls_back_to_the_first_smaller_mode_that_fits() -> None:
    assert quantization_candidates(NONE, False) == [NONE]
    assert quantization_candidates(NONE, True) == [NONE, INT8, NF4]
    assert quantization_candidates(INT8, True) == [INT8, NF4]
    resident = {q: resident_mib(SMOLLM2, q, 250.0) for q in Quantization}
    kw = {"batch_size": 4, "seq_len": 128, "resident_mb": resident}
    fp32_floor = resident[NONE] + step_mib(SMOLLM2, 1, 128, True, NONE, 8.0)
    budget = fp32_floor - 1  # fp32 cannot fit at all; int8 can
    p = client_plan(budget, SMOLLM2, preferred=NONE, quantize_to_fit=True, **kw)  # type: ignore[arg-type]
    assert p.quantization is INT8 and p.estimated_mb <= budget
    with pytest.raises(MemoryBudgetError, match=f"max-memory {budget:.0f} MiB"):
        client_plan(budget, SMOLLM2, preferred=NONE, quantize_to_fit=False, **kw)  # type: ignore[arg-type]
    # Room for fp32 with checkpointing: the model is kept, the memory paid in recomputation.
    budget = resident[NONE] + step_mib(SMOLLM2, 4, 128, True, NONE) + 1
    p = client_plan(budget, SMOLLM2, preferred=NONE, quantize_to_fit=True, **kw)  # type: ignore[arg-type]
    assert p.quantization is NONE and p.estimated_mb <= budget


def test_a_bf16_base_keeps_the_unquantized_model_where_fp32_falls_back() -> None:
    """A budget the fp32 base cannot train in, but the base held in bf16 can: with bf16
    products the client keeps the unquantized model instead of falling back to int8."""
    fp32 = {q: resident_mib(SMOLLM2, q, 250.0) for q in Quantization}
    half = {q: resident_mib(SMOLLM2, q, 250.0, True) for q in Quantization}
    floor_fp32 = fp32[NONE] + step_mib(SMOLLM2, 1, 128, True, NONE, 8.0)
    floor_half = half[NONE] + step_mib(SMOLLM2, 1, 128, True, NONE, 8.0, bf16_base=True)
    assert floor_fp32 - floor_half == pytest.approx(
        2 * (106_168_320 + 28_311_552) / MIB - ALLOCATOR_SLACK * HALF_HEAD_SLICE_MIB
    )
    budget = (floor_fp32 + floor_half) / 2
    kw = {"batch_size": 4, "seq_len": 128, "preferred": NONE, "quantize_to_fit": True}
    assert client_plan(budget, SMOLLM2, resident_mb=fp32, **kw).quantization is INT8  # type: ignore[arg-type]
    p = client_plan(budget, SMOLLM2, resident_mb=half, bf16_base=True, **kw)  # type: ignore[arg-type]
    assert p.quantization is NONE and p.estimated_mb <= budget


def test_the_weights_estimate_is_what_the_loaded_base_holds(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """Bytes of the frozen base as ``load_base`` holds it, fp32 and bf16 products, against
    ``weights_mib``, on the tiny llama with its head tied to the embedding and without (an
    untied head stays fp32: ``model_shape`` counts it apart)."""
    untied_dir = build_tiny_model(tmp_path / "untied", tied=False)
    for directory, tied in ((tiny_model_dir, True), (untied_dir, False)):
        source = resolve_model(str(directory))
        shape = model_shape(ensure_base(source, model_cache), LORA)
        assert shape.embedding_params == shape.vocab * shape.hidden > 0
        assert shape.head_params == (0 if tied else shape.embedding_params)
        for compute in (ComputeDtype.FP32, ComputeDtype.BF16):
            half = compute is ComputeDtype.BF16
            model = load_base(source, NONE, model_cache, compute=compute).model
            head = model.get_output_embeddings().weight
            assert (head.dtype == torch.bfloat16) == (half and tied)
            held = sum(p.numel() * p.element_size() for p in model.parameters())
            assert held == weights_mib(shape, NONE, half) * MIB, (tied, compute)
        # Only a half-precision head (tied to the bf16 embedding) upcasts a vocabulary slice.
        slice_mib = step_mib(shape, 1, 8, True, NF4) - step_mib(shape, 1, 8, True, NONE)
        assert slice_mib == pytest.approx(ALLOCATOR_SLACK * HALF_HEAD_SLICE_MIB if tied else 0)
    # A converted copy beside the checkpoint (where a GGUF base's cache entry keeps it, and an
    # older fedtune wrote it into a model directory) is not a tensor of the model.
    emb = load_base(source, NONE, model_cache).model.get_input_embeddings().weight
    save_file({"model.embed_tokens.weight": emb.to(torch.bfloat16)},
              str(untied_dir / "half-model.embed_tokens.weight.safetensors"))  # fmt: skip
    assert model_shape(untied_dir, LORA) == shape


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="model shape layers: must be >= 1, got 0"):
        ModelShape(0, 1, 1, 1, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="batch 0 x 128"):
        _plan(1000, batch_size=0)


def test_the_estimate_covers_what_autograd_keeps_on_a_tiny_model(
    tiny_model_dir: Path, model_cache: Path
) -> None:
    """The activation term of the estimate against the tensors autograd actually keeps, for
    every micro-batch size and with and without checkpointing, on the tiny llama."""
    from transformers import AutoTokenizer

    shape = model_shape(ensure_base(resolve_model(str(tiny_model_dir)), model_cache), LORA)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads) == (2, 64, 128, 4)
    assert shape.adapter_values == 2 * 4 * ((64 + 64) + (64 + 32))

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_records("builtin:chatterbot")[:8]
    examples = tokenize_all(tok, to_conversations(rows, "builtin"), seq_len=64)
    base = load_base(resolve_model(str(tiny_model_dir)), NONE, model_cache)
    model = attach_lora(base.model, LORA)
    model.train()
    batch = collate(examples[:4], tok.pad_token_id, torch.device("cpu"))
    seq = batch.input_ids.shape[1]

    def kept_floats(micro: int, ckpt: bool) -> int:
        """Largest bytes autograd holds for one micro-batch's forward, in floats."""
        seen: dict[int, int] = {}
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dtype.is_floating_point and t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with activation_checkpointing(model, ckpt), hooks:
            backward_mean_loss(model, batch, micro if micro < 4 else 0)
        model.zero_grad(set_to_none=True)
        return sum(seen.values()) // 4 // ((4 + micro - 1) // micro)

    for micro in (4, 2, 1):
        for ckpt in (False, True):
            kept = kept_floats(micro, ckpt)
            estimate = saved_activation_floats(shape, micro, seq, ckpt)
            head_grad = micro * seq * shape.hidden  # counted apart in step_mib
            assert kept <= estimate + head_grad, (micro, ckpt, kept, estimate)
            if not ckpt and micro == 4:  # (micro-batches are cut to their own longest row)
                assert kept >= 0.9 * estimate, (kept, estimate)
