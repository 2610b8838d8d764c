"""Update compression, codec part: bytes per client-round and reconstruction error of each codec
on real client deltas of the default adapter (LoRA r=8 on q_proj, v_proj of SmolLM2-135M).

Deltas come from ``client.train.train_round`` (the real local trainer) on Dolly-15k categories, one
category per client, all starting from the same fresh adapter; ``--random`` uses Gaussian deltas
of the same shapes instead (no model load). For every codec it prints

- bytes per client-round as Flower counts them (``ArrayRecord``/``ConfigRecord.count_bytes``) and
  the ratio to the fp32 adapter measured the same way in this process;
- the relative L2 error of one client's decoded delta (mean over clients), and of the weighted
  mean over clients (what aggregation sees: unbiased codecs' errors partly cancel there);
- encode + decode CPU seconds per client.

Then the secure-aggregation path: the masked vector in the smallest ring that cannot wrap for
``--max-clients`` clients, for the plain fixed-point vector (``privacy.secagg.encoding``, as today)
and for the sketch, with bytes of the masked upload and the error of the decoded weighted mean.
The per-coordinate clip is taken from the deltas themselves (their largest |value|, rounded up):
an oracle choice that shows the codec's error, not a setting to deploy.

``--federated``: the federated benchmark of issue 17, through the real pieces. Every configuration
is a whole run of ``coordinator.rounds.run_federation`` (the one the CLI runs) on virtual time,
whose nodes are real ``client.app`` ClientApps in this process (``tests.fakegrid.FakeGrid``
delivers the messages; every update crosses the wire encode/decode, codecs, error-feedback state
directories, secure aggregation's four stages and client ranks included). Dolly-15k is split
Dirichlet(``--alpha``) over category into ``--clients`` shards after ``--heldout-per-category``
rows per category are set aside as the coordinator's held-out set (``central-eval-data``); every
configuration runs the same rounds, cohorts (seeded) and seeds. Per configuration and seed: the
held-out loss after the last round, bytes up per client-round of the train phase
(``train_bytes_up`` / clients) and its ratio to fp32 tensors at the global rank, as the round rows
in ``metrics.jsonl`` measured them. Configurations: none, fp16, int8, int8+EF, int4, int4+EF,
sketch (plaintext), none and sketch under ``--secagg`` (sketch in a 32-bit and a 16-bit ring),
and ranks all-8, all-16 and 4,8,16.

    python benchmarks/compression.py [--clients 3] [--steps 3] [--seq-len 128] [--random]
        [--deltas CACHE.npz] [--json PATH]
    python benchmarks/compression.py --federated [--model smollm2] [--clients 32]
        [--clients-per-round 8] [--rounds 10] [--seeds 0,1] [--configs LABEL,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from flwr.app import Array, ArrayRecord, Context, RecordDict

from privacy.secagg.encoding import decode_sum, plan_encoding, quantize, to_ring, weighted_mean
from protocol.adapter import AdapterSpec
from protocol.codecs import (
    Codec,
    CompressionConfig,
    SketchCodec,
    fp32_adapter_bytes,
    payload_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "dolly15k" / "by_category"  # as privacy_utility.py
CATEGORIES = ("open_qa", "brainstorming", "closed_qa", "general_qa", "classification")

CODECS: list[tuple[str, CompressionConfig]] = [
    ("none", CompressionConfig("none")),
    ("fp16", CompressionConfig("fp16")),
    ("int8 per-tensor", CompressionConfig("int8")),
    ("int8 block 64", CompressionConfig("int8", block_size=64)),
    ("int4 per-tensor", CompressionConfig("int4")),
    ("int4 block 64", CompressionConfig("int4", block_size=64)),
    ("int4 block 32", CompressionConfig("int4", block_size=32)),
    ("sketch 1/4", CompressionConfig("sketch", sketch_ratio=0.25)),
    ("sketch 1/8", CompressionConfig("sketch", sketch_ratio=0.125)),
]


def real_deltas(
    model_spec: str, clients: int, steps: int, seq_len: int, data: Path
) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    from client.data import load_records, to_conversations, tokenize_all
    from client.model import (
        Quantization,
        attach_lora,
        default_cache_dir,
        get_adapter,
        load_base,
        resolve_model,
    )
    from client.train import train_round
    from protocol.messages import LoraSpec, TrainInstruction

    lora = LoraSpec(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    base = load_base(resolve_model(model_spec), Quantization.NONE, default_cache_dir())
    model = attach_lora(base.model, lora)
    global_adapter = get_adapter(model)
    instr = TrainInstruction(round=1, lora=lora, local_steps=steps, batch_size=4, seq_len=seq_len)
    deltas, weights = [], []
    for i in range(clients):
        category = CATEGORIES[i % len(CATEGORIES)]
        rows = load_records(data / f"{category}.jsonl")[:200]
        examples = tokenize_all(base.tokenizer, to_conversations(rows, category), seq_len)
        t0 = time.perf_counter()
        update = train_round(
            model,
            examples,
            instr,
            global_adapter,
            pad_id=base.tokenizer.pad_token_id,
            client_seed=i,
        )
        print(
            f"  client {i} ({category}): {steps} steps in {time.perf_counter() - t0:.1f} s, "
            f"train loss {update.metrics['train-loss']:.3f}",
            file=sys.stderr,
        )
        deltas.append(update.delta)
        weights.append(update.num_examples)
    return deltas, weights


def random_deltas(clients: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Gaussian deltas with the default adapter's shapes (30 layers; q 576->576, v 576->192)."""
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(30):
        p = f"base_model.model.model.layers.{i}.self_attn"
        shapes[f"{p}.q_proj.lora_A.weight"] = (8, 576)
        shapes[f"{p}.q_proj.lora_B.weight"] = (576, 8)
        shapes[f"{p}.v_proj.lora_A.weight"] = (8, 576)
        shapes[f"{p}.v_proj.lora_B.weight"] = (192, 8)
    deltas = [
        {k: rng.normal(0, 1e-3, s).astype(np.float32) for k, s in shapes.items()}
        for _ in range(clients)
    ]
    return deltas, [int(w) for w in rng.integers(50, 200, clients)]


