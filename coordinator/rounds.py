"""The federated round loop, written against Flower's ``Grid`` (simulation and deployment alike).

Why our own loop instead of ``flwr.serverapp.strategy.FedAvg.start``: we need round 0 evaluation
of the untrained base, resume from a saved round, rejection of bad updates with a reason in the
round's metrics, bytes on the wire per round, and (later) multi-stage rounds for secure
aggregation. The aggregation itself is the pure function in ``coordinator.aggregation``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregation import Aggregator, fedavg_aggregator
from coordinator.config import DpMode, RunConfig
from coordinator.ddp import DistributedClientDP, DistributedDpSettings, resolve_distributed_dp
from coordinator.dp import ClientDPSettings, ClientLevelDP, resolve_client_dp
from coordinator.progress import Progress
from coordinator.rundir import RunDirectory
from protocol.adapter import AdapterSpec
from protocol.errors import ProtocolError
from protocol.messages import (
    ClientUpdate,
    EvalResult,
    decode_eval_result,
    decode_update,
    encode_eval_instruction,
    encode_train_instruction,
)

log = logging.getLogger("fedtune")

Arrays = dict[str, np.ndarray]
T = TypeVar("T")


class FederationError(RuntimeError):
    """The run cannot go on (not enough nodes, every round failing, ...)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the records' payload (arrays, config and metric values) as Flower counts them."""
    return sum(int(rec.count_bytes()) for rec in content.values())


@dataclass
class Exchange:
    """Replies gathered for one batch of messages, keyed by destination node."""

    replies: dict[int, Message] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0  # wall time from push to the last reply (or the timeout)
    timeout: float = 0.0

    def collect(
        self, decode: Callable[[RecordDict], T]
    ) -> tuple[dict[int, T], list[dict[str, Any]]]:
        """Decode every reply; error replies, undecodable ones and missing ones become failures
        with their reason."""
        results: dict[int, T] = {}
        failures = [
            {"node": n, "reason": f"no reply within {self.timeout:g}s"} for n in self.missing
        ]
        for node, reply in sorted(self.replies.items()):
            if not reply.has_content():
                failures.append({"node": node, "reason": _reason(reply)})
                continue
            try:
                results[node] = decode(reply.content)
            except ProtocolError as exc:
                failures.append({"node": node, "reason": str(exc)})
        return results, failures


def exchange(
    grid: Grid,
    contents: dict[int, RecordDict],
    message_type: str,
    rnd: int,
    timeout: float,
    on_reply: Callable[[int, Message], None] | None = None,
    poll_interval: float = 0.5,
) -> Exchange:
    """Send one message per node and wait (at most ``timeout`` s) for the replies."""
    out = Exchange(timeout=timeout)
    if not contents:  # e.g. an empty Poisson-sampled cohort under client-level DP
        return out
    t0 = time.monotonic()
    messages = []
    for node, content in contents.items():
        out.bytes_down += payload_bytes(content)
        messages.append(
            Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(rnd))
        )
    deadline = time.monotonic() + timeout
    ids = _retry_until(deadline, poll_interval, "send", lambda: list(grid.push_messages(messages)))
    pending = {
        mid: msg.metadata.dst_node_id for mid, msg in zip(ids or [], messages, strict=False) if mid
    }
    if ids is None:  # never sent: every node counts as missing, the warning said why
        pending = {str(i): msg.metadata.dst_node_id for i, msg in enumerate(messages)}
    while ids is not None and pending and time.monotonic() < deadline:
        pulled = _retry_until(
            deadline, poll_interval, "collect replies", lambda: grid.pull_messages(list(pending))
        )
        for reply in pulled or []:
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            node = pending.pop(mid)
            out.replies[node] = reply
            if reply.has_content():
                out.bytes_up += payload_bytes(reply.content)
            if on_reply:
                on_reply(node, reply)
        if pending:
            time.sleep(poll_interval)
    out.missing = sorted(pending.values())
    out.seconds = time.monotonic() - t0
    return out


R = TypeVar("R")


