"""Local LoRA training of the real base model: speed, model-FLOPs utilisation and memory.

Every configuration runs in a fresh subprocess that imports what a client imports
(``client.app``: torch, transformers, peft, flwr), so its peak RSS is the whole process's,
imports and loading included:

* for each quantization mode (``none``, ``int8``, ``nf4``), each precision of the matrix
  products (``--compute-dtype``: fp32, and bf16 as a client with ``--compute-dtype bf16``
  computes), with and without activation checkpointing: seconds per step, tokens/s, peak
  RSS, and MFU against the fp32 GEMM ceiling measured in the same process. Each timed step is
  followed by a short GEMM burst and MFU is the median over these (step, ceiling) pairs, so
  drift in what a shared machine gives the process cancels out (mostly: README). Runs with bf16
  products also report MFU against a bf16 GEMM burst ("own" ceiling), since a CPU with bf16
  instructions multiplies bf16 faster than fp32 and the fp32 figure can then exceed 100%.
  Checkpointing's recomputation cost is the ratio of the paired MFUs without and with it,
  against the bound of one more forward of the decoder;
* for each memory budget: the plan ``client.memory`` chooses (as a client with that
  ``max-memory`` would, allowed to fall back to smaller quantizations), the peak RSS it reaches
  and its tokens/s, or the refusal;
* "lean" runs use what a client under a memory budget uses: the C allocator returns freed memory
  at once (``client.rss``) and head chunks of 8 MiB; by default checkpointed runs are lean and
  the others are not (the fast settings of an unbudgeted client);
* the held-out evaluation's peak (batch 8, chunked head), against the full-logits forward in the
  same process;
* with ``--baseline``, the path before the memory work (full logits, one backward, the C
  allocator's defaults), for the ratio.

    python benchmarks/training.py [--steps 8] [--modes none,int8,nf4] [--checkpointing off,on]
        [--compute-dtype fp32,bf16]
        [--budgets 512MB,768MB,1GB,2GB] [--batch-size 4] [--seq-len 128] [--baseline] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LORA_TARGETS = ("q_proj", "v_proj")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process."""
    import client.app  # noqa: F401  (what a client process has imported)
    from client.rss import current_rss_mb, lifetime_peak_rss_mb, peak_rss_mb, reset_peak_rss

    imports_mb = current_rss_mb()
    if spec["threads"]:
        import torch

        torch.set_num_threads(spec["threads"])
    lean = bool(spec["budget_mb"]) or spec["lean"]
    if lean:  # what a client under a memory budget does (client.memory.MemoryPlan)
        from client.rss import tune_allocator

        tune_allocator()
    import torch
    import torch.nn.functional as F

    from benchmarks._common import (
        llama_decoder_forward_flops,
        llama_train_flops,
        load_average,
        paired_utilisation,
        timed,
    )
    from client.data import IGNORE_INDEX, load_records, to_conversations, tokenize_all
    from client.loss import head_chunk
    from client.memory import (
        HEAD_CHUNKS_MIB,
        MIB,
        MemoryBudgetError,
        MemoryPlan,
        client_plan,
        resident_mib,
    )
    from client.model import (
        ComputeDtype,
        Quantization,
        activation_checkpointing,
        attach_lora,
        compute_precision,
        default_cache_dir,
        ensure_base,
        get_adapter,
        load_base,
        model_shape,
        resolve_compute_dtype,
        resolve_model,
    )
    from client.train import Batch, backward_mean_loss, collate, evaluate, train_round
    from protocol.messages import LoraSpec, TrainInstruction

    batch_size, seq_len, steps = spec["batch_size"], spec["seq_len"], spec["steps"]
    lora = LoraSpec(rank=8, alpha=16.0, dropout=spec["lora_dropout"], target_modules=LORA_TARGETS)
    source = resolve_model(spec["model"])
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "imports_mb": imports_mb}
    requested = ComputeDtype(spec["compute_dtype"])
    # What a client does: an unquantized base is held in bf16 when its products run in bf16.
    compute = resolve_compute_dtype(requested, torch.device("cpu"))
    if spec["budget_mb"]:
        shape = model_shape(ensure_base(source, default_cache_dir()), lora)
        half = compute is ComputeDtype.BF16  # the unquantized base held in bf16
        resident = {q: resident_mib(shape, q, current_rss_mb(), half) for q in Quantization}
        out["budget_mb"] = spec["budget_mb"]
        try:
            plan = client_plan(
                spec["budget_mb"],
                shape,
                preferred=Quantization(spec["mode"]),
                quantize_to_fit=True,
                batch_size=batch_size,
                seq_len=seq_len,
                resident_mb=resident,
                bf16_base=half,
            )
        except MemoryBudgetError as exc:
            return {**out, "refused": str(exc), "load_avg": load_average()}
    else:
        chunk = HEAD_CHUNKS_MIB[-1] if lean else HEAD_CHUNKS_MIB[0]
        micro = spec["micro_batch"] or batch_size
        plan = MemoryPlan(Quantization(spec["mode"]), micro, 1, spec["ckpt"], 0, 0, chunk)
    micro = plan.micro_batch if plan.micro_batch < batch_size else 0
    out.update(
        mode=plan.quantization.value,
        checkpointing=plan.checkpointing,
        micro_batch=plan.micro_batch,
        accumulation=-(-batch_size // plan.micro_batch),
        estimated_mb=plan.estimated_mb or None,
        baseline=spec["baseline"],
        lean=lean,
        head_chunk_mib=plan.head_chunk_mib,
    )

    base = load_base(source, plan.quantization, default_cache_dir(), compute=compute)
    model = attach_lora(base.model, lora)
    model.train()
    out["load_s"] = base.load_seconds
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.model.config.vocab_size, (batch_size, seq_len), generator=gen)
    batch = Batch(ids, torch.ones_like(ids), ids.clone())  # every position labelled
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def plain_backward() -> None:  # before this work: full logits, one cross-entropy
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        F.cross_entropy(logits[:, :-1][keep].float(), targets[keep]).backward()

    def step() -> None:
        if spec["baseline"]:
            plain_backward()
        else:
            backward_mean_loss(model, batch, micro)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cfg = base.model.config
    tokens = batch_size * seq_len
    flops = llama_train_flops(
        cfg, batch_size, seq_len, head_tokens=batch_size * (seq_len - 1), lora_params=lora_params
    )
    chunk_bytes = int(plan.head_chunk_mib * MIB)
    with (
        activation_checkpointing(model, plan.checkpointing),
        head_chunk(chunk_bytes),
        compute_precision(requested) as computed,
    ):
        out["compute_dtype"] = computed.value
        products = torch.bfloat16 if computed.value == "bf16" else torch.float32
        u = paired_utilisation(step, flops, pairs=steps, products=products)
        step_peak = peak_rss_mb()
        realistic = None
        if spec["realistic"]:  # the built-in data through train_round (response-only loss)
            rows = load_records("builtin:chatterbot")[:400]
            examples = tokenize_all(base.tokenizer, to_conversations(rows, "builtin"), seq_len)
            instr = TrainInstruction(
                round=1, lora=lora, local_steps=steps, batch_size=batch_size, seq_len=seq_len
            )
            update = train_round(
                model, examples, instr, get_adapter(model),
                pad_id=base.tokenizer.pad_token_id, client_seed=0, micro_batch=micro,
            )  # fmt: skip
            realistic = float(update.metrics["tokens-per-second"])
    peak = lifetime_peak_rss_mb()

    # Evaluation: 8 held-out rows of seq_len tokens, chunked head vs the full-logits forward.
    model.eval()
    ev_ids = torch.randint(0, cfg.vocab_size, (8, seq_len), generator=gen)
    ev = Batch(ev_ids, torch.ones_like(ev_ids), ev_ids.clone())
    from client.data import TokenizedExample

    ev_examples = [TokenizedExample(tuple(r.tolist()), tuple(r.tolist())) for r in ev.input_ids]
    reset_peak_rss()
    before = current_rss_mb()
    with head_chunk(chunk_bytes), compute_precision(requested):
        t_eval = timed(lambda: evaluate(model, ev_examples, batch_size=8, pad_id=0), 1, warmup=0)
    eval_peak = peak_rss_mb() - before
    reset_peak_rss()
    before = current_rss_mb()
    with torch.no_grad(), compute_precision(requested):
        batch8 = collate(ev_examples, 0, torch.device("cpu"))
        model(input_ids=batch8.input_ids, attention_mask=batch8.attention_mask).logits.sum()
    eval_full_peak = peak_rss_mb() - before

    forward = llama_decoder_forward_flops(cfg, batch_size, seq_len, lora_params)
    out.update(
        seconds_per_step=u.step_wall,
        tokens_per_second=tokens / u.step_wall,
        model_gflop_per_step=flops / 1e9,
        decoder_forward_share=forward / flops,
        gemm_gflops=u.gemm_wall,
        mfu=u.mfu_wall,
        mfu_cpu=u.mfu_cpu,
        mfu_min=u.mfu_wall_spread[0],
        mfu_max=u.mfu_wall_spread[1],
        own_gemm_gflops=u.own_gemm_wall,
        mfu_own_precision=u.mfu_own,
        peak_rss_mb=peak,
        step_peak_rss_mb=step_peak,
        resident_after_mb=current_rss_mb(),
        eval_peak_over_resident_mb=eval_peak,
        eval_full_logits_peak_over_resident_mb=eval_full_peak,
        eval_seconds=t_eval.wall,
        real_tokens_per_s=realistic,
        load_avg=load_average(),
        trainable=lora_params,
    )
    return out


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=8, help="timed (step, GEMM) pairs per config")
    p.add_argument("--modes", default="none,int8,nf4")
    p.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    p.add_argument(
        "--lean",
        default="auto",
        choices=["auto", "on", "off"],
        help="the memory-first settings of a budgeted client (allocator returns freed memory, "
        "8 MiB head chunks); auto: with checkpointing",
    )
    p.add_argument("--micro-batch", type=int, default=0, help="rows per micro-batch (0: all)")
    p.add_argument(
        "--compute-dtype",
        default="fp32,bf16",
        help="precision(s) of the matrix products, fp32 and/or bf16 (mixed precision, as a client "
        "with --compute-dtype bf16)",
    )
    p.add_argument("--budgets", default="512MB,768MB,1GB,2GB", help="'' for none")
    p.add_argument(
        "--budget-compute-dtype",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="precision of the budgeted runs (bf16 holds an unquantized base in bf16)",
    )
    p.add_argument("--budget-mode", default="none", help="preferred quantization under budgets")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default="smollm2")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)"
    )
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--realistic", action="store_true", help="also train_round on chatterbot")
    p.add_argument("--baseline", action="store_true", help="also the pre-change path per mode")
    p.add_argument("--json", action="store_true", help="one JSON object per configuration")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from client.defaults import parse_size
    from client.model import Quantization, default_cache_dir, prepare, resolve_model

    modes = [m for m in args.modes.split(",") if m]
    prepare(resolve_model(args.model), [Quantization(m) for m in modes], default_cache_dir())
    common = {
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lora_dropout": args.lora_dropout,
        "realistic": args.realistic,
        "micro_batch": args.micro_batch,
        "budget_mb": 0,
        "baseline": False,
        "threads": args.threads,
        "compute_dtype": "fp32",
    }
    specs = []
    dtypes = [d for d in args.compute_dtype.split(",") if d]
    for mode in modes:
        if args.baseline:
            specs.append({**common, "mode": mode, "ckpt": False, "baseline": True, "lean": False})
        for dtype in dtypes:
            for ckpt in args.checkpointing.split(","):
                lean = ckpt == "on" if args.lean == "auto" else args.lean == "on"
                specs.append({**common, "mode": mode, "ckpt": ckpt == "on", "lean": lean,
                              "compute_dtype": dtype})  # fmt: skip
    for budget in (b for b in args.budgets.split(",") if b):
        mb = parse_size(budget, "--budgets") / 2**20
        specs.append(
            {**common, "mode": args.budget_mode, "ckpt": False, "budget_mb": mb, "lean": True,
             "compute_dtype": args.budget_compute_dtype}
        )  # fmt: skip

    results = []
    for spec in specs:
        r = _run(spec)
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    _table(results, args)


