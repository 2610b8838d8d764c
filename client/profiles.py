"""Device profiles of a simulated fleet: what kinds of device it holds, which client is which,
when each is available, and how long a round would take on them.

A profiles file (YAML or JSON) maps profile names to their settings::

    pi4:
      share: 0.5            # of the fleet (shares are normalised to sum to 1)
      memory: 2GB           # the client's memory budget (client/memory.py plans within it)
      tokens_per_second: 8  # training throughput of the device
      availability: 0.6     # chance of being reachable in a round
      uplink_mbps: 5
      downlink_mbps: 20
      quantization: nf4     # optional: the base model's quantization on it
      rank: 4               # optional: the LoRA rank it trains (default: the run's lora-rank)

Everything here is a pure function of its arguments: the profile of a client is a function of
(profiles, number of clients, seed, client), its availability of (seed, round, client,
availability), so the coordinator and every worker agree without talking.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.defaults import Quantization, parse_size

_FIELDS = (
    "share",
    "memory",
    "tokens_per_second",
    "availability",
    "uplink_mbps",
    "downlink_mbps",
    "quantization",
    "rank",
)
# Streams of the seeded generators (distinct from sampling's, which uses the round number).
_ASSIGN_STREAM = 0x5EED_0001
_AVAILABLE_TAG = b"fedtune-availability"


class ProfileError(ValueError):
    """A profiles file or value is unusable; the message names the file, profile and field."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    share: float
    tokens_per_second: float
    uplink_mbps: float
    downlink_mbps: float
    availability: float = 1.0
    memory: int = 0  # bytes; 0: no budget
    quantization: Quantization | None = None  # None: the run's
    rank: int | None = None  # LoRA rank it trains; None: the run's lora-rank

    def round_seconds(self, tokens: float, bytes_down: float, bytes_up: float) -> float:
        """Seconds this device would take for a round: download the global adapter, train
        ``tokens`` tokens, upload the update.

        >>> p = DeviceProfile("pi4", 1.0, tokens_per_second=8, uplink_mbps=5, downlink_mbps=20)
        >>> p.round_seconds(tokens=80, bytes_down=2_500_000, bytes_up=625_000)
        12.0
        """
        return (
            tokens / self.tokens_per_second
            + bytes_down * 8 / (self.downlink_mbps * 1e6)
            + bytes_up * 8 / (self.uplink_mbps * 1e6)
        )

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _FIELDS}
        out["quantization"] = self.quantization.value if self.quantization else None
        return out


def parse_profiles(raw: Any, where: str) -> tuple[DeviceProfile, ...]:
    """Profiles from the parsed file ``raw`` (a mapping name -> settings), in name order."""
    if not isinstance(raw, Mapping) or not raw:
        raise ProfileError(f"{where}: expected a mapping of profile names to their settings")
    out = []
    for name in sorted(raw):
        out.append(_profile(str(name), raw[name], f"{where}: profile {name!r}"))
    if sum(p.share for p in out) <= 0:
        raise ProfileError(f"{where}: the shares add up to 0; give at least one share > 0")
    return tuple(out)


def _profile(name: str, raw: Any, where: str) -> DeviceProfile:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: expected a mapping of settings, got {raw!r}")
    unknown = sorted(set(map(str, raw)) - set(_FIELDS))
    if unknown:
        raise ProfileError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")

    def number(key: str, default: float | None, low: float, *, open_low: bool) -> float:
        if key not in raw:
            if default is None:
                raise ProfileError(f"{where}: field {key!r} is missing")
            return default
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProfileError(f"{where}: {key} must be a number, got {value!r}")
        ok = value > low if open_low else value >= low
        if not ok or not np.isfinite(value):
            sign = ">" if open_low else ">="
            raise ProfileError(f"{where}: {key} must be {sign} {low}, got {value}")
        return float(value)

    availability = number("availability", 1.0, 0.0, open_low=True)
    if availability > 1:
        raise ProfileError(f"{where}: availability must be in (0, 1], got {availability}")
    memory = 0
    if raw.get("memory") not in (None, 0, ""):
        try:
            memory = parse_size(raw["memory"], "memory")
        except ValueError as exc:
            raise ProfileError(f"{where}: {exc}") from None
        if memory < 64 * 2**20:
            raise ProfileError(f"{where}: memory {raw['memory']} is below 64 MiB")
    rank = raw.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ProfileError(f"{where}: rank must be a positive integer, got {rank!r}")
    quantization = None
    if raw.get("quantization") not in (None, ""):
        try:
            quantization = Quantization.parse(str(raw["quantization"]), field="quantization")
        except ValueError as exc:
            raise ProfileError(f"{where}: {exc}") from None
    return DeviceProfile(
        name=name,
        share=number("share", None, 0.0, open_low=False),
        tokens_per_second=number("tokens_per_second", None, 0.0, open_low=True),
        uplink_mbps=number("uplink_mbps", None, 0.0, open_low=True),
        downlink_mbps=number("downlink_mbps", None, 0.0, open_low=True),
        availability=availability,
        memory=memory,
        quantization=quantization,
        rank=rank,
    )


