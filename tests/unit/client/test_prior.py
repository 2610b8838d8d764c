"""A client's label prior for local-prior logit adjustment: exact counts and log frequencies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client.data import IGNORE_INDEX
from client.prior import PRIOR_SMOOTHING, log_prior, logit_adjustment_bias, reply_token_counts

X = IGNORE_INDEX


def test_counts_only_labelled_positions() -> None:
    rows = [(X, X, 3, 3, 1), (X, 0, X), ()]
    assert reply_token_counts(rows, 5).tolist() == [1.0, 1.0, 0.0, 2.0, 0.0]


def test_a_token_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary of 4"):
        reply_token_counts([(X, 4)], 4)
    with pytest.raises(ValueError, match="outside the vocabulary of 4"):
        reply_token_counts([(-3,)], 4)


def test_log_prior_exact_values() -> None:
    # counts (2, 0, 1, 0), smoothing 0.5: (2.5, 0.5, 1.5, 0.5) / 5
    got = log_prior(np.array([2.0, 0.0, 1.0, 0.0]), 0.5)
    assert got.tolist() == pytest.approx(
        [math.log(0.5), math.log(0.1), math.log(0.3), math.log(0.1)]
    )
    assert float(np.exp(got).sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        log_prior(np.ones(3), 0.0)


def test_bias_is_tau_times_the_log_prior_of_the_replies() -> None:
    rows = [(X, 1, 1, 2), (X, X, 1)]
    bias = logit_adjustment_bias(rows, 4, 0.7)
    want = 0.7 * np.log(
        (np.array([0.0, 3.0, 1.0, 0.0]) + PRIOR_SMOOTHING) / (4 + 4 * PRIOR_SMOOTHING)
    )
    assert bias.dtype == np.float32
    np.testing.assert_allclose(bias, want.astype(np.float32), rtol=1e-7)
    # The most frequent reply token gets the largest bias: its logit needs the least raising.
    assert int(np.argmax(bias)) == 1


def test_train_round_trains_under_the_clients_own_prior(
    tiny_model_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TrainInstruction.logit_adjustment`` makes ``train_round`` hold the bias tau x log prior
    of its own examples' targets while it trains (and only then); 0 leaves training as it was."""
    import contextlib

    import torch

    import client.train as ct
    from client.data import load_records, to_conversations, tokenize_all
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model
    from client.train import train_round
    from protocol.messages import LoraSpec, TrainInstruction

    lora = LoraSpec(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, lora, seed=3)
    examples = tokenize_all(
        base.tokenizer, to_conversations(load_records("builtin:chatterbot")[:12], "b"), 64
    )
    vocab = int(base.model.get_output_embeddings().weight.shape[0])
    g = get_adapter(model)
    pad = int(base.tokenizer.pad_token_id)
    seen: list[torch.Tensor | None] = []
    real = ct.logit_bias

    @contextlib.contextmanager
    def spy(bias):  # type: ignore[no-untyped-def]
        seen.append(bias)
        with real(bias):
            yield

    monkeypatch.setattr(ct, "logit_bias", spy)

    def run(tau: float):  # type: ignore[no-untyped-def]
        instr = TrainInstruction(round=1, lora=lora, local_steps=2, batch_size=4, seq_len=64,
                                 learning_rate=0.01, logit_adjustment=tau)  # fmt: skip
        return train_round(model, examples, instr, g, pad_id=pad, client_seed=1)

    plain = run(0.0)
    adjusted = run(1.5)
    assert seen[0] is None
    want = 1.5 * log_prior(reply_token_counts((e.labels[1:] for e in examples), vocab))
    np.testing.assert_allclose(seen[1].numpy(), want.astype(np.float32), rtol=1e-7)
    assert ct.logit_bias_in_force() is None  # not left in force after the round
    assert any(not np.array_equal(plain.delta[k], adjusted.delta[k]) for k in plain.delta)
