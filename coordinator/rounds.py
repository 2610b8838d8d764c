"""The federated round loop, written against Flower's ``Grid`` (simulation and deployment alike).

Why our own loop instead of ``flwr.serverapp.strategy.FedAvg.start``: we need round 0 evaluation
of the untrained base, resume from a saved round (optimizer and privacy state included), rejection
of bad updates with a reason in the round's metrics, bytes on the wire per round, and multi-stage
rounds for secure aggregation. A training round is the pipeline of ``coordinator.pipeline``:
selection -> transport -> privacy -> server optimizer -> round result; this loop composes the
stages once per run and never branches on which ones are in use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.aggregators import (
    DEPLOYMENT_WEIGHT_CAP,
    Bounds,
    default_norm_bound,
    make_accumulator,
)
from coordinator.client_tasks import aggregate_task_counts
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.config import ConfigError, DpMode, RunConfig
from coordinator.ddp import DistributedClientDP, DistributedDpSettings, resolve_distributed_dp
from coordinator.dp import ClientDPSettings, ClientLevelDP, resolve_client_dp
from coordinator.exchange import (
    FederationError,
    broadcast,
    live_nodes,
    sample_nodes,
    wait_for_nodes,
)
from coordinator.fleet import FleetModel
from coordinator.pipeline import (
    NoPrivacy,
    PlainTransport,
    Privacy,
    RoundFailed,
    RoundResult,
    Transport,
    check_finite,
    update_norm,
)
from coordinator.progress import Progress
from coordinator.report import write_run_report
from coordinator.roster import Roster
from coordinator.rundir import RunDirectory
from coordinator.strategies import Strategy
from coordinator.update_wire import RANK_ORDER, UpdateWire, wire_row
from protocol.adapter import AdapterSpec, instruction_keys, trained_tensors
from protocol.codecs import CompressionConfig
from protocol.errors import ProtocolError, UpdateRejected
from protocol.messages import EvalResult, decode_eval_result, encode_eval_instruction
from protocol.task_eval import EvalTaskSpec, TaskCounts, decode_task_counts, encode_eval_task

log = logging.getLogger("fedtune")

Arrays = dict[str, np.ndarray]

__all__ = ["FederationError", "ServerModel", "run_federation", "sample_nodes"]


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

    def task_eval(self, adapter: Arrays) -> dict[str, Any]:
        """``task_*`` metrics of ``adapter`` on ``--eval-task`` (accuracy, and the kind's other
        metrics), scored on this model; {} without a task. The task is read on the first call."""
        if not self.cfg.eval_task:
            return {}
        from client.model import set_adapter
        from client.tasks import TaskKind, evaluate_task, load_task

        t0 = time.monotonic()
        if getattr(self, "task", None) is None:
            self.task = load_task(self.cfg.eval_task, self.cfg.task_spec())
        set_adapter(self.model, adapter)
        result = evaluate_task(self.model, self.base.tokenizer, self.task)
        row: dict[str, Any] = {f"task_{k}": v for k, v in result.metrics.items()}
        if result.kind is TaskKind.LABEL:
            row["task_per_class_recall"] = result.per_class_recall
        row["task_eval_seconds"] = time.monotonic() - t0
        return row

    def client_task(self) -> EvalTaskSpec | None:
        """What ``--eval-task-clients`` asks clients to score (None without it). A label task
        without ``--eval-task-labels`` takes the label set of ``--eval-task``'s file."""
        if not self.cfg.eval_task_clients:
            return None
        spec = self.cfg.task_spec()
        labels = ",".join(spec.label_set())
        if spec.kind.value == "label" and not labels:
            from client.tasks import load_task

            if getattr(self, "task", None) is None:
                self.task = load_task(self.cfg.eval_task, spec)
            labels = ",".join(self.task.classes)
        try:
            return EvalTaskSpec(
                kind=spec.kind.value,
                columns=spec.columns,
                labels=labels,
                template=spec.template,
                limit=spec.limit,
                seed=spec.seed,
                max_new_tokens=spec.max_new_tokens,
            )
        except ProtocolError as exc:
            raise ConfigError(f"eval-task-clients: {exc}") from exc

    def write_peft(self, adapter: Arrays, directory: Path) -> None:
        from client.model import set_adapter

        set_adapter(self.model, adapter)
        self.model.save_pretrained(str(directory))
        self.base.tokenizer.save_pretrained(str(directory))


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


