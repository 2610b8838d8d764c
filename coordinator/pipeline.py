"""The stages of one training round, and the records that pass between them.

    selection   privacy.sample(live, rnd)          which nodes train (seeded, or secret under DP)
    transport   transport.collect(...)             plain or secure: the SUM of the client updates
                                                   and the total weight, folded as replies arrive
    privacy     privacy.release(contribution)      the mean delta (noised under client-level DP)
    optimizer   strategy.apply(adapter, mean)      the next global adapter (FedAvg, FedAdam, ...)
    result      RoundResult.to_row()               the metrics.jsonl row, the same fields for every
                                                   transport

``coordinator.rounds.run_federation`` calls these in order and never asks which transport, privacy
mode or strategy is in use. Transports: ``PlainTransport`` (here) and ``SecureTransport``
(``coordinator.secagg_round``). Privacy: ``NoPrivacy`` (here), ``ClientLevelDP``
(``coordinator.dp``), ``DistributedClientDP`` (``coordinator.ddp``). Strategies:
``coordinator.strategies``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregators import Accumulator, Bounds, UpdateOutOfBounds
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.exchange import ByteCounts, Exchange, exchange, reply_reason, sample_nodes
from coordinator.ordered_fold import OrderedFold
from coordinator.progress import Progress
from protocol.adapter import AdapterSpec
from protocol.codecs.secure import SecureLayout
from protocol.errors import ProtocolError
from protocol.messages import ClientUpdate, decode_update

Arrays = Mapping[str, np.ndarray]
# A privacy stage's per-update step before summing (clipping; weight 1 under client-level DP).
Prepare = Callable[[Arrays, float], tuple[dict[str, np.ndarray], float]]


class RoundFailed(RuntimeError):
    """A round cannot produce a new global adapter; the reason goes into its row."""


@dataclass
class Contribution(ByteCounts):
    """What a transport delivers: sum_k w_k * u_k over the contributing clients k (float64,
    every tensor of the expected update spec, zeros if nobody contributed) and sum_k w_k."""

    weighted_sum: dict[str, np.ndarray]
    total_weight: float
    contributors: list[int] = field(default_factory=list)
    sampled: int = 0
    nodes: list[int] = field(default_factory=list)  # who was asked to train
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    node_bytes: dict[int, tuple[int, int]] = field(default_factory=dict)  # node: (down, up)
    replied: list[int] = field(default_factory=list)  # whose reply had content (bytes_up)
    phase_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # transport-specific metrics
    release: Any = None  # distributed DP: what reached the sum (a SkellamRelease)
    error: str | None = None  # the transport could not produce a sum (the reason)

    def count(self, ex: Exchange) -> None:
        """Add the bytes of one exchange to each node's (a secure round has four)."""
        for node, (down, up) in ex.node_bytes.items():
            before = self.node_bytes.get(node, (0, 0))
            self.node_bytes[node] = (before[0] + down, before[1] + up)


