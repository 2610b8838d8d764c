"""How a run's updates travel: the update codec (``--compress``), the compressed global adapter
(``--compress-down``) and per-client LoRA ranks (``--client-ranks`` or a ``rank`` per device
profile), behind the transports' ``wire`` seam (``coordinator.pipeline.Wire``).

Ranks. With ``--client-ranks``, clients get ranks round-robin over a stable order: the nodes
connected at the start, sorted by node id, then later ones in the order they are first sampled
(sorted within a round). With ranks in the device profiles, the fleet says each node's rank
(``coordinator.fleet.FleetModel.rank``: its profile's, a function of the seeded profile
assignment, so nothing about it needs saving for a resume); a profile without one trains the
global rank.
A client of rank r is sent the first r components of the global adapter (``protocol.ranks``)
with alpha scaled so that alpha / r is the global scale, trains them, and replies with its
rank-r delta. In plaintext the coordinator pads the decoded delta to the global rank and adds
the client's holder vector (1 for the components it holds) times its weight to the same running
sum, so the round's sum carries each component's holder weight and ``finish`` divides each
component by it (``protocol.ranks.ranked_mean``; equal ranks: FedAvg). Under secure aggregation
each client pads its own delta and appends its holder vector to the masked vector
(``protocol.codecs.secure``); the rule is linear, so the sum is all it needs. ``--rank-aggregation
flexlora`` (plaintext only) instead keeps the round's updates and redistributes the SVD of their
mean product B A (``protocol.ranks.flexlora``).

Bytes. ``fp32_up``/``fp32_down`` are what the same clients' updates and adapters would take as
uncompressed float32 tensors at the global rank, measured as Flower counts bytes
(``protocol.codecs.fp32_adapter_bytes``): the denominators of the round's ``bytes_up_ratio`` and
``bytes_down_ratio``, whose numerators are the bytes the exchange measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from coordinator.aggregators import Accumulator
from coordinator.config import RunConfig
from coordinator.pipeline import Contribution
from coordinator.strategies import Strategy
from protocol.adapter import AdapterSpec, TensorSpec
from protocol.codecs import Codec, CompressionConfig, fp32_adapter_bytes
from protocol.codecs.secure import SecureLayout
from protocol.errors import UpdateRejected
from protocol.messages import ClientUpdate, TrainInstruction, decode_update
from protocol.ranks import (
    HOLDERS,
    RankError,
    client_lora,
    component_axis,
    flexlora,
    is_lora,
    rank_of_client,
    ranked_mean,
    slice_adapter,
)

Arrays = Mapping[str, np.ndarray]
HOLDER_SLACK = 1e-3  # encoding error allowed on a mean holder weight
RANK_ORDER = "client_rank_order"  # round-state section: client name -> place in the rank order


def rank_spec(spec: AdapterSpec, rank: int) -> AdapterSpec:
    """``spec`` with every LoRA tensor cut to its first ``rank`` components."""
    out = []
    for name, t in spec.tensors:
        if is_lora(name):
            shape = list(t.shape)
            shape[component_axis(name)] = rank
            t = TensorSpec(tuple(shape), t.dtype)
        out.append((name, t))
    return AdapterSpec(tuple(out))


def with_holders(spec: AdapterSpec, global_rank: int) -> AdapterSpec:
    return AdapterSpec((*spec.tensors, (HOLDERS, TensorSpec((global_rank,), "<f4"))))


class UpdateWire:
    """The run's wire settings, and each node's rank (assigned once, kept for the run).
    ``node_rank`` is the fleet's rank of a node (``coordinator.fleet.FleetModel.rank``; None:
    the global rank), used when the run's device profiles set ranks."""

    def __init__(
        self, cfg: RunConfig, node_rank: Callable[[int], int | None] | None = None
    ) -> None:
        self.cfg = cfg
        self.compression: CompressionConfig = cfg.compression()
        self.down: Codec | None = (
            CompressionConfig(cfg.compress_down, block_size=cfg.compress_block_size).build()
            if cfg.compress_down != "none"
            else None
        )
        self.ranks = cfg.client_rank_list()  # round-robin (--client-ranks)
        self.global_rank = cfg.lora_rank
        self.mixed = cfg.mixed_ranks
        self.node_rank = node_rank if self.mixed and not self.ranks else None
        if self.mixed and not self.ranks and node_rank is None:
            raise RankError(
                f"device-profiles: {cfg.device_profiles} sets ranks, but this run has no "
                "simulated fleet to assign them (device profiles are for fedtune simulate)"
            )
        # With mixed ranks (equal ranks included) updates carry holder weights and each
        # component is divided by its own: with one rank that is FedAvg, by another route.
        self.holders = self.mixed or cfg.rank_aggregation == "flexlora"
        self.order: dict[int, int] = {}  # node -> position in the stable order

    @property
    def active(self) -> bool:
        """Whether updates travel differently from plain fp32 deltas at one rank."""
        return self.compression.codec != "none" or self.down is not None or self.holders

    def assign(self, nodes: Iterable[int]) -> None:
        """Give nodes not seen before the next positions, in the order given (the roster's
        stable order: by client name)."""
        for node in nodes:
            if node not in self.order:
                self.order[node] = max(self.order.values(), default=-1) + 1

    def order_record(self, name: Callable[[int], str]) -> dict[str, int]:
        """The rank order for the round state, clients by ``name`` (node ids change on resume)."""
        return {name(n): i for n, i in sorted(self.order.items(), key=lambda x: x[1])}

    def load_order(self, record: Mapping[str, Any], node: Callable[[str], int | None]) -> None:
        """The order a resumed run saved (``order_record``); ``node`` maps a client name to its
        node id now. Clients not connected now keep their places free; new ones come after."""
        try:
            order = {str(n): int(i) for n, i in record.items()}
        except (TypeError, ValueError) as exc:
            raise RankError(f"state {RANK_ORDER}: malformed ({exc})") from exc
        if sorted(order.values()) != list(range(len(order))):
            raise RankError(f"state {RANK_ORDER}: positions are not 0..{len(order) - 1}")
        self.order = {n: i for who, i in order.items() if (n := node(who)) is not None}

    def rank(self, node: int) -> int:
        if self.node_rank is not None:
            r = self.node_rank(node)
            if r is None:
                return self.global_rank
            if not 1 <= r <= self.global_rank:
                raise RankError(f"node {node}: rank {r} is not in 1..{self.global_rank}")
            return r
        if not self.ranks:
            return self.global_rank
        if node not in self.order:
            self.assign([node])
        return rank_of_client(self.ranks, self.order[node])

    def masked_numel(self, update_spec: AdapterSpec) -> int:
        """Values in one masked vector (distributed DP accounts for this many)."""
        return self.layout(update_spec, 0).length

    def layout(self, update_spec: AdapterSpec, rnd: int) -> SecureLayout:
        return SecureLayout(
            update_spec,
            self.compression.build(seed=self.cfg.seed, rnd=rnd),
            self.global_rank if self.holders else 0,
        )

    def for_round(
        self,
        rnd: int,
        nodes: Iterable[int],
        instr: TrainInstruction,
        adapter: Arrays,
        strategy: Strategy,
        trained: AdapterSpec,
    ) -> RoundWire:
        nodes = list(nodes)
        self.assign(nodes)
        update_spec = strategy.update_spec(trained)
        instr = dataclasses.replace(
            instr, global_rank=self.global_rank if (self.holders and self.cfg.secagg) else 0
        )
        return RoundWire(
            self,
            rnd,
            instr,
            dict(adapter),
            strategy,
            trained,
            update_spec,
            {n: self.rank(n) for n in nodes},
        )


