"""Distributed differential privacy for secure aggregation: every client adds discrete noise to its
integer-encoded update, so the coordinator only ever sees a sum that is already private.

Mechanism: the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021). Each client adds
Skellam(mu) = Poisson(mu) - Poisson(mu) noise (variance 2 mu) to every coordinate. Sums of
independent Skellams are Skellam, so if m clients contribute, the sum carries Skellam(m mu):
exactly the discrete analogue of Gaussian noise with variance 2 m mu, and it survives the modular
sum of SecAgg because it is an integer.

Calibration: clients add mu = (z C / step)^2 / (2 m_min), so that the sum of any ``m_min``
(the round's min-clients) contributions carries noise std >= z C (float units): with more clients
there is more noise, never less. Each round records the noise that was *actually* in the sum
(m = number of contributors after dropouts) as a ``SkellamRelease``.

Accounting (RDP): Theorem 3.5 of Agarwal et al.: Skellam with total parameter mu, L1 and L2
sensitivities D1, D2 (integer units) is (alpha, eps(alpha))-RDP with

    eps(alpha) <= alpha D2^2 / (4 mu)
                  + min( ((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu) ).

Client sampling with rate q is accounted with the general upper bound for Poisson-subsampled RDP
of Zhu & Wang (ICML 2019, Theorem 6) at integer orders, and RDP is converted to (epsilon, delta)
by dp-accounting's ``compute_epsilon``. Sensitivities after stochastic rounding are bounded
without assumptions: ||q||_2 <= C / step + sqrt(d) (each coordinate moves by < 1), and
||q||_1 <= sqrt(d) ||q||_2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Integer RDP orders (the subsampling bound needs integers); dp-accounting's default range.
RDP_ORDERS: tuple[int, ...] = (*tuple(range(2, 65)), 80, 96, 128, 192, 256)


class DistributedDpError(ValueError):
    pass


def client_mu(noise_multiplier: float, clip_norm: float, step: float, min_clients: int) -> float:
    """The Skellam parameter each client adds per coordinate (integer units)."""
    if not (noise_multiplier > 0 and clip_norm > 0 and step > 0):
        raise DistributedDpError(
            f"noise-multiplier, clip-norm and step must be > 0, got {noise_multiplier}, "
            f"{clip_norm}, {step}"
        )
    if min_clients < 1:
        raise DistributedDpError(f"min-clients: must be >= 1, got {min_clients}")
    sigma_int = noise_multiplier * clip_norm / step
    return sigma_int**2 / (2.0 * min_clients)


# numpy's Poisson sampler works in float64: above ~1e13 its variance drifts (measured +4% at 1e15).
# Larger means are drawn as sums of independent Poissons of at most this mean (exact in law).
MAX_POISSON_MEAN = 1e12
MAX_POISSON_PARTS = 64


def sample_skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Skellam(mu) noise as int64 (``rng``: ``privacy.secagg.primitives.secure_rng()``)."""
    if not (math.isfinite(mu) and mu >= 0):
        raise DistributedDpError(f"mu must be >= 0, got {mu}")
    out = np.zeros(size, dtype=np.int64)
    if mu == 0:
        return out
    parts = math.ceil(mu / MAX_POISSON_MEAN)
    if parts > MAX_POISSON_PARTS:
        raise DistributedDpError(
            f"Skellam parameter {mu:.3g} is too large to sample exactly; use a coarser step"
        )
    for _ in range(parts):
        out += rng.poisson(mu / parts, size).astype(np.int64)
        out -= rng.poisson(mu / parts, size).astype(np.int64)
    return out


def sensitivities(clip_norm: float, step: float, dim: int) -> tuple[float, float]:
    """(L1, L2) sensitivity in integer units of one client's stochastically rounded update."""
    l2 = clip_norm / step + math.sqrt(dim)
    return math.sqrt(dim) * l2, l2


