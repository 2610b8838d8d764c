"""``fedtune simulate``: a whole fleet on one machine, on Flower's simulation engine (Ray).

The simulator adds only what deployment does not have: it splits one dataset into client shards
(an index into one copy of the data in ``<run>/partitions/``, ``client.shards``: a client
costs nothing before it is sampled), prepares the model cache once before clients start, and
starts the same ServerApp and ClientApp that deployments use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from client.data import BUILTIN_PREFIX, DataError, load_records, to_conversations
from client.model import (
    Quantization,
    check_lora_targets,
    check_model_file,
    default_cache_dir,
    ensure_base,
    prepare,
    resolve_model,
    weight_module_names,
)
from client.profiles import DeviceProfile, Fleet, load_profiles
from client.shards import write_index
from coordinator.config import ConfigError, DpMode, RunConfig, resolve_output_dir
from coordinator.ddp import check_population, resolve_distributed_dp
from coordinator.dp import resolve_client_dp
from coordinator.progress import Progress
from coordinator.rundir import (
    RunDirError,
    check_new_output_dir,
    check_resume_config,
    read_config,
    removed_on_failure,
    write_json_atomic,
)
from protocol.messages import LoraSpec
from simulations.engine import fleet_engine
from simulations.fleet import DeviceFleet
from simulations.partition import PartitionSpec, partition
from simulations.ray_local import local_ray, resolve_ray_address
from simulations.resources import WorkerResources, worker_resources

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
    resume: bool = False

    def __post_init__(self) -> None:
        PartitionSpec.parse(self.partition)
        if self.num_clients is not None and self.num_clients < 1:
            raise ConfigError(f"num-clients: must be >= 1, got {self.num_clients}")


def resume_settings(
    run_dir: Path, data: str | None, partition_spec: str | None, num_clients: int | None
) -> tuple[str, str, int]:
    """The data, partition and client count of the run in ``run_dir`` (for ``--resume``, which
    reuses its shards): a value given again must match the saved one, a value not given is
    taken from the run. Raises ``RunDirError`` for a directory holding no simulated run."""
    saved = read_config(run_dir).get("simulation")
    if not isinstance(saved, dict) or not {"data", "partition", "num_clients"} <= set(saved):
        raise RunDirError(f"--resume: {run_dir} is not a run of fedtune simulate")

    was_data, was_partition, was_clients = (
        str(saved["data"]),
        str(saved["partition"]),
        int(saved["num_clients"]),
    )

    def refuse(flag: str, was: object, given: object) -> ConfigError:
        return ConfigError(
            f"{flag}: the run in {run_dir} was split with {was!r}, not {given!r}; --resume "
            "reuses its client shards (leave the option out or repeat it)"
        )

    if data is not None and data != was_data:
        if data.startswith(BUILTIN_PREFIX) or was_data.startswith(BUILTIN_PREFIX):
            raise refuse("data", was_data, data)
        if Path(data).expanduser().resolve() != Path(was_data).expanduser().resolve():
            raise refuse("data", was_data, data)
    if partition_spec is not None and str(PartitionSpec.parse(partition_spec)) != was_partition:
        raise refuse("partition", was_partition, partition_spec)
    if num_clients is not None and num_clients != was_clients:
        raise refuse("num-clients", was_clients, num_clients)
    return was_data, was_partition, was_clients


def split_data(
    data: str, spec: PartitionSpec, num_clients: int | None, seed: int
) -> tuple[list[dict[str, Any]], list[list[int]], list[dict[str, Any]]]:
    """Read and split ``data`` in memory, checking every row and that no client is empty.
    Returns (records, row indices per client, index of (partition_id, name, rows)). Writes
    nothing."""
    records = load_records(data)
    to_conversations(records, data)  # every row must be usable before any client starts
    names, shards = partition(records, spec, num_clients, seed)
    index = []
    for pid, (name, idx) in enumerate(zip(names, shards, strict=True)):
        if len(idx) == 0:
            raise DataError(f"partition: client {pid} ({name}) received no rows")
        index.append({"partition_id": pid, "name": name, "rows": len(idx)})
    return records, [[int(i) for i in idx] for idx in shards], index


def write_shards(
    records: list[dict[str, Any]],
    shards: list[list[int]],
    index: list[dict[str, Any]],
    out_dir: Path,
) -> None:
    """Write the clients' shards into ``out_dir`` as one data file and an index into it
    (``client.shards``), and ``index.json`` (name and rows of each client)."""
    write_index(records, shards, out_dir)
    write_json_atomic(out_dir / "index.json", index)


def write_partitions(
    data: str, spec: PartitionSpec, num_clients: int | None, seed: int, out_dir: Path
) -> list[dict[str, Any]]:
    """Split ``data`` and write the shards' index. Returns the index (name, rows)."""
    records, shards, index = split_data(data, spec, num_clients, seed)
    write_shards(records, shards, index, out_dir)
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


