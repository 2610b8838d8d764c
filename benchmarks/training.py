"""Local LoRA training throughput of the real base model for each quantization mode.

For ``none``, ``int8`` and ``nf4`` (each in a fresh subprocess, so peak RSS is that mode's own):
tokens/s, seconds per step and peak RSS at batch 4 x 128 tokens, the dense fp32 GEMM throughput
measured in the same process, and the model-FLOPs utilisation (MFU) this implies. Each timed step
is followed by a short GEMM burst and MFU is the median over these (step, ceiling) pairs, so drift
in what a shared machine gives the process cancels out; min and max over the pairs are printed too.
MFU is reported on wall time and on process CPU time.
A second, realistic figure trains on the built-in chatterbot data (short sequences, loss on the
response tokens only).

    python benchmarks/training.py [--steps 8] [--modes none,int8,nf4] [--model smollm2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_mode(mode: str, model_spec: str, steps: int, lora_dropout: float) -> dict[str, float]:
    import numpy as np
    import torch

    from benchmarks._common import (
        llama_train_flops,
        load_average,
        paired_utilisation,
        peak_rss_mb,
    )
    from client.data import load_records, to_conversations, tokenize_all
    from client.model import (
        Quantization,
        attach_lora,
        default_cache_dir,
        get_adapter,
        load_base,
        resolve_model,
    )
    from client.train import Batch, response_loss, train_round
    from protocol.messages import LoraSpec, TrainInstruction

    lora = LoraSpec(rank=8, alpha=16.0, dropout=lora_dropout, target_modules=("q_proj", "v_proj"))
    base = load_base(resolve_model(model_spec), Quantization(mode), default_cache_dir())
    model = attach_lora(base.model, lora)
    model.train()
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.model.config.vocab_size, (4, 128), generator=gen)
    batch = Batch(ids, torch.ones_like(ids), ids.clone())  # every position labelled
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss, n = response_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    threads = torch.get_num_threads()
    flops = llama_train_flops(
        base.model.config, 4, 128, head_tokens=4 * 127, lora_params=lora_params
    )
    u = paired_utilisation(step, flops, pairs=steps)

    # Realistic: the built-in data through train_round (response-only loss, dynamic padding).
    rows = load_records("builtin:chatterbot")[:400]
    examples = tokenize_all(base.tokenizer, to_conversations(rows, "builtin"), 128)
    instr = TrainInstruction(round=1, lora=lora, local_steps=steps, batch_size=4, seq_len=128)
    update = train_round(
        model,
        examples,
        instr,
        get_adapter(model),
        pad_id=base.tokenizer.pad_token_id,
        client_seed=0,
    )
    return {
        "mode": mode,  # type: ignore[dict-item]
        "threads": threads,
        "load_s": base.load_seconds,
        "step_s": u.step_wall,
        "tokens_per_s": 512 / u.step_wall,
        "model_gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / u.step_wall / 1e9,
        "gemm_gflops": u.gemm_wall,
        "mfu_wall": u.mfu_wall,
        "mfu_cpu": u.mfu_cpu,
        "mfu_min": u.mfu_wall_spread[0],
        "mfu_max": u.mfu_wall_spread[1],
        "real_tokens_per_s": float(update.metrics["tokens-per-second"]),
        "peak_rss_mb": peak_rss_mb(),
        "load_avg": load_average(),
        "trainable": float(np.float64(lora_params)),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed (step, GEMM) pairs per mode")
    p.add_argument("--modes", default="none,int8,nf4")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.model, args.steps, args.lora_dropout)))
        return

    from client.model import Quantization, default_cache_dir, prepare, resolve_model

    prepare(
        resolve_model(args.model),
        [Quantization(m) for m in args.modes.split(",")],
        default_cache_dir(),
    )
    results = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
        cmd += ["--model", args.model, "--lora-dropout", str(args.lora_dropout)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(
        f"\nLoRA r=8 on q,v; batch 4 x 128 tokens; {results[0]['threads']} threads; "
        f"{args.steps} timed steps; lora dropout {args.lora_dropout}"
    )
    cols = [
        ("mode", "mode", "{:<6}"),
        ("step s", "step_s", "{:>8.2f}"),
        ("tok/s", "tokens_per_s", "{:>8.0f}"),
        ("GFLOP/s", "achieved_gflops", "{:>9.1f}"),
        ("GEMM", "gemm_gflops", "{:>8.1f}"),
        ("MFU", "mfu_wall", "{:>7.0%}"),
        ("MFU(cpu)", "mfu_cpu", "{:>10.0%}"),
        ("MFU min", "mfu_min", "{:>9.0%}"),
        ("MFU max", "mfu_max", "{:>9.0%}"),
        ("real tok/s", "real_tokens_per_s", "{:>11.0f}"),
        ("RSS MB", "peak_rss_mb", "{:>8.0f}"),
        ("load", "load_avg", "{:>6.1f}"),
    ]
    widths = [6, 8, 8, 9, 8, 7, 10, 9, 9, 11, 8, 6]
    print("".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, ((name, _, _), w) in
                  enumerate(zip(cols, widths, strict=True))))  # fmt: skip
    print("-" * sum(widths))
    for r in results:
        print("".join(fmt.format(r[key]) for _, key, fmt in cols))
    base = results[0]
    print("\nratio vs none (same run):")
    for r in results[1:]:
        step_ratio = r["step_s"] / base["step_s"]
        rss_ratio = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"  {r['mode']}: step time x{step_ratio:.2f}, peak RSS x{rss_ratio:.2f}")
    print(
        f"model FLOPs per step: {base['model_gflop_per_step']:.0f} GFLOP; load = 1-min load average"
    )


if __name__ == "__main__":
    main()
