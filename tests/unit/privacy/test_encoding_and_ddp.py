"""Fixed-point ring encoding (no wrap, checked) and distributed DP (Skellam noise, accounting)."""

from __future__ import annotations

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
    """Clients calibrated for m_min = 4 contributors: the sum over 4 carries variance (zC/step)^2;
    over 6 survivors it is 6/4 of it. Empirical variance within 2% (600k samples)."""
    z, clip, step, m_min = 1.1, 0.5, 1e-4, 4
    mu = ddp.client_mu(z, clip, step, m_min)
    target = (z * clip / step) ** 2
    rng = secure_rng()
    size = 150_000
    for contributors in (4, 6):
        total = sum(ddp.sample_skellam(mu, size, rng) for _ in range(contributors))
        want = target * contributors / m_min
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


def test_skellam_accounting_matches_gaussian_when_noise_is_large_and_unsampled() -> None:
    """With mu huge the Skellam RDP tends to the Gaussian's: no sampling, the (eps, delta)
    equal dp-accounting's Gaussian value for the same noise multiplier to 1e-6 relative."""
    d, clip, step = 460_800, 1.0, 2.0**-20
    l1, l2 = ddp.sensitivities(clip, step, d)
    z = 1.0
    release = ddp.SkellamRelease((z * l2) ** 2 / 2, l1, l2, sampling_rate=1.0, count=10)
    assert release.effective_noise_multiplier == pytest.approx(z)
    acc = RdpAccountant(orders=[float(o) for o in ddp.RDP_ORDERS])
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), 10))
    assert ddp.epsilon([release], 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_subsampled_bound_is_valid_and_amplifies() -> None:
    """Zhu-Wang's general bound applied to the Gaussian RDP never beats the exact subsampled
    Gaussian (it is an upper bound), and subsampling lowers epsilon."""
    orders = list(range(2, 65))
    z, q = 1.2, 0.05
    gauss = [a / (2 * z * z) for a in orders]
    bound = ddp.poisson_subsampled_rdp(q, orders, gauss)
    acc = RdpAccountant(orders=[float(o) for o in orders])
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)))
    exact = np.asarray(acc._rdp)  # dp-accounting's RDP of the subsampled Gaussian
    assert (bound >= exact - 1e-12).all()
    assert (bound < np.asarray(gauss)).all()
    d, clip, step = 1000, 1.0, 1e-3
    l1, l2 = ddp.sensitivities(clip, step, d)
    mu = (z * l2) ** 2 / 2
    sampled = ddp.SkellamRelease(mu, l1, l2, q, count=50)
    full = ddp.SkellamRelease(mu, l1, l2, 1.0, count=50)
    assert ddp.epsilon([sampled], 1e-5) < ddp.epsilon([full], 1e-5)


def test_dropped_clients_lower_the_recorded_noise() -> None:
    mu = ddp.client_mu(1.0, 1.0, 1e-3, min_clients=5)
    five = ddp.release_for_round(mu, 5, 1.0, 1e-3, 100, 0.1)
    three = ddp.release_for_round(mu, 3, 1.0, 1e-3, 100, 0.1)
    assert three.mu_total == pytest.approx(five.mu_total * 3 / 5)
    assert ddp.epsilon([three], 1e-5) > ddp.epsilon([five], 1e-5)
    assert ddp.SkellamRelease.from_dict(five.to_dict()) == five


def test_large_skellam_means_are_sampled_exactly_in_parts() -> None:
    """numpy's Poisson drifts above ~1e13 (float64); 5e12 is drawn as 5 parts of 1e12."""
    x = ddp.sample_skellam(5e12, 200_000, secure_rng()).astype(np.float64)
    assert abs(x.var() / (2 * 5e12) - 1) < 0.02
    with pytest.raises(ddp.DistributedDpError, match="coarser step"):
        ddp.sample_skellam(1e15, 10, secure_rng())
