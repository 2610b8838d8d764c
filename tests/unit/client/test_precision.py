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
    ensure_quantized,
    load_base,
    resolve_compute_dtype,
    resolve_model,
    warn_emulated_bf16,
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


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_bf16_where_it_is_emulated_is_kept_with_one_warning(
    native: bool,
    tiny_model_dir: Path,
    model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Asked for bf16 on a CPU without bf16 instructions (where a step ran 16x slower than in
    fp32), loading the base says so once per process; with the instructions, nothing."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    warn_emulated_bf16.cache_clear()
    source = resolve_model(str(tiny_model_dir))
    with caplog.at_level("WARNING", logger="fedtune"):
        for _ in range(2):
            load_base(source, Quantization.NONE, model_cache, compute=ComputeDtype.BF16)
        load_base(source, Quantization.NONE, model_cache, compute=ComputeDtype.FP32)
    said = [
        r.getMessage() for r in caplog.records if "bf16 products are emulated" in r.getMessage()
    ]
    assert len(said) == (0 if native else 1)
    assert all(s.startswith("compute-dtype bf16: this CPU has no bf16 instructions") for s in said)
    warn_emulated_bf16.cache_clear()


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


def _model(  # type: ignore[no-untyped-def]
    tiny_model_dir: Path, cache: Path, quant: Quantization, compute: ComputeDtype | None = None
):
    return lora_model_with_random_adapter(tiny_model_dir, cache, quant, LORA, compute)


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


def _saved_weight_copies(model, batch) -> list[tuple[int, ...]]:  # type: ignore[no-untyped-def]
    """Shapes of the tensors autograd keeps for backward that are shaped like a frozen linear
    weight (a dense copy of one, kept from forward to backward)."""
    shapes = {
        tuple(m.weight.shape)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    }
    seen: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and t.is_floating_point() and tuple(t.shape) in shapes:
            seen.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backward_mean_loss(model, batch, 0)
    model.zero_grad(set_to_none=True)
    return seen


def test_a_base_held_in_bf16_for_bf16_products_keeps_their_gradients_and_no_weight_copies(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    """``load_base(compute=BF16)`` holds an unquantized base's frozen linears and its embedding
    in bf16: the products use the same bf16 weights autocast made at every use before, and no
    dense copy of a weight waits for backward (autocast's bf16 copies of the fp32 weights
    did)."""
    _, held = _model(tiny_model_dir, model_cache, Quantization.NONE, ComputeDtype.BF16)
    base, plain = _model(tiny_model_dir, model_cache, Quantization.NONE)
    linears = [m for m in held.modules() if type(m) is torch.nn.Linear]
    frozen = [m.weight for m in linears if not m.weight.requires_grad]
    assert len(frozen) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; the tied head
    assert all(w.dtype == torch.bfloat16 for w in frozen)
    assert held.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in held.named_parameters() if "lora_" in n)
    batch = collate(examples[:4], base.tokenizer.pad_token_id, CPU)
    with compute_precision(ComputeDtype.BF16):
        loss_held, g_held = _grads(held, batch)
        loss_plain, g_plain = _grads(plain, batch)
        assert _saved_weight_copies(held, batch) == []
        assert _saved_weight_copies(plain, batch), "autocast keeps bf16 copies of fp32 weights"
    flat_held = torch.cat([g.flatten() for g in g_held.values()])
    flat_plain = torch.cat([g_plain[k].flatten() for k in g_held])
    assert g_held.keys() == g_plain.keys() and len(g_held) == 8
    assert float(torch.nn.functional.cosine_similarity(flat_held, flat_plain, dim=0)) > 0.999
    assert loss_held == pytest.approx(loss_plain, rel=1e-2)
    # Outside autocast (a DP-SGD round on a bf16 device) the held base computes in fp32.
    with compute_precision(ComputeDtype.FP32):
        loss32, g32 = _grads(held, batch)
        assert _saved_weight_copies(held, batch) == []
    loss_ref, g_ref = _grads(plain, batch)
    flat32 = torch.cat([g32[k].flatten() for k in g_ref])
    flat_ref = torch.cat([g.flatten() for g in g_ref.values()])
    assert flat32.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(flat32, flat_ref, dim=0)) > 0.999
    assert loss32 == pytest.approx(loss_ref, rel=1e-2)


