"""Privacy accounting: a ledger of noisy releases, and (epsilon, delta) computed from it.

Three layers, as in Opacus and dp-accounting:

* mechanisms (``privacy.mechanisms``) clip and add noise;
* the ledger (``PrivacyLedger``) records every noisy release as an event: the noise multiplier
  (noise std / L2 sensitivity), the Poisson sampling rate and how many times it happened;
* accounting (``epsilon``, ``calibrate_noise_multiplier``) is pure math over the ledger, done by
  Google's ``dp-accounting`` (RDP or PLD). Nothing here is a hand formula.

The unit of privacy is explicit: a ledger is either client-level (neighbouring datasets differ in
all the data of one client; q = clients per round / population) or sample-level (they differ in
one training example of one client; q = batch size / local examples). Both use add-or-remove-one
adjacency, which is what Poisson sampling with a fixed denominator gives.

Distributed DP (noise added by the clients before secure summation, ``--dp client --secagg``)
records one ``privacy.distributed_dp.SkellamRelease`` per round with the noise of the clients that
actually contributed; its adjacency is zero-out and its sampling uniform without replacement
(``privacy.distributed_dp`` explains why), and such a ledger is accounted in RDP only (the
multi-dimensional Skellam mechanism has an RDP bound, no PLD).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
from dp_accounting import mechanism_calibration, pld, rdp

from privacy.distributed_dp import RDP_ORDERS, DistributedDpError, SkellamRelease, epsilon_from_rdp


class PrivacyConfigError(ValueError):
    """A privacy setting is invalid or cannot be met; the message names the setting."""


class PrivacyUnit(StrEnum):
    """Whose privacy a guarantee protects."""

    CLIENT = "client"  # all the data of one client (user-level DP); q = clients/round / population
    SAMPLE = "sample"  # one training example of one client (DP-SGD); q = batch / local examples


class AccountantKind(StrEnum):
    """Which dp-accounting accountant turns the ledger into (epsilon, delta)."""

    RDP = "rdp"  # Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019): fast, slightly loose
    PLD = "pld"  # privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022): tight

    @classmethod
    def parse(cls, value: str, *, field_name: str = "accountant") -> AccountantKind:
        try:
            return cls(value)
        except ValueError:
            raise PrivacyConfigError(
                f"{field_name}: {value!r} is not one of {', '.join(k.value for k in cls)}"
            ) from None


# PLD discretisation of the privacy loss (dp-accounting's default): epsilon is accurate to ~1e-4
# and always an upper bound ("pessimistic" rounding).
PLD_DISCRETIZATION = 1e-4
# Noise multipliers past this give no useful model; a target that needs more is "unreachable".
MAX_NOISE_MULTIPLIER = 1000.0


@dataclass(frozen=True)
class GaussianRelease:
    """``count`` releases of a sum with L2 sensitivity 1 (after clipping, in units of the clip
    norm) plus N(0, noise_multiplier^2), each computed over a Poisson sample in which every unit
    (client or example) takes part with probability ``sampling_rate``."""

    noise_multiplier: float
    sampling_rate: float
    count: int = 1
    mechanism: str = "poisson-gaussian"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacyConfigError(
                f"noise-multiplier: must be > 0 for a private release, got {self.noise_multiplier}"
            )
        if not 0.0 < self.sampling_rate <= 1.0:
            raise PrivacyConfigError(f"sampling rate: must be in (0, 1], got {self.sampling_rate}")
        if self.count < 1:
            raise PrivacyConfigError(f"event count: must be >= 1, got {self.count}")
        if self.mechanism != "poisson-gaussian":
            raise PrivacyConfigError(f"mechanism: unknown {self.mechanism!r}")

    def same_release(self, other: object) -> bool:
        return (
            isinstance(other, GaussianRelease)
            and self.noise_multiplier == other.noise_multiplier
            and self.sampling_rate == other.sampling_rate
            and self.mechanism == other.mechanism
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussianRelease:
        return cls(
            noise_multiplier=float(data["noise_multiplier"]),
            sampling_rate=float(data["sampling_rate"]),
            count=int(data["count"]),
            mechanism=str(data.get("mechanism", "poisson-gaussian")),
        )


Release = GaussianRelease | SkellamRelease


def release_from_dict(data: Mapping[str, Any]) -> Release:
    if str(data.get("mechanism", "poisson-gaussian")) == "poisson-gaussian":
        return GaussianRelease.from_dict(data)
    try:
        return SkellamRelease.from_dict(data)
    except DistributedDpError as exc:
        raise PrivacyConfigError(str(exc)) from exc


@dataclass
class PrivacyLedger:
    """Every noisy release so far, in order, for one unit of privacy.

    Consecutive identical releases are merged into one event with a larger ``count`` (the
    accountant treats them the same way and the file stays small)."""

    unit: PrivacyUnit
    events: list[Release] = field(default_factory=list)

    def record(self, event: Release) -> None:
        if self.events and self.events[-1].same_release(event):
            last = self.events[-1]
            self.events[-1] = dataclasses.replace(last, count=last.count + event.count)
        else:
            self.events.append(event)

    def with_event(self, event: Release) -> PrivacyLedger:
        """A copy with ``event`` recorded (to ask "what if we release once more?")."""
        out = PrivacyLedger(self.unit, list(self.events))
        out.record(event)
        return out

    @property
    def releases(self) -> int:
        return sum(e.count for e in self.events)

    def epsilon(self, delta: float, accountant: AccountantKind) -> float:
        return epsilon(self.events, delta, accountant)

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit.value, "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        return cls(
            PrivacyUnit(str(data["unit"])),
            [release_from_dict(e) for e in data.get("events", [])],
        )

    def save(self, path: Path) -> None:
        """Write atomically (a crash leaves the previous file intact)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, unit: PrivacyUnit) -> PrivacyLedger:
        """The ledger in ``path``, or an empty one if the file does not exist."""
        if not path.exists():
            return cls(unit)
        try:
            ledger = cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyConfigError(f"privacy ledger {path} cannot be read: {exc}") from exc
        if ledger.unit is not unit:
            raise PrivacyConfigError(
                f"privacy ledger {path} is {ledger.unit.value}-level, expected {unit.value}-level"
            )
        return ledger