def _resources(cfg: RunConfig) -> WorkerResources:
    """Resources of each worker (``simulations.resources``) for this machine, or, attached to
    a cluster, for a machine like this one (the cluster may hold more workers)."""
    cpus = os.cpu_count() or 1
    gpus = _cuda_devices()
    if cfg.ray_address and cfg.gpus_per_client and not gpus:
        gpus = 1  # the GPUs are on the cluster's other machines
    try:
        res = worker_resources(cpus, gpus, cfg.cpus_per_client, cfg.gpus_per_client)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if res.workers == 0 and not cfg.ray_address:
        raise ConfigError(
            f"cpus-per-client: {cfg.cpus_per_client:g} is more than this machine's {cpus} cores"
        )
    return res


def _cuda_devices() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _device_profiles(
    sim: SimulationConfig, part_dir: Path
) -> tuple[tuple[DeviceProfile, ...], Path]:
    """The run's device profiles (none without ``--device-profiles``) and where the run keeps
    them. A resumed run uses the copy it saved; a file given again must say the same."""
    saved = part_dir / "profiles.json"
    given = load_profiles(sim.run.device_profiles) if sim.run.device_profiles else ()
    if sim.resume and saved.is_file():
        kept = load_profiles(saved)
        if given and given != kept:
            raise ConfigError(
                f"device-profiles: {sim.run.device_profiles} differs from the profiles the run "
                f"in {part_dir.parent} was started with ({saved}); leave the option out"
            )
        return kept, saved
    if sim.resume and given:
        raise ConfigError(
            f"device-profiles: the run in {part_dir.parent} was started without device profiles"
        )
    return given, saved


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
    """Run the simulation; returns the run directory.

    Every check runs first and writes nothing (README, "What fedtune refuses"); then the model
    cache is built, then the run directory is written and Ray starts. A new run that fails before
    its first saved round leaves no run directory behind.
    """
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from coordinator.server_app import make_server_app

    run_dir = resolve_output_dir(sim.run)
    spec = PartitionSpec.parse(sim.partition)
    part_dir = run_dir / "partitions"
    if sim.resume:
        read_config(run_dir)  # RunDirError unless run_dir holds a run
        if not (part_dir / "index.json").is_file():
            raise RunDirError(
                f"--resume: {run_dir} has no partitions/index.json (it was not made by "
                "fedtune simulate)"
            )
        index = json.loads((part_dir / "index.json").read_text())
        split: tuple[list[dict[str, Any]], list[list[int]]] | None = None
    else:
        check_new_output_dir(run_dir)
        records, shards, index = split_data(sim.data, spec, sim.num_clients, sim.run.seed)
        split = (records, shards)
    n = len(index)
    if sim.run.clients_per_round > n:
        raise ConfigError(f"clients-per-round: {sim.run.clients_per_round} exceeds the {n} clients")
    check_privacy(sim.run, [int(c["rows"]) for c in index], resuming=sim.resume)
    if sim.run.central_eval_data:
        to_conversations(load_records(sim.run.central_eval_data), sim.run.central_eval_data)
    cache = Path(sim.run.cache_dir).expanduser() if sim.run.cache_dir else default_cache_dir()
    source = resolve_model(sim.run.model)
    check_model_file(source)
    resources = _resources(sim.run)
    if sim.run.ray_address:
        resolve_ray_address(sim.run.ray_address, os.environ)  # a one-line error, before Ray
    profiles, profiles_path = _device_profiles(sim, part_dir)

    flat = {
        **sim.run.to_mapping(),
        # Bounded influence: no client of this fleet trains on more rows than the largest shard.
        "max-client-weight": sim.run.max_client_weight or max(int(c["rows"]) for c in index),
        "output-dir": str(run_dir),
        "partition-dir": str(part_dir.resolve()),
        "cache-dir": str(cache),
        "device-profiles": str(profiles_path.resolve()) if profiles else "",
    }
    fleet = Fleet.build(profiles, n, sim.run.seed) if profiles else None
    record = {
        "run": flat,
        "simulation": {
            "data": sim.data,
            "partition": str(spec),
            "num_clients": n,
            "clients": index,
            "cpus_per_client": resources.cpus,
            "gpus_per_client": resources.gpus,
            "workers": resources.workers,
            "ray_address": sim.run.ray_address,
            **({"device_profiles": fleet.counts()} if fleet else {}),
        },
        "versions": _versions(),
    }
    if sim.resume:
        check_resume_config(run_dir, record)

    # The model cache (shared by runs; a failed build leaves no entry behind).
    modes = sim.run.client_quantizations()
    log.info("preparing model %s (%s) in cache %s", source.label, ",".join(modes), cache)
    prepare(source, [Quantization.NONE, sim.run.quantization, *modes], cache)
    base_dir = ensure_base(source, cache)
    check_lora_targets(weight_module_names(base_dir), sim.run.lora)
    if sim.run.dp is DpMode.CLIENT and sim.run.secagg and not sim.resume:
        # Distributed DP calibrates for the adapter size: refuse an unreachable target here,
        # before Ray starts (the coordinator resolves the same settings again).
        resolve_distributed_dp(sim.run, n, lora_numel(base_dir, sim.run.lora))

    progress = progress or Progress(sim.run.rounds)
    # A resumed run keeps its directory whatever happens; a new one is removed again if it fails
    # before its first saved round.
    keep = contextlib.nullcontext() if sim.resume else removed_on_failure(run_dir)
    partition_names = {int(c["partition_id"]): str(c["name"]) for c in index}
    with (
        keep,
        local_ray(os.cpu_count() or 1, address=sim.run.ray_address or None) as ray_args,
        fleet_engine() as nodes,  # node -> partition id (client names, device profiles)
    ):
        if split is not None:
            write_shards(*split, index, part_dir)
        if profiles and not profiles_path.is_file():
            write_json_atomic(profiles_path, {p.name: p.to_record() for p in profiles})
        backend: dict[str, Any] = {
            "client_resources": resources.client_resources(),
            "init_args": {
                **ray_args,
                "include_dashboard": False,
                "logging_level": "info" if verbose else "error",
                # Client-side library chatter stays in Ray's logs unless asked for; client
                # errors still reach the coordinator as error replies with their reason.
                "log_to_driver": verbose,
            },
        }
        log.info(
            "simulating %d clients (%d per round, %d rounds; workers of %g CPU, %g GPU) -> %s",
            n,
            sim.run.clients_per_round,
            sim.run.rounds,
            resources.cpus,
            resources.gpus,
            run_dir,
        )
        device_fleet = (
            DeviceFleet(fleet, nodes, [str(c["name"]) for c in index], lora_rank=sim.run.lora_rank)
            if fleet
            else None
        )
        run_simulation(
            server_app=make_server_app(
                flat,
                resume=sim.resume,
                config_record=record,
                progress=progress,
                node_names=nodes.names(partition_names),
                fleet=device_fleet,
            ),
            # Each worker's torch threads: its share of the cores, not all of them.
            client_app=make_client_app({**flat, "threads": resources.threads}),
            num_supernodes=n,
            backend_config=backend,
        )
        if not (run_dir / "metrics.jsonl").is_file():
            raise RuntimeError(f"simulation ended without writing {run_dir / 'metrics.jsonl'}")
    return run_dir
