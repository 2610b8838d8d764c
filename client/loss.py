"""The output head and cross-entropy at labelled positions, a chunk of positions at a time.

A causal LM's head is wide (SmolLM2: 49,152 logits per position). Left to autograd, a batch of
4 x 128 tokens keeps the N x V logits, their log-softmax and, in backward, their gradient alive
together: about 300 MB in fp32 for a 135M-parameter model whose NF4 decoder is 60 MB. Here the
head is applied to at most ``chunk`` positions at once and nothing N x V is ever allocated.

For the usual frozen head (a plain ``nn.Linear``, tied to the embedding, no bias, not trained)
``_FrozenHeadCrossEntropy`` computes, chunk by chunk, the losses and already their gradient with
respect to the hidden states, ``(softmax(logits) - onehot(target)) @ W``: the same two GEMMs as
autograd's forward and backward of the head, done while the chunk's logits are at hand, so only
the N x D gradient (1.2 MB here) waits for backward. Any other head (trained, biased, wrapped by
LoRA) goes through autograd one checkpointed chunk at a time: the same memory bound, and one more
GEMM per chunk to recompute its logits in backward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Logits of one chunk stay near this size (fp32). Each chunk's GEMM streams (and packs) the whole
# 49k x 576 head, so small chunks are slow: on one core of the development machine the head's
# forward GEMM ran at 40 GFLOP/s for 42 positions (8 MiB), 72 for 170 (32 MiB), 83 for 508 (all
# of a 4 x 128 batch), the square fp32 GEMM at 109. Unbudgeted training uses 32 MiB; a memory plan
# may choose 8 MiB (``head_chunk``).
HEAD_CHUNK_BYTES = 32 * 2**20
SMALL_HEAD_CHUNK_BYTES = 8 * 2**20
# A head held in half precision is upcast one vocabulary slice of about this size at a time.
HALF_SLICE_BYTES = 4 * 2**20

_chunk_bytes: contextvars.ContextVar[int] = contextvars.ContextVar(
    "head_chunk_bytes", default=HEAD_CHUNK_BYTES
)
_bias: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "logit_bias", default=None
)


@contextlib.contextmanager
def head_chunk(chunk_bytes: int) -> Iterator[None]:
    """Within the block, head chunks hold about ``chunk_bytes`` of fp32 logits."""
    token = _chunk_bytes.set(chunk_bytes)
    try:
        yield
    finally:
        _chunk_bytes.reset(token)


@contextlib.contextmanager
def logit_bias(bias: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``head_losses`` adds ``bias`` (V,) to every position's logits, in
    fp32, before the cross-entropy (a client's local-prior adjustment, ``client.prior``);
    None: no bias."""
    token = _bias.set(bias)
    try:
        yield
    finally:
        _bias.reset(token)


def logit_bias_in_force() -> torch.Tensor | None:
    """The bias of the innermost ``logit_bias`` block, or None."""
    return _bias.get()


