"""The secure transport of the round pipeline (``--secagg``): ``SecureTransport.collect``
delivers the same ``Contribution`` (sum of the updates, total weight) as the plain transport.

One round is four exchanges over the Grid (``exchange.exchange``: push, poll, timeout), one per
SecAgg+ stage, driven by the pure coordinator state machine ``privacy.secagg.server``:

    train.secagg_setup   train instruction + global adapter + Setup -> Advertise (+ metrics)
    train.secagg_share   KeyDirectory                               -> ShareBundle
    train.secagg_mask    ShareDelivery                              -> MaskedHeader + vector
    train.secagg_unmask  UnmaskRequest                              -> UnmaskResponse

What the coordinator holds per client is public keys, sealed shares it cannot open, masked
vectors (added to a running sum as they are read, then released) and revealed shares: never an
update. The unmasked result is the sum of the encoded updates, decoded to sum_k w_k u_k and
sum_k w_k (with distributed DP: the sum of the clipped, noised updates, weights 1, and the Skellam
release that reached it, for the privacy stage's ledger).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.config import RunConfig
from coordinator.ddp import DistributedDp
from coordinator.exchange import Exchange, exchange, reply_reason, sample_nodes
from coordinator.pipeline import Contribution, Prepare, Wire
from coordinator.progress import Progress
from privacy.distributed_dp import plan_noisy_encoding
from privacy.secagg.encoding import (
    EncodingError,
    EncodingPlan,
    decode_sum,
    plan_encoding,
    step_for_ring,
)
from privacy.secagg.messages import SecAggAborted, SecAggError, to_bytes
from privacy.secagg.server import (
    ADVERTISE,
    MASKED_INPUT,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    ComplaintLedger,
    SecAggResult,
    ServerSession,
)
from protocol import keys
from protocol.adapter import AdapterSpec
from protocol.codecs import NoneCodec
from protocol.codecs.secure import SecureLayout
from protocol.errors import UpdateRejected

log = logging.getLogger("fedtune")

Arrays = dict[str, np.ndarray]
_ACTION = dict(zip(STAGES, keys.SECAGG_ACTIONS, strict=True))


def _payload(reply: Message) -> bytes:
    rec = reply.content.get(keys.SECAGG)
    value = rec.get(keys.SECAGG_PAYLOAD) if isinstance(rec, ConfigRecord) else None
    if not isinstance(value, bytes):
        raise SecAggError(f"reply has no {keys.SECAGG}/{keys.SECAGG_PAYLOAD} bytes")
    return value


def _metrics(reply: Message) -> dict[str, float]:
    rec = reply.content.get(keys.METRICS)
    if not isinstance(rec, MetricRecord):
        return {}
    return {
        k: float(v)
        for k, v in rec.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }


class SecureTransport:
    """Secure-aggregation rounds of one run. Keeps, across rounds, the clients excluded for
    misbehaving (inconsistent or tampered shares, bad or replayed public keys, disputes with two
    different clients: privacy/secagg/server.py); they are not sampled again in this run. Also
    kept: every public key advertised so far (a replayed one is refused) and the dispute
    ledger."""

    def __init__(
        self, cfg: RunConfig, ddp: DistributedDp | None = None, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        if not cfg.secagg:
            raise ValueError("secagg: SecureAggregation needs --secagg")
        self.cfg = cfg
        self.ddp = ddp
        self.clock = clock
        self.excluded: dict[int, str] = {}
        self.seen_keys: set[bytes] = set()  # 64 bytes per client and round
        self.complaint_ledger = ComplaintLedger()

    def state_dict(self, name: Callable[[int], str]) -> dict[str, Any]:
        """What a resumed run must keep (saved with every round), clients by ``name``."""
        return {
            "excluded": {name(n): r for n, r in sorted(self.excluded.items())},
            "complaints": {
                name(n): {name(o): r for o, r in sorted(seen.items())}
                for n, seen in sorted(self.complaint_ledger.counterparts.items())
            },
            "seen_keys": sorted(k.hex() for k in self.seen_keys),
        }

    def load_state_dict(self, state: Mapping[str, Any], node: Callable[[str], int | None]) -> None:
        """Restore ``state_dict``'s record; ``node`` maps a client name to its node id now (a
        client not connected now is dropped from it, with a warning)."""

        def known(who: str) -> int | None:
            n = node(who)
            if n is None:
                log.warning("secure aggregation state: client %r is not connected; forgotten", who)
            return n

        for who, reason in state.get("excluded", {}).items():
            if (n := known(who)) is not None:
                self.excluded[n] = str(reason)
        for who, seen in state.get("complaints", {}).items():
            if (n := known(who)) is not None:
                others = {o: int(r) for w, r in seen.items() if (o := known(w)) is not None}
                self.complaint_ledger.counterparts[n] = others
        self.seen_keys = {bytes.fromhex(k) for k in state.get("seen_keys", [])}

    def plan(self, n: int, numel: int, clip: float | None = None) -> tuple[EncodingPlan, float]:
        """The encoding for ``n`` sampled clients and the Skellam parameter each client adds
        (``clip``: the per-coordinate clip, --secagg-clip unless a sketch's cells need more)."""
        cfg, ddp = self.cfg, self.ddp
        if ddp is None:
            clip = cfg.secagg_clip if clip is None else clip
            precision = cfg.secagg_precision
            if cfg.secagg_ring_bits:  # the finest step whose sum fits that ring
                precision = step_for_ring(n, clip, cfg.secagg_ring_bits, cfg.secagg_weight_cap)
            plan = plan_encoding(n, clip, precision, cfg.secagg_weight_cap, numel=numel)
            return plan, 0.0
        # With DP each client counts once (weight 1) and its update is L2-clipped: the
        # per-coordinate clip is then the L2 clip norm itself (privacy.distributed_dp).
        return plan_noisy_encoding(
            n, ddp.noise_multiplier, ddp.clip_norm, ddp.cohort, numel, cfg.secagg_precision
        )

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
        """One secure round over ``nodes``: the unmasked sum of the contributors' updates (with
        distributed DP, their clipped and noised updates, each of weight 1, and the release that
        reached the sum). ``prepare`` is not applied: the coordinator never sees an update."""
        cfg = self.cfg
        sampled = [n for n in nodes if n not in self.excluded]
        c = Contribution(
            {name: np.zeros(t.shape, np.float64) for name, t in expected.tensors},
            0.0,
            sampled=len(nodes),
            nodes=sorted(nodes),
            failures=[
                {"node": n, "stage": "sampling", "reason": f"excluded: {self.excluded[n]}"}
                for n in nodes
                if n in self.excluded
            ],
        )
        if len(sampled) < max(2, cfg.min_clients):
            c.error = f"{len(sampled)} client(s) can take part, min-clients is {cfg.min_clients}"
            return c
        layout = (
            wire.secure_layout()
            if wire
            else SecureLayout(expected, NoneCodec())  # the update's values, as they are
        )
        try:
            plan, mu = self.plan(len(sampled), layout.length, layout.value_clip(cfg.secagg_clip))
            session = ServerSession(
                sampled,
                rnd,
                plan,
                layout.length + 1,
                min_survivors=cfg.min_clients,
                degree=cfg.secagg_neighbours,
                threshold=cfg.secagg_threshold,
                noise_mu=mu,
                known_keys=self.seen_keys,
            )
        except (SecAggError, EncodingError) as exc:
            c.error = f"secure aggregation cannot start: {exc}"
            return c

        victims: set[int] = set()
        if cfg.inject_dropout > 0:
            count = round(cfg.inject_dropout * len(sampled))
            victims = (
                set(sample_nodes(sampled, count, cfg.seed, 1_000_003 + rnd)) if count else set()
            )
        train_metrics: dict[int, dict[str, float]] = {}
        cpu: dict[str, list[float]] = {s: [] for s in STAGES}
        phase_seconds: dict[str, float] = {}

        def run_stage(stage: str, payloads: dict[int, bytes], base: RecordDict | None) -> Exchange:
            contents = {}
            for node, payload in payloads.items():
                if wire is not None and base is not None:
                    base = wire.content(node)  # this node's train content (its rank's slice)
                msg = RecordDict(dict(base.items())) if base is not None else RecordDict()
                msg[keys.SECAGG] = ConfigRecord(
                    {
                        keys.SECAGG_PAYLOAD: payload,
                        keys.SECAGG_INJECT_DROPOUT: stage == cfg.dropout_stage and node in victims,
                    }
                )
                contents[node] = msg
            progress.phase(rnd, f"secagg {stage}", len(contents))
            ex = exchange(
                grid,
                contents,
                f"train.{_ACTION[stage]}",
                rnd,
                cfg.round_timeout,
                on_reply=lambda n, r: progress.client_done(n, not r.has_error()),
                clock=self.clock,
            )
            c.count(ex)
            phase_seconds[stage] = ex.seconds
            for node, reply in ex.replies.items():
                if reply.has_content():
                    m = _metrics(reply)
                    if f"secagg-cpu-{stage}" in m:
                        cpu[stage].append(m[f"secagg-cpu-{stage}"])
                    if stage == ADVERTISE:
                        train_metrics[node] = m
            return ex

        def split(ex: Exchange) -> tuple[dict[int, bytes], dict[int, str]]:
            ok: dict[int, bytes] = {}
            bad = {n: f"no reply within {cfg.round_timeout:g}s" for n in ex.missing}
            for node, reply in ex.replies.items():
                if not reply.has_content():
                    bad[node] = reply_reason(reply)
                    continue
                try:
                    ok[node] = _payload(reply)
                except SecAggError as exc:
                    bad[node] = f"malformed reply: {exc}"
            return ok, bad

        try:
            setups = {u: to_bytes(s) for u, s in session.setup_messages().items()}
            ok, bad = split(run_stage(ADVERTISE, setups, content))
            directories = session.receive_advertise(ok, bad)

            ex = run_stage(SHARE_KEYS, {u: to_bytes(d) for u, d in directories.items()}, None)
            ok, bad = split(ex)
            deliveries = session.receive_shares(ok, bad)

            ex = run_stage(MASKED_INPUT, {u: to_bytes(d) for u, d in deliveries.items()}, None)
            headers, bad = split(ex)
            masked: dict[int, tuple[bytes, np.ndarray]] = {}
            for node, header in headers.items():
                rec = ex.replies[node].content.get(keys.SECAGG_MASKED)
                try:
                    if not isinstance(rec, ArrayRecord) or list(rec) != ["masked"]:
                        raise SecAggError(f"record {keys.SECAGG_MASKED!r} must hold one array")
                    masked[node] = (header, rec["masked"].numpy())
                except Exception as exc:  # a corrupt array payload is the client's fault
                    bad[node] = f"malformed masked vector: {exc}"
            del ex  # the replies (masked vectors) go once the session has summed them
            requests = session.receive_masked(masked, bad)
            masked.clear()

            ok, bad = split(run_stage(UNMASK, {u: to_bytes(r) for u, r in requests.items()}, None))
            result = session.receive_unmask(ok, bad)
        except SecAggAborted as exc:
            for culprit in exc.culprits:
                self.excluded.setdefault(culprit, exc.reason)
            self._report(c, session, cpu, train_metrics, phase_seconds, None, rnd)
            c.error = exc.reason
            return c
        except SecAggError as exc:  # not the clients' doing, but the run goes on without a sum
            self._report(c, session, cpu, train_metrics, phase_seconds, None, rnd)
            c.error = f"secure aggregation failed: {exc}"
            return c
        self._report(c, session, cpu, train_metrics, phase_seconds, result, rnd)

        try:
            decoded = decode_sum(result.ring_sum, plan, len(result.contributors))
        except EncodingError as exc:
            c.error = f"secure sum rejected: {exc}"
            return c
        # phi_k = w_k / weight-cap inside the ring: back to sum_k w_k u_k (DP: w_k = cap = 1);
        # a summed sketch is decoded here (linear), summed holders divided by the clip.
        try:
            summed = layout.decode(decoded.weighted_sum * plan.weight_cap, plan_clip=plan.clip)
        except UpdateRejected as exc:
            c.error = f"secure sum rejected: {exc}"
            return c
        c.weighted_sum = {name: summed[name] for name, _ in expected.tensors}
        c.total_weight = float(decoded.total_weight)
        if self.ddp is not None:  # what the privacy stage's ledger needs of this sum
            c.release = {"mu": mu, "step": plan.step, "numel": layout.length}
        return c

    def _report(
        self,
        c: Contribution,
        session: ServerSession,
        cpu: dict[str, list[float]],
        train_metrics: dict[int, dict[str, float]],
        phase_seconds: dict[str, float],
        result: SecAggResult | None,
        rnd: int,
    ) -> None:
        c.contributors = sorted(result.contributors) if result else []
        c.client_metrics = train_metrics
        c.phase_seconds = sum(phase_seconds.values())
        c.failures += [
            {"node": d.node, "stage": d.stage, "reason": d.reason} for d in session.dropouts
        ]
        excluded = list(result.excluded) if result else list(session.excluded.values())
        excluded += self.complaint_ledger.record(rnd, session.disputes)
        self.seen_keys |= session.advertised_keys()
        for d in excluded:
            self.excluded.setdefault(d.node, d.reason)
        c.extra["secagg"] = {
            "degree": session.graph.degree(),
            "threshold": session.threshold,
            "ring_bits": session.params.plan.ring_bits,
            "step": session.params.plan.step,
            "stage_counts": dict(session.counts),
            "recovered": list(result.recovered) if result else [],
            "excluded": [{"node": d.node, "stage": d.stage, "reason": d.reason} for d in excluded],
            "phase_seconds": phase_seconds,
            "client_cpu_seconds_max": {s: max(v) for s, v in cpu.items() if v},
            "client_cpu_seconds_mean": {s: float(np.mean(v)) for s, v in cpu.items() if v},
        }
        for d in session.dropouts:
            log.warning("round: client %s left at %s: %s", d.node, d.stage, d.reason)


def _unflatten(vector: np.ndarray, spec: AdapterSpec) -> Arrays:
    out: Arrays = {}
    start = 0
    for name, t in spec.tensors:
        out[name] = vector[start : start + t.numel].reshape(t.shape).astype(np.float64)
        start += t.numel
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the adapter {start}")
    return out