def _table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    runs = [r for r in results if "budget_mb" not in r]
    print(
        f"\nLoRA r=8 on q,v; batch {args.batch_size} x {args.seq_len} tokens; "
        f"{results[0]['threads']} threads; {args.steps} timed (step, GEMM) pairs; "
        "peak RSS = whole process"
    )
    head = (f"{'mode':<6}{'dtype':>6}{'ckpt':>5}{'lean':>5}{'path':>9}{'s/step':>8}{'tok/s':>7}"
            f"{'GEMM':>7}{'MFU':>6}{'min-max':>10}{'own GEMM':>9}{'MFU':>5}{'peak RSS':>9}"
            f"{'eval +MB':>9}{'(full)':>8}{'load':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in runs:
        path = "plain" if r["baseline"] else "chunked"
        print(f"{r['mode']:<6}{r['compute_dtype']:>6}{'on' if r['checkpointing'] else 'off':>5}"
              f"{'yes' if r['lean'] else 'no':>5}{path:>9}"
              f"{r['seconds_per_step']:>8.2f}{r['tokens_per_second']:>7.0f}"
              f"{r['gemm_gflops']:>7.0f}{r['mfu']:>6.0%}"
              f"{r['mfu_min']:>5.0%}-{r['mfu_max']:<4.0%}"
              f"{r['own_gemm_gflops']:>9.0f}{r['mfu_own_precision']:>5.0%}{r['peak_rss_mb']:>9.0f}"
              f"{r['eval_peak_over_resident_mb']:>9.0f}"
              f"{r['eval_full_logits_peak_over_resident_mb']:>8.0f}"
              f"{r['load_avg']:>6.1f}")  # fmt: skip
    by = {(r["mode"], r["compute_dtype"], r["checkpointing"], r["baseline"]): r for r in runs}
    for mode, dtype in dict.fromkeys((r["mode"], r["compute_dtype"]) for r in runs):
        off, on = by.get((mode, dtype, False, False)), by.get((mode, dtype, True, False))
        if off and on:
            cost = off["mfu"] / on["mfu"] - 1
            bound = off["decoder_forward_share"]
            print(f"  {mode} {dtype}: checkpointing costs {cost:+.0%} step time (paired MFU "
                  f"ratio); one more decoder forward would be {bound:+.0%}; peak RSS "
                  f"x{on['peak_rss_mb'] / off['peak_rss_mb']:.2f}")  # fmt: skip
        plain = by.get((mode, "fp32", False, True))
        if plain and off:
            ratio = off["peak_rss_mb"] / plain["peak_rss_mb"]
            print(f"  {mode} {dtype}: vs the plain path: peak RSS x{ratio:.2f}, "
                  f"MFU {plain['mfu']:.0%} -> {off['mfu']:.0%}")  # fmt: skip
    budgets = [r for r in results if "budget_mb" in r]
    if budgets:
        print(f"\nmemory budgets (preferred mode {args.budget_mode}, quantize-to-fit, "
              f"{args.budget_compute_dtype} products):")  # fmt: skip
        for r in budgets:
            if "refused" in r:
                print(f"  {r['budget_mb']:>6.0f} MiB: refused: {r['refused']}")
                continue
            print(f"  {r['budget_mb']:>6.0f} MiB: {r['mode']}, micro-batch {r['micro_batch']} x "
                  f"{r['accumulation']}, checkpointing {'on' if r['checkpointing'] else 'off'}: "
                  f"estimated {r['estimated_mb']:.0f}, peak RSS {r['peak_rss_mb']:.0f} MiB, "
                  f"{r['tokens_per_second']:.0f} tok/s (MFU {r['mfu']:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
