"""Distributed differential privacy for secure aggregation: every client adds discrete noise to its
integer-encoded update, so the coordinator only ever sees a sum that is already private.

Mechanism: the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021). Each client adds
Skellam(mu) = Poisson(mu) - Poisson(mu) noise (variance 2 mu) to every coordinate. Sums of
independent Skellams are Skellam, so if c clients contribute, the sum carries Skellam(c mu):
the discrete analogue of Gaussian noise with variance 2 c mu, and it survives the modular sum of
SecAgg because it is an integer.

Calibration: clients add mu = (z C / step)^2 / (2 m), so that the sum of ``m`` contributions (the
whole cohort) carries noise std z C in float units. Each round records the noise that was
*actually* in the sum (c = contributors after dropouts) as a ``SkellamRelease``.

What is protected, and how it is accounted (README "Distributed DP" has the argument):

* Adjacency: zero-out (Kairouz et al., ICML 2021): neighbouring datasets differ in one client's
  data being replaced by data whose update is zero. The client still takes part (and adds its
  noise share) in both, so the noise in the sum is the same in both worlds. With noise added by
  the clients, add-or-remove adjacency does not fit: whether a client exists changes the noise.
* The noise level of a release reveals how many clients contributed (c), so the accountant
  conditions on it: given c, the contributors are a uniformly random c-subset of the N clients
  the cohort was drawn from (cohorts are drawn uniformly with a secret generator; dropouts are
  assumed independent of the clients' data and identities). That is sampling without replacement
  with fraction c / N, accounted with the general bound of Wang, Balle, Kasiviswanathan
  (AISTATS 2019, Theorem 9) on top of the Skellam RDP.
* That theorem is stated for replace-one adjacency, and its proof compares a subset holding the
  client with one holding another client instead: the base mechanism must be bounded for
  replacing one contributor by *any* other, whose sensitivity is twice one client's (2 D1, 2 D2).
  (Zero-out pairs are replace-one pairs in a domain that holds the zero update, so the amplified
  bound covers them.) Without sampling, the zero-out bound with D1, D2 holds directly; the
  accountant takes, order by order, the smaller of the two valid bounds.
* The coordinator knows who contributed, so against it there is no amplification: each client's
  guarantee is the composition of the unsampled releases it contributed to
  (``SkellamRelease.rdp(..., amplified=False)``).

Skellam RDP, Agarwal et al. 2021, Theorem 3.5: Skellam with total parameter mu, L1 and L2
sensitivities D1, D2 (integer units) is (alpha, eps(alpha))-RDP with

    eps(alpha) <= alpha D2^2 / (4 mu)
                  + min( ((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu) ).

Sensitivities after stochastic rounding are bounded without assumptions: ||q||_2 <= C / step +
sqrt(d) (each coordinate moves by < 1), and ||q||_1 <= sqrt(d) ||q||_2. RDP is converted to
(epsilon, delta) by dp-accounting's ``compute_epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.secagg.encoding import EncodingPlan, plan_encoding

# Integer RDP orders (the subsampling bound needs integers); dp-accounting's default range.
RDP_ORDERS: tuple[int, ...] = (*tuple(range(2, 65)), 80, 96, 128, 192, 256)
# The step puts the noise std of the whole cohort's sum at this many integer units: far finer than
# the noise, and small enough for exact Poisson sampling (see MAX_POISSON_MEAN).
NOISE_UNITS = 2.0**20


class DistributedDpError(ValueError):
    pass


def client_mu(noise_multiplier: float, clip_norm: float, step: float, calibrated_for: int) -> float:
    """The Skellam parameter each client adds per coordinate (integer units), so that the sum of
    ``calibrated_for`` contributions (the cohort) has noise std noise_multiplier * clip_norm."""
    if not (noise_multiplier > 0 and clip_norm > 0 and step > 0):
        raise DistributedDpError(
            f"noise-multiplier, clip-norm and step must be > 0, got {noise_multiplier}, "
            f"{clip_norm}, {step}"
        )
    if calibrated_for < 1:
        raise DistributedDpError(f"cohort size: must be >= 1, got {calibrated_for}")
    sigma_int = noise_multiplier * clip_norm / step
    return sigma_int**2 / (2.0 * calibrated_for)


def plan_noisy_encoding(
    n: int,
    noise_multiplier: float,
    clip_norm: float,
    calibrated_for: int,
    numel: int,
    precision: float = 0.0,
) -> tuple[EncodingPlan, float]:
    """The ring encoding for ``n`` clients that L2-clip to ``clip_norm`` and add Skellam noise
    calibrated so that ``calibrated_for`` contributions carry noise std z C; and that per-client
    Skellam parameter.

    The ring holds n clipped updates plus the noise of n clients (bounded except with
    probability 2^-40 over all coordinates: ``plan_encoding``), so the sum cannot wrap; the
    decoded sum is checked against that bound again. ``precision`` 0 picks the step that puts
    the cohort's noise std at ``NOISE_UNITS`` units (or the finest that fits 32 bits, if coarser).
    """
    if calibrated_for < 1 or n < 1:
        raise DistributedDpError(f"client counts must be >= 1, got {n} and {calibrated_for}")
    sigma = noise_multiplier * clip_norm
    noise_std = sigma * math.sqrt(n / calibrated_for)  # all n clients contribute
    if precision <= 0:
        finest = plan_encoding(n, clip_norm, 0.0, 1, noise_std=noise_std, numel=numel)
        precision = max(finest.step, sigma / NOISE_UNITS)
    plan = plan_encoding(
        n, clip_norm, precision, 1, noise_std=noise_std, numel=numel, l2_clip=clip_norm
    )
    return plan, client_mu(noise_multiplier, clip_norm, plan.step, calibrated_for)


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


# ------------------------------------------------------------------------------- accounting


def skellam_rdp(
    orders: Sequence[float] | np.ndarray, mu: float, l1: float, l2: float
) -> np.ndarray:
    """Agarwal et al. 2021, Theorem 3.5 (upper bound on the Skellam mechanism's RDP)."""
    a = np.asarray(orders, dtype=np.float64)
    gauss = a * l2**2 / (4 * mu)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu))
    out: np.ndarray = gauss + extra
    return out


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log C(n, k) elementwise for integer-valued arrays with 0 <= k (k > n gives garbage that
    the caller masks)."""
    top = int(max(n.max(), k.max()))
    log_fact = np.asarray([math.lgamma(i + 1) for i in range(top + 1)])
    ni, ki = n.astype(int), k.astype(int)
    out: np.ndarray = log_fact[ni] - log_fact[ki] - log_fact[np.clip(ni - ki, 0, None)]
    return out


def wor_subsampled_rdp(
    gamma: float, orders: Sequence[int], base_rdp: Mapping[int, float] | np.ndarray
) -> np.ndarray:
    """Wang, Balle, Kasiviswanathan 2019, Theorem 9 (general upper bound): RDP at integer
    ``orders`` of a mechanism run on a uniformly random subset of a fraction ``gamma`` of the
    dataset (replace-one adjacency), given the mechanism's RDP ``base_rdp[j]`` at every order
    j = 2 .. max(orders) (an array indexed from order 2). With eps(inf) = inf:

      eps'(a) <= 1/(a-1) log( 1 + gamma^2 C(a,2) min(4 (e^eps(2) - 1), 2 e^eps(2))
                                 + sum_{j=3}^{a} 2 gamma^j C(a,j) e^((j-1) eps(j)) )."""
    top = max(int(o) for o in orders)
    if min(int(o) for o in orders) < 2 or any(float(o) != int(o) for o in orders):
        raise DistributedDpError(f"orders must be integers >= 2, got {list(orders)[:5]}...")
    if isinstance(base_rdp, Mapping):
        eps = np.asarray([float(base_rdp[j]) for j in range(2, top + 1)])
    else:
        eps = np.asarray(base_rdp, dtype=np.float64)[: top - 1]
    if eps.shape != (top - 1,):
        raise DistributedDpError(f"base RDP needs orders 2..{top}, got {eps.shape[0]} values")
    if not 0 < gamma <= 1:
        raise DistributedDpError(f"sampling fraction: must be in (0, 1], got {gamma}")
    a = np.asarray([int(o) for o in orders], dtype=np.float64)
    if gamma == 1.0:
        same: np.ndarray = eps[a.astype(int) - 2]
        return same
    j = np.arange(2, top + 1, dtype=np.float64)
    # log of each term's order-independent factor: w_j
    e2 = eps[0]
    w = np.log(2.0) + (j - 1) * eps
    w[0] = min(math.log(4.0) + e2 + math.log(-math.expm1(-e2)), e2 + math.log(2.0))
    terms = _log_comb(a[:, None], j[None, :]) + j[None, :] * math.log(gamma) + w[None, :]
    terms = np.where(j[None, :] <= a[:, None], terms, -np.inf)
    terms = np.concatenate([np.zeros((len(a), 1)), terms], axis=1)  # the leading 1
    m = terms.max(axis=1, keepdims=True)
    log_a = m[:, 0] + np.log(np.exp(terms - m).sum(axis=1))
    out: np.ndarray = log_a / (a - 1)
    return out


@dataclass(frozen=True)
class SkellamRelease:
    """``count`` releases of a secure sum carrying Skellam(mu_total) noise per coordinate, each
    the sum of ``contributors`` clients drawn uniformly from ``population`` (in the integer units
    of the encoding: ``mu_total`` and the sensitivities)."""

    mu_total: float
    l1_sensitivity: float
    l2_sensitivity: float
    contributors: int
    population: int
    count: int = 1
    mechanism: str = "zero-out-wor-skellam"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu_total) and self.mu_total > 0):
            raise DistributedDpError(f"mu_total: must be > 0, got {self.mu_total}")
        if not (self.l1_sensitivity > 0 and self.l2_sensitivity > 0):
            raise DistributedDpError("sensitivities must be > 0")
        if not 1 <= self.contributors <= self.population:
            raise DistributedDpError(
                f"contributors: must be in [1, population = {self.population}], got "
                f"{self.contributors}"
            )
        if self.count < 1:
            raise DistributedDpError(f"count: must be >= 1, got {self.count}")
        if self.mechanism != "zero-out-wor-skellam":
            raise DistributedDpError(f"mechanism: unknown {self.mechanism!r}")

    @property
    def sampling_fraction(self) -> float:
        return self.contributors / self.population

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std of the sum over L2 sensitivity (for display: the Gaussian-equivalent z)."""
        return math.sqrt(2 * self.mu_total) / self.l2_sensitivity

    def same_release(self, other: object) -> bool:
        return isinstance(other, SkellamRelease) and self.to_dict() | {"count": 0} == (
            other.to_dict() | {"count": 0}
        )

    def rdp(self, orders: Sequence[int] = RDP_ORDERS, *, amplified: bool = True) -> np.ndarray:
        """RDP of the ``count`` releases at ``orders``; ``amplified=False`` is the guarantee
        against someone who knows the client contributed (the coordinator).

        Amplified: per order, the smaller of the zero-out bound without sampling and Wang et al.'s
        subsampling bound over the replace-one base (sensitivities doubled; module docstring)."""
        a = np.asarray([int(o) for o in orders], dtype=np.float64)
        mu, l1, l2 = self.mu_total, self.l1_sensitivity, self.l2_sensitivity
        out: np.ndarray = skellam_rdp(a, mu, l1, l2)
        if amplified and self.contributors < self.population:
            top = max(int(o) for o in orders)
            replace_one = skellam_rdp(np.arange(2, top + 1), mu, 2 * l1, 2 * l2)
            sampled = wor_subsampled_rdp(self.sampling_fraction, orders, replace_one)
            out = np.minimum(out, sampled)
        return self.count * out

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "mu_total": self.mu_total,
            "l1_sensitivity": self.l1_sensitivity,
            "l2_sensitivity": self.l2_sensitivity,
            "contributors": self.contributors,
            "population": self.population,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkellamRelease:
        return cls(
            float(data["mu_total"]),
            float(data["l1_sensitivity"]),
            float(data["l2_sensitivity"]),
            int(data["contributors"]),
            int(data["population"]),
            int(data["count"]),
            str(data.get("mechanism", "zero-out-wor-skellam")),
        )