def _retry_until(deadline: float, pause: float, what: str, call: Callable[[], R]) -> R | None:
    """``call()``, retried after transient transport errors (a busy SuperLink answers 500 when
    its database is locked) until ``deadline``; None if it never succeeded."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:  # HTTP/gRPC errors of whichever Grid is in use
            failures += 1
            if failures == 1:
                log.warning("could not %s (%s); retrying until the round timeout", what, exc)
            if time.monotonic() + pause >= deadline:
                log.error("gave up trying to %s after %d attempts: %s", what, failures, exc)
                return None
            time.sleep(pause)


def broadcast(
    grid: Grid,
    cfg: RunConfig,
    nodes: Sequence[int],
    content: RecordDict,
    message_type: str,
    rnd: int,
    progress: Progress,
) -> Exchange:
    """The same content to every node in ``nodes``, with progress shown as replies arrive."""
    progress.phase(rnd, message_type, len(nodes))
    return exchange(
        grid,
        {n: content for n in nodes},
        message_type,
        rnd,
        cfg.round_timeout,
        on_reply=lambda n, r: progress.client_done(n, not r.has_error()),
    )


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    nodes = live_nodes(grid, needed, timeout, poll)
    if len(nodes) < needed:
        raise FederationError(
            f"only {len(nodes)} client node(s) connected after {timeout:.0f}s; "
            f"min-clients is {needed}"
        )
    return nodes


def live_nodes(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected nodes, once at least ``needed`` are (or whoever is there after
    ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() >= deadline:
            return nodes
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def sample_nodes(nodes: Sequence[int], k: int, seed: int, stream: int) -> list[int]:
    """``k`` distinct nodes, a deterministic function of (nodes, seed, stream).

    Node ids are unsigned 64-bit, so indices are sampled, not ids. ``stream`` is the round number
    for training samples (0 for the fixed evaluation set).
    """
    ordered = sorted(nodes)
    rng = np.random.default_rng([seed, stream])
    picks = rng.choice(len(ordered), size=min(k, len(ordered)), replace=False)
    return sorted(ordered[int(i)] for i in picks)


def _reason(reply: Message) -> str:
    if reply.has_error():
        return reply.error.reason or f"client error code {reply.error.code}"
    return "reply without content"


class ServerModel:
    """The coordinator's copy of the base model: it creates the initial adapter, writes the
    adapter in PEFT format and computes the coordinator-side held-out loss."""

    def __init__(self, cfg: RunConfig) -> None:
        from client.data import load_records, to_conversations, tokenize_all
        from client.model import attach_lora, default_cache_dir, load_base, resolve_model

        cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
        self.base = load_base(resolve_model(cfg.model), cfg.quantization, cache)
        self.model = attach_lora(self.base.model, cfg.lora, seed=cfg.seed)
        self.cfg = cfg
        self.central: list[Any] = []
        if cfg.central_eval_data:
            records = load_records(cfg.central_eval_data)
            convs = to_conversations(records, cfg.central_eval_data)
            self.central = tokenize_all(self.base.tokenizer, convs, cfg.seq_len)

    def initial_adapter(self) -> Arrays:
        from client.model import get_adapter

        return get_adapter(self.model)

    def central_eval(self, adapter: Arrays) -> EvalResult | None:
        if not self.central:
            return None
        from client.train import evaluate

        pad = int(self.base.tokenizer.pad_token_id)
        return evaluate(
            self.model,
            self.central,
            batch_size=self.cfg.eval_batch_size,
            pad_id=pad,
            global_adapter=adapter,
        )

    def write_peft(self, adapter: Arrays, directory: Path) -> None:
        from client.model import set_adapter

        set_adapter(self.model, adapter)
        self.model.save_pretrained(str(directory))
        self.base.tokenizer.save_pretrained(str(directory))


# Per-client memory figures a reply carries (client/app.py, client/memory.py) -> metrics keys.
_MEMORY_METRICS = {
    "peak-rss-mb": "peak_rss_mb",
    "max-memory-mb": "max_memory_mb",
    "weight-bits": "weight_bits",
    "plan-micro-batch": "micro_batch",
    "plan-accumulation": "accumulation",
    "plan-checkpointing": "checkpointing",
    "plan-estimated-mb": "estimated_mb",
}


def client_memory(updates: Mapping[int, ClientUpdate]) -> list[dict[str, Any]]:
    """Each client's memory plan and peak RSS for metrics.jsonl, by node."""
    rows = []
    for node, u in sorted(updates.items()):
        row: dict[str, Any] = {"node": node}
        for key, name in _MEMORY_METRICS.items():
            if key in u.metrics:
                value = u.metrics[key]
                row[name] = bool(value) if name == "checkpointing" else value
        rows.append(row)
    return rows


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


