"""The accountant: our ledger's epsilon equals dp-accounting's computed directly, matches
published results, calibration never overshoots, the ledger round-trips through disk."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy.stats import norm

from privacy.accounting import (
    AccountantKind,
    GaussianRelease,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyUnit,
    calibrate_noise_multiplier,
    epsilon,
)


def _reference(z: float, q: float, steps: int, delta: float, kind: str) -> float:
    """dp-accounting called directly, independently of privacy.accounting."""
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)
    acc = (
        rdp.RdpAccountant()
        if kind == "rdp"
        else pld.PLDAccountant(value_discretization_interval=1e-4)
    )
    return float(acc.compose(event).get_epsilon(delta))


@pytest.mark.parametrize("kind", list(AccountantKind))
@pytest.mark.parametrize(
    ("z", "q", "steps", "delta"),
    [(1.1, 256 / 60000, 1000, 1e-5), (0.8, 3 / 8, 5, 1e-3), (4.0, 0.01, 300, 1e-5)],
)
def test_ledger_epsilon_equals_the_reference_library(
    kind: AccountantKind, z: float, q: float, steps: int, delta: float
) -> None:
    ledger = PrivacyLedger(PrivacyUnit.CLIENT)
    for _ in range(steps if steps <= 5 else 1):
        ledger.record(GaussianRelease(z, q, 1 if steps <= 5 else steps))
    assert ledger.releases == steps and len(ledger.events) == 1  # identical releases merge
    assert ledger.epsilon(delta, kind) == pytest.approx(_reference(z, q, steps, delta, kind.value))


def test_mixed_ledger_composes_every_event() -> None:
    events = [GaussianRelease(1.0, 0.1, 3), GaussianRelease(2.0, 0.2, 4), GaussianRelease(1.0, 0.1)]
    want = (
        rdp.RdpAccountant()
        .compose(
            dpa.ComposedDpEvent(
                [
                    dpa.SelfComposedDpEvent(
                        dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1)), 3
                    ),
                    dpa.SelfComposedDpEvent(
                        dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(2)), 4
                    ),
                    dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(1)),
                ]
            )
        )
        .get_epsilon(1e-5)
    )
    assert epsilon(events, 1e-5, AccountantKind.RDP) == pytest.approx(want, rel=1e-12)
    assert epsilon([], 1e-5, AccountantKind.RDP) == 0.0


def _gaussian_epsilon_closed_form(mu: float, delta: float) -> float:
    """Balle & Wang 2018 (Thm 8) / Dong, Roth & Su 2019 (mu-GDP): a Gaussian mechanism with
    sensitivity/sigma = mu is (eps, delta)-DP iff delta >= Phi(-eps/mu + mu/2) -
    e^eps Phi(-eps/mu - mu/2). T releases at noise multiplier z compose to mu = sqrt(T)/z."""

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 0.0, 100.0, xtol=1e-12))


@pytest.mark.parametrize(("z", "count", "delta"), [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 4, 1e-3)])
def test_pld_matches_the_analytic_gaussian_mechanism(z: float, count: int, delta: float) -> None:
    """Published point: without sampling, PLD's epsilon is the exact analytic value (up to its
    1e-4 discretisation, rounded up)."""
    exact = _gaussian_epsilon_closed_form(math.sqrt(count) / z, delta)
    got = epsilon([GaussianRelease(z, 1.0, count)], delta, AccountantKind.PLD)
    assert exact <= got <= exact + 2e-3, (exact, got)
    # RDP is an upper bound on the exact value, and not a loose one here.
    loose = epsilon([GaussianRelease(z, 1.0, count)], delta, AccountantKind.RDP)
    assert exact < loose < 1.3 * exact


def test_abadi_et_al_2016_mnist_point() -> None:
    """Abadi et al. 2016 (Sec. 3.1): q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5 is
    (1.26, 1e-5)-DP by the moments accountant. RDP (its successor) must certify at least that,
    PLD tighter still."""
    e_rdp = epsilon([GaussianRelease(4.0, 0.01, 10_000)], 1e-5, AccountantKind.RDP)
    e_pld = epsilon([GaussianRelease(4.0, 0.01, 10_000)], 1e-5, AccountantKind.PLD)
    assert e_pld < e_rdp <= 1.26
    assert e_rdp == pytest.approx(
        1.0355, abs=1e-3
    )  # dp-accounting 0.6 (RDP -> (eps, delta) conversion)


def _check_calibration(
    target: float, delta: float, q: float, rounds: int, kind: AccountantKind
) -> None:
    z = calibrate_noise_multiplier(target, delta, q, rounds, kind)
    eps = epsilon([GaussianRelease(z, q, rounds)], delta, kind)
    assert eps <= target
    # ... and is not wastefully large: 1% less noise would overshoot (or z is tiny already).
    if z > 0.05:
        assert epsilon([GaussianRelease(z * 0.99, q, rounds)], delta, kind) > target * 0.999


# RDP calibration takes ~1-3 s per case on the 2-core machine; PLD ~10-60 s, so it gets one case.
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    target=st.floats(0.5, 20.0),
    q=st.floats(0.01, 1.0),
    rounds=st.integers(1, 100),
    delta_exp=st.integers(3, 7),
)
def test_calibrated_noise_never_overshoots_the_target(
    target: float, q: float, rounds: int, delta_exp: int
) -> None:
    _check_calibration(target, 10.0**-delta_exp, q, rounds, AccountantKind.RDP)


def test_pld_calibration_never_overshoots_the_target() -> None:
    _check_calibration(8.0, 1e-5, 1.0, 3, AccountantKind.PLD)  # unsampled: PLD is fast here


def test_unreachable_target_is_an_error() -> None:
    with pytest.raises(PrivacyConfigError, match="target-epsilon: 1e-06 is unreachable"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 100, AccountantKind.RDP)
    with pytest.raises(PrivacyConfigError, match="target-epsilon: must be > 0"):
        calibrate_noise_multiplier(0.0, 1e-5, 0.5, 10, AccountantKind.RDP)
    with pytest.raises(PrivacyConfigError, match="delta: must be in"):
        calibrate_noise_multiplier(1.0, 1.5, 0.5, 10, AccountantKind.RDP)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0, "sampling_rate": 0.5}, "noise-multiplier: must be > 0"),
        ({"noise_multiplier": -1.0, "sampling_rate": 0.5}, "noise-multiplier: must be > 0"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.0}, "sampling rate: must be in"),
        ({"noise_multiplier": 1.0, "sampling_rate": 1.5}, "sampling rate: must be in"),
    ],
)
def test_bad_release_settings(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PrivacyConfigError, match=message):
        GaussianRelease(**kwargs)


def test_ledger_round_trips_through_disk(tmp_path: Path) -> None:
    ledger = PrivacyLedger(PrivacyUnit.SAMPLE)
    ledger.record(GaussianRelease(1.0, 0.25, 6))
    ledger.record(GaussianRelease(1.0, 0.25, 6))
    ledger.record(GaussianRelease(1.0, 0.5, 6))
    path = tmp_path / "state" / "ledger.json"
    ledger.save(path)
    back = PrivacyLedger.load(path, PrivacyUnit.SAMPLE)
    assert back == ledger and back.releases == 18 and len(back.events) == 2
    assert PrivacyLedger.load(tmp_path / "missing.json", PrivacyUnit.SAMPLE).events == []
    with pytest.raises(PrivacyConfigError, match="sample-level, expected client-level"):
        PrivacyLedger.load(path, PrivacyUnit.CLIENT)
    path.write_text("{not json")
    with pytest.raises(PrivacyConfigError, match="cannot be read"):
        PrivacyLedger.load(path, PrivacyUnit.SAMPLE)


def test_ledger_holds_skellam_releases_and_accounts_them_in_rdp_only(tmp_path: Path) -> None:
    """A distributed-DP ledger round-trips through disk (identical rounds merge), its epsilon is
    the Skellam accountant's (composed with Gaussian events by adding RDP), and PLD refuses it."""
    from privacy import distributed_dp as ddp

    sk = ddp.SkellamRelease(2e12, 3e9, 1.2e6, contributors=9, population=40)
    ledger = PrivacyLedger(PrivacyUnit.CLIENT)
    for _ in range(3):
        ledger.record(sk)
    ledger.record(ddp.SkellamRelease(2e12, 3e9, 1.2e6, contributors=7, population=40))
    assert [e.count for e in ledger.events] == [3, 1]
    path = tmp_path / "ledger.json"
    ledger.save(path)
    back = PrivacyLedger.load(path, PrivacyUnit.CLIENT)
    assert back == ledger
    assert back.epsilon(1e-5, AccountantKind.RDP) == pytest.approx(
        ddp.epsilon(ledger.events, 1e-5), rel=1e-12
    )  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="RDP only"):
        back.epsilon(1e-5, AccountantKind.PLD)
    # Mixed with a Gaussian release: RDP adds order by order before the conversion.
    g = GaussianRelease(1.1, 0.2, 5)
    acc = rdp.RdpAccountant(orders=[float(o) for o in ddp.RDP_ORDERS])
    acc.compose(
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(1.1)), 5)
    )
    want = ddp.epsilon([sk], 1e-5, extra_rdp=acc._rdp)
    assert epsilon([g, sk], 1e-5, AccountantKind.RDP) == pytest.approx(want, rel=1e-12)
    assert want > max(epsilon([g], 1e-5, AccountantKind.RDP), ddp.epsilon([sk], 1e-5))
