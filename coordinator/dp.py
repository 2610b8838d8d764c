"""Client-level differential privacy on the coordinator (DP-FedAvg, McMahan et al. 2018).

``ClientLevelDP`` wraps the round's aggregation step: it clips each client's update (all the
adapter tensors it sent, as one vector) to L2 norm C, adds N(0, (z_sum C)^2) to the sum, divides
by the fixed expected cohort size D = q * population and hands that single noisy mean update to
the inner aggregator (FedAvg applies it as it is). It also Poisson-samples each round's cohort
with rate q from a secret generator (amplification by sampling needs the cohort to be secret) and
records every release in a client-level ``PrivacyLedger``.

``resolve_client_dp`` turns the run configuration and the population into the settings actually
used (calibrating z for ``target-epsilon`` when asked); they go to ``config.json`` so epsilon can
be recomputed from the run directory alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from coordinator.aggregation import Aggregator, Arrays, Update, fedavg_aggregator
from coordinator.aggregators import Accumulator
from coordinator.config import ConfigError, RunConfig
from coordinator.exchange import NOISE_STREAM, SAMPLE_STREAM, round_rng
from coordinator.pipeline import Contribution
from privacy.accounting import (
    AccountantKind,
    GaussianRelease,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyUnit,
    calibrate_noise_multiplier,
)
from privacy.mechanisms import (
    AdaptiveClipping,
    flatten,
    l2_clip,
    next_clip_norm,
    noisy_sum,
    noisy_unclipped_fraction,
    poisson_sample,
    secure_rng,
    sum_noise_multiplier,
    unflatten,
)
from protocol.adapter import AdapterSpec

log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class ClientDPSettings:
    """What client-level DP actually uses in a run (recorded in config.json)."""

    noise_multiplier: float  # z of the whole release (what the accountant sees)
    clip_norm: float  # the initial clip norm C (adaptive clipping moves it)
    sampling_rate: float  # q: each client takes part in a round with this probability
    denominator: float  # D = q * population: the fixed divisor of the noisy sum
    population: int
    delta: float
    accountant: AccountantKind
    target_epsilon: float | None = None
    max_epsilon: float | None = None  # stop before a round would exceed this
    calibrated_rounds: int | None = None  # rounds z was calibrated for (target-epsilon)
    adaptive: AdaptiveClipping | None = None

    @property
    def sum_noise_multiplier(self) -> float:
        """Multiplier of the noise on the clipped sum (= z unless adaptive clipping shares the
        budget with its noisy count)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return sum_noise_multiplier(self.noise_multiplier, self.adaptive.count_stddev)

    def release(self) -> GaussianRelease:
        return GaussianRelease(self.noise_multiplier, self.sampling_rate)

    def to_record(self) -> dict[str, Any]:
        try:
            library = f"dp-accounting {metadata.version('dp-accounting')}"
        except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency
            library = "dp-accounting"
        return {
            "unit": PrivacyUnit.CLIENT.value,
            "mechanism": "poisson-gaussian",
            "adjacency": "add-or-remove one client",
            "noise_multiplier": self.noise_multiplier,
            "sum_noise_multiplier": self.sum_noise_multiplier,
            "clip_norm": self.clip_norm,
            "sampling_rate": self.sampling_rate,
            "denominator": self.denominator,
            "population": self.population,
            "delta": self.delta,
            "accountant": self.accountant.value,
            "accountant_library": library,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
            "calibrated_rounds": self.calibrated_rounds,
            "adaptive_clip": None
            if self.adaptive is None
            else {
                "target_quantile": self.adaptive.target_quantile,
                "learning_rate": self.adaptive.learning_rate,
                "count_stddev": self.adaptive.count_stddev,
            },
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> ClientDPSettings:
        ad = rec.get("adaptive_clip")
        return cls(
            noise_multiplier=float(rec["noise_multiplier"]),
            clip_norm=float(rec["clip_norm"]),
            sampling_rate=float(rec["sampling_rate"]),
            denominator=float(rec["denominator"]),
            population=int(rec["population"]),
            delta=float(rec["delta"]),
            accountant=AccountantKind(str(rec["accountant"])),
            target_epsilon=rec.get("target_epsilon"),
            max_epsilon=rec.get("max_epsilon"),
            calibrated_rounds=rec.get("calibrated_rounds"),
            adaptive=None
            if ad is None
            else AdaptiveClipping(
                float(ad["target_quantile"]), float(ad["learning_rate"]), float(ad["count_stddev"])
            ),
        )


def resolve_client_dp(cfg: RunConfig, population: int) -> ClientDPSettings:
    """Check the client-level DP settings against the population and calibrate z if asked.

    Raises ``ConfigError`` naming the setting (z <= 0, C <= 0, delta >= 1/population, a target
    epsilon that cannot be reached in ``rounds`` rounds, ...)."""
    try:
        return _resolve(cfg, population)
    except PrivacyConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _resolve(cfg: RunConfig, population: int) -> ClientDPSettings:
    population = cfg.population or population
    if population < 1:
        raise ConfigError(f"population: must be >= 1, got {population}")
    if cfg.clients_per_round > population:
        raise ConfigError(
            f"clients-per-round: {cfg.clients_per_round} exceeds the population of {population}"
        )
    if cfg.clip_norm <= 0:
        raise ConfigError(f"clip-norm: must be > 0, got {cfg.clip_norm}")
    if not 0 < cfg.delta < 1.0 / population:
        raise ConfigError(
            f"delta: {cfg.delta:g} must be below 1/population = 1/{population} = "
            f"{1.0 / population:.3g} (a larger delta allows releasing one client's data whole)"
        )
    q = cfg.clients_per_round / population
    kind = AccountantKind.parse(cfg.accountant)
    adaptive = None
    if cfg.adaptive_clip:
        adaptive = AdaptiveClipping(cfg.clip_quantile, cfg.clip_learning_rate, cfg.count_stddev)
    target = cfg.target_epsilon or None
    if target is not None:
        # With adaptive clipping z must stay below 2 x count stddev (the count's own share).
        ceiling = 2.0 * adaptive.count_stddev * (1 - 1e-9) if adaptive else None
        try:
            z = calibrate_noise_multiplier(
                target,
                cfg.delta,
                q,
                cfg.rounds,
                kind,
                **({"max_noise_multiplier": ceiling} if ceiling else {}),
            )
        except PrivacyConfigError as exc:
            hint = (
                f" (adaptive clipping caps the noise multiplier at 2 x clip-count-stddev = "
                f"{ceiling:.3g}; raise clip-count-stddev)"
                if ceiling
                else ""
            )
            raise ConfigError(f"{exc}{hint}") from exc
    else:
        z = cfg.noise_multiplier
        if not z > 0:
            raise ConfigError(f"noise-multiplier: must be > 0, got {z}")
    limits = [e for e in (cfg.max_epsilon, cfg.target_epsilon) if e > 0]
    settings = ClientDPSettings(
        noise_multiplier=z,
        clip_norm=cfg.clip_norm,
        sampling_rate=q,
        denominator=float(cfg.clients_per_round),
        population=population,
        delta=cfg.delta,
        accountant=kind,
        target_epsilon=target,
        max_epsilon=min(limits) if limits else None,
        calibrated_rounds=cfg.rounds if target is not None else None,
        adaptive=adaptive,
    )
    settings.sum_noise_multiplier  # noqa: B018  (raises if adaptive clipping cannot afford z)
    return settings


class ClientLevelDP:
    """An ``Aggregator`` wrapper that makes each round a client-level DP release.

    ``update_keys`` are the tensors clients send (all adapter tensors, or only B with FFA-LoRA);
    clipping treats them as one vector. ``rng_factory`` gives the noise generator of each release
    (OS-seeded by default; tests pass a seeded one)."""

    def __init__(
        self,
        settings: ClientDPSettings,
        update_keys: Sequence[str],
        inner: Aggregator = fedavg_aggregator,
        *,
        rng_factory: Callable[[], np.random.Generator] = secure_rng,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.update_keys = tuple(update_keys)
        self.inner = inner
        self.rng_factory = rng_factory
        # --dp-rng seeded: round r's cohort and noise come from (seed, r), so a run reproduces
        # (and a resumed one continues as if never stopped); None: secret, from rng_factory.
        self.seed = seed
        self._round = 0
        self.ledger = PrivacyLedger(PrivacyUnit.CLIENT)
        self.clip_norm = settings.clip_norm
        self._norms: list[float] = []  # this round's update norms before clipping

    # -- accounting -------------------------------------------------------------------------

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.settings.delta, self.settings.accountant)

    def epsilon_after_next_round(self) -> float:
        nxt = self.ledger.with_event(self.settings.release())
        return nxt.epsilon(self.settings.delta, self.settings.accountant)

    def budget_allows_next_round(self) -> bool:
        limit = self.settings.max_epsilon
        return limit is None or self.epsilon_after_next_round() <= limit

    # -- the round --------------------------------------------------------------------------

    releases_every_round = True  # skipping a round would reveal how many clients took part

    def sample(self, nodes: Sequence[int], rnd: int = 0) -> list[int]:
        """This round's cohort: every node with probability q, from a secret generator (or,
        with a ``seed``, one seeded by (seed, round)). ``nodes`` are in their stable order (the
        roster's: by client name)."""
        # ``nodes`` are the clients reachable this round; with --device-profiles the unavailable
        # ones are left out before this (coordinator/rounds.py). The ledger still records q for
        # every release, and that stays an upper bound: a client's inclusion probability is q
        # if it is available and 0 if not (availability is a public function of seed, round and
        # client, not of anyone's data), and the Poisson-subsampled Gaussian with rate p <= q
        # is a mixture (1 - p/q) Q + (p/q) P_q of the rate-q mechanism P_q and the mechanism
        # without the client Q, so by joint convexity of the hockey-stick and Renyi (as
        # exp((a-1) D_a)) divergences it is no less private. The denominator stays D = q * N.
        self._round = rnd
        picks = poisson_sample(
            range(len(nodes)), self.settings.sampling_rate, self._rng(SAMPLE_STREAM)
        )
        return [nodes[i] for i in picks]

    def _rng(self, stream: int) -> np.random.Generator:
        if self.seed is None:
            return self.rng_factory()
        return round_rng(self.seed, self._round, stream)

    def stop_reason(self, pool: int, rnd: int) -> str | None:
        if self.budget_allows_next_round():
            return None
        return (
            f"round {rnd} would take epsilon from {self.epsilon():.4g} to "
            f"{self.epsilon_after_next_round():.4g}, past the limit {self.settings.max_epsilon:g}"
        )

    def row(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon(), "delta": self.settings.delta}

    def prepare(self, update: Arrays, weight: float) -> tuple[dict[str, np.ndarray], float]:
        """Clip one client's update (all its tensors as one vector) to the clip norm; every
        client counts once (weight 1). Norms are kept for adaptive clipping's count only."""
        if set(update) != set(self.update_keys):
            raise ValueError("an update does not hold exactly the expected tensors")
        like = {k: np.asarray(update[k], np.float64) for k in self.update_keys}
        clipped, norm = l2_clip(flatten(like), self.clip_norm)
        self._norms.append(norm)
        return unflatten(clipped, like), 1.0

    def release(self, c: Contribution) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(sum of clipped updates + N(0, (z_sum C)^2)) / D, recorded in the ledger."""
        s = self.settings
        like = {k: c.weighted_sum[k] for k in self.update_keys}
        rng = self._rng(NOISE_STREAM)
        clip = self.clip_norm
        std = s.sum_noise_multiplier * clip
        noisy = noisy_sum([flatten(like)], sum(int(v.size) for v in like.values()), std, rng)
        metrics: dict[str, Any] = {
            "dp_clip_norm": clip,
            "dp_noise_std": std / s.denominator,  # std per coordinate of the mean
        }
        if s.adaptive is not None:
            fraction = noisy_unclipped_fraction(
                self._norms, clip, s.adaptive.count_stddev, s.denominator, rng
            )
            self.clip_norm = next_clip_norm(clip, fraction, s.adaptive)
            metrics["dp_unclipped_fraction_noisy"] = fraction
            metrics["dp_next_clip_norm"] = self.clip_norm
        self._norms = []
        self.ledger.record(s.release())
        return unflatten(noisy / s.denominator, like), metrics

    def __call__(
        self, global_adapter: Arrays, updates: Sequence[Update]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """One release as an ``Aggregator``: prepare each update, sum, release, apply with the
        inner aggregator."""
        like = {k: global_adapter[k] for k in self.update_keys}
        acc = Accumulator(AdapterSpec.of(like))
        for delta, weight in updates:  # weights are ignored: each client counts once
            acc.add(*self.prepare(delta, weight))
        mean, metrics = self.release(Contribution(acc.sum, acc.weight))
        mean_delta = {k: v.astype(like[k].dtype) for k, v in mean.items()}
        new, inner_metrics = self.inner(global_adapter, [(mean_delta, 1.0)])
        return new, {**inner_metrics, **metrics}

    # -- persistence (saved with every round in state.json) ----------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_record(),
            "ledger": self.ledger.to_dict(),
            "clip_norm": self.clip_norm,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ledger = PrivacyLedger.from_dict(state["ledger"])
        if ledger.unit is not PrivacyUnit.CLIENT:
            raise ConfigError(f"saved privacy ledger is {ledger.unit.value}-level, not client")
        self.ledger = ledger
        clip = float(state.get("clip_norm", self.settings.clip_norm))
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"saved clip norm {clip!r} is not a positive number")
        self.clip_norm = clip
