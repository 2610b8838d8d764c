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

The federated benchmark of the issue (held-out loss after the last round for each codec, plaintext
and under --secagg, mixed ranks) needs the round pipeline and is not here yet.

    python benchmarks/compression.py [--clients 3] [--steps 3] [--seq-len 128] [--random]
        [--deltas CACHE.npz] [--json PATH]
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

from flwr.app import Array, ArrayRecord

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
    args = p.parse_args()

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
