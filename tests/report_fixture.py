"""A synthetic run directory with every kind of row the report draws: losses, task metrics,
client-level DP, bytes, phase timings, sampled clients, failures and a failed round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NODES = [101, 2**63 + 5, 303]


def rows() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"round": 0, "train_loss": None, "eval_loss": 3.0, "central_eval_loss": 3.1,
         "eval_clients_ok": 3, "eval_phase_seconds": 4.0, "client_eval_seconds": 3.0,
         "task_accuracy": 0.25, "task_macro_f1": 0.2, "task_majority_baseline": 0.4,
         "task_chance_baseline": 0.125, "task_eval_seconds": 1.0,
         "task_per_class_recall": {"a": 0.5, "b": None},
         "clients_sampled": 0, "clients_ok": 0, "bytes_down": 3_000_000, "bytes_up": 1000,
         "seconds": 5.5, "epsilon": 0.0, "delta": 1e-5},
    ]  # fmt: skip
    for rnd in (1, 2, 3):
        failed = rnd == 2
        out.append(
            {
                "round": rnd,
                "clients": NODES[:2] if rnd != 3 else NODES,
                "clients_sampled": 2 if rnd != 3 else 3,
                "clients_ok": 0 if failed else 2,
                "failures": (
                    [
                        {"node": NODES[0], "reason": "CUDA out of memory"},
                        {"node": NODES[1], "reason": "no reply within 900s"},
                    ]
                    if failed
                    else []
                ),
                "eval_failures": [{"node": NODES[2], "reason": "no held-out rows"}]
                if rnd == 3
                else [],
                "status": "failed" if failed else "ok",
                "reason": "0 usable update(s), min-clients is 2" if failed else None,
                "train_loss": 2.5 - 0.3 * rnd,
                "eval_loss": 2.9 - 0.2 * rnd,
                "central_eval_loss": 3.0 - 0.2 * rnd,
                "task_accuracy": 0.25 + 0.1 * rnd,
                "task_macro_f1": 0.2 + 0.1 * rnd,
                "task_majority_baseline": 0.4,
                "task_chance_baseline": 0.125,
                "task_eval_seconds": 1.0,
                "train_phase_seconds": 10.0,
                "client_seconds": 8.0,
                "client_seconds_max": 4.5,
                "eval_phase_seconds": 4.0,
                "client_eval_seconds": 3.0,
                "eval_clients_ok": 3,
                "bytes_down": 6_000_000,
                "bytes_up": 2_000_000,
                "seconds": 16.0,
                "epsilon": 0.5 * rnd,
                "delta": 1e-5,
            }
        )
    return out


def write_run(path: Path, *, node_names: bool = True, simulated: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"run": {"rounds": 3, "dp": "client", "model": "tiny"}}
    if simulated:
        config["simulation"] = {"num_clients": 3, "cpus_per_client": 0.0}
    if node_names:
        config["node_names"] = {str(n): f"device-{i}" for i, n in enumerate(NODES)}
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    (path / "state.json").write_text(json.dumps({"round": 3}))
    return path
