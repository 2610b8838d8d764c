"""The simulator's throughput against two baselines, and a 10,000-client scale run (issue 13).

``throughput`` (the real model by default, at the default local steps):

* fedtune   -- ``fedtune simulate`` (Flower + Ray, every update encoded, sent and aggregated);
  client-rounds per hour over its training phases, read from the run's ``metrics.jsonl``;
* plain     -- (a) the pure-training ceiling: one process, the model loaded once, a loop calling
  the same training function (``client.train.train_round``) on the same shards, data read and
  tokenized by the same code (``client.app.Runtime.local_data``);
* flowertune -- (b) a FlowerTune-style client: for every client-round, the model loaded from
  its full-precision weights and quantized while loading (``from_pretrained`` with a
  quantization config, as FlowerTune's ``get_model``; no pre-quantized cache), the tokenizer
  and LoRA, then the same tokenization and training.

It prints client-rounds per hour of each, the simulator's overhead against (a) (target: within
5%) and its speed-up over (b) (target: at least 3x), all measured in this process run.

``scale``: ``fedtune simulate --num-clients 10000 --clients-per-round 100`` on a 20,000-row
dataset (Dolly-15k and WikiDoc from /work/shared/data, each field cut to ``--max-chars`` so every
row fits ``--seq-len`` with the tiny test tokenizer) and a tiny model; prints set-up seconds
(launch until the coordinator sees every node), seconds per round and the peak RSS of the whole
process tree (Ray included), sampled every 0.5 s.

    python benchmarks/simulation.py throughput [--model smollm2] [--rounds 2] ...
    python benchmarks/simulation.py scale [--num-clients 10000] [--rounds 3] ...

Run it on a quiet machine: the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHARED = Path("/work/shared/data")
DOLLY = SHARED / "dolly15k" / "by_category"
WIKIDOC = SHARED / "medical_meadow_wikidoc_patient_info" / "medical_meadow_small.json"


# ----------------------------------------------------------------------------- running fedtune


class Watch:
    """Run a command; sample the RSS of its whole process tree and time-stamp its output."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        import psutil

        self.t0 = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self.peak_rss = 0
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._log = log.open("w")
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        root = psutil.Process(self.proc.pid)
        # CPU seconds of every process seen in the tree (last sample), keyed by pid, with its
        # role read again at each sample (Ray renames a worker when it takes on an actor).
        self.cpu: dict[int, tuple[str, float]] = {}
        while self.proc.poll() is None:
            rss = 0
            with contextlib.suppress(psutil.Error):
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error), p.oneshot():
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        self.cpu[p.pid] = (_role(p), t.user + t.system)
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.5)
        reader.join(timeout=60)
        self.seconds = time.perf_counter() - self.t0
        self._log.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.t0, line.rstrip()))
            self._log.write(line)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) per kind of process over the run, largest first."""
        out: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def first(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


def _role(p: Any) -> str:
    """What a process of the simulation's tree is: the driver, a Ray worker, a Ray server."""
    name = str(p.name())
    if name.startswith("ray::"):
        return "ray worker (" + name.removeprefix("ray::") + ")"
    cmd = " ".join(p.cmdline()[:3])
    if "cli.main" in cmd:
        return "driver (coordinator, Flower engine)"
    for server in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env", "monitor"):
        if server in cmd:
            return f"ray {server}"
    return name


