"""Fixed-point encoding of adapter updates into the ring Z_(2^b) that SecAgg+ sums in.

A client's update (all trained adapter tensors as one float vector) is clipped to [-clip, clip]
per coordinate, multiplied by its weight fraction phi = min(num_examples, weight_cap) / weight_cap
(so example weighting is folded in before masking and never revealed per client), divided by
``step`` and rounded stochastically (unbiased: E[q] = v / step) with a cryptographically seeded
generator. The integer weight itself rides along as one extra coordinate, so the coordinator learns
only sum(phi_i * x_i) and sum(w_i) and divides.

The ring is sized so the sum of up to ``max_clients`` vectors (plus distributed-DP noise, bounded
except with probability ``overflow_prob``) cannot wrap: ``plan_encoding`` checks it and refuses
plans that do not fit, and ``decode_sum`` checks the unmasked sum lies inside the bound (a value
outside it means some client sent a vector outside the agreed range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.secagg.primitives import wire_dtype

MAX_RING_BITS = 32  # wider rings would make the upload larger than the fp32 adapter


class EncodingError(ValueError):
    pass


@dataclass(frozen=True)
class EncodingPlan:
    clip: float  # per-coordinate clip range of an update
    step: float  # the float value of one integer unit
    weight_cap: int  # client weights are min(num_examples, weight_cap); 1 = unweighted
    max_clients: int  # sums of at most this many encoded vectors cannot wrap
    ring_bits: int
    noise_bound: int = 0  # |summed DP noise| per coordinate stays below this (integer units)
    l2_clip: float = 0.0  # > 0: updates are first scaled to L2 norm <= l2_clip (distributed DP)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise EncodingError(f"secagg-clip: must be > 0, got {self.clip}")
        if not (math.isfinite(self.step) and self.step > 0):
            raise EncodingError(f"secagg-precision: must be > 0, got {self.step}")
        if self.weight_cap < 1:
            raise EncodingError(f"secagg-weight-cap: must be >= 1, got {self.weight_cap}")
        if self.max_clients < 1:
            raise EncodingError(f"max_clients: must be >= 1, got {self.max_clients}")
        if not 2 <= self.ring_bits <= 64:
            raise EncodingError(f"ring bits must be in [2, 64], got {self.ring_bits}")
        if not (math.isfinite(self.l2_clip) and self.l2_clip >= 0):
            raise EncodingError(f"clip-norm: must be >= 0, got {self.l2_clip}")
        if self.noise_bound < 0:
            raise EncodingError(f"noise bound must be >= 0, got {self.noise_bound}")
        need = required_bits(self.max_clients, self.level, self.weight_cap, self.noise_bound)
        if need > self.ring_bits:
            raise EncodingError(
                f"a sum of {self.max_clients} clients needs {need} bits but the ring has "
                f"{self.ring_bits}: it could wrap"
            )

    @property
    def level(self) -> int:
        """Largest |integer| one client's coordinate can take."""
        return math.ceil(self.clip / self.step - 1e-9)

    @property
    def value_bound(self) -> int:
        """Largest |integer| a coordinate of a sum of ``max_clients`` vectors can take."""
        return self.max_clients * self.level + self.noise_bound

    @property
    def dtype(self) -> np.dtype:
        return wire_dtype(self.ring_bits)


def required_bits(n: int, level: int, weight_cap: int, noise_bound: int = 0) -> int:
    """Ring bits so that sums in [-(n*level + noise), n*level + noise] and [0, n*weight_cap]
    all have distinct residues when read back centred."""
    span = max(n * level + noise_bound, n * weight_cap)
    return max(2, span.bit_length() + 1)  # centred b-bit values reach 2^(b-1) - 1 >= span


