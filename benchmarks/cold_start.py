"""Client cold start: a fresh process getting the real base model ready to train.

Baseline: transformers parsing the GGUF file (tokenizer + dequantized model), what a client does
without fedtune's cache. fedtune: ``load_base`` from the cache (pre-quantized safetensors) plus
LoRA attached. Each measurement runs in its own fresh subprocess; library imports are timed
separately, because a deployed Flower 1.39 client pays them in every per-message process. Each
also reports the load's peak resident memory above what the process held before it.

``--quantization none --compute-dtype bf16`` (an unquantized base held in bf16 for bf16
products) adds a second baseline: the base loaded in fp32 and its frozen weights then converted
in memory, against ``load_base`` converting them from the checkpoint file. For a checkpoint
stored in bf16 (``--model DIR``, a Hugging Face directory; no GGUF baseline then) it adds
another: ``load_base`` loading it in fp32 first, as it did before it loaded such checkpoints as
stored (``client.model.load_dtype``).

    python benchmarks/cold_start.py [--model smollm2] [--quantization nf4] [--compute-dtype fp32]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(kind: str, model: str, quantization: str, compute_dtype: str) -> dict[str, float]:
    t0 = time.perf_counter()
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import client.model
    from client.model import (
        ComputeDtype,
        Quantization,
        attach_lora,
        default_cache_dir,
        ensure_quantized,
        hold_embeddings_in_half,
        hold_linears_in,
        load_base,
        resolve_model,
    )
    from client.rss import current_rss_mb, peak_rss_mb, reset_peak_rss
    from protocol.messages import LoraSpec

    imports = time.perf_counter() - t0
    source = resolve_model(model)
    quant, compute = Quantization(quantization), ComputeDtype(compute_dtype)
    reset_peak_rss()
    before = current_rss_mb()
    t1 = time.perf_counter()
    if kind == "gguf":
        AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name)
    elif kind == "in-memory":  # load_base's bf16 hold as it was: fp32 loaded, converted in memory
        base = load_base(source, quant, default_cache_dir())
        hold_embeddings_in_half(base.model, ensure_quantized(source, quant, default_cache_dir()))
        hold_linears_in(base.model, torch.bfloat16)
        attach_lora(base.model, LoraSpec())
    elif kind == "fp32-first":  # a bf16 checkpoint as load_base loaded it before load_dtype
        client.model.load_dtype = lambda directory, held_in_bf16: torch.float32  # type: ignore[assignment]
        base = load_base(source, quant, default_cache_dir(), compute=compute)
        attach_lora(base.model, LoraSpec())
    else:
        base = load_base(source, quant, default_cache_dir(), compute=compute)
        attach_lora(base.model, LoraSpec())
    load = time.perf_counter() - t1
    return {"imports": imports, "load": load, "load_peak_mb": peak_rss_mb() - before}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2", help="smollm2, a GGUF file or an HF directory")
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.quantization, args.compute_dtype)))
        return

    import torch

    from client.model import (
        Quantization,
        default_cache_dir,
        ensure_quantized,
        load_dtype,
        prepare,
        resolve_model,
    )

    source = resolve_model(args.model)
    quant = Quantization(args.quantization)
    prepare(source, [quant], default_cache_dir())

    def measure(kind: str) -> list[dict[str, float]]:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", kind, "--model", args.model]
            cmd += ["--quantization", args.quantization, "--compute-dtype", args.compute_dtype]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["process"] = time.perf_counter() - t0
            runs.append(row)
        return runs

    held_in_bf16 = args.quantization == "none" and args.compute_dtype == "bf16"
    stored_bf16 = held_in_bf16 and (
        load_dtype(ensure_quantized(source, quant, default_cache_dir()), True) == torch.bfloat16
    )
    rows = {}
    if source.is_gguf:
        rows["transformers GGUF parse (baseline)"] = measure("gguf")
    if held_in_bf16 and source.is_gguf:  # (the in-memory baseline's copy goes beside the file)
        rows["fp32 cache, converted in memory"] = measure("in-memory")
    if stored_bf16:
        rows["bf16 checkpoint loaded in fp32 first"] = measure("fp32-first")
    label = f"fedtune cache ({args.quantization}, {args.compute_dtype}) + LoRA"
    rows[label] = cache = measure("cache")

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\ncold start of the real base model, median of {args.repeats} fresh processes")
    print(f"{'':<38}{'imports s':>10}{'load s':>9}{'process s':>11}{'load peak MB':>14}")
    for name, runs in rows.items():
        print(f"{name:<38}{med(runs, 'imports'):>10.2f}{med(runs, 'load'):>9.2f}"
              f"{med(runs, 'process'):>11.2f}{med(runs, 'load_peak_mb'):>14.0f}")  # fmt: skip
    if source.is_gguf:
        gguf = rows["transformers GGUF parse (baseline)"]
        print(f"\nload speed-up vs GGUF parse: x{med(gguf, 'load') / med(cache, 'load'):.1f}; "
              f"whole process: x{med(gguf, 'process') / med(cache, 'process'):.1f}")  # fmt: skip
    for name, what in (
        ("fp32 cache, converted in memory", "converting in memory"),
        ("bf16 checkpoint loaded in fp32 first", "loading the bf16 checkpoint in fp32 first"),
    ):
        if name in rows:
            ratio = med(cache, "load_peak_mb") / med(rows[name], "load_peak_mb")
            print(f"load peak vs {what}: x{ratio:.2f}")


if __name__ == "__main__":
    main()
