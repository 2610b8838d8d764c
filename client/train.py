"""Local LoRA training and evaluation: the core every client shell (Flower ClientApp, benchmarks,
simulation) calls.

``train_round`` starts from the global adapter, runs ``local_steps`` AdamW steps on the trainable
adapter tensors and returns the *delta* (trained - global) with the FedAvg weight. ``evaluate``
returns the mean loss per response token on held-out examples.

The loss is computed only where labels are set (assistant tokens). For architectures whose logits
are exactly ``lm_head(hidden)`` we apply the 49k-wide output head to those positions alone instead
of the whole sequence: the same loss, a fraction of the head's FLOPs and memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from client.data import IGNORE_INDEX, TokenizedExample
from client.loss import biased_cross_entropy, head_losses, logit_bias, logit_bias_in_force
from client.model import adapter_parameters, get_adapter, set_adapter
from client.prior import logit_adjustment_bias
from protocol.messages import ClientUpdate, EvalResult, TrainInstruction

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# Causal LMs whose forward computes logits as lm_head(last hidden state) with nothing after it
# (no soft-capping, no logit scale), so the head may be applied to selected positions only.
_PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}
)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T) 1 for real tokens
    labels: torch.Tensor  # (B, T) IGNORE_INDEX where no loss


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def batch_schedule(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Index batches for ``steps`` steps: shuffled epochs laid end to end (no row repeats within
    an epoch). With fewer than ``batch_size`` rows every batch holds all of them."""
    if n == 0:
        raise ValueError("no training examples")
    size = min(batch_size, n)
    order: list[int] = []
    while len(order) < steps * size:
        order.extend(rng.permutation(n).tolist())
    return [np.asarray(order[i * size : (i + 1) * size]) for i in range(steps)]


