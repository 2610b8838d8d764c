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
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from client.data import TokenizedExample
from client.model import adapter_parameters, get_adapter, set_adapter
from client.train import collate, per_example_loss
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
) -> tuple[ClientUpdate, GaussianRelease]:
    """One round of DP-SGD on the LoRA parameters; returns the delta and the release it made.

    ``noise_generator``/``sampling_rng`` default to OS-seeded generators (tests pass seeded ones).
    """
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    sdp = instr.sample_dp
    if not sdp.enabled:
        raise ValueError("dpsgd_round needs sample_dp.noise_multiplier > 0")
    n = len(examples)
    q = sampling_rate(n, instr.batch_size)
    device = next(model.parameters()).device
    set_adapter(model, global_adapter)
    trainable = set(instr.trainable_keys) if instr.trainable_keys else set(global_adapter)
    params = adapter_parameters(model)
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    train_params = [params[k] for k in sorted(trainable)]

    noise_generator = noise_generator or torch.Generator(device=device).manual_seed(
        secrets.randbits(63)
    )
    sampling_rng = sampling_rng or secure_rng()
    # Per-example gradients for the trainable (LoRA) layers only; loss = sum of example losses.
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
    optimizer = DPOptimizer(
        torch.optim.AdamW(train_params, lr=instr.learning_rate, weight_decay=0.0),
        noise_multiplier=sdp.noise_multiplier,
        max_grad_norm=sdp.clip_norm,
        expected_batch_size=max(1, round(q * n)),
        loss_reduction="mean",  # divide the noisy sum by the expected batch size
        generator=noise_generator,
    )
    batch_sizes: list[int] = []
    model.train()
    t0 = time.perf_counter()
    dropout_rng = np.random.default_rng([instr.seed, instr.round, client_seed])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(dropout_rng.integers(2**31)))  # LoRA dropout only
            for _ in range(instr.local_steps):
                idx = poisson_sample(list(range(n)), q, sampling_rng)
                optimizer.zero_grad(set_to_none=True)
                if idx:
                    batch = collate([examples[i] for i in idx], pad_id, device)
                    with warnings.catch_warnings():
                        # The first LoRA layer's input (frozen embeddings) needs no gradient;
                        # Opacus only reads the gradient w.r.t. each layer's output.
                        warnings.filterwarnings(
                            "ignore", message="Full backward hook is firing", category=UserWarning
                        )
                        per_example_loss(model, batch).sum().backward()
                else:  # an empty Poisson sample: the step releases noise only
                    for p in train_params:
                        # Opacus reads per-example gradients from this attribute.
                        p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                            (0, *p.shape), device=device, dtype=p.dtype
                        )
                optimizer.step()
                batch_sizes.append(len(idx))
    finally:
        optimizer.zero_grad(set_to_none=True)
        hooks.cleanup()
        model.eval()
    seconds = time.perf_counter() - t0

    trained = get_adapter(model)
    delta = {k: trained[k] - global_adapter[k] for k in global_adapter if k in trainable}
    update = ClientUpdate(
        delta=delta,
        num_examples=1,  # the local dataset size is private too: uniform FedAvg weights
        metrics={
            "train-seconds": seconds,
            "dp-steps": float(instr.local_steps),
            "dp-sampling-rate": q,
            "dp-examples": float(sum(batch_sizes)),  # Poisson batches: the sizes vary
        },
    )
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
        model, examples, instr, global_adapter, pad_id=pad_id, client_seed=client_seed
    )
    ledger.record(event)
    ledger.save(path)
    eps = ledger.epsilon(sdp.delta, kind)
    metrics = {**update.metrics, "client-epsilon": eps, "client-delta": sdp.delta}
    return ClientUpdate(delta=update.delta, num_examples=update.num_examples, metrics=metrics)