class Wire(Protocol):
    """How one round's updates travel (``coordinator.update_wire.RoundWire``): per-node content
    (a client's rank slice, a compressed adapter), the codec, and the rank padding."""

    def content(self, node: int) -> RecordDict: ...

    def decode(self, node: int, content: RecordDict) -> ClientUpdate:
        """The reply's update, decoded with the round's codec and padded to the global rank."""
        ...

    def attach(self, node: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The prepared delta plus what rides along with it (the rank holder vector)."""
        ...

    def accumulator(self, expected: AdapterSpec) -> Accumulator | None:
        """A round-specific accumulator (FlexLoRA), or None for the transport's own."""
        ...

    def secure_layout(self) -> SecureLayout:
        """What a masked vector holds under secure aggregation (sketch cells, holders)."""
        ...


class Transport(Protocol):
    """Sends the round's train content to ``nodes`` and returns the sum of their updates.
    ``wire``, when given, supplies each node's content and decodes its reply instead."""

    @property
    def excluded(self) -> Mapping[int, str]:
        """Nodes not to sample again (they misbehaved in secure aggregation)."""
        ...

    def collect(
        self,
        grid: Grid,
        nodes: Sequence[int],
        content: RecordDict,
        expected: AdapterSpec,
        rnd: int,
        progress: Progress,
        prepare: Prepare,
        wire: Wire | None = None,
    ) -> Contribution: ...


class Privacy(Protocol):
    """Selection and release of a round: who is sampled, what each update may contribute, how
    the sum becomes the mean delta, and what the run may still spend."""

    releases_every_round: bool  # a DP round is released even with few contributors

    def sample(self, live: Sequence[int], rnd: int) -> list[int]: ...

    def prepare(self, update: Arrays, weight: float) -> tuple[dict[str, np.ndarray], float]: ...

    def release(self, c: Contribution) -> tuple[dict[str, np.ndarray], dict[str, Any]]: ...

    def stop_reason(self, pool: int, rnd: int) -> str | None:
        """Why round ``rnd`` must not run (a budget it would pass), drawing from ``pool``."""
        ...

    def row(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...


@dataclass
class NoPrivacy:
    """Seeded uniform sampling and the weighted mean."""

    clients_per_round: int
    seed: int
    releases_every_round: bool = False

    def sample(self, live: Sequence[int], rnd: int) -> list[int]:
        return sample_nodes(live, self.clients_per_round, self.seed, rnd)

    def prepare(self, update: Arrays, weight: float) -> tuple[dict[str, np.ndarray], float]:
        return dict(update), weight

    def release(self, c: Contribution) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if not c.total_weight > 0:
            raise RoundFailed("no update to average")
        return {k: v / c.total_weight for k, v in c.weighted_sum.items()}, {}

    def stop_reason(self, pool: int, rnd: int) -> str | None:
        return None

    def row(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}


class PlainTransport:
    """Updates in the clear: each reply is decoded, validated, held to the round's bounds
    (``coordinator.aggregators.Bounds``), prepared by the privacy stage and folded into the
    accumulator as it arrives, then dropped."""

    excluded: Mapping[int, str] = {}

    def __init__(
        self,
        timeout: float,
        clock: Clock = SYSTEM_CLOCK,
        *,
        bounds: Bounds | None = None,
        accumulator: Callable[[AdapterSpec], Accumulator] = Accumulator,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.bounds = bounds
        self.accumulator = accumulator

    def collect(
        self,
        grid: Grid,
        nodes: Sequence[int],
        content: RecordDict,
        expected: AdapterSpec,
        rnd: int,
        progress: Progress,
        prepare: Prepare,
        wire: Wire | None = None,
    ) -> Contribution:
        acc = (wire.accumulator(expected) if wire else None) or self.accumulator(expected)
        c = Contribution(acc.sum, 0.0, sampled=len(nodes), nodes=sorted(nodes))
        capped: list[int] = []
        # Summed in sampled order whatever the arrival order (coordinator/ordered_fold.py).
        ordered = OrderedFold(nodes, lambda item: acc.add(*item))

        def fold(node: int, reply: Any) -> None:
            ok = False
            if not reply.has_content():
                c.failures.append({"node": node, "reason": reply_reason(reply)})
                ordered.skip(node)
            else:
                c.replied.append(node)
                try:
                    update: ClientUpdate = (
                        wire.decode(node, reply.content)
                        if wire
                        else decode_update(reply.content, expected, rnd=rnd)
                    )
                    delta, weight = update.delta, float(update.num_examples)
                    if self.bounds is not None:
                        delta, weight = self.bounds.apply(delta, weight)
                        if weight < update.num_examples:
                            capped.append(node)
                    prepared = prepare(delta, weight)
                    if not (math.isfinite(prepared[1]) and prepared[1] > 0):
                        raise ValueError(f"weight must be positive and finite, got {prepared[1]}")
                    if wire:  # --client-ranks: which rank components this update holds
                        prepared = (wire.attach(node, prepared[0]), prepared[1])
                except (ProtocolError, UpdateOutOfBounds, ValueError) as exc:
                    c.failures.append({"node": node, "reason": str(exc)})
                    ordered.skip(node)
                else:
                    ordered.offer(node, prepared)
                    ok = True
                    c.contributors.append(node)
                    c.client_metrics[node] = {
                        **update.metrics,
                        "num-examples": float(update.num_examples),
                    }
            progress.client_done(node, ok)

        progress.phase(rnd, MessageType.TRAIN, len(nodes))
        ex = exchange(
            grid,
            {n: wire.content(n) if wire else content for n in nodes},
            MessageType.TRAIN,
            rnd,
            self.timeout,
            on_reply=fold,
            clock=self.clock,
            keep=False,
        )
        ordered.finish()
        if not ordered.in_order:
            c.extra["fold_out_of_order"] = True  # the window overflowed: not reproducible
        c.failures = [
            {"node": n, "reason": f"no reply within {self.timeout:g}s"} for n in ex.missing
        ] + sorted(c.failures, key=lambda f: f["node"])
        c.contributors.sort()
        try:
            c.weighted_sum, c.total_weight = acc.result()
        except ValueError as exc:  # a robust rule that cannot run on what arrived
            c.error = f"aggregation failed: {exc}"
        if capped:
            c.extra["weights_capped"] = sorted(capped)
        c.count(ex)
        c.phase_seconds = ex.seconds
        return c


# ------------------------------------------------------------------------------ round result


def _sum(metrics: Sequence[Mapping[str, float]], key: str) -> float:
    return float(sum(m.get(key, 0.0) for m in metrics))


def _max(metrics: Sequence[Mapping[str, float]], key: str) -> float | None:
    values = [m[key] for m in metrics if key in m]
    return max(values) if values else None


_MEMORY_METRICS = {
    "peak-rss-mb": "peak_rss_mb",
    "max-memory-mb": "max_memory_mb",
    "weight-bits": "weight_bits",
    "compute-bits": "compute_bits",
    "plan-micro-batch": "micro_batch",
    "plan-accumulation": "accumulation",
    "plan-checkpointing": "checkpointing",
    "plan-estimated-mb": "estimated_mb",
    "plan-head-chunk-mb": "head_chunk_mb",
}


def client_memory(metrics: Mapping[int, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Each client's memory plan and peak RSS for metrics.jsonl, by node."""
    rows = []
    for node, m in sorted(metrics.items()):
        row: dict[str, Any] = {"node": node}
        for key, name in _MEMORY_METRICS.items():
            if key in m:
                row[name] = bool(m[key]) if name == "checkpointing" else m[key]
        rows.append(row)
    return rows


@dataclass
class RoundResult:
    """One round's training outcome: the same fields whatever the transport, privacy mode or
    strategy (``extra`` holds what only some have: secure-aggregation stages, DP noise, ...)."""

    status: str  # "ok" | "failed"
    reason: str | None = None
    clients: list[int] = field(default_factory=list)  # who was asked to train (participation)
    clients_sampled: int = 0
    clients_ok: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    num_examples: int = 0
    # The mean of the contributing clients' local training losses, each client counting once
    # (secure aggregation hides the example counts that would weight it).
    train_loss: float | None = None
    update_norm: float | None = None
    train_phase_seconds: float = 0.0
    client_seconds: float = 0.0
    client_seconds_max: float | None = None
    client_load_seconds: float = 0.0
    client_train_seconds: float = 0.0
    client_peak_rss_mb_max: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    client_memory: list[dict[str, Any]] = field(default_factory=list)  # plan + peak RSS
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_contribution(cls, c: Contribution, status: str, reason: str | None) -> RoundResult:
        ms = [c.client_metrics[n] for n in c.contributors if n in c.client_metrics]
        losses = [m["train-loss"] for m in ms if "train-loss" in m]
        extra = dict(c.extra)
        eps = _max(ms, "client-epsilon")
        if eps is not None:  # sample-level DP: each client's own cumulative epsilon
            extra["client_epsilon_max"] = eps
        return cls(
            status=status,
            reason=reason,
            clients=list(c.nodes),
            clients_sampled=c.sampled,
            clients_ok=len(c.contributors),
            failures=list(c.failures),
            # The clients' reported example counts where the transport sees them (plain), the
            # unmasked total weight where it does not (secure aggregation).
            num_examples=int(
                _sum(ms, "num-examples") if any("num-examples" in m for m in ms) else c.total_weight
            ),
            train_loss=float(np.mean(losses)) if losses else None,
            train_phase_seconds=c.phase_seconds,
            client_seconds=_sum(ms, "client-seconds"),
            client_seconds_max=_max(ms, "client-seconds"),
            client_load_seconds=_sum(ms, "load-seconds"),
            client_train_seconds=_sum(ms, "train-seconds"),
            client_peak_rss_mb_max=_max(ms, "peak-rss-mb"),
            bytes_down=c.bytes_down,
            bytes_up=c.bytes_up,
            client_memory=client_memory(
                {n: c.client_metrics[n] for n in c.contributors if n in c.client_metrics}
            ),
            extra=extra,
        )

    @classmethod
    def not_started(cls, reason: str) -> RoundResult:
        return cls(status="failed", reason=reason)

    def to_row(self) -> dict[str, Any]:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**row, **self.extra}


def update_norm(old: Arrays, new: Arrays) -> float:
    return float(
        np.sqrt(sum(float(np.sum((new[k] - old[k]).astype(np.float64) ** 2)) for k in old))
    )


def check_finite(arrays: Arrays, what: str) -> None:
    for k, v in arrays.items():
        if not np.isfinite(v).all():
            raise RoundFailed(f"{what} holds NaN or infinite values in {k!r}")
