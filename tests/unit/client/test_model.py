from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data import load_records, to_conversations, tokenize_all
from client.model import (
    ModelError,
    Quantization,
    attach_lora,
    ensure_quantized,
    get_adapter,
    load_base,
    resolve_model,
    set_adapter,
)
from client.train import collate, evaluate, response_loss, train_round
from protocol.messages import LoraSpec, TrainInstruction

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def test_resolve_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"model path {tmp_path / 'nope'} does not exist"):
        resolve_model(str(tmp_path / "nope"))
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"JUNKJUNK")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        resolve_model(str(not_gguf))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no config\.json and no \.gguf file"):
        resolve_model(str(empty))
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "locked.gguf"
        unreadable.write_bytes(b"GGUF")
        unreadable.chmod(0)
        with pytest.raises(ModelError, match="cannot be read"):
            resolve_model(str(unreadable))


def test_directory_with_one_gguf_resolves_to_it(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    src = resolve_model(str(tmp_path))
    assert src.is_gguf and src.path.name == "m.gguf"


def test_hf_directory_resolves(tiny_model_dir: Path) -> None:
    src = resolve_model(str(tiny_model_dir))
    assert not src.is_gguf and src.path == tiny_model_dir.resolve()


def test_quantized_cache_is_built_once_and_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = resolve_model(str(tiny_model_dir))
    first = ensure_quantized(src, Quantization.NF4, tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_quantized(src, Quantization.NF4, tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert ensure_quantized(src, Quantization.NONE, tmp_path) == src.path  # HF dirs need no copy


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path) -> list:  # type: ignore[type-arg]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_records("builtin:chatterbot")[:96]
    return tokenize_all(tok, to_conversations(rows, "builtin"), seq_len=64)


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor, as raw storage (uint8 packing for NF4, int8 data for torchao)."""
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        inner = t
        if hasattr(t, "qdata"):  # torchao Int8Tensor
            inner = t.qdata
        out[name] = inner.detach().clone()
    return out


@pytest.mark.parametrize("quant", [Quantization.NF4, Quantization.INT8])
def test_quantizing_on_load_gives_the_cached_weights(
    quant: Quantization, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The FlowerTune-style load (quantize the full-precision base while loading, no quantized
    cache entry) holds the same weights as a load from the pre-quantized cache."""
    src = resolve_model(str(tiny_model_dir))
    on_load = load_base(src, quant, tmp_path / "a", quantize_on_load=True)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob(quant.value))
    cached = load_base(src, quant, tmp_path / "b")
    a, b = _quantized_state(on_load.model), _quantized_state(cached.model)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert any(a[n].dtype in (torch.uint8, torch.int8) for n in a)  # quantized, not fp32


@pytest.mark.parametrize("quant", list(Quantization))
def test_lora_training_on_quantized_base(
    quant: Quantization,
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), quant, model_cache)
    q_proj = base.model.model.layers[0].self_attn.q_proj
    # Evaluate first, as a client does before it trains: the base must still pass gradients
    # (bitsandbytes' CPU inference repacking would stop them; client.model.keep_nf4_trainable).
    with torch.no_grad():
        base.model(input_ids=torch.arange(1, 9).reshape(1, 8))
    if quant is Quantization.NF4:
        assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.dtype == torch.uint8
    elif quant is Quantization.INT8:
        assert (
            type(q_proj.weight).__name__ == "Int8Tensor" and q_proj.weight.qdata.dtype == torch.int8
        )
    else:
        assert q_proj.weight.dtype == torch.float32

    model = attach_lora(base.model, LORA, seed=0)
    frozen_before = _quantized_state(model)
    g = get_adapter(model)
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, examples[:32], batch_size=8, pad_id=pad, global_adapter=g)
    instr = TrainInstruction(
        round=1, lora=LORA, local_steps=15, batch_size=8, seq_len=64, learning_rate=2e-2
    )
    update = train_round(model, examples, instr, g, pad_id=pad, client_seed=7)
    after = evaluate(
        model,
        examples[:32],
        batch_size=8,
        pad_id=pad,
        global_adapter={k: g[k] + update.delta[k] for k in g},
    )
    assert after.loss < before.loss - 0.05, (before.loss, after.loss)

    # Only adapter tensors changed; the quantized base is bit-identical and still quantized.
    frozen_after = _quantized_state(model)
    assert frozen_before.keys() == frozen_after.keys()
    for name in frozen_before:
        assert torch.equal(frozen_before[name], frozen_after[name]), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    assert all(np.abs(update.delta[k]).max() > 0 for k in update.delta if "lora_B" in k)
    assert update.num_examples == len(examples)