def simulate_cmd(out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cli.main", "simulate", "--output-dir", str(out), *args]


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- throughput


def throughput(a: argparse.Namespace, extra: list[str]) -> None:
    import statistics

    from client.logs import quiet_libraries

    quiet_libraries()  # before torchao and transformers load: the figures, not their chatter
    import torch

    from client.app import Runtime
    from client.model import attach_lora, get_adapter, load_base, resolve_model
    from client.settings import ClientSettings
    from client.train import train_round
    from coordinator.config import RunConfig
    from simulations.partition import PartitionSpec
    from simulations.resources import worker_resources
    from simulations.runner import split_data, write_shards

    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-sim-"))
    common = ["--model", a.model, "--data", a.data, "--partition", "iid",
              "--num-clients", str(a.num_clients), "--seed", str(a.seed)]  # fmt: skip
    run_args = [*common, "--rounds", str(a.rounds),
                "--clients-per-round", str(a.clients_per_round),
                "--min-clients", "1", "--eval-clients", "1", *extra]  # fmt: skip
    print(f"fedtune simulate {' '.join(run_args)}", flush=True)

    def simulate(k: int) -> tuple[Path, list[dict[str, Any]]]:
        out = work / f"run{k}"
        w = Watch(simulate_cmd(out, run_args), work / f"simulate{k}.log")
        if w.proc.returncode != 0:
            raise SystemExit(f"fedtune simulate failed; see {work / f'simulate{k}.log'}")
        rows = [r for r in metrics(out) if r["round"] > 0]
        print(f"\n[pair {k + 1}] simulation, seconds per client-round:")
        _phase_table(rows)
        print(f"CPU seconds by process over the whole simulation ({w.seconds:.0f} s wall):")
        for role, seconds in w.cpu_by_role().items():
            print(f"  {seconds:8.1f}  {role}")
        return out, rows

    out, rows = simulate(0)
    # The same options, shards, instruction and threads, in this process.
    flat = json.loads((out / "config.json").read_text())["run"]
    cfg = RunConfig.from_mapping(flat)
    records, shards, index = split_data(a.data, PartitionSpec.parse("iid"), a.num_clients, a.seed)
    write_shards(records, shards, index, work / "partitions")
    # One process with every core: the ceiling a simulation of several one-core workers is held
    # to as well (same threads as the simulation's worker when it has one).
    threads = a.plain_threads or _cpus()
    torch.set_num_threads(threads)
    workers = worker_resources(_cpus(), 0, cfg.cpus_per_client)
    source, cache = resolve_model(cfg.model), Path(flat["cache-dir"])
    run_config = {**flat, "partition-dir": str(work / "partitions")}
    pid = {str(c["name"]): int(c["partition_id"]) for c in index}

    def settings(i: int) -> ClientSettings:
        node = {"partition-id": i, "num-partitions": a.num_clients}
        return ClientSettings.resolve(node, run_config)

    def one(runtime: Runtime, adapter: dict[str, Any], rnd: int, i: int) -> None:
        data = runtime.local_data(settings(i), cfg.seq_len)
        train_round(runtime.model, data.train, cfg.train_instruction(rnd), adapter,
                    pad_id=runtime.pad_id, client_seed=data.seed)  # fmt: skip

    def client_rounds(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """What the simulation trained, in its order: (round, partition id). Client datasets
        differ in length, so the loops here train exactly these clients in these rounds."""
        trained = [(int(r["round"]), pid[name]) for r in rows for name in r["clients"]]
        if len(trained) != sum(int(r["clients_ok"]) for r in rows):
            raise SystemExit("metrics.jsonl: the named clients and clients_ok disagree")
        return trained

    base = load_base(source, cfg.quantization, cache)
    runtime = Runtime(base, attach_lora(base.model, cfg.lora))
    adapter = get_adapter(runtime.model)
    trained = client_rounds(rows)
    # Warm-up, as the simulation's worker had in round 0 (its evaluation): one client-round on a
    # client outside the timed ones; the process's first training step is not timed in either.
    timed_ids = {i for _, i in trained}
    one(runtime, adapter, 1, next(i for i in range(a.num_clients) if i not in timed_ids))

    # The machine's speed drifts by 10-20% over minutes: simulation and plain loop alternate,
    # and each pair gives one ratio.
    pairs: list[tuple[float, float, float, int]] = []  # (sim s, inside training s, plain s, n)
    for k in range(a.repeats):
        if k:
            out, rows = simulate(k)
            trained = client_rounds(rows)
        times = []
        for rnd, i in trained:
            t0 = time.perf_counter()
            one(runtime, adapter, rnd, i)
            times.append(time.perf_counter() - t0)
        print(f"[pair {k + 1}] plain loop, seconds per client-round: "
              f"{', '.join(f'{t:.2f}' for t in times)}")  # fmt: skip
        sim_s = sum(float(r["train_phase_seconds"]) for r in rows)
        inside = sum(float(r["client_train_seconds"]) for r in rows)
        pairs.append((sim_s, inside, sum(times), len(trained)))
    del runtime, base

    asked = a.flowertune_clients
    flower_n = min(len(trained), asked) if asked > 0 else len(trained)
    times, loads = [], []
    for rnd, i in trained[:flower_n]:
        t0 = time.perf_counter()
        # What FlowerTune's client does on every call: from_pretrained of the full-precision
        # model with a quantization config (it has no pre-quantized cache), its tokenizer, LoRA.
        fresh = load_base(source, cfg.quantization, cache, quantize_on_load=True)
        fresh_runtime = Runtime(fresh, attach_lora(fresh.model, cfg.lora))
        loads.append(time.perf_counter() - t0)
        one(fresh_runtime, adapter, rnd, i)
        del fresh, fresh_runtime
        times.append(time.perf_counter() - t0)
    flower_seconds = sum(times)
    print(f"FlowerTune-style, seconds per client-round: {', '.join(f'{t:.2f}' for t in times)}")
    print(f"  of which model + tokenizer + LoRA: {', '.join(f'{t:.2f}' for t in loads)}")

    print(f"\nmodel {cfg.model} ({cfg.quantization.value}), local steps {cfg.local_steps}, "
          f"batch {cfg.batch_size}, seq-len {cfg.seq_len}; simulation: {workers.workers} "
          f"worker(s) of {workers.threads} torch thread(s); loops here: {threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'pair':<6}{'client-rounds':>14}{'fedtune s':>10}{'plain s':>9}{'fedtune/h':>10}"
          f"{'plain/h':>9}{'overhead':>9}{'outside training':>17}")  # fmt: skip
    overheads, outside = [], []
    for k, (sim_s, inside, plain_s, n) in enumerate(pairs):
        overheads.append(1 - plain_s / sim_s)
        outside.append(1 - inside / sim_s)
        print(f"{k + 1:<6}{n:>14}{sim_s:>10.1f}{plain_s:>9.1f}{n / sim_s * 3600:>10.0f}"
              f"{n / plain_s * 3600:>9.0f}{overheads[-1]:>9.1%}{outside[-1]:>17.1%}")  # fmt: skip
    sim_s, _, _, n = pairs[-1]
    print(f"flowertune (b): {flower_n} client-rounds in {flower_seconds:.1f} s, "
          f"{flower_n / flower_seconds * 3600:.0f} per hour")  # fmt: skip
    print(
        f"\noverhead vs the plain loop (a), median of {len(pairs)} pairs: "
        f"{statistics.median(overheads):.1%} (target <= 5%); of it, outside the clients' "
        f"training calls (Flower, Ray, encoding, aggregation): {statistics.median(outside):.1%}"
    )
    speedup = (n / sim_s) / (flower_n / flower_seconds)
    print(f"speed-up vs FlowerTune-style (b), last pair: {speedup:.2f}x (target >= 3x)")
    plain_mean = pairs[-1][2] / pairs[-1][3]
    print(f"(b) per client-round, mean: {sum(loads) / flower_n:.2f} s model + tokenizer + LoRA, "
          f"{(flower_seconds - sum(loads)) / flower_n:.2f} s data and training (the plain "
          f"loop's last pair: {plain_mean:.2f} s)")  # fmt: skip
    print(f"run directories under {work}")


def _phase_table(rows: list[dict[str, Any]]) -> None:
    """Seconds per client-round in each simulated round: load, train and the rest."""
    print(f"\n{'round':>5}{'clients':>8}{'load':>8}{'train':>8}{'other':>8}{'phase s':>9}")
    for r in rows:
        k = max(int(r["clients_ok"]), 1)
        load, train = r["client_load_seconds"] / k, r["client_train_seconds"] / k
        other = r["train_phase_seconds"] / k - load - train
        print(f"{r['round']:>5}{r['clients_ok']:>8}{load:>8.2f}{train:>8.2f}{other:>8.2f}"
              f"{r['train_phase_seconds']:>9.1f}")  # fmt: skip


def _cpus() -> int:
    return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ scale


def fleet_dataset(path: Path, rows: int, max_chars: int) -> Path:
    """``rows`` rows from Dolly-15k, then WikiDoc, each field cut to ``max_chars``."""
    out: list[dict[str, str]] = []

    def add(instruction: str, context: str, response: str, category: str) -> None:
        out.append({"instruction": instruction[:max_chars], "context": context[:max_chars],
                    "response": response[:max_chars], "category": category})  # fmt: skip

    for f in sorted(glob.glob(str(DOLLY / "*.jsonl"))):
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            add(r["instruction"], r.get("context", ""), r["response"], Path(f).stem)
    for r in json.loads(WIKIDOC.read_text()):
        add(r["instruction"], r["input"], r["output"], "medical")
    if len(out) < rows:
        raise SystemExit(f"only {len(out)} rows in {SHARED}, {rows} asked for")
    with path.open("w") as fh:
        for r in out[:rows]:
            fh.write(json.dumps(r) + "\n")
    return path


def scale(a: argparse.Namespace, extra: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-scale-"))
    data = fleet_dataset(work / "fleet.jsonl", a.rows, a.max_chars)
    model = a.model
    if model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny_model import build_tiny_model

        model = str(build_tiny_model(work / "tiny"))
    out = work / "run"
    run_args = ["--model", model, "--quantization", "none", "--cache-dir", str(work / "cache"),
                "--data", str(data), "--partition", "iid", "--num-clients", str(a.num_clients),
                "--clients-per-round", str(a.clients_per_round), "--min-clients", "1",
                "--rounds", str(a.rounds), "--local-steps", str(a.local_steps),
                "--seq-len", str(a.seq_len),
                "--eval-clients", str(a.eval_clients), *extra]  # fmt: skip
    print(f"fedtune simulate {' '.join(run_args)}", flush=True)
    w = Watch(simulate_cmd(out, run_args), work / "simulate.log")
    if w.proc.returncode != 0:
        raise SystemExit(f"fedtune simulate failed; see {work / 'simulate.log'}")
    rows = metrics(out)
    ready = w.first("client node(s)")
    print(f"\n{a.num_clients} clients, {a.rows} rows, {a.clients_per_round} per round, "
          f"{a.rounds} rounds (log: {work / 'simulate.log'})")  # fmt: skip
    print(f"set-up (launch -> every node registered, as the coordinator sees them): "
          f"{ready:.1f} s" if ready is not None else "set-up: not seen in the log")  # fmt: skip
    print(f"partition files written: {len(list((out / 'partitions').iterdir()))}")
    print(f"round 0 (evaluation only; starts the worker, loads the model): "
          f"{rows[0]['seconds']:.1f} s")  # fmt: skip
    for r in rows[1:]:
        print(f"round {r['round']}: {r['seconds']:.1f} s, {r['clients_ok']}/"
              f"{r['clients_sampled']} clients ok, train phase {r['train_phase_seconds']:.1f} s, "
              f"inside clients {r['client_seconds']:.1f} s")  # fmt: skip
    per_round = [float(r["seconds"]) for r in rows[1:]]
    if per_round:
        print(
            f"seconds per round (mean of {len(per_round)}): {sum(per_round) / len(per_round):.1f}"
        )
    print(f"peak RSS of the process tree (Ray included): {w.peak_rss / 2**20:.0f} MiB")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({_cpus()} cores)")
    print(f"whole command: {w.seconds:.1f} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput", help="client-rounds per hour against the two baselines")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--data", default=str(DOLLY / "open_qa.jsonl"))
    t.add_argument("--num-clients", type=int, default=20)
    t.add_argument("--clients-per-round", type=int, default=4)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--repeats", type=int, default=3,
                   help="(simulation, plain loop) pairs, alternated")  # fmt: skip
    t.add_argument("--plain-threads", type=int, default=0,
                   help="torch threads of the loops here (default: every core)")  # fmt: skip
    t.add_argument("--flowertune-clients", type=int, default=0,
                   help="client-rounds timed for (b), the first ones (default: all)")  # fmt: skip
    s = sub.add_parser("scale", help="the 10,000-client run")
    s.add_argument("--model", default="tiny", help="'tiny' (a 2-layer test model) or a model")
    s.add_argument("--num-clients", type=int, default=10_000)
    s.add_argument("--rows", type=int, default=20_000)
    s.add_argument("--max-chars", type=int, default=120)
    s.add_argument("--clients-per-round", type=int, default=100)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--local-steps", type=int, default=2)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--eval-clients", type=int, default=10)
    args, extra = p.parse_known_args()
    (throughput if args.mode == "throughput" else scale)(args, extra)


if __name__ == "__main__":
    main()
