"""The chunked head and cross-entropy, activation checkpointing and micro-batches: the same
losses and LoRA gradients as the plain computation (full logits, one backward), for less memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client.data import IGNORE_INDEX, load_records, to_conversations, tokenize_all
from client.loss import (
    biased_cross_entropy,
    head_chunk,
    head_chunk_rows,
    head_losses,
    logit_bias,
    upcast_linear,
)
from client.model import (
    FROZEN_EMBEDDING_DTYPE,
    Quantization,
    activation_checkpointing,
    ensure_quantized,
    load_base,
    resolve_model,
)
from client.train import Batch, backward_mean_loss, collate, evaluate, split_batch
from protocol.messages import LoraSpec
from tests.helpers import lora_model_with_random_adapter

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path) -> list:  # type: ignore[type-arg]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_records("builtin:chatterbot")[:40]
    return tokenize_all(tok, to_conversations(rows, "builtin"), seq_len=64)


def _model(tiny_model_dir: Path, cache: Path, quant: Quantization = Quantization.NONE):  # type: ignore[no-untyped-def]
    return lora_model_with_random_adapter(tiny_model_dir, cache, quant, LORA)


def _reference_backward(model, batch: Batch) -> float:  # type: ignore[no-untyped-def]
    """Today's computation before this change: full logits, one cross-entropy, one backward."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])
    loss.backward()
    return float(loss.detach())