def load_profiles(path: str | Path) -> tuple[DeviceProfile, ...]:
    """Read a profiles file: ``.json`` as JSON, anything else as YAML."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"device-profiles: cannot read {p}: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    else:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ProfileError(f"{p}: not valid YAML ({exc})") from None
    return parse_profiles(raw, str(p))


@functools.lru_cache(maxsize=4)
def cached_profiles(path: str) -> tuple[DeviceProfile, ...]:
    return load_profiles(path)


def assign_profiles(shares: Sequence[float], num_clients: int, seed: int) -> np.ndarray:
    """The profile index of each of ``num_clients`` clients: exactly round(share x clients)
    clients per profile (largest remainders take the rest), placed by a permutation seeded
    by ``seed`` alone.

    >>> assign_profiles([0.5, 0.5], 4, seed=0).tolist().count(0)
    2
    """
    w = np.asarray(shares, dtype=np.float64)
    if num_clients < 0 or w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"shares: need non-negative shares with a positive sum, got {shares}")
    exact = w / w.sum() * num_clients
    counts = np.floor(exact).astype(np.int64)
    rest = num_clients - int(counts.sum())
    # Largest remainders first; ties to the earlier profile (stable sort).
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    labels = np.repeat(np.arange(len(w)), counts)
    return np.random.default_rng([seed, _ASSIGN_STREAM]).permutation(labels)


def available(seed: int, rnd: int, client: int, availability: float) -> bool:
    """Is ``client`` reachable in round ``rnd``? True with probability ``availability``,
    independently per (seed, round, client), the same in every process."""
    digest = hashlib.blake2b(
        f"{seed}:{rnd}:{client}".encode(), digest_size=8, key=_AVAILABLE_TAG
    ).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    return u < availability


@dataclass(frozen=True)
class Fleet:
    """Profiles assigned to the clients of one simulated fleet."""

    profiles: tuple[DeviceProfile, ...]
    assignment: np.ndarray  # profile index per client (partition id)
    seed: int

    @classmethod
    def build(cls, profiles: tuple[DeviceProfile, ...], num_clients: int, seed: int) -> Fleet:
        return cls(profiles, assign_profiles([p.share for p in profiles], num_clients, seed), seed)

    def profile(self, client: int) -> DeviceProfile:
        return self.profiles[int(self.assignment[client])]

    def is_available(self, client: int, rnd: int) -> bool:
        return available(self.seed, rnd, client, self.profile(client).availability)

    @property
    def ranked(self) -> bool:
        """Whether any profile sets a LoRA rank (then the run is a mixed-rank run)."""
        return any(p.rank is not None for p in self.profiles)

    def counts(self) -> dict[str, int]:
        n = np.bincount(self.assignment, minlength=len(self.profiles))
        return {p.name: int(c) for p, c in zip(self.profiles, n, strict=True)}


def client_profile(path: str, num_clients: int, seed: int, client: int) -> DeviceProfile:
    """The profile of simulated ``client`` (what a worker needs: quantization, memory)."""
    return _fleet(path, num_clients, seed).profile(client)


@functools.lru_cache(maxsize=2)
def _fleet(path: str, num_clients: int, seed: int) -> Fleet:
    return Fleet.build(cached_profiles(path), num_clients, seed)
