"""Mixed precision (``--compute-dtype``): where bf16 is chosen, what runs in it, and what stays
fp32; the memory levers (checkpointing, chunked head, micro-batches) leave bf16 gradients as
they leave fp32 ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.data import load_records, to_conversations, tokenize_all
from client.model import (
    ComputeDtype,
    Quantization,
    activation_checkpointing,
    compute_precision,
    resolve_compute_dtype,
)
from client.train import backward_mean_loss, collate, evaluate
from protocol.messages import LoraSpec
from tests.helpers import lora_model_with_random_adapter

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")],
)
def test_auto_is_bf16_only_where_the_cpu_multiplies_it_natively(
    amx: bool, avx512_bf16: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_compute_dtype(ComputeDtype.AUTO, CPU) is ComputeDtype(expected)
    # An explicit choice is kept whatever the hardware.
    assert resolve_compute_dtype(ComputeDtype.BF16, CPU) is ComputeDtype.BF16
    assert resolve_compute_dtype(ComputeDtype.FP32, CPU) is ComputeDtype.FP32


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_follows_its_bf16_support(
    supported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    expected = ComputeDtype.BF16 if supported else ComputeDtype.FP32
    assert resolve_compute_dtype(ComputeDtype.AUTO, CUDA) is expected


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path) -> list:  # type: ignore[type-arg]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_records("builtin:chatterbot")[:24]
    return tokenize_all(tok, to_conversations(rows, "builtin"), seq_len=64)


def _model(tiny_model_dir: Path, cache: Path, quant: Quantization):  # type: ignore[no-untyped-def]
    return lora_model_with_random_adapter(tiny_model_dir, cache, quant, LORA)


def _grads(model, batch, micro_batch: int = 0) -> tuple[float, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss = backward_mean_loss(model, batch, micro_batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("quant", list(Quantization))
def test_bf16_multiplies_in_bf16_and_keeps_adapters_and_gradients_fp32(
    quant: Quantization,
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    base, model = _model(tiny_model_dir, model_cache, quant)
    batch = collate(examples[:4], base.tokenizer.pad_token_id, CPU)
    seen: list[torch.dtype] = []
    proj = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj"))
    hook = proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        with compute_precision(ComputeDtype.FP32) as chosen:
            assert chosen is ComputeDtype.FP32
            loss32, g32 = _grads(model, batch)
        with compute_precision(ComputeDtype.BF16) as chosen:
            assert chosen is ComputeDtype.BF16
            loss16, g16 = _grads(model, batch)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert not torch.is_autocast_enabled("cpu"), "leaving the block ends autocast"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert g16.keys() == g32.keys() and len(g32) == 8
    # The same gradients up to bf16 rounding (8 mantissa bits): direction kept, not bit-equal.
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[k].flatten() for k in g32])
    assert flat16.dtype == torch.float32
    assert not torch.equal(flat16, flat32)
    cos = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)
    assert float(cos) > 0.99
    assert loss16 == pytest.approx(loss32, rel=2e-2)


@pytest.mark.parametrize("quant", [Quantization.NONE, Quantization.NF4])
@pytest.mark.parametrize(("checkpointing", "micro_batch"), [(True, 0), (False, 2), (True, 2)])
def test_memory_levers_leave_bf16_gradients_unchanged(
    quant: Quantization,
    checkpointing: bool,
    micro_batch: int,
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, model = _model(tiny_model_dir, model_cache, quant)
    batch = collate(examples[:4], base.tokenizer.pad_token_id, CPU)
    with compute_precision(ComputeDtype.BF16):
        ref_loss, ref = _grads(model, batch)
        monkeypatch.setattr("client.loss.head_chunk_rows", lambda vocab: 5)  # several chunks
        with activation_checkpointing(model, checkpointing):
            loss, grads = _grads(model, batch, micro_batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref.keys()
    for name in ref:
        if not micro_batch:  # recomputation repeats the same bf16 products: bit-equal
            assert torch.equal(grads[name], ref[name]), name
        else:  # micro-batches cut to their own width: other GEMM shapes, other bf16 roundings
            rel = float((grads[name] - ref[name]).norm() / ref[name].norm())
            assert rel < 1e-2, (name, rel)


def test_bf16_evaluation_loss_is_close_to_fp32(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    base, model = _model(tiny_model_dir, model_cache, Quantization.NONE)
    pad = int(base.tokenizer.pad_token_id)
    with compute_precision(ComputeDtype.FP32):
        ref = evaluate(model, examples[:8], batch_size=4, pad_id=pad)
    with compute_precision(ComputeDtype.BF16):
        got = evaluate(model, examples[:8], batch_size=4, pad_id=pad)
    assert got.num_tokens == ref.num_tokens > 0
    assert got.loss != ref.loss
    assert got.loss == pytest.approx(ref.loss, rel=2e-2)


def test_a_forward_sees_the_adapters_as_updated_inside_the_block(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    """A whole round of steps runs in one block: each forward must use the adapters the last
    optimizer step left (autocast's cast cache would keep the first step's bf16 copies)."""
    base, model = _model(tiny_model_dir, model_cache, Quantization.NONE)
    batch = collate(examples[:4], base.tokenizer.pad_token_id, CPU)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with compute_precision(ComputeDtype.BF16):
        before, _ = _grads(model, batch)
        with torch.no_grad():
            for p in lora:  # what an optimizer step does: the parameters changed in place
                p.add_(1.0)
        inside, _ = _grads(model, batch)
    with compute_precision(ComputeDtype.BF16):
        fresh, _ = _grads(model, batch)
    assert abs(inside - before) > 1e-3  # (0.0 with the cast cache)
    assert inside == fresh