def test_head_only_loss_equals_full_forward_loss(
    tiny_model_dir: Path, model_cache: Path, examples: list
) -> None:  # type: ignore[type-arg]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=1)
    batch = collate(examples[:8], base.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        fast, n = response_loss(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ref = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch.labels[:, 1:].reshape(-1),
            reduction="sum",
        )
    assert n == int((batch.labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


def _saved_bytes_and_grads(model: torch.nn.Module, batch: object) -> tuple[int, list[torch.Tensor]]:
    """Bytes of plain tensors autograd keeps for backward in one forward, and the LoRA grads."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) is torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = response_loss(model, batch)  # type: ignore[arg-type]
    (loss / n).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), grads


def test_int8_backward_keeps_no_dequantized_weights(
    tiny_model_dir: Path, model_cache: Path, examples: list
) -> None:  # type: ignore[type-arg]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.INT8, model_cache)
    model = attach_lora(base.model, LORA, seed=3)
    model.train()
    switched = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and "forward" in vars(m)
        and type(m.weight).__name__ == "Int8Tensor"
    ]
    # Every quantized linear of the 2-layer model (7 per layer); lm_head is not int8.
    assert len(switched) == 14
    batch = collate(examples[:8], base.tokenizer.pad_token_id, torch.device("cpu"))
    lean_bytes, lean_grads = _saved_bytes_and_grads(model, batch)
    for m in switched:  # back to torchao's own autograd path
        del m.forward
    dense_bytes, dense_grads = _saved_bytes_and_grads(model, batch)
    assert len(lean_grads) == len(dense_grads) == 8
    for a, b in zip(lean_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The default path holds an fp32 copy of each of those weights until backward.
    cfg = base.model.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    fp32_weights = 4 * cfg.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * f)
    assert dense_bytes - lean_bytes >= 0.9 * fp32_weights, (dense_bytes, lean_bytes)


def test_trainable_keys_limit_what_changes(
    tiny_model_dir: Path, model_cache: Path, examples: list
) -> None:  # type: ignore[type-arg]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=2)
    g = get_adapter(model)
    only_b = tuple(k for k in g if "lora_B" in k)
    instr = TrainInstruction(
        round=1, lora=LORA, local_steps=3, batch_size=4, seq_len=64, trainable_keys=only_b
    )
    update = train_round(
        model, examples, instr, g, pad_id=base.tokenizer.pad_token_id, client_seed=0
    )
    assert set(update.delta) == set(only_b)
    after = get_adapter(model)
    for k in g:
        if "lora_A" in k:
            np.testing.assert_array_equal(after[k], g[k])


def test_reading_and_loading_the_adapter_leave_the_nf4_base_untouched(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks NF4 weights for inference at the first
    eval-mode forward and ``model.state_dict()`` (inside get_adapter/set_adapter) converts them
    back lossily: load_base keeps them unpacked. (Where the CPU lacks AVX512-BF16 nothing is
    repacked and this holds either way.)"""
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NF4, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, examples[:16], batch_size=8, pad_id=pad).loss
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    data, absmax = weight.data.clone(), weight.quant_state.absmax.clone()

    g = get_adapter(model)
    set_adapter(model, g)
    assert torch.equal(weight.data, data) and torch.equal(weight.quant_state.absmax, absmax)
    assert evaluate(model, examples[:16], batch_size=8, pad_id=pad).loss == before


def test_set_adapter_rejects_mismatch(tiny_model_dir: Path, model_cache: Path) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    g = get_adapter(model)
    g.pop(next(iter(g)))
    with pytest.raises(ModelError, match="adapter does not match the model"):
        set_adapter(model, g)


def test_attach_lora_names_missing_module(tiny_model_dir: Path, model_cache: Path) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    with pytest.raises(ModelError, match="no module named 'qkv_proj'"):
        attach_lora(base.model, LoraSpec(target_modules=("qkv_proj",)))


def test_corrupt_cache_entry_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = resolve_model(str(tiny_model_dir))
    entry = ensure_quantized(src, Quantization.NF4, tmp_path)
    for f in entry.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    with pytest.raises(ModelError) as err:
        load_base(src, Quantization.NF4, tmp_path)
    assert f"model {entry} cannot be loaded" in str(err.value)
    assert "delete it to rebuild" in str(err.value)
    shutil.rmtree(entry)


def test_a_local_model_directory_is_never_written_to(tmp_path: Path) -> None:
    """Holding an unquantized local model in bf16 keeps its converted embedding in fedtune's
    cache, not in the user's directory, whose fingerprint (the cache key of its quantized
    entries) does not change; the next load reads the copy."""
    from client.model import ComputeDtype, _entry_dir, fingerprint
    from tests.tiny_model import build_tiny_model

    directory = build_tiny_model(tmp_path / "mine")
    cache = tmp_path / "cache"
    source = resolve_model(str(directory))
    files = sorted(p.name for p in directory.iterdir())
    key = fingerprint(source, cache)
    first = load_base(source, Quantization.NONE, cache, compute=ComputeDtype.BF16).model
    assert sorted(p.name for p in directory.iterdir()) == files
    assert fingerprint(source, cache) == key
    copy = _entry_dir(source, cache) / "half-model.embed_tokens.weight.safetensors"
    assert copy.is_file()
    copy.write_bytes(copy.read_bytes())  # the copy, not a fresh conversion, is read next
    again = load_base(source, Quantization.NONE, cache, compute=ComputeDtype.BF16).model
    emb = again.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, first.get_input_embeddings().weight)
    # A copy an older fedtune left in the directory does not change the key either.
    (directory / copy.name).write_bytes(copy.read_bytes())
    assert fingerprint(source, cache) == key


@pytest.mark.parametrize("tied", [True, False])
def test_a_bf16_checkpoint_loads_as_stored_into_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    """A checkpoint stored in bf16 whose linears are held in bf16 is loaded in bf16 instead of
    fp32 first (half the bytes at load); the model it gives equals the fp32-first load's in
    every tensor's dtype and value, and in its logits."""
    import client.model as cm
    from client.model import ComputeDtype, compute_precision, load_dtype
    from tests.tiny_model import build_tiny_model

    directory = build_tiny_model(
        tmp_path / "m", tied=tied, dtype=torch.bfloat16, attention_bias=not tied
    )
    source = resolve_model(str(directory))
    assert load_dtype(directory, held_in_bf16=True) == torch.bfloat16
    assert load_dtype(directory, held_in_bf16=False) == torch.float32
    asked: list[torch.dtype] = []
    real = cm.load_dtype

    def spy(d: Path, held: bool) -> torch.dtype:
        asked.append(real(d, held))
        return asked[-1]

    monkeypatch.setattr(cm, "load_dtype", spy)
    stored = load_base(source, Quantization.NONE, tmp_path / "c1", compute=ComputeDtype.BF16)
    monkeypatch.setattr(cm, "load_dtype", lambda d, held: torch.float32)
    first = load_base(source, Quantization.NONE, tmp_path / "c2", compute=ComputeDtype.BF16)
    assert asked == [torch.bfloat16]

    def tensors(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {**dict(m.named_parameters()), **dict(m.named_buffers())}

    a, b = tensors(stored.model), tensors(first.model)
    assert a.keys() == b.keys()
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert {v.dtype for v in a.values()} == {torch.bfloat16, torch.float32}
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def forwards(m: torch.nn.Module) -> dict[str, object]:
        return {n: getattr(x.forward, "__func__", None) for n, x in m.named_modules()}

    assert forwards(stored.model) == forwards(first.model)
    ids = torch.tensor([[1, 5, 9, 40, 7, 3]])
    with compute_precision(ComputeDtype.BF16):
        la = stored.model(input_ids=ids).logits
        lb = first.model(input_ids=ids).logits
    assert torch.equal(la, lb)


def test_a_checkpoint_not_all_bf16_loads_in_fp32(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from client.model import load_dtype
    from tests.tiny_model import build_tiny_model

    directory = build_tiny_model(tmp_path / "m", dtype=torch.bfloat16)
    (file,) = directory.glob("*.safetensors")
    weights = load_file(str(file))
    weights["model.norm.weight"] = weights["model.norm.weight"].float()  # one fp32 tensor
    save_file(weights, str(file), metadata={"format": "pt"})
    assert load_dtype(directory, held_in_bf16=True) == torch.float32
    fp32 = build_tiny_model(tmp_path / "f")
    assert load_dtype(fp32, held_in_bf16=True) == torch.float32
