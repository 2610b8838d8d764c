"""DP mechanisms as plain functions over numpy arrays: flatten an update to one vector, clip it,
add Gaussian noise to a sum, divide by a fixed denominator, and adapt the clip norm.

Client-level DP-FedAvg (McMahan et al. 2018) releases

    (sum_k clip(delta_k, C) + N(0, (z C)^2 I)) / D

where the clients k were Poisson-sampled with rate q and D = q * population is the *expected*
cohort size, fixed in advance. A fixed D keeps the sensitivity of the release at C / D whatever
the cohort turns out to be (dividing by the actual count would leak it).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves C towards the ``target_quantile`` of the clients' update norms with a geometric
step, using a noisy count of the clients whose update was not clipped. Each client adds
``1[norm <= C] - 1/2`` (sensitivity 1/2) to that count, noised with std ``count_stddev``. The two
releases together are one Gaussian mechanism with noise multiplier z when the sum's multiplier is
``z_sum = (z^-2 - (2 count_stddev)^-2)^-1/2`` (their Theorem 1), which is what the ledger records.

Noise comes from a generator seeded with 128 bits from the OS per release and never stored.
Like Opacus without ``secure_mode``, we do not defend against floating-point attacks on the
Gaussian sampler (Mironov 2012; Haney et al. 2022).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from privacy.accounting import PrivacyConfigError


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS's entropy pool (its seed is never stored or logged)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


# ----------------------------------------------------------------------------- vectors


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All tensors as one float64 vector, in the mapping's order."""
    if not arrays:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in arrays.values()])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into tensors shaped (and typed) like ``like``."""
    total = sum(int(v.size) for v in like.values())
    if vector.shape != (total,):
        raise ValueError(f"vector has shape {vector.shape}, expected ({total},)")
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, ref in like.items():
        n = int(ref.size)
        out[name] = vector[start : start + n].reshape(ref.shape).astype(ref.dtype)
        start += n
    return out


def l2_clip(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled to L2 norm at most ``clip_norm``; also returns the original norm."""
    if not clip_norm > 0:
        raise PrivacyConfigError(f"clip-norm: must be > 0, got {clip_norm}")
    norm = float(np.linalg.norm(vector))
    if norm <= clip_norm:
        return vector.astype(np.float64, copy=True), norm
    return vector * (clip_norm / norm), norm


def noisy_sum(
    vectors: Sequence[np.ndarray], size: int, noise_std: float, rng: np.random.Generator
) -> np.ndarray:
    """sum(vectors) + N(0, noise_std^2 I) (a zero vector of ``size`` if there are none)."""
    acc = np.zeros(size, dtype=np.float64)
    for v in vectors:
        if v.shape != (size,):
            raise ValueError(f"vector has shape {v.shape}, expected ({size},)")
        acc += v
    if noise_std > 0:
        acc += rng.normal(0.0, noise_std, size=size)
    return acc


@dataclass(frozen=True)
class ClippedMean:
    """The released estimate of the mean update and what clipping did to produce it."""

    mean: np.ndarray  # (sum of clipped + noise) / denominator
    norms: tuple[float, ...]  # each input's norm before clipping (never leaves the aggregator)
    clip_norm: float
    noise_std: float  # std of the noise on the sum


def dp_mean(
    vectors: Sequence[np.ndarray],
    size: int,
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    rng: np.random.Generator,
) -> ClippedMean:
    """Clip each vector to ``clip_norm``, sum, add N(0, (noise_multiplier * clip_norm)^2), divide
    by the fixed ``denominator``. No single vector moves the result by more than
    clip_norm / denominator."""
    if not denominator > 0:
        raise PrivacyConfigError(f"denominator: must be > 0, got {denominator}")
    if noise_multiplier < 0:
        raise PrivacyConfigError(f"noise-multiplier: must be >= 0, got {noise_multiplier}")
    clipped, norms = [], []
    for v in vectors:
        c, n = l2_clip(v, clip_norm)
        clipped.append(c)
        norms.append(n)
    std = noise_multiplier * clip_norm
    total = noisy_sum(clipped, size, std, rng)
    return ClippedMean(total / denominator, tuple(norms), clip_norm, std)


# ------------------------------------------------------------------------- adaptive clipping


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. 2021: C <- C * exp(-learning_rate * (unclipped_fraction - target_quantile)).

    ``count_stddev`` is the std of the noise on the count of unclipped updates; the paper's
    recommendation is expected clients per round / 20."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise PrivacyConfigError(
                f"clip-quantile: must be in (0, 1), got {self.target_quantile}"
            )
        if not self.learning_rate > 0:
            raise PrivacyConfigError(f"clip-learning-rate: must be > 0, got {self.learning_rate}")
        if not self.count_stddev > 0:
            raise PrivacyConfigError(f"clip-count-stddev: must be > 0, got {self.count_stddev}")


def sum_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier for the update sum so that (sum, unclipped count) together are one
    Gaussian release with ``noise_multiplier``: z_sum = (z^-2 - (2 sigma_b)^-2)^-1/2."""
    if not noise_multiplier > 0:
        raise PrivacyConfigError(f"noise-multiplier: must be > 0, got {noise_multiplier}")
    limit = 2.0 * count_stddev
    if noise_multiplier >= limit:
        raise PrivacyConfigError(
            f"noise-multiplier: adaptive clipping with clip-count-stddev {count_stddev:g} "
            f"supports noise multipliers below {limit:g} (2 x clip-count-stddev), got "
            f"{noise_multiplier:g}; raise clip-count-stddev or use fixed clipping"
        )
    return float((noise_multiplier**-2 - limit**-2) ** -0.5)


def noisy_unclipped_fraction(
    norms: Sequence[float],
    clip_norm: float,
    count_stddev: float,
    denominator: float,
    rng: np.random.Generator,
) -> float:
    """DP estimate of the fraction of updates with norm <= clip_norm (Andrew et al. 2021):
    each update adds 1[norm <= C] - 1/2 (sensitivity 1/2), Gaussian noise is added to the sum,
    and the result is divided by the expected cohort size."""
    centred = sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms)
    noisy = centred + float(rng.normal(0.0, count_stddev))
    return noisy / denominator + 0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, rule: AdaptiveClipping) -> float:
    """Geometric update towards the target quantile: too many unclipped updates shrink C."""
    return clip_norm * math.exp(-rule.learning_rate * (unclipped_fraction - rule.target_quantile))


# ------------------------------------------------------------------------------- sampling


def poisson_sample(units: Sequence[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each unit independently with probability ``rate`` (the sampling the accountant assumes)."""
    if not 0.0 < rate <= 1.0:
        raise PrivacyConfigError(f"sampling rate: must be in (0, 1], got {rate}")
    ordered = sorted(units)
    keep = rng.random(len(ordered)) < rate
    return [u for u, k in zip(ordered, keep, strict=True) if k]