def save_deltas(
    path: Path, deltas: list[dict[str, np.ndarray]], weights: list[int], source: str
) -> None:
    arrays = {f"{i}/{k}": v for i, d in enumerate(deltas) for k, v in d.items()}
    meta = json.dumps({"weights": weights, "source": source, "names": list(deltas[0])})
    np.savez(path, meta=np.array(meta), **arrays)


def load_deltas(path: Path) -> tuple[list[dict[str, np.ndarray]], list[int], str]:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        deltas = [{k: f[f"{i}/{k}"] for k in meta["names"]} for i in range(len(meta["weights"]))]
    return deltas, meta["weights"], meta["source"] + f" (cached in {path})"


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.astype(np.float64).ravel() for v in arrays.values()])


def rel(err: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(err) / np.linalg.norm(ref))


def codec_row(
    label: str, codec: Codec, deltas: list[dict[str, np.ndarray]], p: np.ndarray, fp32: int
) -> dict[str, Any]:
    spec = AdapterSpec.of(deltas[0])
    rng = np.random.default_rng(0)
    sizes, client_err, cpu = [], [], []
    decoded = []
    for d in deltas:
        c0 = time.process_time()
        payload = codec.encode(d, rng)
        out = codec.decode(payload, spec)
        cpu.append(time.process_time() - c0)
        sizes.append(payload_bytes(payload))
        decoded.append(flat(out))
        client_err.append(rel(decoded[-1] - flat(d), flat(d)))
    truth = sum(pk * flat(d) for pk, d in zip(p, deltas, strict=True))
    if isinstance(codec, SketchCodec):  # linear: the coordinator decodes the weighted sum
        summed = sum(pk * codec.sketch(d) for pk, d in zip(p, deltas, strict=True))
        mean = flat(codec.decode_vector(np.asarray(summed), spec))
    else:
        mean = sum(pk * x for pk, x in zip(p, decoded, strict=True))
    return {
        "codec": label,
        "bytes": int(np.mean(sizes)),
        "ratio": float(np.mean(sizes)) / fp32,
        "bits_per_value": 8 * float(np.mean(sizes)) / spec.numel,
        "client_rel_err": float(np.mean(client_err)),
        "mean_rel_err": rel(np.asarray(mean) - np.asarray(truth), np.asarray(truth)),
        "cpu_s": float(np.mean(cpu)),
    }


