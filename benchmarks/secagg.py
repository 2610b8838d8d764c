"""Secure aggregation cost: fedtune's SecAgg+ against plaintext aggregation and against Flower's
legacy SecAgg+ workflow (flwr 1.39 ``SecAggPlusWorkflow`` + ``secaggplus_mod``), on the same
update vectors in the same process.

Vectors have the real adapter's size: LoRA r=8 on q_proj and v_proj of SmolLM2-135M (30 layers,
q 576->576, v 576->192): 460,800 fp32 parameters. Every client and the coordinator run in this
process, so "round seconds" is the whole round's CPU work done one client after another (a real
fleet runs the clients in parallel); per-stage client CPU seconds are per client.

    .venv/bin/python benchmarks/secagg.py [--clients 10 50 100] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import fedavg
from coordinator.rounds import payload_bytes
from privacy.secagg.encoding import plan_encoding, quantize
from privacy.secagg.graph import default_degree, default_threshold
from privacy.secagg.local import LocalStats, plaintext_ring_sum, run_round
from privacy.secagg.primitives import secure_rng
from privacy.secagg.server import MASKED_INPUT, STAGES
from protocol.adapter import AdapterSpec
from protocol.messages import ClientUpdate, decode_update, encode_update

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8


def adapter_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(LAYERS):
        p = f"base_model.model.model.layers.{i}.self_attn"
        shapes[f"{p}.q_proj.lora_A.weight"] = (RANK, HIDDEN)
        shapes[f"{p}.q_proj.lora_B.weight"] = (HIDDEN, RANK)
        shapes[f"{p}.v_proj.lora_A.weight"] = (RANK, HIDDEN)
        shapes[f"{p}.v_proj.lora_B.weight"] = (KV, RANK)
    return shapes


def make_updates(n: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    rng = np.random.default_rng(seed)
    shapes = adapter_shapes()
    deltas = [
        {k: rng.normal(0, 2e-3, s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)
    ]
    return deltas, [int(w) for w in rng.integers(50, 800, n)]


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel() for v in delta.values()])


# -- plaintext ----------------------------------------------------------------------------------


def plaintext_round(deltas: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, Any]:
    spec = AdapterSpec.of(deltas[0])
    zero = {k: np.zeros_like(v) for k, v in deltas[0].items()}
    t0, p0 = time.perf_counter(), time.process_time()
    up = 0
    cpu_client = []
    decoded = []
    for d, w in zip(deltas, weights, strict=True):
        c0 = time.process_time()
        content = encode_update(ClientUpdate(d, w, {"train-loss": 1.0}), rnd=1)
        cpu_client.append(time.process_time() - c0)
        up += payload_bytes(content)
        decoded.append(decode_update(content, spec, rnd=1))
    fedavg(zero, [(u.delta, u.num_examples) for u in decoded])
    return {
        "round_seconds": time.perf_counter() - t0,
        "round_cpu_seconds": time.process_time() - p0,
        "bytes_up_per_client": up / len(deltas),
        "client_cpu_seconds": {"encode": float(np.mean(cpu_client))},
    }


# -- fedtune SecAgg+ ----------------------------------------------------------------------------


def fedtune_round(
    deltas: list[dict[str, np.ndarray]], weights: list[int], dropout: float
) -> dict[str, Any]:
    n = len(deltas)
    numel = flat(deltas[0]).size
    t0, p0 = time.perf_counter(), time.process_time()
    plan = plan_encoding(n, clip=0.5, weight_cap=1024, numel=numel)
    c0 = time.process_time()
    enc = {
        1000 + i: quantize(flat(d), w, plan, secure_rng())
        for i, (d, w) in enumerate(zip(deltas, weights, strict=True))
    }
    encode_cpu = (time.process_time() - c0) / n
    gone = set(sorted(enc)[: round(dropout * n)])
    stats = LocalStats()
    res = run_round(enc, plan, drop={MASKED_INPUT: gone} if gone else None, stats=stats)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - p0
    exact = bool(
        (
            res.ring_sum.astype(np.uint64)
            == plaintext_ring_sum(enc, res.contributors, plan.ring_bits)
        ).all()
    )
    k = default_degree(n)
    per_client = {"encode": encode_cpu}
    for s in STAGES:
        active = res.stage_counts.get(s, n) if s != MASKED_INPUT else n - len(gone)
        per_client[s] = stats.client_seconds.get(s, 0.0) / max(active, 1)
    return {
        "round_seconds": seconds,
        "round_cpu_seconds": cpu_seconds,
        "bytes_up_per_client": sum(stats.bytes_up.values()) / n,
        "masked_vector_bytes": stats.bytes_up[MASKED_INPUT] / max(n - len(gone), 1),
        "bytes_down_protocol_per_client": sum(stats.bytes_down.values()) / n,
        "client_cpu_seconds": per_client,
        "server_cpu_seconds": dict(stats.server_seconds),
        "degree": k,
        "threshold": default_threshold(k),
        "dropped": len(gone),
        "exact_sum": exact,
    }


# -- Flower legacy SecAgg+ -----------------------------------------------------------------------


def flower_round(
    deltas: list[dict[str, np.ndarray]], weights: list[int], dropout: float
) -> dict[str, Any]:
    from flwr.app import Context, Message, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from tests.fakegrid import FakeGrid

    n = len(deltas)
    vectors = [flat(d) for d in deltas]
    nodes = [1000 + i for i in range(n)]
    gone = set(nodes[: round(dropout * n)])
    cpu: dict[str, list[float]] = {}
    bytes_up = [0]

    class Client(NumPyClient):
        def __init__(self, i: int) -> None:
            self.i = i

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [vectors[self.i]], weights[self.i], {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return Client(nodes.index(context.node_id)).to_client()

    app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    contexts = {
        u: Context(run_id=1, node_id=u, node_config={}, state=RecordDict(), run_config={})
        for u in nodes
    }

    def handler(u: int):  # type: ignore[no-untyped-def]
        def handle(msg: Message) -> Message | None:
            # A real Grid serialises each message; the legacy mod edits its config in place.
            msg = copy.deepcopy(msg)
            stage = (
                msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if (RECORD_KEY_CONFIGS in msg.content.config_records)
                else "other"
            )
            if u in gone and stage == "collect_masked_vectors":
                return None
            c0 = time.process_time()
            reply = app(msg, contexts[u])
            cpu.setdefault(str(stage), []).append(time.process_time() - c0)
            if reply.has_content():
                bytes_up[0] += payload_bytes(reply.content)
            return reply

        return handle

    grid = FakeGrid({u: handler(u) for u in nodes})
    from flwr.supercore.run import Run

    grid.set_run(Run.create_empty(run_id=1))
    k = default_degree(n)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros_like(vectors[0])]),
    )
    server_ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(server_ctx, config=ServerConfig(num_rounds=1), strategy=strategy)
    # Same graph degree, k + 1 shares (both count the client itself) and threshold as fedtune.
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=min(k + 1, n), reconstruction_threshold=default_threshold(k), timeout=60
        )
    )
    t0, p0 = time.perf_counter(), time.process_time()
    workflow(grid, ctx)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - p0
    names = {"setup": "advertise", "share_keys": "share-keys",
             "collect_masked_vectors": "masked-input", "unmask": "unmask"}  # fmt: skip
    return {
        "round_seconds": seconds,
        "round_cpu_seconds": cpu_seconds,
        "bytes_up_per_client": bytes_up[0] / n,
        "client_cpu_seconds": {names.get(s, s): float(np.mean(v)) for s, v in cpu.items()},
        "completed": ctx.history.metrics_distributed_fit is not None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--dropout", type=float, default=0.0, help="fraction dropping at masked input")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/secagg.json"))
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = []
    for n in args.clients:
        deltas, weights = make_updates(n)
        row: dict[str, Any] = {"clients": n, "params": int(flat(deltas[0]).size)}
        row["plaintext"] = plaintext_round(deltas, weights)
        row["fedtune_secagg"] = fedtune_round(deltas, weights, args.dropout)
        if not args.skip_flower:
            row["flower_secaggplus"] = flower_round(deltas, weights, args.dropout)
        rows.append(row)
        p, f = row["plaintext"], row["fedtune_secagg"]
        mb = 1e6
        line = (
            f"n={n:4d} CPU s per round: plaintext {p['round_cpu_seconds']:6.2f}"
            f" {p['bytes_up_per_client'] / mb:5.2f} MB up/client"
            f" | fedtune SecAgg+ {f['round_cpu_seconds']:6.2f}"
            f" {f['bytes_up_per_client'] / mb:6.2f} MB"
            f" (x{f['round_cpu_seconds'] / p['round_cpu_seconds']:.1f} CPU,"
            f" x{f['bytes_up_per_client'] / p['bytes_up_per_client']:.3f} bytes,"
            f" exact={f['exact_sum']})"
        )
        if "flower_secaggplus" in row:
            fl = row["flower_secaggplus"]
            line += (
                f" | Flower SecAgg+ {fl['round_cpu_seconds']:6.2f}"
                f" {fl['bytes_up_per_client'] / 1e6:6.2f} MB"
                f" (x{fl['round_cpu_seconds'] / f['round_cpu_seconds']:.2f} fedtune's CPU)"
            )
        print(line, flush=True)
        cpu = {s: round(v * 1000, 1) for s, v in f["client_cpu_seconds"].items()}
        print(f"        fedtune client CPU ms per stage: {cpu}", flush=True)
        if "flower_secaggplus" in row:
            cpu = {
                s: round(v * 1000, 1)
                for s, v in row["flower_secaggplus"]["client_cpu_seconds"].items()
            }
            print(f"        Flower  client CPU ms per stage: {cpu}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dropout": args.dropout, "rows": rows}, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
