"""Sample-level DP-SGD with Opacus on the LoRA parameters: per-example gradients are exact for
our head-at-labelled-positions loss, on fp32, NF4 and int8 bases; only LoRA changes; the
client's ledger survives a process restart; the budget is enforced."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from client.data import load_records, to_conversations, tokenize_all
from client.dpsgd import PrivacyBudgetExhausted, dpsgd_round, ledger_path, private_round
from client.model import (
    Quantization,
    adapter_parameters,
    attach_lora,
    get_adapter,
    load_base,
    resolve_model,
    set_adapter,
)
from client.train import collate, per_example_loss, train_round
from protocol.messages import LoraSpec, SampleDP, TrainInstruction

LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def examples(tiny_model_dir: Path) -> list:  # type: ignore[type-arg]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_records("builtin:chatterbot")[:64]
    return tokenize_all(tok, to_conversations(rows, "builtin"), seq_len=64)


def _frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" not in name:
            out[name] = (t.qdata if hasattr(t, "qdata") else t).detach().clone()
    return out


def _random_b(model, seed: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """The adapter with B nonzero (B = 0 at init makes every A gradient zero)."""
    rng = np.random.default_rng(seed)
    g = get_adapter(model)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) if "lora_B" in k else v
            for k, v in g.items()}  # fmt: skip


@pytest.mark.parametrize("quant", list(Quantization))
def test_per_example_gradients_match_one_example_at_a_time(
    quant: Quantization,
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    from opacus.grad_sample import GradSampleHooks

    base = load_base(resolve_model(str(tiny_model_dir)), quant, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    set_adapter(model, _random_b(model, 1))
    pad = int(base.tokenizer.pad_token_id)
    # Different lengths, so the batch is padded and examples have different token counts.
    picked = sorted(examples, key=lambda e: len(e.input_ids))[::12][:5]
    assert len({len(e.input_ids) for e in picked}) >= 3
    params = adapter_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    model.train()
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
    try:
        batch = collate(picked, pad, torch.device("cpu"))
        per_example_loss(model, batch).sum().backward()
        per_sample = {k: p.grad_sample.detach().clone() for k, p in params.items()}
    finally:
        hooks.cleanup()
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for i, ex in enumerate(picked):
        for p in params.values():
            p.grad = None
        per_example_loss(model, collate([ex], pad, torch.device("cpu"))).sum().backward()
        for k, p in params.items():
            assert p.grad is not None and p.grad.abs().max() > 0, k
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quant", [Quantization.NF4, Quantization.INT8])
def test_dpsgd_changes_only_lora_parameters(
    quant: Quantization,
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), quant, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    frozen = _frozen_state(model)
    g = get_adapter(model)
    instr = TrainInstruction(
        round=1, lora=LORA, local_steps=3, batch_size=8, seq_len=64, learning_rate=1e-2,
        sample_dp=SampleDP(noise_multiplier=1.0, clip_norm=0.5, delta=1e-3),
    )  # fmt: skip
    update, event = dpsgd_round(
        model, examples, instr, g, pad_id=int(base.tokenizer.pad_token_id), client_seed=0,
        noise_generator=torch.Generator().manual_seed(0), sampling_rng=np.random.default_rng(0),
    )  # fmt: skip
    after = _frozen_state(model)
    assert frozen.keys() == after.keys()
    for name in frozen:
        assert torch.equal(frozen[name], after[name]), name
    assert set(update.delta) == set(g)
    assert all(np.abs(update.delta[k]).max() > 0 for k in g if "lora_B" in k)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    assert event.noise_multiplier == 1.0 and event.count == 3
    assert event.sampling_rate == pytest.approx(8 / len(examples))
    assert update.num_examples == 1 and "train-loss" not in update.metrics
    # Opacus's hooks are gone: plain training afterwards works and leaves no per-sample grads.
    plain = dataclasses.replace(instr, sample_dp=SampleDP())
    train_round(model, examples, plain, g, pad_id=int(base.tokenizer.pad_token_id), client_seed=1)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_dpsgd_noise_comes_only_from_the_noise_generator(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,  # type: ignore[type-arg]
) -> None:
    """Same sampling, same noise seed: identical update; another noise seed: a different one.
    (So the noise is not derived from the public run seed; by default the generator is seeded
    from the OS.)"""
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    g = get_adapter(model)
    pad = int(base.tokenizer.pad_token_id)
    instr = TrainInstruction(
        round=1, lora=LORA, local_steps=2, batch_size=4, seq_len=64,
        sample_dp=SampleDP(noise_multiplier=2.0, clip_norm=1.0, delta=1e-3),
    )  # fmt: skip

    def run(noise_seed: int) -> dict[str, np.ndarray]:
        up, _ = dpsgd_round(
            model, examples, instr, g, pad_id=pad, client_seed=0,
            noise_generator=torch.Generator().manual_seed(noise_seed),
            sampling_rng=np.random.default_rng(5),
        )  # fmt: skip
        return dict(up.delta)

    a, b, c = run(1), run(1), run(2)
    for k in g:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in g)


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from client.data import load_records, to_conversations, tokenize_all
    from client.dpsgd import private_round
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model
    from protocol.messages import LoraSpec, SampleDP, TrainInstruction

    model_dir, cache, state = sys.argv[1:4]
    base = load_base(resolve_model(model_dir), Quantization.NONE, Path(cache))
    lora = LoraSpec(rank=2, alpha=4.0, dropout=0.0)
    model = attach_lora(base.model, lora, seed=0)
    rows = load_records("builtin:chatterbot")[:40]
    ex = tokenize_all(base.tokenizer, to_conversations(rows, "b"), 64)
    instr = TrainInstruction(round=2, lora=lora, local_steps=3, batch_size=4, seq_len=64,
        sample_dp=SampleDP(noise_multiplier=1.1, clip_norm=1.0, delta=1e-3))
    up = private_round(model, ex, instr, get_adapter(model),
                       pad_id=int(base.tokenizer.pad_token_id), client_seed=0,
                       state_dir=Path(state))
    print(json.dumps({"epsilon": up.metrics["client-epsilon"], "n": len(ex)}))
    """
)


