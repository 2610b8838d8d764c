"""Sample-level DP-SGD for a client's local round (Abadi et al. 2016), with Opacus.

Only the LoRA parameters train, so only they get per-example gradients: Opacus's hooks sit on
the LoRA ``nn.Linear`` layers and never touch the frozen (quantized) base. Each step

* Poisson-samples the local examples with rate q = batch_size / examples (a secret generator),
* computes each example's gradient of its own mean loss per response token (the loss in
  ``client.train.per_example_loss``: decoder + LM head at labelled positions only),
* clips each to ``clip_norm``, sums, adds N(0, (noise_multiplier * clip_norm)^2) and divides by
  the expected batch size (Opacus's ``DPOptimizer``), then takes an AdamW step.

A round is ``local_steps`` Poisson-sampled Gaussian releases; the client's ledger of them lives in
its persistent state directory, so its epsilon accumulates across rounds and restarts, and a
round that would take it past ``max_epsilon`` is refused before any training.

What the reply carries besides the DP-trained delta would leak the local data, so in DP-SGD mode
a client reports ``num-examples`` = 1 (uniform FedAvg weights) and no training loss.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client.data import TokenizedExample
from client.train import Batch, Correction, Params, per_example_loss, train_round
from privacy.accounting import AccountantKind, GaussianRelease, PrivacyLedger, PrivacyUnit
from privacy.mechanisms import poisson_sample, secure_rng
from protocol.messages import ClientUpdate, TrainInstruction

if TYPE_CHECKING:
    from peft import PeftModel

LEDGER_FILE = Path("privacy") / "sample-ledger.json"


class PrivacyBudgetExhausted(RuntimeError):
    """The client refuses to train: its epsilon would pass the allowed maximum."""


def sampling_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate that gives ``batch_size`` examples per step on average."""
    if num_examples < 1:
        raise ValueError("no training examples")
    return min(1.0, batch_size / num_examples)


def ledger_path(state_dir: Path) -> Path:
    return state_dir / LEDGER_FILE


