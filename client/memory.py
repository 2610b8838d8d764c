"""A memory budget that a client keeps: choose how to train so that the round fits ``max-memory``.

Pure arithmetic (no torch): model shapes, the batch, and what the process holds before the step
go in; a ``MemoryPlan`` (micro-batch with gradient accumulation, activation checkpointing,
quantization) comes out, or ``MemoryBudgetError`` naming the budget and the smallest footprint
reachable. ``client/app.py`` measures the inputs and applies the plan.

The estimate of a training step's memory, for ``tok = micro_batch x seq_len`` tokens of a
llama-style decoder with ``L`` layers (hidden ``D``, MLP ``F``), in fp32:

* without checkpointing, autograd keeps per layer and token ``7 D + 3 F + H + 2`` floats (measured
  with ``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2-135M: the normed inputs of the
  attention and MLP, q, k and v (repeated to every head when the batch is padded) and the
  attention output, gate/up/activation of the MLP, the attention's log-sum-exp per head ``H``
  and the norms' scales), plus a padded batch's attention mask;
* with checkpointing, only each layer's input (``D`` per token) is kept, and in backward one layer
  at a time is recomputed with its activations;
* while a layer runs (forward or backward) it holds ``TRANSIENT_PER_TOKEN`` more floats per token;
* the head (``client.loss``) holds one chunk of fp32 logits (32 MiB, or 8 MiB where that fits
  and 32 does not; and, for a half-precision weight, one upcast vocabulary slice) plus the
  gradient of the labelled hidden states;
* AdamW keeps a gradient and two moments per trainable adapter value.

The allocator hands memory back in pages and keeps some of what tensors release: the estimate is
scaled by ``ALLOCATOR_SLACK``, a factor measured with ``benchmarks/training.py --budgets``
(estimate against peak RSS, README "Edge clients in 2 GB").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from client.defaults import Quantization, base_held_in_bf16

MIB = 2**20
TRANSIENT_PER_TOKEN = (
    4  # x F floats: a layer's backward holds the MLP's gate/up/activation gradients at once
)
# Margin on the counted bytes for what the allocator keeps (README, "Edge clients in 2 GB").
# Measured on SmolLM2 at 128 tokens per row, step peak over the resident process against the
# counted bytes: 0.90 for 4 rows without checkpointing, 0.71 with it, but 1.28 for micro-batches
# of 2 rows (small tensors fragment the heap); a simulated client's plan of 1-row micro-batches
# reached 964 MiB where 953 were estimated with a margin of 1.1.
ALLOCATOR_SLACK = 1.3
# fp32 logits of one head chunk (client.loss): the faster size first, then the smaller one.
HEAD_CHUNKS_MIB = (32.0, 8.0)
HALF_HEAD_SLICE_MIB = 4.0  # one upcast vocabulary slice of a half-precision head
# What loading and using the base model costs besides its weights, MiB: transformers' modelling
# code and what it imports (scipy, sympy, torch.distributed, ...), bitsandbytes for NF4,
# thread pools and kernel caches. Measured with SmolLM2-135M on torch 2.13 / transformers 5.24
# (README, "Edge clients in 2 GB").
# Measured after two training steps: 265 (none), 267 (int8), 269 (nf4) MiB.
LOAD_OVERHEAD_MIB = {Quantization.NONE: 270.0, Quantization.INT8: 270.0, Quantization.NF4: 270.0}


class MemoryBudgetError(RuntimeError):
    """No way of training fits the budget; the message names it and the smallest footprint."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the model (its config and checkpoint headers)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    linear_params: int  # weights of the decoder's linear layers (what quantization compresses)
    embedding_params: int  # the token embedding (and a head tied to it)
    other_params: int  # norms and biases (kept in fp32)
    adapter_values: int  # trainable LoRA values
    head_params: int = 0  # an untied output head (kept in fp32 in every mode)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"model shape {name}: must be >= 1, got {getattr(self, name)}")
        counts = ("linear_params", "embedding_params", "other_params", "adapter_values")
        for name in (*counts, "head_params"):
            if getattr(self, name) < 0:
                raise ValueError(f"model shape {name}: must be >= 0, got {getattr(self, name)}")


# Bytes per weight of the decoder's linear layers: NF4 packs two 4-bit codes per byte plus one
# fp32 absmax per 64-value block; int8 one byte plus one fp32 scale per row (negligible).
_LINEAR_BYTES = {Quantization.NONE: 4.0, Quantization.INT8: 1.0, Quantization.NF4: 0.5 + 4 / 64}
# Quantized modes hold the frozen embedding in bfloat16 (client.model.hold_embeddings_in_half).
_EMBEDDING_BYTES = {Quantization.NONE: 4.0, Quantization.INT8: 2.0, Quantization.NF4: 2.0}


def _weight_bytes(quantization: Quantization, bf16_base: bool) -> tuple[float, float]:
    """Bytes per (linear, embedding) weight. ``bf16_base``: a client whose products run in bf16
    holds an unquantized base's linear layers and embedding in bf16 (``client.model.load_base``);
    the quantized modes are held the same either way."""
    if base_held_in_bf16(quantization, bf16_base):
        return 2.0, 2.0
    return _LINEAR_BYTES[quantization], _EMBEDDING_BYTES[quantization]