def token_losses(model: PeftModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at each labelled position (N,), and the example each position
    belongs to (N,). The head runs a chunk of labelled positions at a time (``client.loss``):
    never the full B x T x V logits, in training or in evaluation."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    base = cast("PreTrainedModel", model.get_base_model())
    if getattr(base.config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES:
        decoder = cast(torch.nn.Module, base.get_decoder())
        head = cast(torch.nn.Module, base.get_output_embeddings())
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state  # (B, T, D)
        losses = head_losses(head, hidden[:, :-1][keep], targets[keep])  # (N,)
    else:
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        losses = biased_cross_entropy(full[:, :-1][keep], targets[keep], logit_bias_in_force())
    return losses, keep.nonzero()[:, 0]


def response_loss(model: PeftModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and their count."""
    losses, _ = token_losses(model, batch)
    return losses.sum(), int(losses.numel())


def per_example_loss(model: PeftModel, batch: Batch) -> torch.Tensor:
    """Each example's mean loss per response token (B,): the unit DP-SGD clips. Examples without
    a labelled token contribute 0."""
    losses, owner = token_losses(model, batch)
    n = batch.input_ids.shape[0]
    sums = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, owner, losses)
    counts = torch.bincount(owner, minlength=n).to(losses.dtype)
    return sums / counts.clamp(min=1)


def split_batch(batch: Batch, rows: int) -> list[Batch]:
    """Micro-batches of at most ``rows`` examples, each cut to its own longest row (right
    padding: the cut columns are padding only, so no position's loss changes)."""
    out = []
    for start in range(0, batch.input_ids.shape[0], rows):
        mask = batch.attention_mask[start : start + rows]
        width = max(int(mask.sum(dim=1).max()), 1)
        out.append(
            Batch(
                batch.input_ids[start : start + rows, :width],
                mask[:, :width],
                batch.labels[start : start + rows, :width],
            )
        )
    return out


def backward_mean_loss(model: PeftModel, batch: Batch, micro_batch: int = 0) -> float:
    """Backpropagate the batch's mean loss per labelled token and return it; with ``micro_batch``
    (0: off) one micro-batch of rows at a time, each scaled by the whole batch's token count, so
    the accumulated gradients are those of one backward over the batch (up to float rounding;
    with LoRA dropout the masks are drawn per micro-batch)."""
    if micro_batch <= 0 or micro_batch >= batch.input_ids.shape[0]:
        loss_sum, n = response_loss(model, batch)
        loss = loss_sum / max(n, 1)
        loss.backward()
        return float(loss.detach())
    n_total = max(int((batch.labels[:, 1:] != IGNORE_INDEX).sum()), 1)
    total = 0.0
    for part in split_batch(batch, micro_batch):
        loss_sum, _ = response_loss(model, part)
        (loss_sum / n_total).backward()
        total += float(loss_sum.detach())
    return total / n_total


def _client_rng(instr: TrainInstruction, client_seed: int) -> np.random.Generator:
    return np.random.default_rng([instr.seed, instr.round, client_seed])


Params = Mapping[str, torch.nn.Parameter]


class Correction(Protocol):
    """A data-independent term added to the trainable parameters' gradients each local step
    (FedProx's proximal gradient, SCAFFOLD's control-variate correction): before gradient
    clipping in plain training, after clipping and noise in DP-SGD (being data-independent, it
    leaves the privacy guarantee unchanged)."""

    def __call__(self, params: Params) -> None: ...


class Engine(Protocol):
    """How local steps pick examples and turn them into gradients and an optimizer step: plain
    minibatch AdamW (``PlainSteps``) or DP-SGD (``client.dpsgd.DpSgdSteps``)."""

    def batches(self, n: int, rng: np.random.Generator) -> list[np.ndarray]: ...

    def backward(self, model: PeftModel, batch: Batch | None) -> float | None:
        """Gradients of the step's loss (``batch`` None: an empty DP sample); the loss value
        to report, or None when it must not leave the client."""
        ...

    def zero_grad(self) -> None: ...

    def step(self, params: Params, corrections: Sequence[Correction]) -> None: ...

    def close(self) -> None: ...

    def num_examples(self, n: int) -> int:
        """The FedAvg weight the update reports for ``n`` local examples."""
        ...

    def metrics(self) -> dict[str, float]: ...


class PlainSteps:
    """Minibatch AdamW: seeded shuffled batches, mean loss per response token, gradient-norm
    clipping, then the corrections and the step."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, instr: TrainInstruction, micro_batch: int = 0
    ) -> None:
        self.optimizer = optimizer
        self.instr = instr
        self.micro_batch = micro_batch

    def batches(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        return batch_schedule(n, self.instr.batch_size, self.instr.local_steps, rng)

    def backward(self, model: PeftModel, batch: Batch | None) -> float | None:
        assert batch is not None
        return backward_mean_loss(model, batch, self.micro_batch)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, params: Params, corrections: Sequence[Correction]) -> None:
        trainable = [p for p in params.values() if p.requires_grad]
        for correct in corrections:
            correct(params)
        torch.nn.utils.clip_grad_norm_(trainable, self.instr.max_grad_norm)
        self.optimizer.step()

    def close(self) -> None:
        return None

    def num_examples(self, n: int) -> int:
        return n

    def metrics(self) -> dict[str, float]:
        return {}


EngineFactory = Callable[[torch.optim.Optimizer, TrainInstruction, "PeftModel"], Engine]


def prior_bias(
    model: PeftModel, examples: Sequence[TokenizedExample], tau: float
) -> torch.Tensor | None:
    """The logit bias of local-prior adjustment (``client.prior``): tau x the log frequency of
    each token among ``examples``' reply tokens, on the model's device; None when tau is 0."""
    if tau == 0:
        return None
    base = cast("PreTrainedModel", model.get_base_model())
    head = cast(torch.nn.Module, base.get_output_embeddings())
    vocab = int(cast(torch.Tensor, head.weight).shape[0])
    bias = logit_adjustment_bias((e.labels[1:] for e in examples), vocab, tau)  # the targets
    return torch.from_numpy(bias).to(next(model.parameters()).device)


def train_round(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    instr: TrainInstruction,
    global_adapter: dict[str, np.ndarray],
    *,
    pad_id: int,
    client_seed: int,
    engine: EngineFactory | None = None,
    corrections: Sequence[Correction] = (),
    micro_batch: int = 0,
) -> ClientUpdate:
    """One round of local training from ``global_adapter``; returns the adapter delta.

    ``engine`` decides how a step's gradient is formed (plain, the default, or DP-SGD);
    ``corrections`` are added to the gradients every step (FedProx, SCAFFOLD); ``micro_batch``
    > 0 makes the plain engine accumulate each step's gradients over micro-batches of that many
    rows (the memory plan's choice, ``client.memory``). ``instr.logit_adjustment`` > 0 trains
    on logits shifted by the client's own log prior (``prior_bias``)."""
    device = next(model.parameters()).device
    set_adapter(model, global_adapter)
    trainable = set(instr.trainable_keys) if instr.trainable_keys else set(global_adapter)
    params = adapter_parameters(model)
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    optimizer = torch.optim.AdamW(
        [params[k] for k in sorted(trainable)], lr=instr.learning_rate, weight_decay=0.0
    )
    steps = engine(optimizer, instr, model) if engine else PlainSteps(optimizer, instr, micro_batch)

    rng = _client_rng(instr, client_seed)
    schedule = steps.batches(len(examples), rng)
    bias = prior_bias(model, examples, instr.logit_adjustment)
    losses: list[float] = []
    tokens = 0
    model.train()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]), logit_bias(bias):
            torch.manual_seed(int(rng.integers(2**31)))  # LoRA dropout
            for idx in schedule:
                steps.zero_grad()
                batch = collate([examples[i] for i in idx], pad_id, device) if len(idx) else None
                loss = steps.backward(model, batch)
                steps.step(params, corrections)
                if loss is not None:
                    losses.append(loss)
                if batch is not None:
                    tokens += int(batch.attention_mask.sum())
    finally:
        optimizer.zero_grad(set_to_none=True)
        steps.close()
        model.eval()
    seconds = time.perf_counter() - t0

    trained = get_adapter(model)
    delta = {k: trained[k] - global_adapter[k] for k in global_adapter if k in trainable}
    metrics = {"train-seconds": seconds, **steps.metrics()}
    if losses:
        metrics.update(
            {
                "train-loss": float(np.mean(losses)),
                "train-loss-last": losses[-1],
                "train-tokens": tokens,
                "tokens-per-second": tokens / seconds if seconds > 0 else 0.0,
            }
        )
    return ClientUpdate(
        delta=delta, num_examples=steps.num_examples(len(examples)), metrics=metrics
    )


@torch.no_grad()  # not inference_mode: torchao int8 weights cannot be detached inside it
def evaluate(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_id: int,
    global_adapter: dict[str, np.ndarray] | None = None,
) -> EvalResult:
    """Mean loss per response token over ``examples`` (the adapter loaded first if given)."""
    if global_adapter is not None:
        set_adapter(model, global_adapter)
    model.eval()
    device = next(model.parameters()).device
    total, n_tokens = 0.0, 0
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        loss_sum, n = response_loss(model, batch)
        total += float(loss_sum)
        n_tokens += n
    loss = total / n_tokens if n_tokens else float("nan")
    return EvalResult(
        loss=loss if n_tokens else 0.0,
        num_tokens=n_tokens,
        num_examples=len(examples),
        metrics={"eval-seconds": time.perf_counter() - t0},
    )
