"""``fedtune simulate``: a whole fleet on one machine, on Flower's simulation engine (Ray).

The simulator adds only what deployment does not have: it splits one dataset into client shards
(written to ``<run>/partitions/NNNN.jsonl``, so each virtual client reads a file exactly as a
device would), prepares the model cache once before clients start, and starts the same ServerApp
and ClientApp that deployments use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from client.data import DataError, load_records, to_conversations
from client.model import (
    Quantization,
    check_lora_targets,
    default_cache_dir,
    ensure_base,
    prepare,
    resolve_model,
    weight_module_names,
)
from client.settings import partition_file
from coordinator.config import ConfigError, DpMode, RunConfig, resolve_output_dir
from coordinator.ddp import check_population, resolve_distributed_dp
from coordinator.dp import resolve_client_dp
from coordinator.progress import Progress
from coordinator.rundir import write_json_atomic
from protocol.messages import LoraSpec
from simulations.partition import PartitionSpec, partition

log = logging.getLogger("fedtune")

DEFAULT_DATA = "builtin:chatterbot"
DEFAULT_PARTITION = "natural:category"
# In simulation a round's clients share this machine's cores and run one after another, so the
# per-phase timeout must cover all of them; a deployment's default (RunConfig) covers one device.
SIMULATION_ROUND_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True)
class SimulationConfig:
    run: RunConfig
    data: str = DEFAULT_DATA
    partition: str = DEFAULT_PARTITION
    num_clients: int | None = None  # natural partitions infer it
    cpus_per_client: float = 0.0  # 0: all cores, one client at a time
    resume: bool = False

    def __post_init__(self) -> None:
        PartitionSpec.parse(self.partition)
        if self.num_clients is not None and self.num_clients < 1:
            raise ConfigError(f"num-clients: must be >= 1, got {self.num_clients}")
        if self.cpus_per_client < 0:
            raise ConfigError(f"cpus-per-client: must be >= 0, got {self.cpus_per_client}")


def write_partitions(
    data: str, spec: PartitionSpec, num_clients: int | None, seed: int, out_dir: Path
) -> list[dict[str, Any]]:
    """Split ``data`` and write one JSONL file per client. Returns the index (name, rows)."""
    records = load_records(data)
    to_conversations(records, data)  # every row must be usable before any client starts
    names, shards = partition(records, spec, num_clients, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = []
    for pid, (name, idx) in enumerate(zip(names, shards, strict=True)):
        if len(idx) == 0:
            raise DataError(f"partition: client {pid} ({name}) received no rows")
        with partition_file(out_dir, pid).open("w", encoding="utf-8") as fh:
            for i in idx:
                fh.write(json.dumps(records[int(i)], ensure_ascii=False, default=str) + "\n")
        index.append({"partition_id": pid, "name": name, "rows": len(idx)})
    write_json_atomic(out_dir / "index.json", index)
    return index


def check_privacy(cfg: RunConfig, client_rows: list[int], *, resuming: bool = False) -> None:
    """Reject privacy settings that cannot work for this fleet before Ray starts (the server
    checks again with the connected population; a resumed run keeps its saved settings)."""
    if cfg.dp is DpMode.CLIENT and not resuming:
        if cfg.secagg:  # distributed DP: calibration needs the adapter size (on the server)
            check_population(cfg, len(client_rows))
        else:
            resolve_client_dp(cfg, len(client_rows))
    if cfg.dp is DpMode.SAMPLE:
        smallest = min(client_rows)
        if not cfg.delta < 1.0 / smallest:
            raise ConfigError(
                f"delta: {cfg.delta:g} must be below 1/(examples of the smallest client) = "
                f"1/{smallest}"
            )


def lora_numel(base_dir: Path, spec: LoraSpec) -> int:
    """Values in the LoRA adapter of ``spec`` on the checkpoint in ``base_dir`` (headers only):
    r * (in + out) for every weight matrix of a targeted module."""
    from safetensors import safe_open

    total = 0
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as fh:
            for key in fh.keys():  # noqa: SIM118
                module, _, leaf = key.rpartition(".")
                if leaf != "weight" or not any(
                    module == t or module.endswith("." + t) for t in spec.target_modules
                ):
                    continue
                shape = fh.get_slice(key).get_shape()
                if len(shape) == 2:
                    total += spec.rank * (int(shape[0]) + int(shape[1]))
    return total


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "flwr",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "torchao",
        "opacus",
        "dp-accounting",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def simulate(
    sim: SimulationConfig, *, progress: Progress | None = None, verbose: bool = False
) -> Path:
    """Run the simulation; returns the run directory."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from coordinator.server_app import make_server_app

    run_dir = resolve_output_dir(sim.run)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = PartitionSpec.parse(sim.partition)
    part_dir = run_dir / "partitions"
    if sim.resume and (part_dir / "index.json").is_file():
        index = json.loads((part_dir / "index.json").read_text())
    else:
        index = write_partitions(sim.data, spec, sim.num_clients, sim.run.seed, part_dir)
    n = len(index)
    if sim.run.clients_per_round > n:
        raise ConfigError(f"clients-per-round: {sim.run.clients_per_round} exceeds the {n} clients")
    check_privacy(sim.run, [int(c["rows"]) for c in index], resuming=sim.resume)

    cache = Path(sim.run.cache_dir).expanduser() if sim.run.cache_dir else default_cache_dir()
    source = resolve_model(sim.run.model)
    modes = sim.run.client_quantizations()
    log.info("preparing model %s (%s) in cache %s", source.label, ",".join(modes), cache)
    prepare(source, [Quantization.NONE, sim.run.quantization, *modes], cache)
    base_dir = ensure_base(source, cache)
    check_lora_targets(weight_module_names(base_dir), sim.run.lora)
    if sim.run.dp is DpMode.CLIENT and sim.run.secagg and not sim.resume:
        # Distributed DP calibrates for the adapter size: refuse an unreachable target here,
        # before Ray starts (the coordinator resolves the same settings again).
        resolve_distributed_dp(sim.run, n, lora_numel(base_dir, sim.run.lora))

    flat = {
        **sim.run.to_mapping(),
        "output-dir": str(run_dir),
        "partition-dir": str(part_dir.resolve()),
        "cache-dir": str(cache),
    }
    record = {
        "run": flat,
        "simulation": {
            "data": sim.data,
            "partition": str(spec),
            "num_clients": n,
            "clients": index,
            "cpus_per_client": sim.cpus_per_client,
        },
        "versions": _versions(),
    }
    cpus = os.cpu_count() or 1
    per_client = sim.cpus_per_client or cpus
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": "info" if verbose else "error",
            # Client-side library chatter stays in Ray's logs unless asked for; client errors
            # still reach the coordinator as error replies with their reason.
            "log_to_driver": verbose,
        },
    }
    progress = progress or Progress(sim.run.rounds)
    log.info(
        "simulating %d clients (%d per round, %d rounds) -> %s",
        n,
        sim.run.clients_per_round,
        sim.run.rounds,
        run_dir,
    )
    run_simulation(
        server_app=make_server_app(
            flat, resume=sim.resume, config_record=record, progress=progress
        ),
        client_app=make_client_app(flat),
        num_supernodes=n,
        backend_config=backend,
    )
    if not (run_dir / "metrics.jsonl").is_file():
        raise RuntimeError(f"simulation ended without writing {run_dir / 'metrics.jsonl'}")
    return run_dir


def summary(run_dir: Path) -> Mapping[str, Any]:
    rows = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    first, last = rows[0], rows[-1]
    state_file = run_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {
        "epsilon": last.get("epsilon"),
        "delta": last.get("delta"),
        "stopped": state.get("stopped"),
        "rounds": last["round"],
        "eval_loss_round0": first.get("eval_loss"),
        "eval_loss_final": last.get("eval_loss"),
        "central_eval_loss_round0": first.get("central_eval_loss"),
        "central_eval_loss_final": last.get("central_eval_loss"),
        "task_accuracy_round0": first.get("task_accuracy"),
        "task_accuracy_final": last.get("task_accuracy"),
    }