def release_for_round(
    mu_per_client: float,
    contributors: int,
    population: int,
    clip_norm: float,
    step: float,
    dim: int,
) -> SkellamRelease:
    """The release a round actually made: only the ``contributors`` whose inputs are in the sum
    added noise (dropped clients' noise never reached it)."""
    l1, l2 = sensitivities(clip_norm, step, dim)
    return SkellamRelease(mu_per_client * contributors, l1, l2, contributors, population)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[int] = RDP_ORDERS) -> float:
    """dp-accounting's RDP -> (epsilon, delta) conversion."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not 0 < delta < 1:
        raise DistributedDpError(f"delta: must be in (0, 1), got {delta}")
    if not np.any(rdp):
        return 0.0
    eps, _order = compute_epsilon(np.asarray(orders, dtype=np.float64), np.asarray(rdp), delta)
    return float(eps)


def epsilon(
    events: Iterable[SkellamRelease],
    delta: float,
    *,
    extra_rdp: np.ndarray | None = None,
    orders: Sequence[int] = RDP_ORDERS,
    amplified: bool = True,
) -> float:
    """(epsilon, delta) of the composed releases; ``extra_rdp`` (at ``orders``) adds other
    mechanisms' RDP, e.g. the Gaussian events of a central-DP ledger from dp-accounting's
    ``RdpAccountant(orders).compose(...)``, so a mixed ledger is accounted in one composition."""
    rdp = np.zeros(len(orders))
    for e in events:
        rdp = rdp + e.rdp(orders, amplified=amplified)
    if extra_rdp is not None:
        rdp = rdp + np.asarray(extra_rdp)
    return epsilon_from_rdp(rdp, delta, orders)


def planned_release(
    noise_multiplier: float,
    clip_norm: float,
    cohort: int,
    contributors: int,
    population: int,
    numel: int,
    precision: float = 0.0,
    count: int = 1,
    *,
    sampled: int = 0,
) -> SkellamRelease:
    """The release of a round whose noise is calibrated for ``cohort`` clients, that samples
    ``sampled`` clients (0: ``cohort``) from ``population``, of which ``contributors`` reach the
    sum: what the coordinator will record, computed before the round (for calibration and the
    max-epsilon check)."""
    n = sampled or cohort
    plan, mu = plan_noisy_encoding(n, noise_multiplier, clip_norm, cohort, numel, precision)
    release = release_for_round(mu, contributors, population, clip_norm, plan.step, numel)
    return SkellamRelease(
        release.mu_total,
        release.l1_sensitivity,
        release.l2_sensitivity,
        release.contributors,
        release.population,
        count,
    )


MAX_NOISE_MULTIPLIER = 1000.0


def worst_round_rdp(
    noise_multiplier: float,
    clip_norm: float,
    cohort: int,
    min_contributors: int,
    population: int,
    numel: int,
    precision: float = 0.0,
    orders: Sequence[int] = RDP_ORDERS,
) -> np.ndarray:
    """Per order, the largest RDP one round can have when anywhere from ``min_contributors`` to
    the whole ``cohort`` reach the sum (dropouts leave less noise, but also a smaller fraction
    of the population): an upper bound for any round of the run whatever drops out."""
    low = max(1, min(min_contributors, cohort))
    out: np.ndarray = np.max(
        [
            planned_release(
                noise_multiplier, clip_norm, cohort, c, population, numel, precision
            ).rdp(orders)
            for c in range(low, cohort + 1)
        ],
        axis=0,
    )
    return out


MAX_NOISE_MULTIPLIER = 1000.0


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    cohort: int,
    population: int,
    clip_norm: float,
    numel: int,
    precision: float = 0.0,
    *,
    min_contributors: int = 0,
    rel_tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier z (within ``rel_tol``) for which ``rounds`` rounds are
    (target_epsilon, delta)-DP even if every round loses all but ``min_contributors`` of the
    cohort (0: no dropouts), i.e. ``rounds`` x ``worst_round_rdp`` converts to <= the target.

    Never overshoots: the returned z is checked to give epsilon <= target_epsilon."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise DistributedDpError(f"target-epsilon: must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise DistributedDpError(f"rounds: must be >= 1 to calibrate noise, got {rounds}")
    low = min_contributors or cohort

    def eps_at(z: float) -> float:
        r = worst_round_rdp(z, clip_norm, cohort, low, population, numel, precision)
        return epsilon_from_rdp(rounds * r, delta)

    if eps_at(MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise DistributedDpError(
            f"target-epsilon: {target_epsilon} is unreachable in {rounds} round(s) of {cohort} "
            f"of {population} clients (as few as {low} contributing) at delta {delta:g} with a "
            f"noise multiplier up to {MAX_NOISE_MULTIPLIER:g}; raise the target, or lower rounds "
            "or clients-per-round"
        )
    hi = 1.0
    while eps_at(hi) > target_epsilon:
        hi = min(hi * 2.0, MAX_NOISE_MULTIPLIER)
    lo = hi / 2.0
    while eps_at(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
        if lo < 1e-6:
            return hi
    while hi - lo > rel_tol * hi:  # invariant: eps(hi) <= target < eps(lo)
        mid = (lo + hi) / 2.0
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
