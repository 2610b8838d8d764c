"""Seconds per client-round in simulation, split into load, train, evaluate and transport.

Runs ``fedtune simulate`` with the real model and reads the run's ``metrics.jsonl``:

* load      -- decoding the round message and getting the (process-cached) model ready
* train     -- the local optimizer steps
* evaluate  -- one client's held-out evaluation
* transport -- the rest of a phase's wall time: serialising, Flower's message passing, Ray

    python benchmarks/simulation.py [--rounds 2] [--clients-per-round 3] [extra simulate args]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--eval-clients", type=int, default=3)
    args, extra = p.parse_known_args()
    out = Path(tempfile.mkdtemp(prefix="fedtune-bench-")) / "run"
    cmd = [
        sys.executable, "-m", "cli.main", "simulate", "--rounds", str(args.rounds),
        "--clients-per-round", str(args.clients_per_round),
        "--eval-clients", str(args.eval_clients), "--output-dir", str(out), *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["round"] > 0 and r.get("clients_ok")]

    print(f"\n{' '.join(cmd[3:])}\nwhole command: {total:.1f} s; run directory {out}\n")
    print(
        f"{'round':>5}{'clients':>8}{'load':>8}{'train':>8}{'eval':>8}{'transport':>10}{'up MB':>8}"
    )
    sums = {"load": 0.0, "train": 0.0, "eval": 0.0, "transport": 0.0}
    for r in train_rows:
        n, m = r["clients_ok"], max(r["eval_clients_ok"], 1)
        load = r["client_load_seconds"] / n
        train = r["client_train_seconds"] / n
        ev = r["client_eval_seconds"] / m
        transport = (r["train_phase_seconds"] - r["client_seconds"]) / n + (
            r["eval_phase_seconds"] - r["client_eval_seconds"]
        ) / m
        for k, v in zip(sums, (load, train, ev, transport), strict=True):
            sums[k] += v
        print(f"{r['round']:>5}{n:>8}{load:>8.2f}{train:>8.2f}{ev:>8.2f}{transport:>10.2f}"
              f"{r['bytes_up'] / 1e6:>8.2f}")  # fmt: skip
    k = max(len(train_rows), 1)
    mean = {key: v / k for key, v in sums.items()}
    whole = sum(mean.values())
    print(
        "\nmean seconds per client-round: " + ", ".join(f"{key} {v:.2f}" for key, v in mean.items())
    )
    print("share: " + ", ".join(f"{key} {v / whole:.0%}" for key, v in mean.items()))


if __name__ == "__main__":
    main()