def federated_evaluate(
    grid: Grid, cfg: RunConfig, nodes: Sequence[int], adapter: Arrays, rnd: int, progress: Progress
) -> tuple[dict[str, Any], int, int]:
    """Held-out loss of ``adapter`` on ``nodes``' local splits, weighted by response tokens."""
    if not nodes:
        return {"eval_loss": None, "eval_clients_ok": 0, "eval_failures": []}, 0, 0
    content = encode_eval_instruction(cfg.eval_instruction(rnd), adapter)
    ex = broadcast(grid, cfg, nodes, content, MessageType.EVALUATE, rnd, progress)
    decoded, failures = ex.collect(decode_eval_result)
    results = list(decoded.values())
    loss = _weighted([(r.loss, r.num_tokens) for r in results if r.num_tokens > 0])
    return (
        {
            "eval_loss": loss,
            "eval_clients_ok": len(results),
            "eval_tokens": sum(r.num_tokens for r in results),
            "eval_failures": failures,
            "eval_phase_seconds": ex.seconds,
            "client_eval_seconds": sum(r.metrics.get("eval-seconds", 0.0) for r in results),
            "client_eval_peak_rss_mb_max": max(
                (r.metrics.get("eval-peak-rss-mb", 0.0) for r in results), default=None
            ),
        },
        ex.bytes_down,
        ex.bytes_up,
    )


def train_round(
    grid: Grid,
    cfg: RunConfig,
    nodes: Sequence[int],
    adapter: Arrays,
    spec: AdapterSpec,
    rnd: int,
    progress: Progress,
    *,
    aggregate: Aggregator = fedavg_aggregator,
    trainable_keys: Sequence[str] = (),
    min_clients: int | None = None,
) -> tuple[Arrays | None, dict[str, Any], int, int]:
    """Send the global adapter to ``nodes``, collect and validate updates, aggregate.

    ``aggregate`` is the aggregation step (FedAvg, or FedAvg wrapped in client-level DP);
    ``trainable_keys`` restricts what clients train and send (FFA-LoRA: the B matrices);
    ``min_clients`` overrides cfg.min_clients (DP releases every round: 0).
    Returns (new adapter or None if the round failed, metrics, bytes down, bytes up)."""
    instr = cfg.train_instruction(rnd)
    if trainable_keys:
        instr = dataclasses.replace(instr, trainable_keys=tuple(trainable_keys))
    needed = cfg.min_clients if min_clients is None else min_clients
    expected = spec.subset(instr.trainable_keys) if instr.trainable_keys else spec
    content = encode_train_instruction(instr, adapter)
    ex = broadcast(grid, cfg, nodes, content, MessageType.TRAIN, rnd, progress)
    updates, failures = ex.collect(lambda content: decode_update(content, expected))
    for f in failures:
        log.warning("round %d: client %s dropped: %s", rnd, f["node"], f["reason"])

    ok = list(updates.values())
    metrics: dict[str, Any] = {
        "clients_sampled": len(nodes),
        "clients_ok": len(ok),
        "failures": failures,
        "num_examples": sum(u.num_examples for u in ok),
        "train_loss": _weighted(
            [(u.metrics["train-loss"], u.num_examples) for u in ok if "train-loss" in u.metrics]
        ),
        "client_seconds_max": max((u.metrics.get("client-seconds", 0.0) for u in ok), default=None),
        # Sums over clients, so load / train / transport per client-round can be told apart.
        "train_phase_seconds": ex.seconds,
        "client_seconds": sum(u.metrics.get("client-seconds", 0.0) for u in ok),
        "client_load_seconds": sum(u.metrics.get("load-seconds", 0.0) for u in ok),
        "client_train_seconds": sum(u.metrics.get("train-seconds", 0.0) for u in ok),
        "client_peak_rss_mb_max": max(
            (u.metrics.get("peak-rss-mb", 0.0) for u in ok), default=None
        ),
    }
    metrics["client_memory"] = client_memory(updates)
    client_eps = [u.metrics["client-epsilon"] for u in ok if "client-epsilon" in u.metrics]
    if client_eps:  # sample-level DP: each client's own cumulative epsilon
        metrics["client_epsilon_max"] = max(client_eps)
    if len(ok) < needed:
        metrics["status"] = "failed"
        metrics["reason"] = f"{len(ok)} usable update(s), min-clients is {needed}"
        return None, metrics, ex.bytes_down, ex.bytes_up
    new, agg_metrics = aggregate(adapter, [(u.delta, u.num_examples) for u in ok])
    metrics.update(agg_metrics)
    metrics["status"] = "ok"
    metrics["update_norm"] = float(
        np.sqrt(sum(float(np.sum((new[k] - adapter[k]).astype(np.float64) ** 2)) for k in adapter))
    )
    return new, metrics, ex.bytes_down, ex.bytes_up