def ring_row(
    label: str,
    deltas: list[dict[str, np.ndarray]],
    weights: list[int],
    max_clients: int,
    bits: int,
    clip: float,
    fp32: int,
    sketch: SketchCodec | None,
) -> dict[str, Any]:
    """Secure-aggregation encoding in a ``bits``-bit ring: what the unmasked sum decodes to.
    (Masks cancel exactly in the ring, tests/unit/privacy; the sum here is the plaintext ring
    sum.)"""
    spec = AdapterSpec.of(deltas[0])
    ring_clip = sketch.ring_clip(spec, clip) if sketch else clip
    level = ((1 << (bits - 1)) - 1) // max_clients  # largest per-client level that cannot wrap
    cap = min(level, 65536)  # the weight coordinate shares the ring
    plan = plan_encoding(max_clients, ring_clip, precision=ring_clip / level, weight_cap=cap)
    assert plan.ring_bits <= bits, (plan.ring_bits, bits)
    rng = np.random.default_rng(0)
    total = None
    c0 = time.process_time()
    sizes = []
    for d, w in zip(deltas, weights, strict=True):
        vec = sketch.ring_input(d, clip) if sketch else np.clip(flat(d), -clip, clip)
        enc = quantize(vec, w, plan, rng)
        ring = to_ring(enc, plan.ring_bits)
        sizes.append(int(ArrayRecord({"masked": Array(ring)}).count_bytes()))
        total = enc if total is None else total + enc
    assert total is not None
    ring_sum = to_ring(total, plan.ring_bits)
    mean_vec = weighted_mean(decode_sum(ring_sum, plan, len(deltas)), plan)
    mean = flat(sketch.decode_vector(mean_vec, spec)) if sketch else mean_vec
    cpu = (time.process_time() - c0) / len(deltas)
    eff = np.asarray([min(w, cap) for w in weights], dtype=np.float64)
    truth = sum(e * flat(d) for e, d in zip(eff / eff.sum(), deltas, strict=True))
    return {
        "codec": label,
        "ring_bits": plan.ring_bits,
        "wire_dtype": str(plan.dtype),
        "bytes": int(np.mean(sizes)),
        "ratio": float(np.mean(sizes)) / fp32,
        "mean_rel_err": rel(np.asarray(mean) - np.asarray(truth), np.asarray(truth)),
        "weight_cap": cap,
        "cpu_s": cpu,
    }


# label -> run options of one federated configuration (the global rank is --lora-rank 8 unless
# the configuration says otherwise)
FEDERATED: dict[str, dict[str, Any]] = {
    "none": {},
    "fp16": {"compress": "fp16"},
    "int8": {"compress": "int8", "compress-block-size": 64},
    "int8+ef": {"compress": "int8", "compress-block-size": 64, "error-feedback": True},
    "int4": {"compress": "int4", "compress-block-size": 64},
    "int4+ef": {"compress": "int4", "compress-block-size": 64, "error-feedback": True},
    "sketch": {"compress": "sketch", "sketch-ratio": 0.25},
    "secagg": {"secagg": True},
    "secagg+sketch": {"secagg": True, "compress": "sketch", "sketch-ratio": 0.25},
    # the same in a 16-bit ring: the weight cap must fit it (8 clients x 4095)
    "secagg+sketch 16-bit": {
        "secagg": True,
        "compress": "sketch",
        "sketch-ratio": 0.25,
        "secagg-ring-bits": 16,
        "secagg-weight-cap": 4095,
    },
    # half the values in the sketch (a smaller error), in a 16-bit ring: 1/4 of fp32's bytes
    "secagg+sketch/2 16-bit": {
        "secagg": True,
        "compress": "sketch",
        "sketch-ratio": 0.5,
        "secagg-ring-bits": 16,
        "secagg-weight-cap": 4095,
    },
    "ranks 8": {"lora-rank": 8, "lora-alpha": 16.0},
    "ranks 16": {"lora-rank": 16, "lora-alpha": 32.0},
    "ranks 4,8,16": {"lora-rank": 16, "lora-alpha": 32.0, "client-ranks": "4,8,16"},
}


def config_labels(text: str) -> list[str]:
    """``--configs`` split at commas, a label's own commas kept (``ranks 4,8,16``).

    >>> config_labels("none,ranks 4,8,16,int8")
    ['none', 'ranks 4,8,16', 'int8']
    """
    labels: list[str] = []
    part = ""
    for token in text.split(","):
        part = f"{part},{token}" if part else token.strip()
        if part in FEDERATED:
            labels.append(part)
            part = ""
    return labels + ([part] if part else [])


