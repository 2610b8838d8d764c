"""Fixed-point ring encoding (no wrap, checked) and distributed DP (Skellam noise, accounting)."""

from __future__ import annotations

import decimal
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy import distributed_dp as ddp
from privacy.secagg.encoding import (
    EncodingError,
    EncodingPlan,
    centred,
    decode_sum,
    plan_encoding,
    quantize,
    required_bits,
    to_ring,
    weighted_mean,
)
from privacy.secagg.primitives import secure_rng


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 200),
    clip=st.floats(1e-3, 10.0),
    precision=st.floats(1e-7, 1e-2),
    cap=st.integers(1, 10_000),
)
def test_worst_case_sums_never_wrap(n: int, clip: float, precision: float, cap: int) -> None:
    """All n clients at +clip (and all at -clip) with the largest weight: the centred ring sum
    gives back exactly n * level, so the chosen ring cannot wrap."""
    try:
        plan = plan_encoding(n, clip, precision, cap)
    except EncodingError as exc:
        assert "-bit ring (> 32)" in str(exc)
        assert required_bits(n, math.ceil(clip / precision - 1e-9), cap) > 32
        return
    for sign in (1, -1):
        one = np.full(5, sign * plan.level, dtype=np.int64)
        one = np.append(one, cap)
        total = np.zeros(6, dtype=plan.dtype)
        for _ in range(min(n, 3)):
            total += to_ring(one, plan.ring_bits)
        # the remaining n-3 clients, added at once (same residue arithmetic)
        if n > 3:
            total += to_ring(one * (n - 3), plan.ring_bits)
        total &= total.dtype.type((1 << plan.ring_bits) - 1)
        back = centred(total, plan.ring_bits)
        assert back[0] == sign * n * plan.level and back[-1] == n * cap


def test_auto_precision_fills_32_bits_and_precision_too_fine_is_an_error() -> None:
    plan = plan_encoding(100, clip=0.5, weight_cap=65536)
    assert plan.ring_bits == 32 and plan.dtype == np.uint32
    assert 100 * plan.level < 2**31 and 100 * (plan.level + 2) * 1.01 > 2**31 * 0.99
    with pytest.raises(EncodingError, match=r"needs a 3[3-9]-bit ring"):
        plan_encoding(100, clip=1.0, precision=1e-9)
    small = plan_encoding(10, clip=1.0, precision=1e-3, weight_cap=100)
    assert small.ring_bits == required_bits(10, 1000, 100) == 15 and small.dtype == np.uint16
    with pytest.raises(EncodingError, match="could wrap"):
        EncodingPlan(clip=1.0, step=1e-3, weight_cap=1, max_clients=10, ring_bits=14)


def test_stochastic_rounding_is_unbiased_and_weighting_is_folded_in() -> None:
    plan = plan_encoding(4, clip=1.0, precision=0.25, weight_cap=8)
    x = np.full(200_000, 0.1)  # 0.1 / 0.25 = 0.4 units: rounds to 0 or 1
    q = quantize(x, 8, plan, secure_rng())
    assert set(np.unique(q[:-1]).tolist()) == {0, 1} and q[-1] == 8
    assert abs(q[:-1].mean() - 0.4) < 0.005
    half = quantize(x, 4, plan, secure_rng())  # weight 4 of cap 8: values halved
    assert abs(half[:-1].mean() - 0.2) < 0.005 and half[-1] == 4
    capped = quantize(np.full(10, 5.0), 100, plan, secure_rng())  # clipped and weight-capped
    assert (capped[:-1] == 4).all() and capped[-1] == 8
    with pytest.raises(EncodingError, match="NaN"):
        quantize(np.array([np.nan]), 1, plan, secure_rng())


def test_decoded_weighted_mean_matches_fedavg_within_quantization_error() -> None:
    rng = np.random.default_rng(0)
    n, d = 7, 5000
    plan = plan_encoding(n, clip=0.5, weight_cap=1000)
    xs = [rng.normal(0, 0.01, d) for _ in range(n)]
    ws = [int(w) for w in rng.integers(10, 900, n)]
    acc = np.zeros(d + 1, dtype=plan.dtype)
    for x, w in zip(xs, ws, strict=True):
        acc += to_ring(quantize(x, w, plan, secure_rng()), plan.ring_bits)
    dec = decode_sum(acc, plan, n)
    assert dec.total_weight == sum(ws)
    want = sum(w * x for x, w in zip(xs, ws, strict=True)) / sum(ws)
    err = np.abs(weighted_mean(dec, plan) - want).max()
    # each coordinate moves by < 1 step per client, divided by sum(phi)
    assert err < n * plan.step * plan.weight_cap / sum(ws)


def test_decode_detects_out_of_range_contributions() -> None:
    plan = plan_encoding(3, clip=0.1, precision=1e-4, weight_cap=10)
    evil = to_ring(np.array([plan.level * 3, 5], dtype=np.int64), plan.ring_bits)
    with pytest.raises(EncodingError, match="out of range"):
        decode_sum(evil, plan, 2)
    with pytest.raises(EncodingError, match="total weight"):
        decode_sum(to_ring(np.array([0, 0], dtype=np.int64), plan.ring_bits), plan, 2)


