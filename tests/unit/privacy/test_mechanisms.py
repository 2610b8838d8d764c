"""Mechanisms: flatten/clip/noise/denominator, adaptive clipping, Poisson sampling."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.accounting import PrivacyConfigError
from privacy.mechanisms import (
    AdaptiveClipping,
    dp_mean,
    flatten,
    l2_clip,
    next_clip_norm,
    noisy_unclipped_fraction,
    poisson_sample,
    sum_noise_multiplier,
    unflatten,
)


def test_flatten_unflatten_round_trip() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), np.float32)}
    vec = flatten(arrays)
    assert vec.shape == (10,) and vec.dtype == np.float64
    back = unflatten(vec, arrays)
    assert list(back) == ["a", "b"]
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == np.float32
    with pytest.raises(ValueError, match="expected"):
        unflatten(vec[:5], arrays)


def test_clip_bounds_the_norm_and_keeps_the_direction() -> None:
    v = np.array([3.0, 4.0])
    clipped, norm = l2_clip(v, 1.0)
    assert norm == 5.0 and np.linalg.norm(clipped) == pytest.approx(1.0)
    np.testing.assert_allclose(clipped, v / 5.0)
    small, n = l2_clip(np.array([0.1, 0.0]), 1.0)
    assert n == pytest.approx(0.1)
    np.testing.assert_array_equal(small, [0.1, 0.0])
    with pytest.raises(PrivacyConfigError, match="clip-norm: must be > 0"):
        l2_clip(v, 0.0)


def test_every_contribution_is_bounded_by_clip_over_denominator() -> None:
    """Sensitivity: removing any one vector moves the noiseless release by <= C / D."""
    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, s, 50) for s in (0.01, 0.5, 3.0, 100.0)]
    c, d = 0.7, 4.0
    full = dp_mean(vectors, 50, clip_norm=c, noise_multiplier=0.0, denominator=d, rng=rng)
    for i in range(len(vectors)):
        rest = vectors[:i] + vectors[i + 1 :]
        without = dp_mean(rest, 50, clip_norm=c, noise_multiplier=0.0, denominator=d, rng=rng)
        assert np.linalg.norm(full.mean - without.mean) <= c / d + 1e-12
    assert full.norms[3] > 100 and full.clip_norm == c


def test_noise_std_matches_z_c_over_denominator() -> None:
    """The released mean of zero updates is pure noise with std z * C / D per coordinate."""
    rng = np.random.default_rng(1)
    z, c, d, size = 1.3, 0.5, 8.0, 200_000
    out = dp_mean(
        [np.zeros(size)] * 3, size, clip_norm=c, noise_multiplier=z, denominator=d, rng=rng
    )
    want = z * c / d
    # The sample std of n Gaussians has relative standard error ~ 1/sqrt(2n) = 0.16%; 1% is 6 s.e.
    assert out.mean.std() == pytest.approx(want, rel=0.01)
    assert abs(out.mean.mean()) < 5 * want / np.sqrt(size)
    assert out.noise_std == pytest.approx(z * c)


def test_adaptive_clipping_noise_split_and_update() -> None:
    # z_sum = (z^-2 - (2 sigma_b)^-2)^-1/2; sigma_b large -> z_sum -> z.
    assert sum_noise_multiplier(1.0, 1e6) == pytest.approx(1.0)
    zs = sum_noise_multiplier(1.0, 1.0)
    assert zs == pytest.approx((1.0 - 0.25) ** -0.5)
    assert (zs**-2 + (2 * 1.0) ** -2) ** -0.5 == pytest.approx(1.0)  # the combined multiplier
    with pytest.raises(PrivacyConfigError, match=r"supports noise multipliers below 0\.3"):
        sum_noise_multiplier(0.5, 0.15)

    rule = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=1.0)
    # Everyone unclipped (fraction 1 > 0.5): the clip norm shrinks by exp(-0.2 * 0.5).
    assert next_clip_norm(2.0, 1.0, rule) == pytest.approx(2.0 * np.exp(-0.1))
    assert next_clip_norm(2.0, 0.0, rule) == pytest.approx(2.0 * np.exp(0.1))
    assert next_clip_norm(2.0, 0.5, rule) == pytest.approx(2.0)


def test_noisy_unclipped_fraction_is_unbiased() -> None:
    rng = np.random.default_rng(2)
    norms = [0.1, 0.2, 5.0, 6.0, 0.3, 7.0, 0.4, 9.0]  # 4 of 8 below C = 1
    draws = [noisy_unclipped_fraction(norms, 1.0, 0.4, 8.0, rng) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.01)
    assert np.std(draws) == pytest.approx(0.4 / 8.0, rel=0.05)


def test_adaptive_clip_converges_to_the_quantile() -> None:
    """Repeated updates with noise move C to the target quantile of a fixed norm distribution."""
    rng = np.random.default_rng(3)
    rule = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_stddev=2.0)
    clip = 50.0
    for _ in range(400):
        norms = rng.lognormal(0.0, 0.5, 100)  # median 1
        clip = next_clip_norm(clip, noisy_unclipped_fraction(norms, clip, 2.0, 100.0, rng), rule)
    assert 0.8 < clip < 1.25


def test_poisson_sampling_rate() -> None:
    rng = np.random.default_rng(4)
    units = list(range(1000))
    sizes = [len(poisson_sample(units, 0.1, rng)) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.std(sizes) == pytest.approx(np.sqrt(1000 * 0.1 * 0.9), rel=0.2)
    assert poisson_sample(units, 1.0, rng) == units
    with pytest.raises(PrivacyConfigError, match="sampling rate"):
        poisson_sample(units, 0.0, rng)
