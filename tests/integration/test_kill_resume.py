"""Issue 13 points 1 and 2 on the real entry point: `fedtune simulate` (Flower's simulation engine
on Ray, tiny model) is killed with SIGKILL, its whole process tree at once (Ray's processes
included), after its first training round; `fedtune simulate --resume` then finishes it, and the
final adapter is byte-identical to that of an uninterrupted run with the same arguments, although
the simulation gave the clients new node ids when it restarted."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fleet import write_data

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GUARD = 2400.0  # a hang guard for a busy machine, not a speed target


def simulate_cmd(tiny_model_dir: Path, cache: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "cli.main", "simulate",
        "--model", str(tiny_model_dir),
        "--quantization", "none",
        "--data", str(data),
        "--partition", "natural:category",
        "--clients-per-round", "3",
        "--eval-clients", "3",
        "--rounds", "4",
        "--local-steps", "2",
        "--batch-size", "2",
        "--seq-len", "64",
        "--lora-rank", "2",
        "--max-update-norm", "100",
        "--seed", "11",
        "--cache-dir", str(cache),
        "--output-dir", str(out),
    ]  # fmt: skip


def state_round(out: Path) -> int:
    try:
        return int(json.loads((out / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return -1


def kill_tree(proc: subprocess.Popen[str]) -> list[int]:
    """SIGKILL the process and every descendant at once; wait until all are gone."""
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(60)
    _gone, alive = psutil.wait_procs(tree, timeout=60)
    assert alive == [], f"still running after SIGKILL: {alive}"
    return [p.pid for p in tree]


def test_kill_9_of_the_simulation_tree_then_resume_equals_an_uninterrupted_run(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    data = write_data(tmp_path / "data.jsonl")
    ref = tmp_path / "reference"
    res = subprocess.run(
        simulate_cmd(tiny_model_dir, model_cache, data, ref),
        cwd=ROOT, capture_output=True, text=True, timeout=GUARD,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # The simulator knows which partition each node serves: no node is asked its name.
    log = res.stdout + res.stderr
    assert "named 7 node(s) from the simulation's partitions" in log
    assert "their client names" not in log

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        simulate_cmd(tiny_model_dir, model_cache, data, out),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + GUARD
        while state_round(out) < 1:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "round 1 was never saved"
            time.sleep(0.2)
    finally:
        killed = kill_tree(proc)
    assert len(killed) > 1, "Ray's processes were part of the tree"
    assert state_round(out) < 4

    res = subprocess.run(
        [*simulate_cmd(tiny_model_dir, model_cache, data, out), "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=GUARD,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    weights = "adapter/adapter_model.safetensors"
    assert (out / weights).read_bytes() == (ref / weights).read_bytes()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["clients"] for r in rows[1:]] == [r["clients"] for r in ref_rows[1:]]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