def test_client_epsilon_survives_a_process_restart(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """Round 1 here, round 2 in a fresh process reading the same state dir, round 3 here again
    with a budget that only allows two rounds."""
    state = tmp_path / "client-state"
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    lora = LoraSpec(rank=2, alpha=4.0, dropout=0.0)
    model = attach_lora(base.model, lora, seed=0)
    rows = load_records("builtin:chatterbot")[:40]
    ex = tokenize_all(base.tokenizer, to_conversations(rows, "b"), 64)
    n, pad = len(ex), int(base.tokenizer.pad_token_id)

    def instr(rnd: int, max_eps: float = 0.0) -> TrainInstruction:
        sdp = SampleDP(noise_multiplier=1.1, clip_norm=1.0, delta=1e-3, max_epsilon=max_eps)
        return TrainInstruction(
            round=rnd, lora=lora, local_steps=3, batch_size=4, seq_len=64, sample_dp=sdp
        )

    def reference(steps: int) -> float:
        ev = dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(4 / n, dpa.GaussianDpEvent(1.1)), steps
        )
        return float(rdp.RdpAccountant().compose(ev).get_epsilon(1e-3))

    first = private_round(model, ex, instr(1), get_adapter(model), pad_id=pad, client_seed=0,
                          state_dir=state)  # fmt: skip
    assert first.metrics["client-epsilon"] == pytest.approx(reference(3), abs=1e-9)

    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_model_dir), str(model_cache), str(state)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    second = json.loads(res.stdout.strip().splitlines()[-1])
    assert second["n"] == n
    assert second["epsilon"] == pytest.approx(reference(6), abs=1e-9)
    saved = json.loads(ledger_path(state).read_text())
    assert saved["unit"] == "sample" and saved["events"][0]["count"] == 6

    limit = (reference(6) + reference(9)) / 2
    with pytest.raises(PrivacyBudgetExhausted, match="past max-epsilon"):
        private_round(model, ex, instr(3, limit), get_adapter(model), pad_id=pad,
                      client_seed=0, state_dir=state)  # fmt: skip
    assert json.loads(ledger_path(state).read_text())["events"][0]["count"] == 6


def test_delta_must_be_below_one_over_local_examples(
    tiny_model_dir: Path,
    model_cache: Path,
    examples: list,
    tmp_path: Path,  # type: ignore[type-arg]
) -> None:
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=0)
    instr = TrainInstruction(
        round=1, lora=LORA, sample_dp=SampleDP(noise_multiplier=1.0, delta=0.5)
    )
    with pytest.raises(ValueError, match=r"delta: 0\.5 must be below 1/"):
        private_round(model, examples, instr, get_adapter(model), pad_id=0, client_seed=0,
                      state_dir=tmp_path)  # fmt: skip
    assert not ledger_path(tmp_path).exists()
