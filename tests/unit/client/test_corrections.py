"""FedProx and SCAFFOLD on the client: corrections added to the gradients of one local trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.corrections import (
    ProximalTerm,
    Scaffold,
    load_client_control,
    save_client_control,
)
from client.data import load_records, to_conversations, tokenize_all
from client.model import (
    Quantization,
    adapter_parameters,
    attach_lora,
    get_adapter,
    load_base,
    resolve_model,
    set_adapter,
)
from client.train import collate, response_loss, train_round
from protocol import keys
from protocol.messages import LoraSpec, TrainInstruction

LORA = LoraSpec(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, model_cache: Path):  # type: ignore[no-untyped-def]
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    model = attach_lora(base.model, LORA, seed=3)
    rows = load_records("builtin:chatterbot")[:40]
    examples = tokenize_all(base.tokenizer, to_conversations(rows, "b"), 64)
    rng = np.random.default_rng(0)
    g = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in get_adapter(model).items()
    }
    return model, examples, int(base.tokenizer.pad_token_id), g


def _instr(**kw: object) -> TrainInstruction:
    return TrainInstruction(round=1, lora=LORA, local_steps=3, batch_size=4, seq_len=64,
                            learning_rate=0.01, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(setup) -> None:  # type: ignore[no-untyped-def]
    model, examples, pad, g = setup
    plain = train_round(model, examples, _instr(), g, pad_id=pad, client_seed=1)
    prox = train_round(model, examples, _instr(proximal_mu=0.0), g, pad_id=pad, client_seed=1,
                       corrections=[ProximalTerm(0.0, g)])  # fmt: skip
    assert plain.delta.keys() == prox.delta.keys()
    for k in plain.delta:
        np.testing.assert_array_equal(plain.delta[k], prox.delta[k])
    stronger = train_round(model, examples, _instr(), g, pad_id=pad, client_seed=1,
                           corrections=[ProximalTerm(10.0, g)])  # fmt: skip
    norm = lambda d: float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values())))  # noqa: E731
    assert norm(stronger.delta) < norm(plain.delta)  # the proximal term pulls towards w_global


def test_fedprox_gradient_equals_autograd_on_the_proximal_term(setup) -> None:  # type: ignore[no-untyped-def]
    model, examples, pad, g = setup
    mu = 0.7
    # Move the adapter away from the anchor so the term is not zero.
    w = {k: (v + 0.1).astype(np.float32) for k, v in g.items()}
    batch = collate(examples[:4], pad, torch.device("cpu"))

    def grads(with_autograd_term: bool) -> dict[str, torch.Tensor]:
        set_adapter(model, w)
        params = adapter_parameters(model)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        loss_sum, n = response_loss(model, batch)
        loss = loss_sum / n
        if with_autograd_term:
            loss = loss + mu / 2 * sum(
                ((p - torch.from_numpy(g[k])) ** 2).sum() for k, p in params.items()
            )
        loss.backward()
        if not with_autograd_term:
            ProximalTerm(mu, g)(params)
        return {k: p.grad.detach().clone() for k, p in params.items()}  # type: ignore[union-attr]

    auto, ours = grads(True), grads(False)
    for k in auto:
        torch.testing.assert_close(ours[k], auto[k], rtol=1e-5, atol=1e-7)


def test_scaffold_control_variate_round_trip_and_correction(
    setup,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    model, examples, pad, g = setup
    c = {k: np.full(v.shape, 0.01, np.float32) for k, v in g.items()}
    assert load_client_control(tmp_path) == {}  # a client's first SCAFFOLD round: c_i = 0
    scaffold = Scaffold(c, load_client_control(tmp_path))
    up = train_round(model, examples, _instr(scaffold=True), g, pad_id=pad, client_seed=2,
                     corrections=[scaffold])  # fmt: skip
    assert scaffold.steps == 3
    new = scaffold.new_client_control()
    delta = scaffold.control_delta(new)
    assert set(delta) == {keys.CONTROL_PREFIX + k for k in g}
    for k in g:  # c_i started at 0: its delta is the new c_i, the mean raw gradient
        np.testing.assert_array_equal(delta[keys.CONTROL_PREFIX + k], new[k])
        assert np.abs(new[k]).max() > 0
    save_client_control(tmp_path, new)
    again = load_client_control(tmp_path)  # survives a restart (a file in the state dir)
    assert again.keys() == new.keys()
    for k in new:
        np.testing.assert_array_equal(again[k], new[k])
    # The correction moved the training: without it the delta differs.
    plain = train_round(model, examples, _instr(), g, pad_id=pad, client_seed=2)
    assert any(not np.array_equal(plain.delta[k], up.delta[k]) for k in g)


def test_client_control_is_kept_per_round_so_a_redone_round_starts_from_the_same_c_i(
    tmp_path: Path,
) -> None:
    """Issue 13: a round the coordinator redoes after a crash (it never saved it) must not see
    the c_i this client wrote in the lost attempt."""

    def c(value: float) -> dict[str, np.ndarray]:
        return {"w": np.full(3, value, np.float32)}

    save_client_control(tmp_path, c(3.0), 3)
    save_client_control(tmp_path, c(7.0), 7)  # round 7's attempt: lost with the coordinator
    np.testing.assert_array_equal(load_client_control(tmp_path, 7)["w"], c(3.0)["w"])  # redo
    save_client_control(tmp_path, c(7.5), 7)  # the redo writes round 7 again
    np.testing.assert_array_equal(load_client_control(tmp_path, 9)["w"], c(7.5)["w"])
    save_client_control(tmp_path, c(9.0), 9)
    names = sorted(p.name for p in (tmp_path / "scaffold").iterdir())
    # round 3's is gone; round 7's stays for a redo of round 9
    assert names == ["control-r000007.safetensors", "control-r000009.safetensors"]
    assert load_client_control(tmp_path, 1) == {}  # nothing from before round 1