def federated(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of ``FEDERATED`` (or ``--configs``) for every seed, as whole runs."""
    from benchmarks.privacy_utility import heldout_and_clients
    from client import app as client_app
    from client.data import load_records
    from coordinator.config import RunConfig
    from coordinator.progress import Progress
    from tests.fakegrid import FakeGrid, run_virtual

    labels = config_labels(args.configs) if args.configs else list(FEDERATED)
    unknown = [x for x in labels if x not in FEDERATED]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(FEDERATED)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    records = load_records(args.data)
    work = args.out / "compression-runs"
    results = []
    for seed in seeds:
        split = argparse.Namespace(
            seed=seed if args.split_seed is None else args.split_seed,
            heldout_per_category=args.heldout_per_category,
            natural=False,
            alpha=args.alpha,
            clients=args.clients,
        )
        held, shards = heldout_and_clients(records, split)
        data = work / f"data-seed{seed}-split{split.seed}"
        data.mkdir(parents=True, exist_ok=True)
        heldout = data / "heldout.jsonl"
        heldout.write_text(
            "".join(json.dumps(records[i]) + "\n" for idx in held.values() for i in idx)
        )
        for cid, idx in enumerate(shards):
            (data / f"{cid:04d}.jsonl").write_text(
                "".join(json.dumps(records[int(i)]) + "\n" for i in idx)
            )
        for label in labels:
            out = work / f"{label.replace(' ', '_').replace(',', '-')}-seed{seed}-split{split.seed}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            cfg = RunConfig.from_mapping(
                {
                    "model": args.model,
                    "quantization": args.quantization,
                    "rounds": args.rounds,
                    "clients-per-round": args.clients_per_round,
                    "min-clients": max(1, args.clients_per_round // 2),
                    "eval-clients": 1,
                    "local-steps": args.local_steps,
                    "batch-size": args.batch_size,
                    "seq-len": args.seq_len,
                    "learning-rate": args.lr,
                    "seed": seed,
                    "central-eval-data": str(heldout),
                    "output-dir": str(out),
                    "round-timeout": 3600.0,
                    "node-wait-timeout": 10.0,
                    **FEDERATED[label],
                }
            )
            app = client_app.make_client_app()
            contexts = {
                1000 + cid: Context(
                    run_id=1,
                    node_id=1000 + cid,
                    node_config={
                        "data-path": str(data / f"{cid:04d}.jsonl"),
                        "state-dir": str(out / "client-state" / f"{cid:04d}"),
                        "partition-id": cid,
                    },
                    state=RecordDict(),
                    run_config={"model": args.model, "quantization": args.quantization},
                )
                for cid in range(args.clients)
            }

            def handler(node: int, app: Any = app, contexts: Any = contexts) -> Any:
                return lambda msg: app(msg, contexts[node])

            t0 = time.perf_counter()
            rows = run_virtual(
                FakeGrid({n: handler(n) for n in contexts}),
                cfg,
                out,
                progress=Progress(cfg.rounds, live=False),
            )
            trained = [r for r in rows[1:] if r.get("status") == "ok"]
            per_client = [r["train_bytes_up"] / max(1, r["clients_ok"]) for r in trained]
            result = {
                "config": label,
                "seed": seed,
                "split_seed": split.seed,
                "rounds_ok": len(trained),
                "final_heldout_loss": rows[-1].get("central_eval_loss"),
                "base_heldout_loss": rows[0].get("central_eval_loss"),
                "bytes_up_per_client_round": float(np.mean(per_client)) if per_client else None,
                "bytes_up_ratio": float(np.mean([r["bytes_up_ratio"] for r in trained]))
                if trained
                else None,
                "bytes_down_ratio": float(np.mean([r["bytes_down_ratio"] for r in trained]))
                if trained
                else None,
                "seconds": time.perf_counter() - t0,
                "run_dir": str(out),
            }
            results.append(result)
            print(json.dumps(result), flush=True)
            # after every run: a long benchmark stopped early keeps what it measured
            (args.out / "compression_federated.json").write_text(
                json.dumps(results, indent=2) + "\n"
            )
    print_federated(results)
    (args.out / "compression_federated.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_federated(results: list[dict[str, Any]]) -> None:
    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print("\n| configuration | seed | held-out loss (base -> last round) | bytes up / client-round "
          "| vs fp32 | rounds ok |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['seed']} | {fmt(r['base_heldout_loss'], '.4f')} -> "
            f"{fmt(r['final_heldout_loss'], '.4f')} | "
            f"{fmt(r['bytes_up_per_client_round'], ',.0f')} | {fmt(r['bytes_up_ratio'], '.3f')} "
            f"| {r['rounds_ok']} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="local steps per client")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--deltas", type=Path, default=None, help="npz cache of trained deltas (read or written)"
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--random", action="store_true", help="Gaussian deltas, no model")
    p.add_argument("--max-clients", type=int, default=8, help="ring sized for this many")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    f = p.add_argument_group("--federated: whole runs through the round loop")
    f.add_argument("--federated", action="store_true")
    f.add_argument("--quantization", default="nf4")
    f.add_argument("--clients-per-round", type=int, default=8)
    f.add_argument("--rounds", type=int, default=10)
    f.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="one data split and held-out set for every seed (default: each seed its own), so "
        "two seeds show the training noise alone",
    )
    f.add_argument("--local-steps", type=int, default=3)
    f.add_argument("--batch-size", type=int, default=4)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha over category")
    f.add_argument("--heldout-per-category", type=int, default=12)
    f.add_argument("--seeds", default="0,1")
    f.add_argument("--configs", default="", help=f"comma-separated subset of: {list(FEDERATED)}")
    f.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.federated:
        if "--clients" not in sys.argv:
            args.clients = 32
        federated(args)
        return

    t0 = time.perf_counter()
    if args.random:
        deltas, weights = random_deltas(args.clients)
        source = "Gaussian deltas (sd 1e-3), default adapter shapes"
    elif args.deltas and args.deltas.exists():
        deltas, weights, source = load_deltas(args.deltas)
    else:
        deltas, weights = real_deltas(args.model, args.clients, args.steps, args.seq_len, args.data)
        source = (
            f"train_round deltas of {args.model}, {args.steps} local steps (batch 4 x "
            f"{args.seq_len}) from a fresh adapter, one Dolly category per client"
        )
        if args.deltas:
            save_deltas(args.deltas, deltas, weights, source)
    spec = AdapterSpec.of(deltas[0])
    fp32 = fp32_adapter_bytes(spec)
    p_w = np.asarray(weights, dtype=np.float64) / sum(weights)
    rows = [codec_row(label, cfg.build(seed=0, rnd=1), deltas, p_w, fp32) for label, cfg in CODECS]

    amax = max(float(np.abs(flat(d)).max()) for d in deltas)
    clip = float(f"{amax * 1.01:.2g}")
    ring = [
        ring_row(
            f"fixed point, {b}-bit ring", deltas, weights, args.max_clients, b, clip, fp32, None
        )
        for b in (32, 16, 8)
    ]
    for ratio in (0.25, 0.125):
        sketch = SketchCodec(ratio=ratio, seed=0, round=1)
        label = f"sketch {ratio:g} in 16-bit ring"
        ring.append(ring_row(label, deltas, weights, args.max_clients, 16, clip, fp32, sketch))

    print(f"\n{source}; {len(deltas)} clients, weights {weights}")
    print(
        f"adapter: {len(spec.tensors)} tensors, {spec.numel:,} values; fp32 payload {fp32:,} "
        "bytes (the baseline, measured as Flower counts it)"
    )
    print(
        f"\n{'codec':<18}{'bytes':>10}{'vs fp32':>9}{'bits/val':>10}"
        f"{'client err':>12}{'mean err':>10}{'cpu s':>8}"
    )
    print("-" * 77)
    for r in rows:
        print(
            f"{r['codec']:<18}{r['bytes']:>10,}{r['ratio']:>9.3f}{r['bits_per_value']:>10.2f}"
            f"{r['client_rel_err']:>12.2e}{r['mean_rel_err']:>10.2e}{r['cpu_s']:>8.3f}"
        )
    print(
        "\nclient err: ||decode(x_i) - x_i|| / ||x_i||, mean over clients; mean err: the same for "
        "the weighted mean over clients"
    )
    print(
        f"\nsecure aggregation: masked upload for a sum of up to {args.max_clients} clients, "
        f"per-value clip {clip:g} (oracle: largest |delta| {amax:.3g})"
    )
    print(f"{'encoding':<30}{'ring':>6}{'dtype':>8}{'bytes':>10}{'vs fp32':>9}{'mean err':>10}")
    print("-" * 73)
    for r in ring:
        print(
            f"{r['codec']:<30}{r['ring_bits']:>6}{r['wire_dtype']:>8}{r['bytes']:>10,}"
            f"{r['ratio']:>9.3f}{r['mean_rel_err']:>10.2e}"
        )
    small = [r for r in ring if r["weight_cap"] < 1000]
    if small:
        caps = sorted({r["weight_cap"] for r in small})
        print(
            f"(narrow rings carry the example weight in the same ring: weights capped at {caps}, "
            "the reference mean uses the same capped weights)"
        )
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.json:
        figures = {
            "source": source,
            "weights": weights,
            "numel": spec.numel,
            "fp32_bytes": fp32,
            "clip": clip,
            "codecs": rows,
            "secagg": ring,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