def _client_dp(
    cfg: RunConfig,
    connected: int,
    update_keys: Sequence[str],
    saved_state: dict[str, Any] | None,
    numel: int,
) -> ClientLevelDP | DistributedClientDP | None:
    """Client-level DP for this run, or None: noise added by the coordinator, or by the clients
    with ``--secagg`` (distributed DP). A resumed run continues its saved ledger with the
    settings it started with (a changed ``rounds`` does not recalibrate the noise)."""
    if cfg.dp is not DpMode.CLIENT:
        return None
    saved = saved_state["privacy"] if saved_state is not None and "privacy" in saved_state else None
    limits = [cfg.max_epsilon] if cfg.max_epsilon > 0 else []  # a resumed run may change it
    if cfg.secagg:
        if saved is None:
            return DistributedClientDP(resolve_distributed_dp(cfg, connected, numel))
        dsettings = DistributedDpSettings.from_record(saved["settings"])
        if limits:
            limits += [dsettings.target_epsilon] if dsettings.target_epsilon else []
            dsettings = dataclasses.replace(dsettings, max_epsilon=min(limits))
        ddp = DistributedClientDP(dsettings)
        ddp.load_state_dict(saved)
        return ddp
    if saved is not None:
        settings = ClientDPSettings.from_record(saved["settings"])
        if limits:
            limits += [settings.target_epsilon] if settings.target_epsilon else []
            settings = dataclasses.replace(settings, max_epsilon=min(limits))
        dp = ClientLevelDP(settings, update_keys)
        dp.load_state_dict(saved)
        return dp
    return ClientLevelDP(resolve_client_dp(cfg, connected), update_keys)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    config_record: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) ``cfg.rounds`` rounds and return the metrics rows of this run directory."""
    progress = progress or Progress(cfg.rounds)
    rundir = RunDirectory.open(run_dir, config_record or {"run": cfg.to_mapping()}, resume=resume)
    server = ServerModel(cfg)
    saved = rundir.load_state()
    if saved is None:
        adapter = server.initial_adapter()
        start = 1
    else:
        state, adapter = saved
        start = int(state["round"]) + 1
        rundir.truncate_metrics(int(state["round"]))
        log.info("resuming %s after round %d", run_dir, start - 1)
    spec = AdapterSpec.of(adapter)
    # FFA-LoRA (Sun et al. 2024): A stays at the shared initialisation; only B is trained and sent.
    trainable = tuple(k for k in spec.names if ".lora_B." in k) if cfg.ffa_lora else ()

    nodes = wait_for_nodes(grid, cfg.min_clients, cfg.node_wait_timeout)
    dp = _client_dp(
        cfg, len(nodes), trainable or spec.names, saved[0] if saved else None, spec.numel
    )
    secure = None
    if cfg.secagg:  # README "Secure aggregation": the coordinator sees only the sum
        from coordinator.secagg_round import SecureAggregation

        ddp = dp.settings.mechanism() if isinstance(dp, DistributedClientDP) else None
        secure = SecureAggregation(cfg, ddp)
    if isinstance(dp, DistributedClientDP):
        rundir.update_config("privacy", dp.settings.to_record())
        log.info(
            "distributed DP (Skellam noise added by the clients): noise multiplier %.4g, clip "
            "norm %.4g, %d per round of %d, delta %g (rdp)",
            dp.settings.noise_multiplier,
            dp.settings.clip_norm,
            dp.settings.cohort,
            dp.settings.population,
            dp.settings.delta,
        )
    elif dp is not None:
        rundir.update_config("privacy", dp.settings.to_record())
        log.info(
            "client-level DP: noise multiplier %.4g, clip norm %.4g, q = %d/%d, delta %g (%s)",
            dp.settings.noise_multiplier,
            dp.clip_norm,
            cfg.clients_per_round,
            dp.settings.population,
            dp.settings.delta,
            dp.settings.accountant.value,
        )

    def privacy_state() -> dict[str, Any]:
        return {"privacy": dp.state_dict()} if dp is not None else {}

    def privacy_row() -> dict[str, Any]:
        if dp is None:
            return {}
        row = {"epsilon": dp.epsilon(), "delta": dp.settings.delta}
        if isinstance(dp, DistributedClientDP):  # against the coordinator: no amplification
            row["epsilon_unamplified"] = dp.epsilon_unamplified()
        return row

    eval_nodes = (
        nodes if cfg.eval_clients == 0 else sample_nodes(nodes, cfg.eval_clients, cfg.seed, 0)
    )
    log.info(
        "%d client node(s); %d per round, %d evaluating; adapter %d tensors, %d parameters",
        len(nodes),
        min(cfg.clients_per_round, len(nodes)),
        len(eval_nodes),
        len(spec.tensors),
        spec.numel,
    )

    def evaluate_all(rnd: int) -> tuple[dict[str, Any], int, int]:
        live = set(grid.get_node_ids())
        row, down, up = federated_evaluate(
            grid, cfg, [n for n in eval_nodes if n in live], adapter, rnd, progress
        )
        central = server.central_eval(adapter)
        row["central_eval_loss"] = central.loss if central else None
        return row, down, up

    if start == 1:
        t0 = time.monotonic()
        row, down, up = evaluate_all(0)
        rundir.save_round(0, functools.partial(server.write_peft, adapter), privacy_state())
        rundir.append_metrics(
            {
                "round": 0,
                "train_loss": None,
                **row,
                "clients_sampled": 0,
                "clients_ok": 0,
                "bytes_down": down,
                "bytes_up": up,
                "seconds": time.monotonic() - t0,
                **privacy_row(),
            }
        )
        progress.round_done(rundir.read_metrics()[-1])

    for rnd in range(start, cfg.rounds + 1):
        live = live_nodes(grid, cfg.min_clients, cfg.node_wait_timeout)
        if secure is not None:  # misbehaving clients are not sampled again
            live = [n for n in live if n not in secure.excluded]
        if isinstance(dp, DistributedClientDP):
            dp.pool = len(live)  # the next cohort is drawn from these
        if dp is not None and not dp.budget_allows_next_round():
            reason = (
                f"round {rnd} would take epsilon from {dp.epsilon():.4g} to "
                f"{dp.epsilon_after_next_round():.4g}, past the limit {dp.settings.max_epsilon:g}"
            )
            log.warning("stopping: %s", reason)
            rundir.mark_stopped(reason)
            break
        t0 = time.monotonic()
        if len(live) < cfg.min_clients:
            new, train_metrics, down, up = None, _not_enough_nodes(cfg, len(live)), 0, 0
        elif isinstance(dp, ClientLevelDP):
            sampled = dp.sample(live)
            new, train_metrics, down, up = train_round(
                grid,
                cfg,
                sampled,
                adapter,
                spec,
                rnd,
                progress,
                aggregate=dp,
                trainable_keys=trainable,
                min_clients=0,  # skipping a round would reveal how many clients took part
            )
        elif secure is not None and isinstance(dp, DistributedClientDP):
            # Distributed DP: a uniform cohort from a secret generator (the accountant's
            # sampling); the round's release (noise of the actual contributors) goes to the ledger.
            sampled = dp.sample(live)
            released = len(secure.releases)
            new, train_metrics, down, up = secure.train_round(
                grid, sampled, adapter, spec, rnd, progress, population=len(live)
            )
            for release in secure.releases[released:]:
                dp.record(release)
        elif secure is not None:
            sampled = sample_nodes(live, cfg.clients_per_round, cfg.seed, rnd)
            new, train_metrics, down, up = secure.train_round(
                grid, sampled, adapter, spec, rnd, progress
            )
        else:
            sampled = sample_nodes(live, cfg.clients_per_round, cfg.seed, rnd)
            new, train_metrics, down, up = train_round(
                grid, cfg, sampled, adapter, spec, rnd, progress, trainable_keys=trainable
            )
        if new is not None:
            adapter = new
        else:
            log.error(
                "round %d failed: %s; the global adapter is unchanged", rnd, train_metrics["reason"]
            )
        eval_row, edown, eup = evaluate_all(rnd)
        rundir.save_round(rnd, functools.partial(server.write_peft, adapter), privacy_state())
        row = {
            "round": rnd,
            **train_metrics,
            **eval_row,
            "bytes_down": down + edown,
            "bytes_up": up + eup,
            "seconds": time.monotonic() - t0,
            **privacy_row(),
        }
        rundir.append_metrics(row)
        rundir.plot()
        progress.round_done(row)
        if new is None and cfg.on_round_failure == "stop":
            raise FederationError(
                f"round {rnd} failed: {train_metrics['reason']}; stopping the run "
                "(on-round-failure is 'stop')"
            )
    rundir.plot()
    return rundir.read_metrics()


def _not_enough_nodes(cfg: RunConfig, connected: int) -> dict[str, Any]:
    """Metrics of a round that could not start: too few nodes connected."""
    return {
        "clients_sampled": 0,
        "clients_ok": 0,
        "failures": [],
        "num_examples": 0,
        "train_loss": None,
        "client_seconds_max": None,
        "train_phase_seconds": 0.0,
        "client_seconds": 0.0,
        "client_load_seconds": 0.0,
        "client_train_seconds": 0.0,
        "client_peak_rss_mb_max": None,
        "status": "failed",
        "reason": (
            f"only {connected} client node(s) connected after waiting "
            f"{cfg.node_wait_timeout:g}s; min-clients is {cfg.min_clients}"
        ),
    }