# ------------------------------------------------------------------------------- accounting


def to_dp_event(events: Sequence[GaussianRelease]) -> dpa.DpEvent:
    """The ledger as a dp-accounting event: a composition of self-composed, Poisson-sampled
    Gaussian mechanisms."""
    parts: list[dpa.DpEvent] = []
    for e in events:
        single: dpa.DpEvent = dpa.GaussianDpEvent(e.noise_multiplier)
        if e.sampling_rate < 1.0:
            single = dpa.PoissonSampledDpEvent(e.sampling_rate, single)
        parts.append(dpa.SelfComposedDpEvent(single, e.count) if e.count > 1 else single)
    return dpa.ComposedDpEvent(parts)


def make_accountant(kind: AccountantKind) -> dpa.PrivacyAccountant:
    if kind is AccountantKind.RDP:
        return rdp.RdpAccountant()
    return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"delta: must be in (0, 1), got {delta}")


def epsilon(events: Iterable[Release], delta: float, kind: AccountantKind) -> float:
    """Smallest epsilon such that the releases in ``events`` are (epsilon, delta)-DP.

    Distributed (Skellam) releases are accounted in RDP at integer orders, composed with any
    Gaussian releases of the same ledger."""
    _check_delta(delta)
    events = list(events)
    if not events:
        return 0.0
    gaussian = [e for e in events if isinstance(e, GaussianRelease)]
    skellam = [e for e in events if isinstance(e, SkellamRelease)]
    if not skellam:
        acc = make_accountant(kind)
        acc.compose(to_dp_event(gaussian))
        return float(acc.get_epsilon(delta))
    if kind is not AccountantKind.RDP:
        raise PrivacyConfigError(
            "accountant: the distributed Skellam mechanism (--dp client --secagg) is accounted "
            f"in RDP only (there is no PLD for it), got {kind.value!r}"
        )
    total = np.zeros(len(RDP_ORDERS))
    if gaussian:
        acc = rdp.RdpAccountant(orders=[float(o) for o in RDP_ORDERS])
        acc.compose(to_dp_event(gaussian))
        total += np.asarray(acc.rdp)
    for e in skellam:
        total += e.rdp(RDP_ORDERS)
    return epsilon_from_rdp(total, delta, RDP_ORDERS)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    releases: int,
    kind: AccountantKind,
    *,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within ``tol``) for which ``releases`` Poisson-sampled
    Gaussian releases at ``sampling_rate`` are (target_epsilon, delta)-DP.

    The result never overshoots: ``epsilon(...)`` at the returned value is <= target_epsilon.
    Raises ``PrivacyConfigError`` if even ``max_noise_multiplier`` cannot reach the target.
    """
    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(f"target-epsilon: must be > 0, got {target_epsilon}")
    if releases < 1:
        raise PrivacyConfigError(f"rounds: must be >= 1 to calibrate noise, got {releases}")
    if not 0.0 < sampling_rate <= 1.0:
        raise PrivacyConfigError(f"sampling rate: must be in (0, 1], got {sampling_rate}")

    def eps_at(z: float) -> float:
        return epsilon([GaussianRelease(z, sampling_rate, releases)], delta, kind)

    if eps_at(max_noise_multiplier) > target_epsilon:
        raise PrivacyConfigError(
            f"target-epsilon: {target_epsilon} is unreachable in {releases} release(s) at "
            f"sampling rate {sampling_rate:.4g} and delta {delta:g} with a noise multiplier up "
            f"to {max_noise_multiplier:g}; raise the target, or lower rounds or the sampling rate"
        )
    # Bracket the answer: lo overshoots, hi does not.
    hi = min(1.0, max_noise_multiplier)
    while eps_at(hi) > target_epsilon:
        hi = min(hi * 2.0, max_noise_multiplier)
    lo = hi / 2.0
    while eps_at(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
        if lo < tol:
            return hi  # almost no noise is needed for so large a target
    z = float(
        mechanism_calibration.calibrate_dp_mechanism(
            lambda: make_accountant(kind),
            lambda x: to_dp_event([GaussianRelease(float(x), sampling_rate, releases)]),
            target_epsilon,
            delta,
            bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
            tol=tol,
        )
    )
    # calibrate_dp_mechanism promises a non-positive gap; keep the promise visible here too.
    while eps_at(z) > target_epsilon:
        z += tol
    return z
