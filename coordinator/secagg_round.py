"""A training round with secure aggregation (``--secagg``): the round loop calls
``SecureAggregation.train_round`` instead of ``rounds.train_round``.

One round is four exchanges over the Grid (``rounds.exchange``: push, poll, timeout), one per
SecAgg+ stage, driven by the pure coordinator state machine ``privacy.secagg.server``:

    train.secagg_setup   train instruction + global adapter + Setup -> Advertise (+ metrics)
    train.secagg_share   KeyDirectory                               -> ShareBundle
    train.secagg_mask    ShareDelivery                              -> MaskedHeader + vector
    train.secagg_unmask  UnmaskRequest                              -> UnmaskResponse

What the coordinator holds per client is public keys, sealed shares it cannot open, masked
vectors (added to a running sum as they are read, then released) and revealed shares: never an
update. The unmasked result is the sum of the encoded updates, decoded to the example-weighted
mean delta (or, with distributed DP, the noisy sum over a fixed denominator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregation import apply_delta
from coordinator.config import RunConfig
from coordinator.ddp import DistributedDp
from coordinator.progress import Progress
from coordinator.rounds import Exchange, exchange, sample_nodes
from privacy.distributed_dp import SkellamRelease, plan_noisy_encoding, release_for_round
from privacy.secagg.encoding import (
    EncodingError,
    EncodingPlan,
    decode_sum,
    plan_encoding,
    weighted_mean,
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
from protocol.messages import encode_train_instruction

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


def _reason(reply: Message) -> str:
    if reply.has_error():
        return reply.error.reason or f"client error code {reply.error.code}"
    return "reply without content"


class SecureAggregation:
    """Secure-aggregation rounds of one run. Keeps, across rounds, the clients excluded for
    misbehaving (inconsistent or tampered shares, bad or replayed public keys, disputes with two
    different clients: privacy/secagg/server.py); they are not sampled again in this run. Also
    kept: every public key advertised so far (a replayed one is refused) and the dispute
    ledger."""

    def __init__(self, cfg: RunConfig, ddp: DistributedDp | None = None) -> None:
        if not cfg.secagg:
            raise ValueError("secagg: SecureAggregation needs --secagg")
        self.cfg = cfg
        self.ddp = ddp
        self.excluded: dict[int, str] = {}
        self.releases: list[SkellamRelease] = []  # distributed-DP releases, for the accountant
        self.seen_keys: set[bytes] = set()  # 64 bytes per client and round
        self.complaint_ledger = ComplaintLedger()

    def plan(self, n: int, numel: int) -> tuple[EncodingPlan, float]:
        """The encoding for ``n`` sampled clients and the Skellam parameter each client adds."""
        cfg, ddp = self.cfg, self.ddp
        if ddp is None:
            plan = plan_encoding(
                n, cfg.secagg_clip, cfg.secagg_precision, cfg.secagg_weight_cap, numel=numel
            )
            return plan, 0.0
        # With DP each client counts once (weight 1) and its update is L2-clipped: the
        # per-coordinate clip is then the L2 clip norm itself (privacy.distributed_dp).
        return plan_noisy_encoding(
            n, ddp.noise_multiplier, ddp.clip_norm, ddp.cohort, numel, cfg.secagg_precision
        )

    def train_round(
        self,
        grid: Grid,
        nodes: Sequence[int],
        adapter: Arrays,
        spec: AdapterSpec,
        rnd: int,
        progress: Progress,
        *,
        population: int = 0,
    ) -> tuple[Arrays | None, dict[str, Any], int, int]:
        """One secure round over ``nodes``. With distributed DP, ``population`` is how many
        clients the cohort was drawn from (0: ``nodes`` is the whole population)."""
        cfg = self.cfg
        instr = cfg.train_instruction(rnd)
        expected = spec.subset(instr.trainable_keys) if instr.trainable_keys else spec
        sampled = [n for n in nodes if n not in self.excluded]
        metrics: dict[str, Any] = {
            "clients_sampled": len(nodes),
            "clients_ok": 0,
            "failures": [
                {"node": n, "stage": "sampling", "reason": f"excluded: {self.excluded[n]}"}
                for n in nodes
                if n in self.excluded
            ],
            "num_examples": 0,
            "train_loss": None,
        }
        down = up = 0

        def failed(reason: str) -> tuple[None, dict[str, Any], int, int]:
            metrics["status"] = "failed"
            metrics["reason"] = reason
            return None, metrics, down, up

        if len(sampled) < max(2, cfg.min_clients):
            return failed(
                f"{len(sampled)} client(s) can take part, min-clients is {cfg.min_clients}"
            )
        try:
            plan, mu = self.plan(len(sampled), expected.numel)
            session = ServerSession(
                sampled,
                rnd,
                plan,
                expected.numel + 1,
                min_survivors=cfg.min_clients,
                degree=cfg.secagg_neighbours,
                threshold=cfg.secagg_threshold,
                noise_mu=mu,
                known_keys=self.seen_keys,
            )
        except (SecAggError, EncodingError) as exc:
            return failed(f"secure aggregation cannot start: {exc}")

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
            nonlocal down, up
            contents = {}
            for node, payload in payloads.items():
                content = RecordDict(dict(base.items())) if base is not None else RecordDict()
                content[keys.SECAGG] = ConfigRecord(
                    {
                        keys.SECAGG_PAYLOAD: payload,
                        keys.SECAGG_INJECT_DROPOUT: stage == cfg.dropout_stage and node in victims,
                    }
                )
                contents[node] = content
            progress.phase(rnd, f"secagg {stage}", len(contents))
            ex = exchange(
                grid,
                contents,
                f"train.{_ACTION[stage]}",
                rnd,
                cfg.round_timeout,
                on_reply=lambda n, r: progress.client_done(n, not r.has_error()),
            )
            down += ex.bytes_down
            up += ex.bytes_up
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
                    bad[node] = _reason(reply)
                    continue
                try:
                    ok[node] = _payload(reply)
                except SecAggError as exc:
                    bad[node] = f"malformed reply: {exc}"
            return ok, bad

        try:
            base = encode_train_instruction(instr, adapter)
            setups = {u: to_bytes(s) for u, s in session.setup_messages().items()}
            ok, bad = split(run_stage(ADVERTISE, setups, base))
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
            self._report(metrics, session, cpu, train_metrics, phase_seconds, None, rnd)
            return failed(exc.reason)
        except SecAggError as exc:  # not the clients' doing, but the run goes on without a sum
            self._report(metrics, session, cpu, train_metrics, phase_seconds, None, rnd)
            return failed(f"secure aggregation failed: {exc}")
        self._report(metrics, session, cpu, train_metrics, phase_seconds, result, rnd)

        try:
            decoded = decode_sum(result.ring_sum, plan, len(result.contributors))
        except EncodingError as exc:
            return failed(f"secure sum rejected: {exc}")
        if self.ddp is None:
            mean = weighted_mean(decoded, plan)
            metrics["num_examples"] = decoded.total_weight
        else:
            mean = decoded.weighted_sum / self.ddp.denominator
            release = release_for_round(
                mu,
                len(result.contributors),
                max(population, len(nodes)),
                self.ddp.clip_norm,
                plan.step,
                expected.numel,
            )
            self.releases.append(release)
            metrics["ddp_noise_multiplier"] = release.effective_noise_multiplier
            metrics["ddp_release"] = release.to_dict()
        delta = _unflatten(mean, expected)
        new = apply_delta(adapter, delta)
        metrics["status"] = "ok"
        metrics["update_norm"] = float(
            np.sqrt(
                sum(float(np.sum((new[k] - adapter[k]).astype(np.float64) ** 2)) for k in adapter)
            )
        )
        return new, metrics, down, up

    def _report(
        self,
        metrics: dict[str, Any],
        session: ServerSession,
        cpu: dict[str, list[float]],
        train_metrics: dict[int, dict[str, float]],
        phase_seconds: dict[str, float],
        result: SecAggResult | None,
        rnd: int,
    ) -> None:
        contributors = set(result.contributors) if result else set()
        losses = [
            m["train-loss"]
            for n, m in train_metrics.items()
            if n in contributors and "train-loss" in m
        ]
        metrics["clients_ok"] = len(contributors)
        metrics["train_loss"] = float(np.mean(losses)) if losses else None
        trained = list(train_metrics.values())
        metrics["client_seconds_max"] = max(
            (m.get("client-seconds", 0.0) for m in trained), default=None
        )
        metrics["train_phase_seconds"] = sum(phase_seconds.values())
        for key, name in (
            ("client_seconds", "client-seconds"),
            ("client_load_seconds", "load-seconds"),
            ("client_train_seconds", "train-seconds"),
        ):
            metrics[key] = sum(m.get(name, 0.0) for m in trained)
        metrics["failures"] += [
            {"node": d.node, "stage": d.stage, "reason": d.reason} for d in session.dropouts
        ]
        excluded = list(result.excluded) if result else list(session.excluded.values())
        excluded += self.complaint_ledger.record(rnd, session.disputes)
        self.seen_keys |= session.advertised_keys()
        for d in excluded:
            self.excluded.setdefault(d.node, d.reason)
        metrics["secagg"] = {
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
        out[name] = vector[start : start + t.numel].reshape(t.shape).astype(np.dtype(t.dtype))
        start += t.numel
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, the adapter {start}")
    return out