def skellam_tail_bound(mu_total: float, prob: float) -> int:
    """An integer H with P(|Skellam(mu_total)| >= H) <= prob.

    Skellam(mu) = A - B, A, B ~ Poisson(mu). Poisson tails (Bennett): P(A - mu >= s) and
    P(mu - B >= s) are each <= exp(-s^2 / (2 (mu + s/3))), so |A - B| >= 2s has probability
    <= 4 exp(-s^2 / (2 (mu + s/3))); solve for s."""
    if mu_total <= 0:
        return 0
    c = math.log(4.0 / prob)
    s = c / 3 + math.sqrt(c * c / 9 + 2 * c * mu_total)
    return math.ceil(2 * s) + 1


def plan_encoding(
    max_clients: int,
    clip: float,
    precision: float = 0.0,
    weight_cap: int = 1,
    *,
    noise_std: float = 0.0,
    numel: int = 1,
    overflow_prob: float = 2.0**-40,
    l2_clip: float = 0.0,
) -> EncodingPlan:
    """Choose step and ring bits for ``max_clients`` clients.

    ``precision`` > 0 fixes the step and picks the fewest ring bits that cannot wrap (an error if
    more than 32 are needed: the masked upload must not outgrow the fp32 adapter). ``precision``
    = 0 picks the finest step that fits a 32-bit ring. ``noise_std`` is the standard deviation, in
    float units, of the summed distributed-DP noise when all ``max_clients`` contribute; its
    Skellam tail is bounded with probability ``overflow_prob`` over all ``numel`` coordinates.
    """
    if max_clients < 1:
        raise EncodingError(f"max_clients: must be >= 1, got {max_clients}")
    per_coord = overflow_prob / max(numel, 1)

    def noise_bound(step: float) -> int:
        if noise_std <= 0:
            return 0
        mu_total = (noise_std / step) ** 2 / 2.0
        return skellam_tail_bound(mu_total, per_coord)

    if precision > 0:
        bound = noise_bound(precision)
        level = math.ceil(clip / precision - 1e-9)
        bits = required_bits(max_clients, level, weight_cap, bound)
        if bits > MAX_RING_BITS:
            raise EncodingError(
                f"secagg-precision: step {precision:g} with clip {clip:g} for {max_clients} "
                f"clients needs a {bits}-bit ring (> {MAX_RING_BITS}); use a coarser step or a "
                "smaller clip"
            )
        return EncodingPlan(clip, precision, weight_cap, max_clients, bits, bound, l2_clip)

    limit = (1 << (MAX_RING_BITS - 1)) - 1  # largest centred value in a 32-bit ring
    if max_clients * weight_cap > limit:
        raise EncodingError(
            f"secagg-weight-cap: {weight_cap} x {max_clients} clients does not fit 32 bits"
        )
    # noise bound * step is about 2 sqrt(2c) noise_std; start there and tighten until it fits.
    c = math.log(4.0 / per_coord)
    step = (max_clients * clip + 2.2 * math.sqrt(2 * c) * noise_std) / (limit - 8)
    for _ in range(64):
        level = math.ceil(clip / step - 1e-9)
        if required_bits(max_clients, level, weight_cap, noise_bound(step)) <= MAX_RING_BITS:
            return EncodingPlan(
                clip, step, weight_cap, max_clients, MAX_RING_BITS, noise_bound(step), l2_clip
            )
        step *= 1.0001
    raise EncodingError("could not fit the encoding into 32 bits")  # pragma: no cover


def step_for_ring(max_clients: int, clip: float, bits: int, weight_cap: int) -> float:
    """The finest step for which a sum of ``max_clients`` encoded vectors (per-coordinate clip
    ``clip``, weights up to ``weight_cap``) fits a ``bits``-bit ring (``--secagg-ring-bits``):
    pass it as ``plan_encoding``'s precision. Refused if the weights alone do not fit."""
    if not 2 <= bits <= MAX_RING_BITS:
        raise EncodingError(f"secagg-ring-bits: must be in [2, {MAX_RING_BITS}], got {bits}")
    limit = (1 << (bits - 1)) - 1  # largest centred value
    if max_clients * weight_cap > limit:
        raise EncodingError(
            f"secagg-weight-cap: {weight_cap} x {max_clients} clients does not fit a {bits}-bit "
            f"ring; use --secagg-weight-cap {max(1, limit // max_clients)} or a wider ring"
        )
    level = limit // max_clients
    if level < 1:
        raise EncodingError(f"secagg-ring-bits: {bits} bits cannot hold {max_clients} clients")
    return clip / level * (1 + 1e-9)  # ceil(clip / step) stays at level