@dataclass
class RoundWire:
    """One round of ``UpdateWire``: the ``coordinator.pipeline.Wire`` the transports use."""

    run: UpdateWire
    rnd: int
    instr: TrainInstruction
    adapter: dict[str, np.ndarray]
    strategy: Strategy
    trained: AdapterSpec
    update_spec: AdapterSpec  # at the global rank, holders excluded
    ranks: dict[int, int]
    _contents: dict[int, RecordDict] = field(default_factory=dict)  # by rank

    @property
    def codec(self) -> Codec:
        return self.run.compression.build(seed=self.run.cfg.seed, rnd=self.rnd)

    @property
    def expected(self) -> AdapterSpec:
        """What the transport sums: the update at the global rank (plus the holder vector)."""
        if self.run.holders:
            return with_holders(self.update_spec, self.run.global_rank)
        return self.update_spec

    def node_spec(self, node: int) -> AdapterSpec:
        """What ``node`` sends (in plaintext): its update at its own rank."""
        r = self.ranks.get(node, self.run.rank(node))
        return self.update_spec if r == self.run.global_rank else rank_spec(self.update_spec, r)

    # -- Wire ------------------------------------------------------------------------------

    def content(self, node: int) -> RecordDict:
        r = self.ranks.get(node, self.run.rank(node))
        if r not in self._contents:
            instr, adapter = self.instr, self.adapter
            if r != self.run.global_rank:
                instr = dataclasses.replace(instr, lora=client_lora(instr.lora, r))
                adapter = slice_adapter(adapter, r)
            trained = rank_spec(self.trained, r)
            if instr.trainable_keys:
                instr = dataclasses.replace(instr, trainable_keys=trained.names)
            rng = np.random.default_rng([0xD0, self.run.cfg.seed, self.rnd, r])
            self._contents[r] = self.strategy.train_content(
                instr, adapter, trained, down=self.run.down, rng=rng
            )
        return self._contents[r]

    def decode(self, node: int, content: RecordDict) -> ClientUpdate:
        spec = self.node_spec(node)
        update = decode_update(content, spec, rnd=self.rnd, codec=self.codec)
        if spec == self.update_spec:
            return update
        padded = {}
        for name, t in self.update_spec.tensors:
            arr = np.zeros(t.shape, np.dtype(t.dtype))
            got = update.delta[name]
            if is_lora(name) and component_axis(name) == 1:
                arr[:, : got.shape[1]] = got
            else:
                arr[: got.shape[0]] = got
            padded[name] = arr
        return dataclasses.replace(update, delta=padded)

    def attach(self, node: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.run.holders:
            return delta
        holders = np.zeros(self.run.global_rank, np.float32)
        holders[: self.ranks.get(node, self.run.rank(node))] = 1.0
        return {**delta, HOLDERS: holders}

    def accumulator(self, expected: AdapterSpec) -> Accumulator | None:
        if self.run.cfg.rank_aggregation != "flexlora":
            return None
        return FlexLoraCollector(expected, self.adapter)

    def secure_layout(self) -> SecureLayout:
        return self.run.layout(self.update_spec, self.rnd)

    # -- after the transport ---------------------------------------------------------------

    def finish(self, mean: Arrays) -> dict[str, np.ndarray]:
        """The released mean as the mean delta at the global rank: each rank component divided
        by its holders' share of the weight (mixed ranks), the holder vector dropped."""
        if not self.run.holders:
            return dict(mean)
        # Under secure aggregation the holder weights went through the fixed-point encoding:
        # within a few steps of [0, 1], never exactly outside by more than that.
        h = np.asarray(mean[HOLDERS], np.float64)
        if (h < -HOLDER_SLACK).any() or (h > 1 + HOLDER_SLACK).any():
            raise UpdateRejected(f"mixed-rank mean: holder weights {h.tolist()} outside [0, 1]")
        try:
            return ranked_mean({**mean, HOLDERS: np.clip(h, 0.0, 1.0)}, 1.0)
        except RankError as exc:
            raise UpdateRejected(f"mixed-rank mean: {exc}") from exc

    def fp32_up(self, nodes: Iterable[int]) -> int:
        """Bytes of ``nodes``' updates as fp32 tensors at the global rank (no codec)."""
        return len(list(nodes)) * fp32_adapter_bytes(self.update_spec)

    def fp32_down(self, nodes: Iterable[int]) -> int:
        return len(list(nodes)) * fp32_adapter_bytes(AdapterSpec.of(self.adapter))


class FlexLoraCollector(Accumulator):
    """``--rank-aggregation flexlora``: keeps the round's (padded delta, weight) pairs; the
    result is FlexLoRA's next adapter minus the global one, times the total weight, with every
    holder at the total weight (so the per-component division is the plain division)."""

    def __init__(self, spec: AdapterSpec, adapter: Arrays) -> None:
        super().__init__(spec)
        self.adapter = adapter
        self.updates: list[tuple[dict[str, np.ndarray], float]] = []

    def add(self, update: Arrays, weight: float) -> None:
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        r = int((np.asarray(update[HOLDERS]) > 0).sum())
        delta = slice_adapter({k: np.asarray(v) for k, v in update.items() if k != HOLDERS}, r)
        self.updates.append((delta, float(weight)))
        self.weight += weight

    def result(self) -> tuple[dict[str, np.ndarray], float]:
        if not self.updates:
            return self.sum, 0.0
        new = flexlora(self.adapter, self.updates)
        total = self.weight
        out = {
            k: (np.asarray(new[k], np.float64) - np.asarray(self.adapter[k], np.float64)) * total
            for k in self.sum
            if k != HOLDERS
        }
        out[HOLDERS] = np.full(self.sum[HOLDERS].shape, total)
        return out, total


def wire_row(wire: RoundWire, c: Contribution) -> dict[str, Any]:
    """The round's compression and rank figures for metrics.jsonl: the codec, bytes against
    fp32 (train phase: what the exchange measured over what fp32 tensors at the global rank
    would take), each sampled client's rank."""
    replied = c.replied or c.contributors  # the secure transport reports its contributors
    up, down = wire.fp32_up(replied), wire.fp32_down(c.nodes)
    row: dict[str, Any] = {
        "train_bytes_up": c.bytes_up,  # the train phase only (bytes_up adds evaluation)
        "train_bytes_down": c.bytes_down,
        "compress": wire.codec.name,
        "compress_down": wire.run.down.name if wire.run.down else "none",
        "update_bytes_fp32": wire.fp32_up([0]),
        "bytes_up_ratio": c.bytes_up / up if up else None,
        "bytes_down_ratio": c.bytes_down / down if down else None,
    }
    if wire.run.mixed:
        row["client_ranks"] = {str(n): wire.ranks[n] for n in sorted(wire.ranks)}
    return row
