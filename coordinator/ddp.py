"""Distributed DP on the coordinator's side (``--dp client --secagg``): the settings a run uses,
the cohort sampling the accountant assumes, and the client-level ledger of Skellam releases.

The clients add the noise (``client/secagg.py``) and the secure round records what reached the
sum (``coordinator/secagg_round.py``, ``privacy/distributed_dp.py`` for the mechanism and the
accountant). This module turns the run configuration into ``DistributedDpSettings`` (calibrating
the noise multiplier for ``target-epsilon`` with the Skellam accountant), samples each cohort
uniformly without replacement from a secret generator, and keeps the ledger that metrics.jsonl,
state.json (resume) and the ``max-epsilon`` stop read. The interface mirrors
``coordinator.dp.ClientLevelDP`` so the round loop treats both alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from coordinator.config import ConfigError, RunConfig
from coordinator.exchange import SAMPLE_STREAM, round_rng
from coordinator.pipeline import Arrays, Contribution
from privacy.accounting import AccountantKind, PrivacyLedger, PrivacyUnit
from privacy.distributed_dp import (
    NOISE_UNITS,
    RDP_ORDERS,
    DistributedDpError,
    SkellamRelease,
    calibrate_noise_multiplier,
    epsilon,
    epsilon_from_rdp,
    planned_release,
    release_for_round,
)
from privacy.mechanisms import secure_rng

MECHANISM = "skellam"


@dataclass(frozen=True)
class DistributedDp:
    """Client-level DP with the noise added by the clients (``--dp client --secagg``).

    Each client clips its update to L2 norm ``clip_norm`` and adds Skellam noise so that the sum
    of the ``cohort`` clients sampled per round carries noise std ``noise_multiplier *
    clip_norm`` (fewer contributors after dropouts: less noise, which the round's release
    records); the noisy sum is divided by the fixed ``denominator`` (clients per round)."""

    noise_multiplier: float
    clip_norm: float
    denominator: float
    cohort: int

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm", "denominator"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')}: must be > 0, got {value}")
        if self.cohort < 1:
            raise ValueError(f"clients-per-round: must be >= 1, got {self.cohort}")


@dataclass(frozen=True)
class DistributedDpSettings:
    """What distributed DP actually uses in a run (recorded in config.json)."""

    noise_multiplier: float  # z of the full cohort's sum (what calibration targets)
    clip_norm: float  # C: L2 bound of each client's update
    cohort: int  # clients sampled per round; the noise is calibrated for all of them
    min_clients: int  # the fewest contributors a round releases with
    population: int  # N at the start (calibration; each round records its own pool)
    numel: int  # d: values in one update
    precision: float  # secagg-precision (0: the step puts the cohort's noise std at NOISE_UNITS)
    delta: float
    target_epsilon: float | None = None
    max_epsilon: float | None = None  # stop before a round would exceed this
    calibrated_rounds: int | None = None

    @property
    def accountant(self) -> AccountantKind:
        return AccountantKind.RDP

    @property
    def denominator(self) -> float:
        return float(self.cohort)

    def mechanism(self) -> DistributedDp:
        return DistributedDp(self.noise_multiplier, self.clip_norm, self.denominator, self.cohort)

    def release(self, contributors: int, population: int, sampled: int = 0) -> SkellamRelease:
        """The release of a round that samples ``sampled`` clients (0: a full cohort) from
        ``population``, of which ``contributors`` reach the sum."""
        return planned_release(
            self.noise_multiplier,
            self.clip_norm,
            self.cohort,
            contributors,
            population,
            self.numel,
            self.precision,
            sampled=sampled or self.cohort,
        )

    def to_record(self) -> dict[str, Any]:
        try:
            library = f"dp-accounting {metadata.version('dp-accounting')}"
        except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency
            library = "dp-accounting"
        return {
            "unit": PrivacyUnit.CLIENT.value,
            "mechanism": MECHANISM,
            "noise_added_by": "clients (distributed DP, secure aggregation)",
            "adjacency": "zero-out one client (Kairouz et al. 2021)",
            "sampling": "uniform without replacement, secret generator; fraction contributors / "
            "population (Wang, Balle, Kasiviswanathan 2019, Theorem 9)",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "clients_per_round": self.cohort,
            "denominator": self.denominator,
            "min_clients": self.min_clients,
            "population": self.population,
            "numel": self.numel,
            "precision": self.precision,
            "noise_units": NOISE_UNITS,
            "delta": self.delta,
            "accountant": self.accountant.value,
            "rdp_orders": list(RDP_ORDERS),
            "accountant_library": f"Skellam RDP (Agarwal et al. 2021, Thm 3.5) + {library}",
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
            "calibrated_rounds": self.calibrated_rounds,
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DistributedDpSettings:
        if rec.get("mechanism") != MECHANISM:
            raise ConfigError(
                f"saved privacy settings are for mechanism {rec.get('mechanism')!r}, not "
                f"{MECHANISM!r} (--dp client --secagg); resume with the options the run began with"
            )
        return cls(
            noise_multiplier=float(rec["noise_multiplier"]),
            clip_norm=float(rec["clip_norm"]),
            cohort=int(rec["clients_per_round"]),
            min_clients=int(rec["min_clients"]),
            population=int(rec["population"]),
            numel=int(rec["numel"]),
            precision=float(rec["precision"]),
            delta=float(rec["delta"]),
            target_epsilon=rec.get("target_epsilon"),
            max_epsilon=rec.get("max_epsilon"),
            calibrated_rounds=rec.get("calibrated_rounds"),
        )


def check_population(cfg: RunConfig, population: int) -> int:
    """The population distributed DP accounts with (``population`` or the connected clients),
    checked against clients-per-round and delta."""
    population = cfg.population or population
    if population < 1:
        raise ConfigError(f"population: must be >= 1, got {population}")
    if cfg.clients_per_round > population:
        raise ConfigError(
            f"clients-per-round: {cfg.clients_per_round} exceeds the population of {population}"
        )
    if not 0 < cfg.delta < 1.0 / population:
        raise ConfigError(
            f"delta: {cfg.delta:g} must be below 1/population = 1/{population} = "
            f"{1.0 / population:.3g} (a larger delta allows releasing one client's data whole)"
        )
    return population


def resolve_distributed_dp(cfg: RunConfig, population: int, numel: int) -> DistributedDpSettings:
    """Check the distributed-DP settings and calibrate z for ``target-epsilon`` if asked.

    Raises ``ConfigError`` naming the setting."""
    population = check_population(cfg, population)
    target = cfg.target_epsilon or None
    try:
        if target is not None:
            z = calibrate_noise_multiplier(
                target,
                cfg.delta,
                cfg.rounds,
                cfg.clients_per_round,
                population,
                cfg.clip_norm,
                numel,
                cfg.secagg_precision,
                min_contributors=cfg.min_clients,
            )
        else:
            z = cfg.noise_multiplier
        limits = [e for e in (cfg.max_epsilon, cfg.target_epsilon) if e > 0]
        settings = DistributedDpSettings(
            noise_multiplier=z,
            clip_norm=cfg.clip_norm,
            cohort=cfg.clients_per_round,
            min_clients=cfg.min_clients,
            population=population,
            numel=numel,
            precision=cfg.secagg_precision,
            delta=cfg.delta,
            target_epsilon=target,
            max_epsilon=min(limits) if limits else None,
            calibrated_rounds=cfg.rounds if target is not None else None,
        )
        settings.release(settings.cohort, population)  # the encoding must fit (32-bit ring)
        settings.mechanism()
    except (DistributedDpError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc
    return settings


def uniform_sample(units: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """``k`` distinct units, uniformly (the sampling without replacement the accountant
    assumes). ``units`` are in their stable order (the roster's: by client name); the picks
    keep it."""
    picks = rng.choice(len(units), size=min(k, len(units)), replace=False)
    return [units[int(i)] for i in sorted(picks)]


class DistributedClientDP:
    """The client-level ledger of a ``--dp client --secagg`` run, and its cohort sampler.

    ``rng_factory`` gives the cohort sampler's generator (OS-seeded by default: amplification by
    sampling needs the cohort to be secret; tests pass a seeded one)."""

    def __init__(
        self,
        settings: DistributedDpSettings,
        *,
        rng_factory: Callable[[], np.random.Generator] = secure_rng,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.rng_factory = rng_factory
        self.seed = seed  # --dp-rng seeded: the cohort of round r comes from (seed, r)
        self.ledger = PrivacyLedger(PrivacyUnit.CLIENT)
        self.pool = settings.population  # the pool the next cohort is drawn from

    # -- accounting -------------------------------------------------------------------------

    def epsilon(self) -> float:
        """Against anyone who sees only the released models (amplified by the secret cohort)."""
        return self.ledger.epsilon(self.settings.delta, self.settings.accountant)

    def epsilon_unamplified(self) -> float:
        """Against the coordinator, who knows who contributed: no amplification by sampling."""
        events = [e for e in self.ledger.events if isinstance(e, SkellamRelease)]
        return epsilon(events, self.settings.delta, amplified=False)

    def epsilon_after_next_round(self) -> float:
        """The largest epsilon the next round can lead to: any number of contributors from
        min-clients (dropouts leave less noise in the sum) to the whole cohort, drawn from the
        current pool (``self.pool``, set by the round loop before it asks)."""
        s = self.settings
        sampled = min(s.cohort, self.pool)
        if sampled < 1:  # nobody to sample: the round will release nothing
            return self.epsilon()
        events = [e for e in self.ledger.events if isinstance(e, SkellamRelease)]
        spent = sum((e.rdp(RDP_ORDERS) for e in events), np.zeros(len(RDP_ORDERS)))
        worst = 0.0
        for c in range(min(s.min_clients, sampled), sampled + 1):
            nxt = s.release(c, self.pool, sampled)
            worst = max(worst, epsilon_from_rdp(spent + nxt.rdp(RDP_ORDERS), s.delta))
        return worst

    def budget_allows_next_round(self) -> bool:
        limit = self.settings.max_epsilon
        return limit is None or self.epsilon_after_next_round() <= limit

    def record(self, release: SkellamRelease) -> None:
        self.ledger.record(release)

    # -- the round --------------------------------------------------------------------------

    releases_every_round = False  # a secure round needs its min-clients to unmask

    def sample(self, nodes: Sequence[int], rnd: int = 0) -> list[int]:
        """This round's cohort: clients-per-round nodes uniformly, from a secret generator (or,
        with a ``seed``, one seeded by (seed, round))."""
        rng = self.rng_factory() if self.seed is None else round_rng(self.seed, rnd, SAMPLE_STREAM)
        return uniform_sample(nodes, self.settings.cohort, rng)

    def stop_reason(self, pool: int, rnd: int) -> str | None:
        self.pool = pool  # the next cohort is drawn from these
        if self.budget_allows_next_round():
            return None
        return (
            f"round {rnd} would take epsilon from {self.epsilon():.4g} to "
            f"{self.epsilon_after_next_round():.4g}, past the limit {self.settings.max_epsilon:g}"
        )

    def prepare(self, update: Arrays, weight: float) -> tuple[dict[str, np.ndarray], float]:
        raise ValueError("distributed DP: updates are clipped and noised by the clients")

    def release(self, c: Contribution) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The noisy sum of the clients' clipped updates over the fixed denominator; the release
        that reached the sum (its contributors' noise) goes to the ledger."""
        if not isinstance(c.release, Mapping):
            raise ValueError("distributed DP: the secure sum carries no noise parameters")
        release = release_for_round(
            float(c.release["mu"]),
            len(c.contributors),
            max(self.pool, c.sampled),
            self.settings.clip_norm,
            float(c.release["step"]),
            int(c.release["numel"]),
        )
        self.record(release)
        mean = {k: v / self.settings.denominator for k, v in c.weighted_sum.items()}
        return mean, {
            "ddp_noise_multiplier": release.effective_noise_multiplier,
            "ddp_release": release.to_dict(),
        }

    def row(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.settings.delta,
            # against the coordinator, who knows who contributed: no amplification
            "epsilon_unamplified": self.epsilon_unamplified(),
        }

    # -- persistence (saved with every round in state.json) ----------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_record(), "ledger": self.ledger.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ledger = PrivacyLedger.from_dict(state["ledger"])
        if ledger.unit is not PrivacyUnit.CLIENT:
            raise ConfigError(f"saved privacy ledger is {ledger.unit.value}-level, not client")
        if not all(isinstance(e, SkellamRelease) for e in ledger.events):
            raise ConfigError("saved privacy ledger holds releases that are not distributed DP")
        self.ledger = ledger
