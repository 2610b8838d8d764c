"""Device-local client settings: which base model, how it is quantized, where data and caches live.

These never travel on the wire. They are resolved, most specific first, from the node's
``node_config`` (``flower-supernode --node-config``), the run's ``run_config``, and defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.defaults import (
    DEFAULT_MODEL,
    ComputeDtype,
    Quantization,
    default_cache_dir,
    parse_size,
)
from client.profiles import client_profile
from client.shards import RECORDS, is_indexed


@dataclass(frozen=True)
class ClientSettings:
    model: str = DEFAULT_MODEL
    quantization: Quantization = Quantization.NF4
    compute_dtype: ComputeDtype = ComputeDtype.AUTO
    data_path: str = ""
    cache_dir: Path = Path()
    heldout_fraction: float = 0.1
    threads: int = 0  # 0: torch's default
    device: str = "auto"
    # Client state that must survive restarts (privacy accountant, ...). Never in memory only.
    state_dir: Path = Path()
    # Memory budget for this client's process, bytes (0: none): training plans to stay within
    # it and refuses a round that cannot (client.memory).
    max_memory: int = 0
    # May the plan fall back to a smaller quantization (none -> int8 -> nf4) to fit max-memory?
    quantize_to_fit: bool = False
    # A simulated client: its shard of the indexed data file ``data_path`` (client.shards);
    # -1: every row of ``data_path`` is this client's.
    shard: int = -1
    # Tokenized client datasets a process keeps (least recently used dropped first).
    data_cache: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout-fraction: must be in [0, 1), got {self.heldout_fraction}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0, got {self.threads}")
        if self.data_cache < 1:
            raise ValueError(f"client-data-cache: must be >= 1, got {self.data_cache}")
        if self.max_memory < 0:
            raise ValueError(f"max-memory: must be >= 0 bytes, got {self.max_memory}")
        if not self.data_path:
            raise ValueError(
                "data-path: no data configured for this client (set node config 'data-path', "
                "or run through `fedtune simulate`)"
            )

    @classmethod
    def resolve(
        cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> ClientSettings:
        merged = {**run_config, **node_config}

        def get(key: str, default: Any) -> Any:
            value = merged.get(key, default)
            return default if value == "" else value

        data_path = str(get("data-path", ""))
        state_dir = str(get("state-dir", ""))
        quantization = str(get("quantization", Quantization.NF4.value))
        if (
            "partition-id" in node_config
            and get("client-quantization", "")
            and ("quantization" not in node_config)
        ):
            # A simulated mixed fleet: modes assigned to clients round-robin.
            modes = [m.strip() for m in str(get("client-quantization", "")).split(",")]
            quantization = modes[int(node_config["partition-id"]) % len(modes)]
        shard = -1
        if "partition-id" in node_config and get("partition-dir", ""):
            # A simulated client: its shard and its state live in the run directory.
            pid = int(node_config["partition-id"])
            part_dir = Path(get("partition-dir", ""))
            if not data_path and is_indexed(part_dir):  # one data file and an index
                data_path, shard = str(part_dir / RECORDS), pid
            data_path = data_path or str(partition_file(part_dir, pid))  # one file per client
            state_dir = state_dir or str(part_dir.parent / "client-state" / f"{pid:04d}")
        max_memory = get("max-memory", 0)
        if "partition-id" in node_config and "max-memory" not in node_config:
            # A simulated device profile: budgets assigned to clients round-robin.
            budgets = [b.strip() for b in str(get("client-max-memory", "")).split(",") if b.strip()]
            if budgets:
                max_memory = budgets[int(node_config["partition-id"]) % len(budgets)]
        profiles = str(get("device-profiles", ""))
        if "partition-id" in node_config and profiles:
            # A simulated device of the fleet's profiles (client/profiles.py): its quantization
            # and memory budget, unless the node config sets them.
            profile = client_profile(
                profiles,
                int(node_config["num-partitions"]),
                int(get("seed", 0)),
                int(node_config["partition-id"]),
            )
            if profile.quantization is not None and "quantization" not in node_config:
                quantization = profile.quantization.value
            if profile.memory and "max-memory" not in node_config:
                max_memory = profile.memory
        cache = get("cache-dir", "")
        budget = parse_size(max_memory, "max-memory")
        compute_dtype = ComputeDtype.parse(
            str(get("compute-dtype", ComputeDtype.AUTO.value)), field="compute-dtype"
        )
        if budget and compute_dtype is ComputeDtype.AUTO:
            # With the lean allocator and a quantized base, bf16 peaked higher than fp32 (README,
            # "Mixed precision"), while the planner counts activations in fp32 either way: a
            # budgeted device keeps fp32 unless told otherwise.
            compute_dtype = ComputeDtype.FP32
        return cls(
            model=str(get("model", DEFAULT_MODEL)),
            quantization=Quantization.parse(quantization),
            compute_dtype=compute_dtype,
            data_path=data_path,
            cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
            heldout_fraction=float(get("heldout-fraction", 0.1)),
            threads=int(get("threads", 0)),
            device=str(get("device", "auto")),
            state_dir=Path(state_dir).expanduser() if state_dir else default_state_dir(),
            max_memory=budget,
            quantize_to_fit=_flag(get("quantize-to-fit", False), "quantize-to-fit"),
            shard=shard,
            data_cache=int(get("client-data-cache", 32)),
        )


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{key}: expected true/false, got {value!r}")


def partition_file(partition_dir: Path, partition_id: int) -> Path:
    """Shard ``partition_id`` of a run made before shards were an index (``client.shards``)."""
    return partition_dir / f"{partition_id:04d}.jsonl"


def default_state_dir() -> Path:
    env = os.environ.get("FEDTUNE_STATE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fedtune"