def _grads(model, run: Callable[[], float]) -> tuple[float, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    loss = run()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, grads


@pytest.mark.parametrize("quant", [Quantization.NONE, Quantization.NF4])
@pytest.mark.parametrize(
    ("checkpointing", "micro_batch", "chunk"),
    [(False, 0, None), (False, 0, 5), (True, 0, 5), (False, 3, 5), (True, 2, 7), (True, 1, None)],
)
def test_lora_gradients_equal_the_plain_computation(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
    quant: Quantization,
    checkpointing: bool,
    micro_batch: int,
    chunk: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, model = _model(tiny_model_dir, model_cache, quant)
    batch = collate(examples[:6], base.tokenizer.pad_token_id, torch.device("cpu"))
    ref_loss, ref = _grads(model, lambda: _reference_backward(model, batch))
    assert len(ref) == 8 and all(float(g.abs().max()) > 0 for g in ref.values())

    if chunk is not None:  # force several head chunks on the tiny vocabulary
        monkeypatch.setattr("client.loss.head_chunk_rows", lambda vocab: chunk)
    with activation_checkpointing(model, checkpointing):
        loss, grads = _grads(model, lambda: backward_mean_loss(model, batch, micro_batch))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Leaving the block switches checkpointing off again.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_checkpointing_keeps_only_layer_inputs(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    base, model = _model(tiny_model_dir, model_cache)
    batch = collate(examples[:8], base.tokenizer.pad_token_id, torch.device("cpu"))

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backward_mean_loss(model, batch)
        model.zero_grad(set_to_none=True)
        return sum(seen.values())

    plain = saved_bytes()
    with activation_checkpointing(model):
        checkpointed = saved_bytes()
    b, t = batch.input_ids.shape
    d, layers = base.model.config.hidden_size, base.model.config.num_hidden_layers
    # Each layer's input, the final norm's input and the head's gradient, not much more.
    assert checkpointed <= 4 * b * t * d * (layers + 3), (checkpointed, plain)
    assert plain > 4 * checkpointed


def test_chunked_head_loss_equals_unchunked_and_never_holds_all_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 1000
    head = torch.nn.Linear(d, v, bias=False).requires_grad_(False)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)

    ref = F.cross_entropy(head(hidden), targets, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum() * 0.5, hidden)

    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        got = head_losses(head, hidden, targets, chunk=8)
    (g_got,) = torch.autograd.grad(got.sum() * 0.5, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
    assert saved == [torch.Size([n, d])], "only the hidden states' gradient waits for backward"

    with torch.no_grad():  # evaluation: no gradient is formed
        torch.testing.assert_close(head_losses(head, hidden, targets, chunk=5), ref)
    assert head_chunk_rows(49_152) == 170  # 32 MiB of fp32 logits per chunk
    with head_chunk(8 * 2**20):  # what a memory plan may choose
        assert head_chunk_rows(49_152) == 42


def test_trained_head_goes_through_autograd_chunk_by_chunk() -> None:
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (11,), generator=gen)
    ref = F.cross_entropy(head(hidden), targets, reduction="none")
    ref_grads = torch.autograd.grad(ref.sum(), [hidden, head.weight, head.bias])
    got = head_losses(head, hidden, targets, chunk=4)
    got_grads = torch.autograd.grad(got.sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_half_precision_head_computes_in_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 12, generator=gen).to(torch.bfloat16)
    head = torch.nn.Linear(12, 300, bias=False).requires_grad_(False)
    head.weight = torch.nn.Parameter(weight, requires_grad=False)
    hidden = torch.randn(9, 12, generator=gen, requires_grad=True)
    targets = torch.randint(0, 300, (9,), generator=gen)
    exact = hidden @ weight.float().T  # what the stored half-precision weights mean
    ref = F.cross_entropy(exact, targets, reduction="none")
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(upcast_linear(hidden, weight), exact)
    got = head_losses(head, hidden, targets, chunk=4)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_quantized_bases_hold_the_tied_embedding_in_half_precision(
    tiny_model_dir: Path, model_cache: Path
) -> None:
    fp32 = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache).model
    nf4 = load_base(resolve_model(str(tiny_model_dir)), Quantization.NF4, model_cache).model
    emb, head = nf4.get_input_embeddings(), nf4.get_output_embeddings()
    assert emb.weight.dtype == FROZEN_EMBEDDING_DTYPE and head.weight is emb.weight
    assert fp32.get_input_embeddings().weight.dtype == torch.float32
    torch.testing.assert_close(
        emb.weight.float(), fp32.get_input_embeddings().weight.to(FROZEN_EMBEDDING_DTYPE).float()
    )
    # The converted table is kept beside the checkpoint; the next load reads it.
    entry = ensure_quantized(resolve_model(str(tiny_model_dir)), Quantization.NF4, model_cache)
    assert (entry / "half-model.embed_tokens.weight.safetensors").is_file()
    again = load_base(resolve_model(str(tiny_model_dir)), Quantization.NF4, model_cache).model
    assert torch.equal(again.get_input_embeddings().weight, emb.weight)
    ids = torch.tensor([[1, 5, 9]])
    assert emb(ids).dtype == torch.float32  # the decoder still computes in fp32
    hidden = torch.randn(1, 3, emb.weight.shape[1])
    torch.testing.assert_close(head(hidden), hidden @ emb.weight.float().T)


def test_split_batch_cuts_padding_only(
    tiny_model_dir: Path, model_cache: Path, examples: list
) -> None:  # type: ignore[type-arg]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    batch = collate(examples[:5], base.tokenizer.pad_token_id, torch.device("cpu"))
    parts = split_batch(batch, 2)
    assert [p.input_ids.shape[0] for p in parts] == [2, 2, 1]
    for i, part in enumerate(parts):
        rows = slice(2 * i, 2 * i + part.input_ids.shape[0])
        width = part.input_ids.shape[1]
        assert width == int(batch.attention_mask[rows].sum(dim=1).max())
        assert torch.equal(part.labels, batch.labels[rows, :width])
        assert not (batch.labels[rows, width:] != IGNORE_INDEX).any()


def test_evaluation_loss_is_unchanged(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, model = _model(tiny_model_dir, model_cache)
    model.eval()
    pad = base.tokenizer.pad_token_id
    total, count = 0.0, 0
    with torch.no_grad():  # the plain computation, batch by batch
        for start in range(0, 20, 8):
            batch = collate(examples[start : min(start + 8, 20)], pad, torch.device("cpu"))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            targets = batch.labels[:, 1:]
            keep = targets != IGNORE_INDEX
            total += float(F.cross_entropy(logits[:, :-1][keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    monkeypatch.setattr("client.loss.head_chunk_rows", lambda vocab: 6)
    result = evaluate(model, examples[:20], batch_size=8, pad_id=pad)
    assert result.num_tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-6)


def _reference_biased_backward(model, batch: Batch, bias: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    """Full logits plus the bias, one cross-entropy, one backward."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[:, :-1][keep].float() + bias, targets[keep])
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("quant", [Quantization.NONE, Quantization.NF4])
@pytest.mark.parametrize(
    ("micro_batch", "chunk", "plain_head"), [(0, None, True), (3, 5, True), (0, None, False)]
)
def test_logit_bias_gives_the_gradients_of_the_biased_cross_entropy(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
    quant: Quantization,
    micro_batch: int,
    chunk: int | None,
    plain_head: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Local-prior adjustment (``client.prior``): under ``logit_bias`` the chunked head (and the
    full-logits path of a model whose head is not applied alone) trains on logits + bias."""
    base, model = _model(tiny_model_dir, model_cache, quant)
    batch = collate(examples[:6], base.tokenizer.pad_token_id, torch.device("cpu"))
    vocab = int(base.model.get_output_embeddings().weight.shape[0])
    bias = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 3.0
    ref_loss, ref = _grads(model, lambda: _reference_biased_backward(model, batch, bias))
    plain_loss, _ = _grads(model, lambda: _reference_backward(model, batch))
    assert abs(ref_loss - plain_loss) > 0.1  # the bias changes the loss

    if chunk is not None:
        monkeypatch.setattr("client.loss.head_chunk_rows", lambda vocab: chunk)
    if not plain_head:
        monkeypatch.setattr("client.train._PLAIN_HEAD_MODEL_TYPES", frozenset())
    with logit_bias(bias):
        loss, grads = _grads(model, lambda: backward_mean_loss(model, batch, micro_batch))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Outside the block no bias is applied.
    loss_after, _ = _grads(model, lambda: backward_mean_loss(model, batch, micro_batch))
    assert loss_after == pytest.approx(plain_loss, rel=1e-6)


def test_logit_bias_on_a_trained_head() -> None:
    """The autograd path of ``head_losses`` (a head that is trained) adds the bias too."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(9, 6, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    bias = torch.randn(11)
    want = F.cross_entropy(head(hidden) + bias, targets, reduction="none")
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    with logit_bias(bias):
        got = head_losses(head, hidden, targets, chunk=4)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_a_biased_half_precision_chunk_stays_within_its_planned_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bf16 products a chunk's logits are upcast to fp32 to take the bias; such chunks
    hold half the positions, so the bf16 logits and their fp32 copy together stay within the
    fp32 bytes the memory plan counts per chunk (``client.memory``). The losses are unchanged."""
    import client.loss

    torch.manual_seed(0)
    vocab, dim, n = 64, 16, 20
    head = torch.nn.Linear(dim, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(n, dim)
    targets = torch.randint(0, vocab, (n,))
    bias = torch.randn(vocab)
    chunk_bytes = 8 * 4 * vocab  # 8 positions of fp32 logits
    seen: list[tuple[int, torch.dtype]] = []
    real = client.loss.upcast_linear

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = real(x, w)
        seen.append((int(out.shape[0]), out.dtype))
        return out

    monkeypatch.setattr("client.loss.upcast_linear", spy)
    with head_chunk(chunk_bytes), torch.autocast("cpu", dtype=torch.bfloat16):
        head_losses(head, hidden, targets)
        unbiased = list(seen)
        seen.clear()
        with logit_bias(bias):
            got = head_losses(head, hidden, targets)
        want = biased_cross_entropy(head(hidden), targets, bias)
    assert unbiased == [(8, torch.bfloat16), (8, torch.bfloat16), (4, torch.bfloat16)]
    assert seen == [(4, torch.bfloat16)] * 5
    assert 4 * vocab * (2 + 4) <= chunk_bytes  # a bf16 chunk and its fp32 copy
    torch.testing.assert_close(got, want)
    # In fp32 nothing is upcast and the chunks keep their planned size.
    seen.clear()
    with head_chunk(chunk_bytes), logit_bias(bias):
        head_losses(head, hidden, targets)
    assert [rows for rows, _ in seen] == [8, 8, 4]
