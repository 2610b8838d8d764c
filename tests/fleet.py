"""A small simulated fleet on the in-process grid: natural partitions of a synthetic data set
(clients named by category: ``ai``, ``law``, ...), each served by the real ClientApp (real
training of the tiny model), under random node ids drawn per run as Flower's simulation does.

Used by the reproducibility and crash-resume tests (issue 13); ``python -m tests.fleet`` runs
one federation in a child process, so that a test can kill it at an exact point."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

from coordinator.config import RunConfig
from coordinator.progress import Progress
from simulations.partition import PartitionSpec
from simulations.runner import write_partitions
from tests.fakegrid import FakeGrid, Handler, random_nodes, run_virtual

CATEGORIES = ("ai", "art", "law", "math", "music", "science", "sport")
# Metrics fields that measure time, memory or bytes on the wire: they may differ between
# otherwise identical runs.
VARIABLE = re.compile(r"seconds|bytes|rss|eta")


def write_data(path: Path) -> Path:
    rows = []
    for c, cat in enumerate(CATEGORIES):
        for i in range(10 + c):
            q = f"{i} plus {c}?"
            rows.append({"instruction": q, "response": f"It is {i + c}.", "category": cat})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_partitions(root: Path) -> Path:
    part_dir = root / "partitions"
    if not (part_dir / "index.json").is_file():
        data = write_data(root / "data.jsonl")
        write_partitions(str(data), PartitionSpec.parse("natural:category"), None, 0, part_dir)
    return part_dir


def config(tiny_model_dir: Path, cache: Path, out: Path, part_dir: Path, **kw: Any) -> RunConfig:
    values = {
        "model": str(tiny_model_dir),
        "quantization": "none",
        "cache-dir": str(cache),
        "output-dir": str(out),
        "partition-dir": str(part_dir),
        "rounds": 4,
        "clients-per-round": 3,
        "min-clients": 2,
        "eval-clients": 3,
        "local-steps": 2,
        "batch-size": 2,
        "eval-batch-size": 4,
        "seq-len": 64,
        "lora-rank": 2,
        "seed": 7,
        "round-timeout": 600.0,
        "node-wait-timeout": 1.0,
        # The automatic bound is for real runs; SCAFFOLD's first steps on the random tiny
        # model pass it, and these tests are about state, not bounds (test_bounds.py).
        "max-update-norm": 100.0,
        **kw,
    }
    return RunConfig.from_mapping(values)


def client_handlers(cfg: RunConfig, part_dir: Path) -> dict[str, Handler]:
    """One real ClientApp per partition, keyed by partition name (what it will report)."""
    from client.app import make_client_app

    app = make_client_app(cfg.to_mapping())
    index = json.loads((part_dir / "index.json").read_text())
    handlers: dict[str, Handler] = {}
    for entry in index:
        pid = int(entry["partition_id"])
        context = Context(
            run_id=1,
            node_id=pid,
            node_config={"partition-id": pid, "num-partitions": len(index)},
            state=RecordDict(),
            run_config={},
        )

        def handle(msg: Message, context: Context = context) -> Message:
            return app(msg, context)

        handlers[str(entry["name"])] = handle
    return handlers


def fleet_grid(cfg: RunConfig, part_dir: Path, node_seed: int) -> FakeGrid:
    """The fleet under node ids drawn from ``node_seed``; every message, the identity query
    included, goes to the real ClientApp."""
    return random_nodes(client_handlers(cfg, part_dir), node_seed)


def run(
    cfg: RunConfig,
    part_dir: Path,
    out: Path,
    node_seed: int,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    grid = fleet_grid(cfg, part_dir, node_seed)
    progress = progress or Progress(cfg.rounds, live=False, quiet=True)
    return run_virtual(grid, cfg, out, resume=resume, progress=progress)


def stable(row: Mapping[str, Any]) -> Any:
    """``row`` without the fields that measure time, memory or bytes (recursively)."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not VARIABLE.search(k)}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(dict(row))


def main() -> None:
    """A federation in this process, killed at an exact point: ``--kill-at STEP:ROUND`` (a
    checkpoint step of ``coordinator.rundir``) or ``--kill-at train:ROUND:N`` (while the N-th
    client of that round trains)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", required=True)
    p.add_argument("--node-seed", type=int, required=True)
    p.add_argument("--kill-at", default="")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--config", default="{}")
    a = p.parse_args()
    cfg = config(Path(a.model), Path(a.cache), Path(a.out), Path(a.parts), **json.loads(a.config))
    grid = fleet_grid(cfg, Path(a.parts), a.node_seed)
    if a.kill_at:
        arm(grid, a.kill_at)
    run_virtual(
        grid,
        cfg,
        Path(a.out),
        resume=a.resume,
        progress=Progress(cfg.rounds, live=False, quiet=True),
    )


def arm(grid: FakeGrid, kill_at: str) -> None:
    """Make this process die (``os._exit``: no clean-up runs, as after ``kill -9``) at
    ``kill_at``."""
    from flwr.app import MessageType

    from coordinator import rundir

    parts = kill_at.split(":")
    if parts[0] == "train":
        rnd, nth = int(parts[1]), int(parts[2])
        seen = [0]
        for node, handler in list(grid.handlers.items()):

            def killing(msg: Message, handler: Handler = handler) -> Message | None:
                if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.group_id == str(
                    rnd
                ):
                    seen[0] += 1
                    if seen[0] == nth:
                        os._exit(137)
                return handler(msg)

            grid.handlers[node] = killing
        return
    step, rnd = parts[0], int(parts[1])
    original = rundir.RunDirectory.save_round
    current = [-1]

    def save_round(self: rundir.RunDirectory, r: int, *args: Any, **kwargs: Any) -> None:
        current[0] = r
        original(self, r, *args, **kwargs)

    def crash(name: str) -> None:
        if name == step and current[0] == rnd:
            os._exit(137)

    rundir.RunDirectory.save_round = save_round  # type: ignore[method-assign]
    rundir.checkpoint_step = crash  # type: ignore[assignment]


if __name__ == "__main__":
    main()
