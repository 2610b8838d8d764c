"""Client cold start: a fresh process getting the real base model ready to train.

Baseline: transformers parsing the GGUF file (tokenizer + dequantized model), what a client does
without fedtune's cache. fedtune: ``load_base`` from the cache (pre-quantized safetensors) plus
LoRA attached. Each measurement runs in its own fresh subprocess; library imports are timed
separately, because a deployed Flower 1.39 client pays them in every per-message process.

    python benchmarks/cold_start.py [--quantization nf4] [--repeats 3]
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


def child(kind: str, quantization: str) -> dict[str, float]:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.model import Quantization, attach_lora, default_cache_dir, load_base, resolve_model
    from protocol.messages import LoraSpec

    imports = time.perf_counter() - t0
    source = resolve_model("smollm2")
    t1 = time.perf_counter()
    if kind == "gguf":
        AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name)
    else:
        base = load_base(source, Quantization(quantization), default_cache_dir())
        attach_lora(base.model, LoraSpec())
    return {"imports": imports, "load": time.perf_counter() - t1}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quantization", default="nf4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.quantization)))
        return

    from client.model import Quantization, default_cache_dir, prepare, resolve_model

    prepare(resolve_model("smollm2"), [Quantization(args.quantization)], default_cache_dir())

    def measure(kind: str) -> list[dict[str, float]]:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", kind, "--quantization", args.quantization]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["process"] = time.perf_counter() - t0
            runs.append(row)
        return runs

    gguf = measure("gguf")
    cache = measure("cache")

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\ncold start of the real base model, median of {args.repeats} fresh processes")
    print(f"{'':<34}{'imports s':>10}{'load s':>9}{'process s':>11}")
    print(f"{'transformers GGUF parse (baseline)':<34}{med(gguf, 'imports'):>10.2f}"
          f"{med(gguf, 'load'):>9.2f}{med(gguf, 'process'):>11.2f}")  # fmt: skip
    label = f"fedtune cache ({args.quantization}) + LoRA"
    print(f"{label:<34}{med(cache, 'imports'):>10.2f}"
          f"{med(cache, 'load'):>9.2f}{med(cache, 'process'):>11.2f}")  # fmt: skip
    print(f"\nload speed-up vs GGUF parse: x{med(gguf, 'load') / med(cache, 'load'):.1f}; "
          f"whole process: x{med(gguf, 'process') / med(cache, 'process'):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
