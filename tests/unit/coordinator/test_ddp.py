"""Distributed DP in the round loop (``--dp client --secagg``) over the in-process SecAgg fleet:
epsilon per round in metrics.jsonl, settings in config.json, the Skellam ledger in state.json
(recomputed independently from the run directory), dropouts recorded, resume, max-epsilon,
target-epsilon calibration and configuration errors."""

from __future__ import annotations

import decimal
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from coordinator.config import ConfigError, RunConfig
from coordinator.ddp import DistributedClientDP, resolve_distributed_dp, uniform_sample
from coordinator.pipeline import Contribution
from coordinator.progress import Progress
from privacy import distributed_dp as ddp
from tests.fakegrid import run_virtual
from tests.secagg_fleet import Fleet

NODES = [2**63 + 7 * i for i in range(8)]
DDP = {
    "secagg": True,
    "dp": "client",
    "clients-per-round": 5,
    "min-clients": 3,
    "clip-norm": 0.5,
    "noise-multiplier": 1.5,
    "delta": 1e-3,
    "eval-clients": 2,
}


def cfg_for(tiny_model_dir: Path, cache: Path, out: Path, **kw: Any) -> RunConfig:
    values = {
        "model": str(tiny_model_dir),
        "quantization": "none",
        "cache-dir": str(cache),
        "output-dir": str(out),
        "rounds": 3,
        "round-timeout": 1.0,
        "node-wait-timeout": 1.0,
        "lora-rank": 2,
        **DDP,
        **kw,
    }
    return RunConfig.from_mapping(values)


def fleet() -> Fleet:
    return Fleet(NODES, {u: 10 + i for i, u in enumerate(NODES)})


def _skellam_rdp(a: int, mu: float, l1: float, l2: float) -> float:
    """Agarwal, Kairouz, Liu 2021, Theorem 3.5."""
    extra = min(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))
    return a * l2**2 / (4 * mu) + extra