def head_chunk_rows(vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Positions per head chunk so that one chunk's fp32 logits take about ``chunk_bytes``
    (default: the ``head_chunk`` in force, else ``HEAD_CHUNK_BYTES``)."""
    return max(1, (chunk_bytes or _chunk_bytes.get()) // (4 * vocab_size))


def _slice_rows(weight: torch.Tensor, slice_bytes: int = HALF_SLICE_BYTES) -> int:
    return max(1, slice_bytes // (4 * int(weight.shape[1])))


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x``'s products run in: autocast's when it is on, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def upcast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in the products' precision (``product_dtype``) for a weight held in
    lower precision (V, D), one vocabulary slice upcast at a time (never a full-precision copy
    of the weight); one product when the weight is held in ``x``'s precision or in the
    products' (a bf16 head under bf16 autocast)."""
    if weight.dtype in (x.dtype, product_dtype(x)):
        return x @ weight.T  # autocast, when on, converts what differs
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    rows = _slice_rows(weight)
    for v in range(0, weight.shape[0], rows):
        out[..., v : v + rows] = x @ weight[v : v + rows].to(x.dtype).T
    return out


def _upcast_matmul(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``probs @ weight`` (c, V) x (V, D) in the products' precision, slice by slice unless
    the weight is held in it."""
    if weight.dtype in (probs.dtype, product_dtype(probs)):
        return probs @ weight
    rows = _slice_rows(weight)
    out = probs.new_zeros((probs.shape[0], weight.shape[1]))
    for v in range(0, weight.shape[0], rows):
        out.addmm_(probs[:, v : v + rows], weight[v : v + rows].to(probs.dtype))
    return out


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Per-position ``cross_entropy(hidden @ W.T, targets)`` for a frozen ``W`` (V, D), with the
    gradient for ``hidden`` formed in forward, one chunk of positions at a time. Each chunk's
    logits are the only (c, V) buffer: the softmax is formed in place."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,  # (N, D) float32
        weight: torch.Tensor,  # (V, D), frozen; float32 or held in half precision
        targets: torch.Tensor,  # (N,) int64
        chunk: int,
        want_grad: bool,
        bias: torch.Tensor | None,  # (V,) float32, added to the logits
    ) -> torch.Tensor:
        n = hidden.shape[0]
        losses = hidden.new_empty(n)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            t = targets[start:stop, None]
            logits = upcast_linear(hidden[start:stop], weight)  # (c, V)
            if bias is not None:
                logits = logits.float().add_(bias)
            target_logit = logits.gather(1, t).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(top).exp_()  # in place: logits are not needed any more
            total = exp.sum(dim=1, keepdim=True)
            losses[start:stop] = (top + total.log()).squeeze(1) - target_logit
            if grad_hidden is not None:
                probs = exp.div_(total)
                probs.scatter_add_(1, t, probs.new_full(t.shape, -1.0))  # softmax - onehot
                grad_hidden[start:stop] = _upcast_matmul(probs, weight)
            del logits, exp
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("head losses were computed without a gradient for backward")
        return grad_hidden * grad_losses[:, None], None, None, None, None, None


def _is_frozen_plain_linear(head: torch.nn.Module) -> bool:
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and type(head.weight) in (torch.Tensor, torch.nn.Parameter)
        and head.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def biased_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Per-position cross-entropy (N,) of ``logits`` (N, V) in fp32, plus ``bias`` (V,) if
    given (``logit_bias``)."""
    logits = logits.float()
    return F.cross_entropy(logits if bias is None else logits + bias, targets, reduction="none")


def _chunk_losses(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None
) -> Any:
    return biased_cross_entropy(head(hidden), targets, bias)


def head_losses(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(head(hidden), targets, reduction="none")`` (N,) for hidden states (N, D),
    never holding more than ``chunk`` positions' logits (default: ``head_chunk_rows``); the
    logits carry the ``logit_bias`` in force."""
    bias = logit_bias_in_force()
    weight = cast(torch.Tensor, getattr(head, "weight", None))
    rows = chunk or head_chunk_rows(int(weight.shape[0]) if weight is not None else 1)
    if chunk is None and bias is not None and product_dtype(hidden).itemsize < 4:
        # Half-precision logits are upcast to fp32 to take the bias: with half the positions
        # both copies (1/4 + 1/2 of a chunk) stay within the fp32 bytes a chunk is planned at.
        rows = max(1, rows // 2)
    if _is_frozen_plain_linear(head):
        want_grad = torch.is_grad_enabled() and hidden.requires_grad
        out = _FrozenHeadCrossEntropy.apply(hidden, head.weight, targets, rows, want_grad, bias)  # type: ignore[no-untyped-call]
        return cast(torch.Tensor, out)
    parts = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            parts.append(
                cast(torch.Tensor, checkpoint(_chunk_losses, head, h, t, bias, use_reentrant=False))
            )
        else:
            parts.append(_chunk_losses(head, h, t, bias))
    return torch.cat(parts)