def test_a_base_held_in_bf16_converts_its_weights_from_the_checkpoint(
    tiny_model_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 hold converts each frozen linear from the checkpoint file, never from the fp32
    tensor the model loaded (a view of the file's map, whose pages converting it would make
    resident: SmolLM2's load peaked at 1048 MB that way): the values are the fp32 weights
    rounded to bf16, and the conversion works from a meta tensor, which has no data to read."""
    import client.model as cm

    source = resolve_model(str(tiny_model_dir))
    fp32 = dict(load_base(source, Quantization.NONE, model_cache).model.named_parameters())
    converted: list[str] = []
    real = cm._convert_from_checkpoint

    def spy(path: Path, key: str, current: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        converted.append(key)
        return real(path, key, current, dtype)

    monkeypatch.setattr(cm, "_convert_from_checkpoint", spy)
    held = load_base(source, Quantization.NONE, model_cache, compute=ComputeDtype.BF16).model
    monkeypatch.setattr(cm, "_convert_from_checkpoint", real)
    # The decoder's linears; the embedding too unless an earlier load kept its bf16 copy.
    linears = [k for k in converted if k != "model.embed_tokens.weight"]
    assert len(linears) == 2 * 7 and all(k.startswith("model.layers.") for k in linears)
    halves = 0
    for name, param in held.named_parameters():
        if param.dtype == torch.bfloat16:
            halves += 1
            assert torch.equal(param, fp32[name].to(torch.bfloat16)), name
        else:  # norms stay as loaded
            assert torch.equal(param, fp32[name]), name
    assert halves == 2 * 7 + 1  # the decoder's linears and the embedding (tied to the head)
    index = cm.checkpoint_index(ensure_quantized(source, Quantization.NONE, model_cache))
    key = "model.layers.1.mlp.down_proj.weight"
    exact = fp32[key].to(torch.bfloat16)
    meta = torch.empty(exact.shape, device="meta")
    assert torch.equal(cm._convert_from_checkpoint(index[key], key, meta, torch.bfloat16), exact)
    monkeypatch.setattr(cm, "_CONVERT_SLICE_BYTES", 3 * 4 * exact.shape[1])  # 3 rows a read
    assert exact.shape[0] % 3 != 0
    assert torch.equal(cm._convert_from_checkpoint(index[key], key, meta, torch.bfloat16), exact)
    # A tensor the file holds in another shape, or with other values, is converted from memory.
    for other in (torch.arange(6.0).reshape(2, 3), fp32[key].detach() + 1):
        got = cm._convert_from_checkpoint(index[key], key, other, torch.bfloat16)
        assert torch.equal(got, other.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_products_multiply_the_integers_and_scale_the_output(
    dtype: torch.dtype, tiny_model_dir: Path, model_cache: Path
) -> None:
    """torchao's per-channel int8 weight as its integers (exact in bf16 and fp32) times the
    per-row scale applied to the product: the same layer as its dequantized weight."""
    from client.model import _dense_weight, _FrozenLinear

    base, _ = _model(tiny_model_dir, model_cache, Quantization.INT8)
    proj = base.model.model.layers[0].mlp.down_proj
    weight = proj.weight
    dense, scale = _dense_weight(weight, torch.float32)
    assert scale is not None and scale.shape == (1, weight.shape[0])
    assert torch.equal(dense, dense.round()) and float(dense.abs().max()) <= 255
    assert torch.equal(dense * scale.T, weight.dequantize(output_dtype=torch.float32))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, weight.shape[1], generator=gen, requires_grad=True)
    grad = torch.randn(3, 5, weight.shape[0], generator=gen)
    ref_w = weight.dequantize(output_dtype=torch.float32)
    ref = torch.nn.functional.linear(x.to(dtype), ref_w.to(dtype))
    (ref_gx,) = torch.autograd.grad(ref, x, grad.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = _FrozenLinear.apply(x, weight, None)
    (gx,) = torch.autograd.grad(out, x, grad.to(dtype))
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((out.detach(), ref.detach()), (gx, ref_gx)):
        rel = float((got.float() - want.float()).norm() / want.float().norm().detach())
        assert rel < tol, rel


def test_attention_computes_in_fp32_under_cpu_autocast(
    tiny_model_dir: Path, model_cache: Path
) -> None:
    """bf16 products around it, fp32 attention: PyTorch's CPU flash attention runs its backward
    faster in fp32 than in bf16 at a client's shapes (``client.model._attention_fp32_on_cpu``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from client.model import _attention_fp32_on_cpu

    base, _ = _model(tiny_model_dir, model_cache, Quantization.NONE)
    assert base.model.config._attn_implementation == "fedtune_sdpa"
    attn = base.model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 6, 16, generator=gen).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _attention_fp32_on_cpu(attn, q, k, v, None, is_causal=True)
    ref, _ = sdpa_attention_forward(attn, q.float(), k.float(), v.float(), None, is_causal=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    # Without autocast it is transformers' SDPA as it is.
    plain, _ = _attention_fp32_on_cpu(attn, q, k, v, None, is_causal=True)
    assert plain.dtype == torch.bfloat16