def weights_mib(shape: ModelShape, quantization: Quantization, bf16_base: bool = False) -> float:
    """Memory of the frozen base model's weights in ``quantization``, MiB."""
    linear, embedding = _weight_bytes(quantization, bf16_base)
    return (
        shape.linear_params * linear
        + shape.embedding_params * embedding
        + (shape.head_params + shape.other_params) * 4.0
    ) / MIB


@dataclass(frozen=True)
class MemoryPlan:
    """How one round trains: ``accumulation`` micro-batches of at most ``micro_batch`` rows make
    one optimizer step of the instructed batch size."""

    quantization: Quantization
    micro_batch: int
    accumulation: int
    checkpointing: bool
    estimated_mb: float  # estimated peak RSS of the process while training, MiB
    budget_mb: float  # 0: no budget
    head_chunk_mib: float = HEAD_CHUNKS_MIB[0]  # fp32 logits per head chunk (client.loss)

    @property
    def lean_allocator(self) -> bool:
        """Under a budget the C allocator returns freed memory at once (``client.rss``): the
        estimates assume it; it costs page faults, so unbudgeted training keeps the default."""
        return self.budget_mb > 0

    def describe(self) -> str:
        ckpt = ", checkpointing" if self.checkpointing else ""
        return (
            f"{self.quantization.value}, micro-batch {self.micro_batch} x {self.accumulation}"
            f"{ckpt}, ~{self.estimated_mb:.0f} MiB"
        )

    @classmethod
    def unplanned(cls, quantization: Quantization, batch_size: int) -> MemoryPlan:
        """No budget: the whole batch at once, no checkpointing, nothing estimated."""
        return cls(quantization, batch_size, 1, False, 0.0, 0.0, HEAD_CHUNKS_MIB[0])

    def metrics(self) -> dict[str, float]:
        """Numbers for the reply's metric record (``plan-*`` keys)."""
        return {
            "plan-micro-batch": float(self.micro_batch),
            "plan-accumulation": float(self.accumulation),
            "plan-checkpointing": float(self.checkpointing),
            "plan-estimated-mb": self.estimated_mb,
            "plan-head-chunk-mb": self.head_chunk_mib,
            "max-memory-mb": self.budget_mb,
        }


def saved_activation_floats(
    shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool
) -> int:
    """Floats autograd keeps for the backward of one micro-batch: every layer's activations, or
    with checkpointing every layer's input plus one layer's activations during its recompute;
    and a padded batch's attention mask (micro_batch x seq_len x seq_len, shared by the layers,
    kept twice: as built and as expanded for the attention kernel).
    """
    tok = micro_batch * seq_len
    per_layer_token = 7 * shape.hidden + 3 * shape.intermediate + shape.heads + 2
    mask = 2 * tok * seq_len
    if checkpointing:
        return tok * (shape.layers * shape.hidden + per_layer_token) + mask
    return tok * shape.layers * per_layer_token + mask


def step_mib(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    quantization: Quantization = Quantization.NONE,
    head_chunk_mib: float = HEAD_CHUNKS_MIB[0],
    bf16_base: bool = False,
) -> float:
    """Estimated memory (MiB) a training step adds to the loaded model, allocator slack
    included. Activations are counted in fp32 also for bf16 products (autocast keeps some of
    them in bf16: an over-estimate, README "Edge clients in 2 GB")."""
    tok = micro_batch * seq_len
    kept = saved_activation_floats(shape, micro_batch, seq_len, checkpointing)
    transient = tok * TRANSIENT_PER_TOKEN * shape.intermediate
    head_grad = tok * shape.hidden
    optimizer = 3 * shape.adapter_values
    floats = kept + transient + head_grad + optimizer
    # A head tied to a half-precision embedding upcasts one vocabulary slice per chunk.
    half = _weight_bytes(quantization, bf16_base)[1] < 4 and not shape.head_params
    head_mib = head_chunk_mib + (HALF_HEAD_SLICE_MIB if half else 0.0)
    return ALLOCATOR_SLACK * (4 * floats / MIB + head_mib)


def resident_mib(
    shape: ModelShape, quantization: Quantization, process_mb: float, bf16_base: bool = False
) -> float:
    """Estimated memory of a process now holding ``process_mb`` once it has loaded and used the
    base model in ``quantization``: its weights plus what loading and running one costs besides
    (``LOAD_OVERHEAD_MIB``: the modelling code and its imports, thread pools, kernel caches)."""
    weights = weights_mib(shape, quantization, bf16_base)
    return process_mb + LOAD_OVERHEAD_MIB[quantization] + weights


def micro_batch_sizes(batch_size: int) -> list[int]:
    """Distinct micro-batch sizes ceil(B / k), k = 1..B, largest first."""
    return sorted({math.ceil(batch_size / k) for k in range(1, batch_size + 1)}, reverse=True)