# -- distributed DP --------------------------------------------------------------------------------


def test_summed_skellam_noise_has_the_target_variance() -> None:
    """Clients calibrated for a cohort of m = 6: the sum over all 6 carries variance (zC/step)^2;
    if 2 drop out, the 4 survivors' sum carries 4/6 of it. Empirical variance within 2%."""
    z, clip, step, m = 1.1, 0.5, 1e-4, 6
    mu = ddp.client_mu(z, clip, step, m)
    target = (z * clip / step) ** 2
    rng = secure_rng()
    size = 150_000
    for contributors in (6, 4):
        total = sum(ddp.sample_skellam(mu, size, rng) for _ in range(contributors))
        want = target * contributors / m
        assert abs(total.mean()) < 5 * math.sqrt(want / size)
        assert abs(total.var() / want - 1) < 0.02
        assert total.dtype == np.int64


def test_noise_bound_makes_room_in_the_ring() -> None:
    plain = plan_encoding(10, clip=0.5, numel=1000)
    noisy = plan_encoding(10, clip=0.5, noise_std=0.5, numel=1000)
    assert noisy.noise_bound > 0 and noisy.step > plain.step
    sigma_int = 0.5 / noisy.step
    assert noisy.noise_bound > 8 * sigma_int  # tail bound at 2^-40 per coordinate
    assert 10 * noisy.level + noisy.noise_bound < 2**31


def test_noisy_encoding_puts_the_cohort_noise_at_noise_units() -> None:
    """The default step makes the full cohort's noise std 2^20 integer units, and the ring
    still holds every client's clipped update plus that noise."""
    plan, mu = ddp.plan_noisy_encoding(8, 1.3, 0.7, 8, numel=50_000)
    assert plan.step == pytest.approx(1.3 * 0.7 / ddp.NOISE_UNITS)
    assert math.sqrt(2 * mu * 8) == pytest.approx(ddp.NOISE_UNITS)
    assert plan.l2_clip == 0.7 and plan.level == math.ceil(0.7 / plan.step)
    assert 8 * plan.level + plan.noise_bound < 2**31