def federated_evaluate(
    grid: Grid,
    cfg: RunConfig,
    nodes: Sequence[int],
    adapter: Arrays,
    rnd: int,
    progress: Progress,
    clock: Clock = SYSTEM_CLOCK,
    task: EvalTaskSpec | None = None,
) -> tuple[dict[str, Any], int, int]:
    """Held-out loss of ``adapter`` on ``nodes``' local splits, weighted by response tokens;
    with ``task`` (--eval-task-clients), also the clients' pooled task metrics."""
    if not nodes:
        return {"eval_loss": None, "eval_clients_ok": 0, "eval_failures": []}, 0, 0
    down = CompressionConfig(cfg.compress_down, block_size=cfg.compress_block_size).build()
    content = encode_eval_instruction(  # --compress-down: the adapter evaluated is the decoded one
        cfg.eval_instruction(rnd), adapter, down=down, rng=np.random.default_rng([0xE0, rnd])
    )
    if task is not None:
        encode_eval_task(content, task)
    ex = broadcast(
        grid, nodes, content, MessageType.EVALUATE, rnd, cfg.round_timeout, progress, clock
    )
    n_labels = len(task.label_set()) if task is not None else 0

    def decode(content: RecordDict) -> tuple[EvalResult, TaskCounts | None]:
        result = decode_eval_result(content, rnd=rnd)
        counts = decode_task_counts(content, task.kind, n_labels) if task is not None else None
        return result, counts

    decoded, failures = ex.collect(decode)
    results = [r for r, _ in decoded.values()]
    loss = _weighted([(r.loss, r.num_tokens) for r in results if r.num_tokens > 0])
    task_row: dict[str, Any] = {}
    if task is not None:
        counts = {n: c for n, (_, c) in decoded.items() if c is not None}
        task_row = aggregate_task_counts(task.kind, counts, task.label_set())
        task_row["client_task_eval_seconds"] = sum(
            r.metrics.get("task-eval-seconds", 0.0) for r in results
        )
    return (
        {
            **task_row,
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


# ------------------------------------------------------------------------------ composition


def _privacy(
    cfg: RunConfig,
    connected: int,
    update_keys: Sequence[str],
    saved_state: dict[str, Any] | None,
    numel: int,
) -> Privacy:
    """The privacy stage of this run: none, client-level DP with coordinator noise, or
    distributed DP (client noise under ``--secagg``). A resumed run continues its saved ledger
    with the settings it started with (a changed ``rounds`` does not recalibrate the noise)."""
    if cfg.dp is not DpMode.CLIENT:
        return NoPrivacy(cfg.clients_per_round, cfg.seed)
    # --dp-rng: the cohort (and the coordinator's noise) from (seed, round), or secret
    seeded = cfg.dp_rng == "seeded" or (cfg.dp_rng == "auto" and bool(cfg.partition_dir))
    seed = cfg.seed if seeded else None
    saved = saved_state["privacy"] if saved_state is not None and "privacy" in saved_state else None
    limits = [cfg.max_epsilon] if cfg.max_epsilon > 0 else []  # a resumed run may change it
    if cfg.secagg:
        if saved is None:
            return DistributedClientDP(resolve_distributed_dp(cfg, connected, numel), seed=seed)
        dsettings = DistributedDpSettings.from_record(saved["settings"])
        if limits:
            limits += [dsettings.target_epsilon] if dsettings.target_epsilon else []
            dsettings = dataclasses.replace(dsettings, max_epsilon=min(limits))
        ddp = DistributedClientDP(dsettings, seed=seed)
        ddp.load_state_dict(saved)
        return ddp
    if saved is not None:
        settings = ClientDPSettings.from_record(saved["settings"])
        if limits:
            limits += [settings.target_epsilon] if settings.target_epsilon else []
            settings = dataclasses.replace(settings, max_epsilon=min(limits))
        dp = ClientLevelDP(settings, update_keys, seed=seed)
        dp.load_state_dict(saved)
        return dp
    return ClientLevelDP(resolve_client_dp(cfg, connected), update_keys, seed=seed)


def _transport(cfg: RunConfig, privacy: Privacy, clock: Clock, trained_numel: int) -> Transport:
    if not cfg.secagg:
        bounds = Bounds(
            cfg.max_client_weight or DEPLOYMENT_WEIGHT_CAP,
            cfg.max_update_norm
            or default_norm_bound(cfg.learning_rate, cfg.local_steps, trained_numel)
            * cfg.compression().norm_slack,
        )
        accumulator = make_accumulator(
            cfg.aggregator,
            trim_fraction=cfg.trim_fraction,
            krum_f=cfg.krum_byzantine,
            krum_m=cfg.krum_select,
        )
        return PlainTransport(cfg.round_timeout, clock, bounds=bounds, accumulator=accumulator)
    from coordinator.secagg_round import SecureTransport

    ddp = privacy.settings.mechanism() if isinstance(privacy, DistributedClientDP) else None
    return SecureTransport(cfg, ddp, clock=clock)


def _describe_privacy(privacy: Privacy, cfg: RunConfig) -> None:
    if isinstance(privacy, DistributedClientDP):
        s = privacy.settings
        log.info(
            "distributed DP (Skellam noise added by the clients): noise multiplier %.4g, clip "
            "norm %.4g, %d per round of %d, delta %g (rdp)",
            s.noise_multiplier,
            s.clip_norm,
            s.cohort,
            s.population,
            s.delta,
        )
    elif isinstance(privacy, ClientLevelDP):
        log.info(
            "client-level DP: noise multiplier %.4g, clip norm %.4g, q = %d/%d, delta %g (%s)",
            privacy.settings.noise_multiplier,
            privacy.clip_norm,
            cfg.clients_per_round,
            privacy.settings.population,
            privacy.settings.delta,
            privacy.settings.accountant.value,
        )


@dataclass
class Pipeline:
    """The stages of this run's training rounds (``coordinator.pipeline``)."""

    privacy: Privacy
    transport: Transport
    strategy: Strategy
    trained: AdapterSpec  # the adapter tensors clients train (FFA-LoRA: the B matrices)
    min_clients: int
    wire: UpdateWire | None = None  # codecs and client ranks (coordinator.update_wire)
    fleet: FleetModel | None = None  # simulated devices (coordinator/fleet.py)

    def train(
        self,
        grid: Grid,
        cfg: RunConfig,
        live: Sequence[int],
        adapter: Arrays,
        rnd: int,
        progress: Progress,
    ) -> tuple[Arrays | None, RoundResult]:
        """One round over ``live`` (the clients reachable this round): (next global adapter or
        None if the round failed, its result)."""
        sampled = self.privacy.sample(live, rnd)
        instr = dataclasses.replace(
            cfg.train_instruction(rnd), trainable_keys=instruction_keys(self.trained, adapter)
        )
        expected = self.strategy.update_spec(self.trained)
        rw = wire = None
        if self.wire is not None:
            rw = self.wire.for_round(rnd, sampled, instr, adapter, self.strategy, self.trained)
        if rw is not None and self.wire is not None and self.wire.active:
            wire = rw  # per-node content, the codec, client ranks
            expected, content = rw.expected, RecordDict()
        else:
            content = self.strategy.train_content(instr, adapter, self.trained)
        c = self.transport.collect(
            grid, sampled, content, expected, rnd, progress, self.privacy.prepare, wire=wire
        )
        if rw is not None:
            c.extra.update(wire_row(rw, c))  # bytes against fp32, ranks
        fleet_metrics = self.fleet.round_metrics(rnd, c) if self.fleet is not None else {}
        for f in c.failures:
            log.warning(
                "round %d: client %s dropped: %s", rnd, progress.name(f["node"]), f["reason"]
            )
        if c.error is None and len(c.contributors) < self.min_clients:
            c.error = f"{len(c.contributors)} usable update(s), min-clients is {self.min_clients}"
        if c.error is not None:
            failed = RoundResult.from_contribution(c, "failed", c.error)
            failed.extra.update(fleet_metrics)
            return None, failed
        try:
            mean, privacy_metrics = self.privacy.release(c)
            if wire is not None:
                mean = wire.finish(mean)  # per rank component over its holders
            check_finite(mean, "the released mean update")
            new = self.strategy.apply(adapter, mean)
            check_finite(new, "the next global adapter")
        except (RoundFailed, UpdateRejected) as exc:
            failed = RoundResult.from_contribution(c, "failed", str(exc))
            failed.extra.update(fleet_metrics)
            return None, failed
        result = RoundResult.from_contribution(c, "ok", None)
        result.extra.update(privacy_metrics)
        result.extra.update(fleet_metrics)
        result.update_norm = update_norm(adapter, new)
        return new, result


def reachable(fleet: FleetModel | None, nodes: Sequence[int], rnd: int) -> tuple[list[int], int]:
    """The nodes of ``nodes`` reachable in round ``rnd`` (all without a simulated fleet), and
    how many were left out."""
    if fleet is None:
        return list(nodes), 0
    up = fleet.available(nodes, rnd)
    return up, len(nodes) - len(up)


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    config_record: dict[str, Any] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    node_names: Callable[[Iterable[int]], Mapping[int, str]] | None = None,
    fleet: FleetModel | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) ``cfg.rounds`` rounds and return the metrics rows of this run directory.
    ``node_names`` gives clients' names where the caller knows them (the simulator); other
    nodes are asked (``coordinator.roster``)."""
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
    trained = trained_tensors(spec, cfg.ffa_lora)

    nodes = wait_for_nodes(grid, cfg.min_clients, cfg.node_wait_timeout, clock=clock)
    wire = UpdateWire(cfg, fleet.rank if fleet is not None else None)  # profile ranks
    numel = wire.masked_numel(trained) if cfg.secagg else spec.numel  # a sketch is shorter
    privacy = _privacy(cfg, len(nodes), trained.names, saved[0] if saved else None, numel)
    strategy = Strategy.create(
        cfg.strategy_settings(), cfg.population or len(nodes), cfg.clients_per_round
    )
    if saved is not None:
        strategy.load_state_arrays(rundir.load_server_arrays(int(saved[0]["round"])))
    transport = _transport(cfg, privacy, clock, trained.numel)
    # The settings are checked: ask the nodes their names. Clients go by these stable names
    # (coordinator/roster.py) in sampling, rank assignment, metrics and progress.
    roster = Roster(cfg.round_timeout, clock, known=node_names)
    roster.learn(grid, nodes)
    progress.set_names(roster.names)
    nodes = roster.ordered(nodes)
    if saved is not None:  # a resumed run keeps each client's place in the rank order
        wire.load_order(saved[0].get(RANK_ORDER, {}), roster.node_named)
    wire.assign(nodes)  # client ranks round-robin over the clients, by name
    if saved is not None and "secagg" in saved[0] and hasattr(transport, "load_state_dict"):
        transport.load_state_dict(saved[0]["secagg"], roster.node_named)
    pipeline = Pipeline(
        privacy,
        transport,
        strategy,
        trained,
        0 if privacy.releases_every_round else cfg.min_clients,
        wire,
        fleet,
    )
    if not isinstance(privacy, NoPrivacy):
        rundir.update_config("privacy", privacy.settings.to_record())  # type: ignore[attr-defined]
    rundir.update_config("strategy", strategy.record())
    _describe_privacy(privacy, cfg)

    eval_nodes = (
        nodes if cfg.eval_clients == 0 else sample_nodes(nodes, cfg.eval_clients, cfg.seed, 0)
    )
    eval_names = {roster.name(n) for n in eval_nodes}  # a fixed set of clients, by name
    log.info(
        "%d client node(s); %d per round, %d evaluating; adapter %d tensors, %d parameters; "
        "strategy %s",
        len(nodes),
        min(cfg.clients_per_round, len(nodes)),
        len(eval_nodes),
        len(spec.tensors),
        spec.numel,
        cfg.strategy,
    )

    client_task = server.client_task()  # --eval-task-clients

    def evaluate_all(rnd: int) -> tuple[dict[str, Any], int, int]:
        live = list(grid.get_node_ids())
        roster.learn(grid, live)
        # Of the fixed set, only the devices up this round evaluate.
        evaluating, unavailable = reachable(fleet, roster.nodes_named(eval_names, live), rnd)
        row, down, up = federated_evaluate(
            grid, cfg, evaluating, adapter, rnd, progress, clock, task=client_task
        )
        if fleet is not None:
            row["eval_clients_unavailable"] = unavailable
        central = server.central_eval(adapter)
        row["central_eval_loss"] = central.loss if central else None
        row.update(server.task_eval(adapter))  # task_accuracy, ... with --eval-task
        return row, down, up

    def save(rnd: int, row: dict[str, Any]) -> None:
        """Round ``rnd``'s adapter, optimizer, privacy and secure-aggregation state and its
        metrics row (clients by name), saved all or nothing (``RunDirectory.save_round``)."""
        state: dict[str, Any] = {}
        if not isinstance(privacy, NoPrivacy):
            state["privacy"] = privacy.state_dict()
        if hasattr(pipeline.transport, "state_dict"):
            state["secagg"] = pipeline.transport.state_dict(roster.name)
        if wire.ranks:  # each client's place in the rank order, for a resumed run
            state[RANK_ORDER] = wire.order_record(roster.name)
        rundir.save_round(
            rnd,
            functools.partial(server.write_peft, adapter),
            state,
            strategy.state_arrays(),
            row=roster.label_row(row),
        )

    if start == 1:
        t0 = clock.now()
        row, down, up = evaluate_all(0)
        save(
            0,
            {
                "round": 0,
                "train_loss": None,
                **row,
                "clients_sampled": 0,
                "clients_ok": 0,
                "bytes_down": down,
                "bytes_up": up,
                "seconds": clock.now() - t0,
                **privacy.row(),
            },
        )
        progress.round_done(rundir.read_metrics()[-1])

    for rnd in range(start, cfg.rounds + 1):
        live = live_nodes(grid, cfg.min_clients, cfg.node_wait_timeout, clock=clock)
        roster.learn(grid, live)
        progress.set_names(roster.names)
        live = roster.ordered(n for n in live if n not in pipeline.transport.excluded)
        live, unavailable = reachable(fleet, live, rnd)  # devices down are not sampled
        # The pool the cohort is drawn from: distributed DP accounts with its size.
        stop = privacy.stop_reason(len(live), rnd)
        if stop is not None:
            log.warning("stopping: %s", stop)
            rundir.mark_stopped(stop)
            break
        t0 = clock.now()
        if len(live) < cfg.min_clients:
            new, result = (
                None,
                RoundResult.not_started(
                    f"only {len(live)} client node(s) connected"
                    f"{' and available' if fleet is not None else ''} after waiting "
                    f"{cfg.node_wait_timeout:g}s; min-clients is {cfg.min_clients}"
                ),
            )
        else:
            new, result = pipeline.train(grid, cfg, live, adapter, rnd, progress)
        if fleet is not None:
            result.extra["clients_unavailable"] = unavailable
        if new is not None:
            adapter = new
        else:
            log.error("round %d failed: %s; the global adapter is unchanged", rnd, result.reason)
        eval_row, edown, eup = evaluate_all(rnd)
        row = {
            "round": rnd,
            **result.to_row(),
            **eval_row,
            "bytes_down": result.bytes_down + edown,
            "bytes_up": result.bytes_up + eup,
            "seconds": clock.now() - t0,
            **privacy.row(),
        }
        save(rnd, row)
        rundir.plot()
        progress.round_done(row)
        if new is None and cfg.on_round_failure == "stop":
            raise FederationError(
                f"round {rnd} failed: {result.reason}; stopping the run "
                "(on-round-failure is 'stop')"
            )
    rundir.plot()
    write_run_report(run_dir)  # PNG plots and report.html (coordinator/report.py)
    return rundir.read_metrics()