class DpSgdSteps:
    """The DP-SGD engine of ``client.train.train_round``: Poisson-sampled batches, per-example
    gradients of the LoRA layers (Opacus hooks), clipping and noise (Opacus's ``DPOptimizer``),
    then the corrections and the AdamW step. The loss never leaves the client."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        instr: TrainInstruction,
        model: PeftModel,
        *,
        noise_generator: torch.Generator | None,
        sampling_rng: np.random.Generator | None,
    ) -> None:
        from opacus.grad_sample import GradSampleHooks
        from opacus.optimizers import DPOptimizer

        sdp = instr.sample_dp
        if not sdp.enabled:
            raise ValueError("DP-SGD needs sample_dp.noise_multiplier > 0")
        self.instr = instr
        self.device = next(model.parameters()).device
        self.noise_generator = noise_generator or torch.Generator(device=self.device).manual_seed(
            secrets.randbits(63)
        )
        self.sampling_rng = sampling_rng or secure_rng()
        self.q = 0.0
        self.batch_sizes: list[int] = []
        self._model = model
        self._hooks_cls = GradSampleHooks
        self._hooks: Any = None
        self._dp_cls = DPOptimizer
        self._inner = optimizer
        self.optimizer: Any = None

    def batches(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        self.q = sampling_rate(n, self.instr.batch_size)
        sdp = self.instr.sample_dp
        # Per-example gradients for the trainable (LoRA) layers only; loss = sum of example losses.
        self._hooks = self._hooks_cls(
            self._model, batch_first=True, loss_reduction="sum", strict=True
        )
        self.optimizer = self._dp_cls(
            self._inner,
            noise_multiplier=sdp.noise_multiplier,
            max_grad_norm=sdp.clip_norm,
            expected_batch_size=max(1, round(self.q * n)),
            loss_reduction="mean",  # divide the noisy sum by the expected batch size
            generator=self.noise_generator,
        )
        out = [
            np.asarray(poisson_sample(list(range(n)), self.q, self.sampling_rng), dtype=np.int64)
            for _ in range(self.instr.local_steps)
        ]
        self.batch_sizes = [len(idx) for idx in out]
        return out

    def backward(self, model: PeftModel, batch: Batch | None) -> float | None:
        if batch is None:  # an empty Poisson sample: the step releases noise only
            for p in model.parameters():
                if p.requires_grad:
                    # Opacus reads per-example gradients from this attribute.
                    p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                        (0, *p.shape), device=self.device, dtype=p.dtype
                    )
            return None
        with warnings.catch_warnings():
            # The first LoRA layer's input (frozen embeddings) needs no gradient; Opacus only
            # reads the gradient w.r.t. each layer's output.
            warnings.filterwarnings(
                "ignore", message="Full backward hook is firing", category=UserWarning
            )
            per_example_loss(model, batch).sum().backward()
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # per-example gradients too

    def step(self, params: Params, corrections: Sequence[Correction]) -> None:
        if self.optimizer.pre_step():  # clip, sum, noise, divide: p.grad is the private grad
            for correct in corrections:
                correct(params)
            self.optimizer.original_optimizer.step()

    def close(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self._hooks is not None:
            self._hooks.cleanup()

    def num_examples(self, n: int) -> int:
        return 1  # the local dataset size is private too: uniform FedAvg weights

    def metrics(self) -> dict[str, float]:
        return {
            "dp-steps": float(self.instr.local_steps),
            "dp-sampling-rate": self.q,
            "dp-examples": float(sum(self.batch_sizes)),  # Poisson batches: the sizes vary
        }


def dpsgd_round(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    instr: TrainInstruction,
    global_adapter: dict[str, np.ndarray],
    *,
    pad_id: int,
    client_seed: int,
    noise_generator: torch.Generator | None = None,
    sampling_rng: np.random.Generator | None = None,
    corrections: Sequence[Correction] = (),
) -> tuple[ClientUpdate, GaussianRelease]:
    """One round of DP-SGD on the LoRA parameters; returns the delta and the release it made.

    ``noise_generator``/``sampling_rng`` default to OS-seeded generators (tests pass seeded ones).
    """
    sdp = instr.sample_dp
    if not sdp.enabled:
        raise ValueError("dpsgd_round needs sample_dp.noise_multiplier > 0")

    def engine(optimizer: torch.optim.Optimizer, ins: TrainInstruction, m: Any) -> DpSgdSteps:
        return DpSgdSteps(
            optimizer, ins, m, noise_generator=noise_generator, sampling_rng=sampling_rng
        )

    update = train_round(
        model,
        examples,
        instr,
        global_adapter,
        pad_id=pad_id,
        client_seed=client_seed,
        engine=engine,
        corrections=corrections,
    )
    q = sampling_rate(len(examples), instr.batch_size)
    return update, GaussianRelease(sdp.noise_multiplier, q, instr.local_steps)


def private_round(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    instr: TrainInstruction,
    global_adapter: dict[str, np.ndarray],
    *,
    pad_id: int,
    client_seed: int,
    state_dir: Path,
    corrections: Sequence[Correction] = (),
) -> ClientUpdate:
    """DP-SGD round with the client's persistent ledger: refuse if over budget, train, record
    the release on disk (before the update leaves the client) and report cumulative epsilon."""
    sdp = instr.sample_dp
    kind = AccountantKind.parse(sdp.accountant, field_name="sample-dp accountant")
    n = len(examples)
    if not sdp.delta < 1.0 / n:
        raise ValueError(f"delta: {sdp.delta:g} must be below 1/(local training examples) = 1/{n}")
    path = ledger_path(state_dir)
    ledger = PrivacyLedger.load(path, PrivacyUnit.SAMPLE)
    planned = GaussianRelease(
        sdp.noise_multiplier, sampling_rate(n, instr.batch_size), instr.local_steps
    )
    if sdp.max_epsilon > 0:
        after = ledger.with_event(planned).epsilon(sdp.delta, kind)
        if after > sdp.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"privacy budget: this round would take the client's sample-level epsilon from "
                f"{ledger.epsilon(sdp.delta, kind):.4g} to {after:.4g}, past max-epsilon "
                f"{sdp.max_epsilon:g}"
            )
    update, event = dpsgd_round(
        model,
        examples,
        instr,
        global_adapter,
        pad_id=pad_id,
        client_seed=client_seed,
        corrections=corrections,
    )
    ledger.record(event)
    ledger.save(path)
    eps = ledger.epsilon(sdp.delta, kind)
    metrics = {**update.metrics, "client-epsilon": eps, "client-delta": sdp.delta}
    return ClientUpdate(delta=update.delta, num_examples=update.num_examples, metrics=metrics)