def _theorem9(gamma: float, a: int, eps: list[float]) -> float:
    """Wang, Balle, Kasiviswanathan 2019, Theorem 9 (eps[j - 2] is the base RDP at order j)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        g = decimal.Decimal(gamma)
        e2 = decimal.Decimal(eps[0]).exp()
        total = 1 + g**2 * math.comb(a, 2) * min(4 * (e2 - 1), 2 * e2)
        for j in range(3, a + 1):
            total += 2 * g**j * math.comb(a, j) * ((j - 1) * decimal.Decimal(eps[j - 2])).exp()
        return float(total.ln() / (a - 1))


def recompute(run: Path, *, amplified: bool = True) -> float:
    """Epsilon from the run directory alone: config.json (delta, orders) and the ledger in
    state.json, with the two theorems written out here and dp-accounting's RDP conversion."""
    privacy = json.loads((run / "config.json").read_text())["privacy"]
    events = json.loads((run / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert privacy["accountant"] == "rdp" and privacy["mechanism"] == "skellam"
    orders = [int(o) for o in privacy["rdp_orders"]]
    top = max(orders)
    total = np.zeros(len(orders))
    for e in events:
        mu, l1, l2 = e["mu_total"], e["l1_sensitivity"], e["l2_sensitivity"]
        plain = [_skellam_rdp(a, mu, l1, l2) for a in orders]
        gamma = e["contributors"] / e["population"]
        if amplified and gamma < 1:
            base = [_skellam_rdp(j, mu, 2 * l1, 2 * l2) for j in range(2, top + 1)]
            plain = [min(p, _theorem9(gamma, a, base)) for p, a in zip(plain, orders, strict=True)]
        total += e["count"] * np.asarray(plain)
    eps, _ = compute_epsilon(np.asarray(orders, dtype=float), total, privacy["delta"])
    return float(eps)


def test_secure_dp_run_records_epsilon_settings_and_ledger(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, model_cache, out)
    rows = run_virtual(fleet().grid(), cfg, out, progress=Progress(3, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["epsilon"] == 0.0
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0 and all(r["delta"] == 1e-3 for r in rows)
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_sampled"] == 5 and r["clients_ok"] == 5
        assert r["ddp_noise_multiplier"] == pytest.approx(1.5, rel=1e-3)
        # Against the coordinator (who knows the cohort) there is no amplification;
        assert r["epsilon_unamplified"] >= r["epsilon"]  # equal here: 5 of 8 amplifies little
    privacy = json.loads((out / "config.json").read_text())["privacy"]
    assert privacy == privacy | {
        "unit": "client",
        "mechanism": "skellam",
        "noise_multiplier": 1.5,
        "clip_norm": 0.5,
        "clients_per_round": 5,
        "population": 8,
        "delta": 1e-3,
        "accountant": "rdp",
        "noise_units": 2.0**20,
    }
    (event,) = json.loads((out / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert (event["contributors"], event["population"], event["count"]) == (5, 8, 3)
    assert event["mu_total"] == pytest.approx(2.0**40 / 2)  # cohort noise std = 2^20 units
    assert recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)
    assert recompute(out, amplified=False) == pytest.approx(
        rows[-1]["epsilon_unamplified"], abs=1e-6
    )


def test_dropouts_leave_less_noise_and_the_ledger_says_so(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """30% injected dropouts: 2 of the 5 sampled clients leave before sending their masked
    input; only 3 clients' noise reaches the sum, the release records 3 contributors and the
    noise multiplier sqrt(3/5) z, and epsilon is larger than the full cohort's."""
    out = tmp_path / "run"
    kw = {
        "inject-dropout": 0.3,
        "dropout-stage": "masked-input",
        "rounds": 2,
        "secagg-threshold": 2,
    }
    rows = run_virtual(
        fleet().grid(),
        cfg_for(tiny_model_dir, model_cache, out, **kw),
        out,
        progress=Progress(2, live=False),
    )
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_ok"] == 3
        assert r["ddp_noise_multiplier"] == pytest.approx(1.5 * math.sqrt(3 / 5), rel=1e-3)
    (event,) = json.loads((out / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert (event["contributors"], event["count"]) == (3, 2)
    assert event["mu_total"] == pytest.approx(2.0**40 / 2 * 3 / 5)
    settings = resolve_distributed_dp(cfg_for(tiny_model_dir, model_cache, out), 8, 1)
    full = settings.release(5, 8)
    reduced = settings.release(3, 8)
    assert ddp.epsilon([reduced], 1e-3, amplified=False) > ddp.epsilon(
        [full], 1e-3, amplified=False
    )
    assert recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)


def test_resume_continues_the_ledger(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    grid = fleet().grid()
    one = cfg_for(tiny_model_dir, model_cache, out, rounds=1)
    run_virtual(grid, one, out, progress=Progress(1, live=False))
    first = json.loads((out / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert sum(e["count"] for e in first) == 1
    three = cfg_for(tiny_model_dir, model_cache, out, rounds=3)
    rows = run_virtual(grid, three, out, resume=True, progress=Progress(3, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    events = json.loads((out / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert sum(e["count"] for e in events) == 3
    assert recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)
    assert rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"]


def test_max_epsilon_stops_before_a_round_would_pass_it(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """With min-clients = clients-per-round the worst next round is the full cohort: a limit
    between epsilon after 2 and after 3 rounds stops the run cleanly after round 2."""
    kw = {"min-clients": 5, "rounds": 5}
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, model_cache, out, **kw)
    probe = DistributedClientDP(resolve_distributed_dp(cfg, 8, numel_of(cfg)))
    eps = []
    for _ in range(3):
        probe.record(probe.settings.release(5, 8))
        eps.append(probe.epsilon())
    limit = (eps[1] + eps[2]) / 2
    cfg = cfg_for(tiny_model_dir, model_cache, out, **kw, **{"max-epsilon": limit})
    rows = run_virtual(fleet().grid(), cfg, out, progress=Progress(5, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["epsilon"] == pytest.approx(eps[1], rel=1e-9) and rows[-1]["epsilon"] <= limit
    state = json.loads((out / "state.json").read_text())
    assert state["round"] == 2 and "round 3 would take epsilon" in state["stopped"]


def numel_of(cfg: RunConfig) -> int:
    from coordinator.rounds import ServerModel

    return sum(int(v.size) for v in ServerModel(cfg).initial_adapter().values())


def test_target_epsilon_is_calibrated_with_the_skellam_accountant(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """target-epsilon 6 over 2 rounds, 5 per round of 8, min-clients 3: z is the smallest for
    which 2 rounds stay within 6 even if only 3 of 5 contribute each time; the run completes
    every round (the max-epsilon check never fires) and ends at or below the target."""
    out = tmp_path / "run"
    kw = {"noise-multiplier": 0.0, "target-epsilon": 6.0, "rounds": 2}
    cfg = cfg_for(tiny_model_dir, model_cache, out, **kw)
    rows = run_virtual(fleet().grid(), cfg, out, progress=Progress(2, live=False))
    assert [r["round"] for r in rows] == [0, 1, 2]
    privacy = json.loads((out / "config.json").read_text())["privacy"]
    assert privacy["target_epsilon"] == 6.0 and privacy["calibrated_rounds"] == 2
    z, numel = privacy["noise_multiplier"], privacy["numel"]
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= 6.0
    assert recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)

    def worst(z: float) -> float:
        r = ddp.worst_round_rdp(z, 0.5, 5, 3, 8, numel)
        return ddp.epsilon_from_rdp(2 * r, 1e-3)

    assert worst(z) <= 6.0 < worst(z * (1 - 2e-4))  # the smallest z, to the tolerance


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"accountant": "pld"}, "accountant: 'pld' cannot account --dp client --secagg"),
        ({"adaptive-clip": True}, "adaptive-clip: is not supported with --dp client --secagg"),
    ],
)
def test_unsupported_combinations_name_the_option(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**DDP, **kw})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"delta": 0.2}, "delta: 0.2 must be below 1/population = 1/8"),
        ({"population": 4}, "clients-per-round: 5 exceeds the population of 4"),
        (
            {"noise-multiplier": 0.0, "target-epsilon": 0.01, "rounds": 50},
            "target-epsilon: 0.01 is unreachable in 50 round",
        ),
    ],
)
def test_bad_settings_fail_before_any_training(
    kw: dict[str, Any], message: str, tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    grid = fleet().grid()
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run", **kw)
    with pytest.raises(ConfigError, match=message):
        run_virtual(grid, cfg, tmp_path / "run", progress=Progress(2, live=False))
    assert grid.sent == []


def test_cohorts_are_uniform_without_replacement() -> None:
    rng = np.random.default_rng(3)
    counts = np.zeros(10)
    for _ in range(4000):
        pick = uniform_sample(list(range(10)), 3, rng)
        assert len(set(pick)) == 3
        counts[pick] += 1
    np.testing.assert_allclose(counts / 4000, 0.3, atol=0.03)


def test_simulate_counts_the_adapter_size_from_checkpoint_headers(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """``fedtune simulate`` calibrates before Ray starts from the checkpoint's headers: the count
    equals the coordinator's adapter."""
    from simulations.runner import lora_numel

    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run")
    assert lora_numel(tiny_model_dir, cfg.lora) == numel_of(cfg) > 0


def test_seeded_cohort_is_a_function_of_seed_round_and_order(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """--dp-rng seeded (simulation): the cohort is drawn by position in the nodes' stable order
    from (seed, round); the default stays secret."""
    cfg = cfg_for(tiny_model_dir, model_cache, tmp_path / "run")
    settings = resolve_distributed_dp(cfg, 8, 1000)
    one, two = range(100, 108), [9, 2**63 + 1, 5, 77, 3, 8, 1, 40]
    pos_one = [
        list(one).index(n) for n in DistributedClientDP(settings, seed=4).sample(list(one), 2)
    ]
    pos_two = [two.index(n) for n in DistributedClientDP(settings, seed=4).sample(two, 2)]
    assert pos_one == pos_two and len(pos_one) == settings.cohort
    draws = {tuple(DistributedClientDP(settings, seed=4).sample(list(one), r)) for r in range(9)}
    assert len(draws) > 1
    assert DistributedClientDP(settings).seed is None


class TwoDown:
    """A FleetModel (coordinator/fleet.py) in which two clients, a different pair each round,
    are unreachable."""

    def available(self, nodes: Sequence[int], rnd: int) -> list[int]:
        down = {NODES[rnd % 8], NODES[(rnd + 3) % 8]}
        return [n for n in nodes if n not in down]

    def rank(self, node: int) -> int | None:
        return None  # every device trains the run's rank

    def round_metrics(self, rnd: int, c: Contribution) -> dict[str, Any]:
        return {}


def test_the_accountant_draws_the_cohort_from_the_available_clients(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    """Cohorts come from the clients available in the round, so the sampling fraction the
    ledger records is contributors / available clients (5/6 here), not / connected (5/8)."""
    out = tmp_path / "run"
    cfg = cfg_for(tiny_model_dir, model_cache, out, rounds=2)
    rows = run_virtual(fleet().grid(), cfg, out, progress=Progress(2, live=False), fleet=TwoDown())
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_sampled"] == 5
        assert r["clients_unavailable"] == 2
    (event,) = json.loads((out / "state.json").read_text())["privacy"]["ledger"]["events"]
    assert (event["contributors"], event["population"], event["count"]) == (5, 6, 2)
    assert recompute(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)