def test_skellam_accounting_matches_gaussian_when_noise_is_large_and_unsampled() -> None:
    """With mu huge the Skellam RDP tends to the Gaussian's: with no sampling (every client of
    the population contributes) the (eps, delta) equal dp-accounting's Gaussian value for the
    same noise multiplier to 1e-6 relative."""
    d, clip, step = 460_800, 1.0, 2.0**-20
    l1, l2 = ddp.sensitivities(clip, step, d)
    z = 1.0
    release = ddp.SkellamRelease((z * l2) ** 2 / 2, l1, l2, 10, 10, count=10)
    assert release.effective_noise_multiplier == pytest.approx(z)
    acc = RdpAccountant(orders=[float(o) for o in ddp.RDP_ORDERS])
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), 10))
    assert ddp.epsilon([release], 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def _wbk_theorem9(gamma: float, alpha: int, eps: dict[int, float]) -> float:
    """Wang, Balle, Kasiviswanathan 2019, Theorem 9 with eps(inf) = inf, written out term by
    term in 60-digit decimals with exact binomials (an independent reference for
    ``wor_subsampled_rdp``)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        g = decimal.Decimal(gamma)
        e2 = decimal.Decimal(eps[2]).exp()
        total = 1 + g**2 * math.comb(alpha, 2) * min(4 * (e2 - 1), 2 * e2)
        for j in range(3, alpha + 1):
            total += 2 * g**j * math.comb(alpha, j) * ((j - 1) * decimal.Decimal(eps[j])).exp()
        return float(total.ln() / (alpha - 1))


@pytest.mark.parametrize(("z", "gamma"), [(1.0, 0.1), (2.0, 0.01), (0.7, 0.3), (3.0, 0.05)])
def test_wor_bound_matches_the_theorem_and_dp_accountings_sharper_gaussian_bound(
    z: float, gamma: float
) -> None:
    """On the Gaussian RDP, our vectorised Theorem 9 equals the term-by-term formula, and it is
    never below dp-accounting's Gaussian-specific bound for the same sampling (WBK Thm 27, which
    strengthens Thm 9 for the Gaussian), and equal to it at low orders."""
    from dp_accounting.rdp import rdp_privacy_accountant as rpa

    orders = list(range(2, 41))
    gauss = np.asarray([a / (2 * z * z) for a in range(2, 41)])
    ours = ddp.wor_subsampled_rdp(gamma, orders, gauss)
    ref = [_wbk_theorem9(gamma, a, dict(zip(range(2, 41), gauss, strict=True))) for a in orders]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    sharper = rpa._compute_rdp_sample_wor_gaussian(gamma, z, orders)
    assert (ours >= sharper * (1 - 1e-9)).all()
    assert ours[0] == pytest.approx(sharper[0], rel=1e-9)  # order 2: the same expression


@settings(max_examples=40, deadline=None)
@given(
    st.floats(0.01, 0.99),
    st.floats(0.01, 0.99),
    st.floats(0.3, 5.0),
)
def test_wor_bound_is_monotone_in_gamma_and_is_the_base_at_one(
    g1: float, g2: float, z: float
) -> None:
    orders = list(range(2, 65))
    base = np.asarray([a / (2 * z * z) for a in orders])
    lo, hi = sorted((g1, g2))
    assert (
        ddp.wor_subsampled_rdp(lo, orders, base) <= ddp.wor_subsampled_rdp(hi, orders, base) + 1e-12
    ).all()
    np.testing.assert_array_equal(ddp.wor_subsampled_rdp(1.0, orders, base), base)


def test_amplified_release_uses_the_replace_one_base_and_never_exceeds_the_unsampled() -> None:
    """Amplification: per order the smaller of the zero-out bound without sampling and Theorem 9
    over the replace-one base (doubled sensitivities); sampling 10 of 1000 lowers epsilon."""
    d, clip, step, z = 10_000, 1.0, 2.0**-20, 2.0
    l1, l2 = ddp.sensitivities(clip, step, d)
    mu = (z * l2) ** 2 / 2
    full = ddp.SkellamRelease(mu, l1, l2, 10, 10, count=50)
    sampled = ddp.SkellamRelease(mu, l1, l2, 10, 1000, count=50)
    orders = list(ddp.RDP_ORDERS)
    plain = ddp.skellam_rdp(orders, mu, l1, l2)
    wor = ddp.wor_subsampled_rdp(0.01, orders, ddp.skellam_rdp(range(2, 257), mu, 2 * l1, 2 * l2))
    np.testing.assert_allclose(sampled.rdp(orders), 50 * np.minimum(plain, wor), rtol=1e-12)
    np.testing.assert_allclose(full.rdp(orders), 50 * plain, rtol=1e-12)
    np.testing.assert_allclose(sampled.rdp(orders, amplified=False), 50 * plain, rtol=1e-12)
    assert ddp.epsilon([sampled], 1e-5) < 0.5 * ddp.epsilon([full], 1e-5)
    assert ddp.epsilon([sampled], 1e-5, amplified=False) == ddp.epsilon([full], 1e-5)


def test_dropped_clients_lower_the_recorded_noise() -> None:
    mu = ddp.client_mu(1.0, 1.0, 1e-3, calibrated_for=5)
    five = ddp.release_for_round(mu, 5, 50, 1.0, 1e-3, 100)
    three = ddp.release_for_round(mu, 3, 50, 1.0, 1e-3, 100)
    assert three.mu_total == pytest.approx(five.mu_total * 3 / 5)
    assert five.effective_noise_multiplier == pytest.approx(1.0 / (1 + 10 * 1e-3), rel=1e-9)
    assert three.effective_noise_multiplier == pytest.approx(
        five.effective_noise_multiplier * math.sqrt(3 / 5)
    )
    assert ddp.epsilon([three], 1e-5, amplified=False) > ddp.epsilon([five], 1e-5, amplified=False)
    assert ddp.SkellamRelease.from_dict(five.to_dict()) == five
    with pytest.raises(ddp.DistributedDpError, match="contributors"):
        ddp.SkellamRelease(1.0, 1.0, 1.0, contributors=6, population=5)


@settings(max_examples=15, deadline=None)
@given(
    st.floats(0.5, 30.0),
    st.integers(1, 50),
    st.integers(2, 20),
    st.integers(1, 20),
)
def test_calibration_never_overshoots_the_target(
    target: float, rounds: int, cohort: int, extra: int
) -> None:
    population = cohort * extra
    delta = 0.5 / population
    try:
        z = ddp.calibrate_noise_multiplier(target, delta, rounds, cohort, population, 0.5, 20_000)
    except ddp.DistributedDpError as exc:
        assert "unreachable" in str(exc)
        return
    release = ddp.planned_release(z, 0.5, cohort, cohort, population, 20_000, count=rounds)
    assert ddp.epsilon([release], delta) <= target
    if z > 1e-3:  # and it is the smallest such z, to the tolerance
        smaller = ddp.planned_release(
            z * (1 - 2e-4), 0.5, cohort, cohort, population, 20_000, count=rounds
        )
        assert ddp.epsilon([smaller], delta) > target


def test_large_skellam_means_are_sampled_exactly_in_parts() -> None:
    """numpy's Poisson drifts above ~1e13 (float64); 5e12 is drawn as 5 parts of 1e12."""
    x = ddp.sample_skellam(5e12, 200_000, secure_rng()).astype(np.float64)
    assert abs(x.var() / (2 * 5e12) - 1) < 0.02
    with pytest.raises(ddp.DistributedDpError, match="coarser step"):
        ddp.sample_skellam(1e15, 10, secure_rng())