@dataclass(frozen=True)
class SkellamRelease:
    """``count`` releases of a secure sum carrying Skellam(mu_total) noise per coordinate, each
    over a cohort sampled with probability ``sampling_rate`` per client. Sensitivities and mu are
    in the integer units of the encoding."""

    mu_total: float
    l1_sensitivity: float
    l2_sensitivity: float
    sampling_rate: float
    count: int = 1
    mechanism: str = "poisson-skellam"

    def __post_init__(self) -> None:
        if not self.mu_total > 0:
            raise DistributedDpError(f"mu_total: must be > 0, got {self.mu_total}")
        if not (self.l1_sensitivity > 0 and self.l2_sensitivity > 0):
            raise DistributedDpError("sensitivities must be > 0")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise DistributedDpError(f"sampling rate: must be in (0, 1], got {self.sampling_rate}")
        if self.count < 1:
            raise DistributedDpError(f"count: must be >= 1, got {self.count}")

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std of the sum over L2 sensitivity (for display: the Gaussian-equivalent z)."""
        return math.sqrt(2 * self.mu_total) / self.l2_sensitivity

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "mu_total": self.mu_total,
            "l1_sensitivity": self.l1_sensitivity,
            "l2_sensitivity": self.l2_sensitivity,
            "sampling_rate": self.sampling_rate,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkellamRelease:
        return cls(
            float(data["mu_total"]),
            float(data["l1_sensitivity"]),
            float(data["l2_sensitivity"]),
            float(data["sampling_rate"]),
            int(data["count"]),
        )


def release_for_round(
    mu_per_client: float,
    contributors: int,
    clip_norm: float,
    step: float,
    dim: int,
    sampling_rate: float,
) -> SkellamRelease:
    """The release a round actually made: only the ``contributors`` whose inputs are in the sum
    added noise (dropped clients' noise never reached it)."""
    l1, l2 = sensitivities(clip_norm, step, dim)
    return SkellamRelease(mu_per_client * contributors, l1, l2, sampling_rate)


def skellam_rdp(orders: Sequence[float], mu: float, l1: float, l2: float) -> np.ndarray:
    """Agarwal et al. 2021, Theorem 3.5 (upper bound on the Skellam mechanism's RDP)."""
    a = np.asarray(orders, dtype=np.float64)
    gauss = a * l2**2 / (4 * mu)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))
    out: np.ndarray = gauss + extra
    return out


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def poisson_subsampled_rdp(
    q: float, orders: Sequence[int], rdp: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Zhu & Wang 2019, Theorem 6: RDP of a mechanism with RDP ``rdp`` (at integer ``orders``
    2, 3, ..., each needed order present) run on a Poisson sample with rate ``q``:

      eps'(a) <= 1/(a-1) log( (1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
                              + 3 sum_{l=3}^{a} C(a,l) q^l (1-q)^(a-l) e^((l-1) eps(l)) )."""
    eps = dict(zip((int(o) for o in orders), (float(r) for r in rdp), strict=True))
    if q >= 1.0:
        return np.asarray([eps[int(o)] for o in orders])
    out = []
    lq, l1q = math.log(q), math.log1p(-q)
    for a in (int(o) for o in orders):
        if a < 2:
            raise DistributedDpError(f"orders must be integers >= 2, got {a}")
        terms = [(a - 1) * l1q + math.log(a * q - q + 1)]
        if 2 not in eps:
            raise DistributedDpError("the subsampling bound needs the RDP at order 2")
        terms.append(_log_comb(a, 2) + 2 * lq + (a - 2) * l1q + eps[2])
        for ell in range(3, a + 1):
            if ell not in eps:
                # eps is non-decreasing in the order: the next order up bounds a missing one
                above = [o for o in eps if o >= ell]
                if not above:
                    raise DistributedDpError(f"no RDP value at or above order {ell}")
                e_l = eps[min(above)]
            else:
                e_l = eps[ell]
            terms.append(
                math.log(3) + _log_comb(a, ell) + ell * lq + (a - ell) * l1q + (ell - 1) * e_l
            )
        m = max(terms)
        out.append((m + math.log(sum(math.exp(t - m) for t in terms))) / (a - 1))
    return np.asarray(out)


def rdp_of(events: Iterable[SkellamRelease], orders: Sequence[int] = RDP_ORDERS) -> np.ndarray:
    """RDP (at ``orders``) of the composition of ``events``."""
    total = np.zeros(len(orders))
    for e in events:
        base = skellam_rdp(
            range(2, max(orders) + 1), e.mu_total, e.l1_sensitivity, e.l2_sensitivity
        )
        full = list(range(2, max(orders) + 1))
        sampled = poisson_subsampled_rdp(e.sampling_rate, full, base)
        by_order = dict(zip(full, sampled, strict=True))
        total += e.count * np.asarray([by_order[int(o)] for o in orders])
    return total


def epsilon(
    events: Iterable[SkellamRelease],
    delta: float,
    *,
    extra_rdp: np.ndarray | None = None,
    orders: Sequence[int] = RDP_ORDERS,
) -> float:
    """(epsilon, delta) of the composed releases; ``extra_rdp`` (at ``orders``) adds other
    mechanisms' RDP, e.g. the Gaussian events of a central-DP ledger from dp-accounting's
    ``RdpAccountant(orders).compose(...)``, so a mixed ledger is accounted in one composition."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not 0 < delta < 1:
        raise DistributedDpError(f"delta: must be in (0, 1), got {delta}")
    events = list(events)
    rdp = rdp_of(events, orders)
    if extra_rdp is not None:
        rdp = rdp + np.asarray(extra_rdp)
    if not events and extra_rdp is None:
        return 0.0
    eps, _order = compute_epsilon(np.asarray(orders, dtype=np.float64), rdp, delta)
    return float(eps)
