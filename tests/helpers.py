"""Helpers the integration tests share: running the real CLI (``python -m cli.main``), reading a
run's metrics rows, and setting up a loopback deployment (device keys, shards, the commands that
start a coordinator and a device)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Seconds per phase of a loopback deployment: far above a busy machine's client start-up (a fresh
# process per message), hang guards rather than speed targets.
START_TIMEOUT = 600.0
RUN_TIMEOUT = 1800.0


def fedtune_cmd(*args: str) -> list[str]:
    """The command line of ``fedtune ARGS`` in this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def fedtune(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess[str]:
    """Run ``fedtune ARGS`` to its end (``timeout``: a hang guard), output captured."""
    return subprocess.run(fedtune_cmd(*args), capture_output=True, text=True, timeout=timeout)


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, round 0 first."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_shards(out: Path, n: int) -> list[Path]:
    """``n`` disjoint shards of 60 chatterbot rows each (``out/shard-I.jsonl``), fixed seed."""
    from client.data import load_records

    rows = load_records("builtin:chatterbot")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(rows))
    paths = []
    for i in range(n):
        path = out / f"shard-{i}.jsonl"
        with path.open("w") as fh:
            for j in idx[i * 60 : (i + 1) * 60]:
                fh.write(json.dumps(rows[int(j)]) + "\n")
        paths.append(path)
    return paths


def device_keys(root: Path, devices: list[str], registered: list[str]) -> tuple[Path, Path]:
    """``fedtune keys`` for ``devices`` into ``root/keys``, and ``root/authorized`` holding the
    public keys of ``registered`` only. Returns (keys dir, authorized-keys dir)."""
    keys = root / "keys"
    res = subprocess.run(
        fedtune_cmd("keys", "--out", str(keys), *[a for d in devices for a in ("--device", d)]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    authorized = root / "authorized"
    authorized.mkdir()
    for d in registered:
        (authorized / f"{d}.pub").write_bytes((keys / "nodes" / f"{d}.pub").read_bytes())
    return keys, authorized


def coordinator_args(
    keys: Path, authorized: Path, fleet: str, control: str, state: Path
) -> list[str]:
    """``fedtune coordinator start`` arguments: TLS and node auth from ``device_keys``."""
    return [
        "coordinator", "start", "--keys", str(keys), "--authorized-keys", str(authorized),
        "--fleet-address", fleet, "--control-address", control, "--state-dir", str(state),
    ]  # fmt: skip


def client_args(
    name: str, fleet: str, keys: Path, shard: Path, cache: Path, state: Path
) -> list[str]:
    """``fedtune client start`` arguments of device ``name`` (its key from ``device_keys``),
    one thread, its state in ``state``."""
    return [
        "client", "start", "--coordinator", fleet,
        "--root-cert", str(keys / "ca.pem"), "--key", str(keys / "nodes" / f"{name}.key"),
        "--data", str(shard), "--cache-dir", str(cache), "--state-dir", str(state),
        "--threads", "1", "--max-wait", "120",
    ]  # fmt: skip


def lora_model_with_random_adapter(
    model_dir: Path, cache: Path, quant: Any, lora: Any, compute: Any = None
) -> Any:
    """(base, PEFT model in train mode) with LoRA ``lora`` set to seeded random values: B starts
    at zero, which would leave every A gradient zero. ``compute``: ``load_base``'s (fp32)."""
    from client.model import (
        ComputeDtype,
        attach_lora,
        get_adapter,
        load_base,
        resolve_model,
        set_adapter,
    )

    base = load_base(
        resolve_model(str(model_dir)), quant, cache, compute=compute or ComputeDtype.FP32
    )
    model = attach_lora(base.model, lora, seed=2)
    rng = np.random.default_rng(0)
    set_adapter(
        model,
        {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in get_adapter(model).items()},
    )
    model.train()
    return base, model
