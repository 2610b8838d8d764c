"""Server optimizers against direct numpy implementations of their papers' update rules, over
several rounds with the state carried (and saved/restored in the middle)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from coordinator.optimizers.fedavg import FedAvg
from coordinator.strategies import Strategy, StrategySettings

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}


def deltas(rounds: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {k: rng.normal(0, 1e-2, s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(rounds)
    ]


def start() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}


# Reddi et al. 2021, Algorithm 2, written out for one flat tensor (float64).
def reference(name: str, x: np.ndarray, ds: list[np.ndarray], lr: float) -> np.ndarray:
    b1, b2, tau, mom = 0.9, 0.99, 1e-3, 0.9
    x = x.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    vel = np.zeros_like(x)
    for d in ds:
        d = d.astype(np.float64)
        if name in ("fedavg", "fedprox", "scaffold"):
            x = x + lr * d
            continue
        if name == "fedavgm":
            vel = mom * vel + d
            x = x + lr * vel
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedyogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    "name", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"]
)
@pytest.mark.parametrize("lr", [0.0, 0.5])  # 0: the strategy's default server learning rate
def test_each_optimizer_matches_its_update_rule(name: str, lr: float) -> None:
    settings = StrategySettings(name=name, server_learning_rate=lr)
    strategy = Strategy.create(settings, population=10, cohort=5)
    x = start()
    ds = deltas(6)
    for i, d in enumerate(ds):
        x = strategy.apply(x, d)
        if i == 2:  # restart mid-run from the saved state: nothing may change
            saved = {k: v.copy() for k, v in strategy.state_arrays().items()}
            strategy = Strategy.create(settings, population=10, cohort=5)
            strategy.load_state_arrays(saved)
    used = strategy.record()["server_learning_rate"]
    assert used == (lr or {"fedavg": 1.0, "fedavgm": 1.0, "fedprox": 1.0}.get(name, 0.01))
    for k in SHAPES:
        want = reference(name, start()[k], [d[k] for d in ds], used).astype(np.float32)
        np.testing.assert_allclose(x[k], want, rtol=1e-6, atol=1e-7)
        assert x[k].dtype == np.float32


def test_fedavg_with_server_lr_1_adds_the_mean_delta_exactly() -> None:
    x, (d,) = start(), deltas(1)
    out = FedAvg().step(x, d)
    for k in x:
        np.testing.assert_array_equal(out[k], (x[k].astype(np.float64) + d[k]).astype(np.float32))


def test_tensors_the_clients_did_not_train_are_kept() -> None:
    x = start()
    d = {"a.lora_B.weight": np.ones(SHAPES["a.lora_B.weight"], np.float32)}
    out = Strategy.create(StrategySettings(name="fedadam"), 4, 2).apply(x, d)
    np.testing.assert_array_equal(out["a.lora_A.weight"], x["a.lora_A.weight"])
    assert not np.array_equal(out["a.lora_B.weight"], x["a.lora_B.weight"])


def test_scaffold_moves_the_server_control_by_the_sampled_fraction() -> None:
    """c <- c + (|S| / N) mean(delta c_i); the adapter moves by the mean delta (lr 1)."""
    strategy = Strategy.create(StrategySettings(name="scaffold"), population=8, cohort=2)
    x = start()
    mean = {**deltas(1)[0]}
    dc = {k: np.full(s, 0.4, np.float32) for k, s in SHAPES.items()}
    mean.update({f"scaffold-control:{k}": v for k, v in dc.items()})
    out = strategy.apply(x, mean)
    for k in SHAPES:
        np.testing.assert_allclose(strategy.control[k], 0.4 * 2 / 8)
        np.testing.assert_allclose(out[k], x[k] + mean[k], rtol=1e-6)
    out2 = strategy.apply(out, mean)
    for k in SHAPES:
        np.testing.assert_allclose(strategy.control[k], 2 * 0.4 * 2 / 8)
        assert out2[k].shape == SHAPES[k]


def test_unknown_or_misshapen_deltas_are_refused() -> None:
    s = Strategy.create(StrategySettings(name="fedyogi"), 4, 2)
    with pytest.raises(ValueError, match="not in the adapter"):
        s.apply(start(), {"nope": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="has shape"):
        s.apply(start(), {"a.lora_A.weight": np.zeros((3, 3), np.float32)})


Step = Callable[[np.ndarray], np.ndarray]


def test_scaffold_beats_fedavg_on_a_non_iid_problem() -> None:
    """Two clients with opposite pulls and different curvature, f_i(x) = h_i/2 (x - a_i)^2, many
    local SGD steps. FedAvg drifts to a curvature-blind point; SCAFFOLD's corrections
    (client.corrections.Scaffold on the client, Strategy('scaffold') on the server) remove the
    drift. Same rounds, steps and learning rate for both."""
    import torch

    from client.corrections import Scaffold

    h = [1.0, 10.0]
    a = [np.array([1.0, -2.0]), np.array([-1.0, 2.0])]
    opt = (h[0] * a[0] + h[1] * a[1]) / (h[0] + h[1])

    def global_loss(x: np.ndarray) -> float:
        return float(sum(hi / 2 * np.sum((x - ai) ** 2) for hi, ai in zip(h, a, strict=True)))

    def run(name: str) -> float:
        strategy = Strategy.create(StrategySettings(name=name), population=2, cohort=2)
        x = {"w": np.zeros(2, np.float32)}
        client_c: list[dict[str, np.ndarray]] = [{}, {}]
        for _ in range(30):
            updates = []
            for i in range(2):
                w = torch.nn.Parameter(torch.from_numpy(x["w"].copy()))
                sgd = torch.optim.SGD([w], lr=0.05)
                scaffold = None
                if name == "scaffold":
                    server_c = {"w": strategy.control.get("w", np.zeros(2)).astype(np.float32)}
                    scaffold = Scaffold(server_c, client_c[i])
                for _step in range(10):
                    sgd.zero_grad()
                    loss = h[i] / 2 * ((w - torch.from_numpy(a[i]).float()) ** 2).sum()
                    loss.backward()
                    if scaffold is not None:
                        scaffold({"w": w})
                    sgd.step()
                up = {"w": (w.detach().numpy() - x["w"]).astype(np.float32)}
                if scaffold is not None:
                    new_c = scaffold.new_client_control()
                    up.update(scaffold.control_delta(new_c))
                    client_c[i] = new_c
                updates.append(up)
            mean = {k: np.mean([u[k] for u in updates], axis=0) for k in updates[0]}
            x = strategy.apply(x, mean)
        return global_loss(x["w"].astype(np.float64))

    best = global_loss(opt)
    fedavg, scaffold = run("fedavg") - best, run("scaffold") - best
    assert scaffold < 0.1 * fedavg, (fedavg, scaffold)