def quantize(
    update: np.ndarray, weight: int, plan: EncodingPlan, rng: np.random.Generator
) -> np.ndarray:
    """The client's vector in integers (int64): round(phi * clip(update) / step), then the weight.

    ``rng`` must be a cryptographically seeded generator (``primitives.secure_rng``)."""
    if update.ndim != 1:
        raise EncodingError(f"update must be a flat vector, got shape {update.shape}")
    if not np.isfinite(update).all():
        raise EncodingError("update contains NaN or infinite values")
    if weight < 1:
        raise EncodingError(f"weight must be >= 1, got {weight}")
    w = min(int(weight), plan.weight_cap)
    x = update.astype(np.float64)
    if plan.l2_clip > 0:
        norm = float(np.linalg.norm(x))
        if norm > plan.l2_clip:
            x *= plan.l2_clip / norm
    scaled = np.clip(x, -plan.clip, plan.clip) * (w / plan.weight_cap)
    scaled /= plan.step
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    out = np.empty(update.size + 1, dtype=np.int64)
    out[:-1] = np.clip(q, -plan.level, plan.level).astype(np.int64)
    out[-1] = w
    return out


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """int64 values -> their residues mod 2^bits, in the wire dtype."""
    dt = wire_dtype(bits)
    ring = values.astype(np.int64).view(np.uint64) & np.uint64((1 << bits) - 1)
    return ring.astype(dt)


def centred(ring: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits -> the representatives in [-2^(bits-1), 2^(bits-1)), as int64."""
    v = ring.astype(np.uint64) & np.uint64((1 << bits) - 1)
    signed = v.astype(np.int64)
    half = 1 << (bits - 1)
    if bits == 64:
        return v.view(np.int64)
    signed[signed >= half] -= 1 << bits
    return signed


@dataclass(frozen=True)
class DecodedSum:
    weighted_sum: np.ndarray  # sum_i phi_i * clip(x_i) (+ noise), float64
    total_weight: int  # sum_i w_i


def decode_sum(ring_sum: np.ndarray, plan: EncodingPlan, contributors: int) -> DecodedSum:
    """Read an unmasked ring sum of ``contributors`` vectors back as floats, checking that it lies
    in the range honest contributions allow (so it cannot have wrapped)."""
    if contributors > plan.max_clients:
        raise EncodingError(
            f"{contributors} contributions exceed the {plan.max_clients} the ring was sized for"
        )
    v = centred(ring_sum, plan.ring_bits)
    values, weight = v[:-1], int(v[-1])
    bound = contributors * plan.level + plan.noise_bound
    worst = int(np.abs(values).max(initial=0))
    if worst > bound:
        raise EncodingError(
            f"unmasked sum has a coordinate of magnitude {worst} > {bound}, the most "
            f"{contributors} in-range contributions can reach: a contribution was out of range"
        )
    if not contributors <= weight <= contributors * plan.weight_cap:
        raise EncodingError(
            f"unmasked total weight {weight} is outside [{contributors}, "
            f"{contributors * plan.weight_cap}]"
        )
    return DecodedSum(values.astype(np.float64) * plan.step, weight)


def weighted_mean(decoded: DecodedSum, plan: EncodingPlan) -> np.ndarray:
    """sum phi_i x_i / sum phi_i: the example-weighted mean of the (clipped) updates."""
    return decoded.weighted_sum * (plan.weight_cap / decoded.total_weight)