def plan_memory(
    budget_mb: float,
    shape: ModelShape,
    *,
    batch_size: int,
    seq_len: int,
    resident_mb: Mapping[Quantization, float],
    quantizations: Sequence[Quantization],
    allow_checkpointing: bool = True,
    allow_micro_batches: bool = True,
    bf16_base: bool = False,
) -> MemoryPlan:
    """The fastest way to train that fits ``budget_mb`` (MiB; 0: no budget).

    ``quantizations`` are the modes the client may use, preferred first; ``resident_mb`` is the
    process's memory with that mode's model loaded and used, before a step (``resident_mib``).
    ``bf16_base``: the products run in bf16, so an unquantized base is held in bf16.
    The first mode in which some plan fits is used; within it, no checkpointing comes before
    checkpointing (recomputation costs one more forward of the decoder, while micro-batches of
    a 4 x 128 batch run about as fast as the whole batch on a CPU), and larger micro-batches
    before smaller ones.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch {batch_size} x {seq_len}: both must be >= 1")
    if not quantizations:
        raise ValueError("quantizations: at least one mode is needed")
    sizes = micro_batch_sizes(batch_size) if allow_micro_batches else [batch_size]
    ckpts = (False, True) if allow_checkpointing else (False,)

    def plan(q: Quantization, mb: int, ckpt: bool, chunk: float) -> MemoryPlan:
        est = resident_mb[q] + step_mib(shape, mb, seq_len, ckpt, q, chunk, bf16_base)
        return MemoryPlan(q, mb, math.ceil(batch_size / mb), ckpt, est, budget_mb, chunk)

    if budget_mb <= 0:
        return plan(quantizations[0], batch_size, False, HEAD_CHUNKS_MIB[0])
    for q in quantizations:
        for ckpt in ckpts:
            for mb in sizes:
                for chunk in HEAD_CHUNKS_MIB:
                    candidate = plan(q, mb, ckpt, chunk)
                    if candidate.estimated_mb <= budget_mb:
                        return candidate
    smallest = min(
        (plan(q, sizes[-1], ckpts[-1], HEAD_CHUNKS_MIB[-1]) for q in quantizations), key=_estimate
    )
    how = f"{smallest.quantization.value}, micro-batch {smallest.micro_batch}"
    how += ", checkpointing" if smallest.checkpointing else ""
    raise MemoryBudgetError(
        f"max-memory {budget_mb:.0f} MiB: training cannot fit; the smallest footprint this client "
        f"can reach is ~{smallest.estimated_mb:.0f} MiB ({how})"
    )


def fitting_quantization(
    budget_mb: float,
    shape: ModelShape,
    *,
    seq_len: int,
    resident_mb: Mapping[Quantization, float],
    quantizations: Sequence[Quantization],
    bf16_base: bool = False,
) -> Quantization:
    """The first of ``quantizations`` whose smallest training footprint (one row per
    micro-batch, checkpointing) fits ``budget_mb``: the model a client trains and evaluates."""
    plan = plan_memory(
        budget_mb,
        shape,
        batch_size=1,
        seq_len=seq_len,
        resident_mb=resident_mb,
        quantizations=quantizations,
        bf16_base=bf16_base,
    )
    return plan.quantization


def _estimate(p: MemoryPlan) -> float:
    return p.estimated_mb


# Fallback order of quantize-to-fit: each mode holds the decoder's linear weights in fewer bytes.
_SMALLER = (Quantization.NONE, Quantization.INT8, Quantization.NF4)


def quantization_candidates(preferred: Quantization, quantize_to_fit: bool) -> list[Quantization]:
    """The modes a client may train in, preferred first: its own, then (if it allows falling
    back) each smaller one."""
    if not quantize_to_fit:
        return [preferred]
    return [preferred, *_SMALLER[_SMALLER.index(preferred) + 1 :]]


def client_plan(
    budget_mb: float,
    shape: ModelShape,
    *,
    preferred: Quantization,
    quantize_to_fit: bool,
    batch_size: int,
    seq_len: int,
    resident_mb: Mapping[Quantization, float],
    dp_sgd: bool = False,
    bf16_base: bool = False,
) -> MemoryPlan:
    """A client's plan for a training round. The quantization is the one its evaluation uses
    too (``fitting_quantization``: fixed by the budget and sequence length, not the batch);
    then the fastest micro-batch/checkpointing within it. DP-SGD (Opacus' per-example hooks)
    trains its Poisson batch whole and without checkpointing."""
    if budget_mb <= 0:
        raise ValueError(f"max-memory: a plan needs a budget, got {budget_mb} MiB")
    modes = quantization_candidates(preferred, quantize_to_fit)
    if len(modes) > 1:
        modes = [
            fitting_quantization(
                budget_mb,
                shape,
                seq_len=seq_len,
                resident_mb=resident_mb,
                quantizations=modes,
                bf16_base=bf16_base,
            )
        ]
    return plan_memory(
        budget_mb,
        shape,
        batch_size=batch_size,
        seq_len=seq_len,
        resident_mb=resident_mb,
        quantizations=modes,
        allow_checkpointing=not dp_sgd,
        allow_micro_batches=not dp_sgd,
        bf16_base=bf16_base,
    )
