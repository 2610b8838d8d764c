"""Shared helpers for the benchmarks: timing, peak memory, FLOP counting, machine load."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds per call
    cpu: float  # process CPU seconds per call (user + system, all threads)


def run_values(args: Any) -> dict[str, Any]:
    """The run options every federated benchmark takes from its command line (``--rounds``,
    ``--clients-per-round``, ``--local-steps``, ``--batch-size``, ``--seq-len``, ``--lr``,
    ``--seed``), spelled as ``RunConfig.from_mapping`` reads them; one client is enough."""
    return {
        "rounds": args.rounds,
        "clients-per-round": args.clients_per_round,
        "min-clients": 1,
        "local-steps": args.local_steps,
        "batch-size": args.batch_size,
        "seq-len": args.seq_len,
        "learning-rate": args.lr,
        "seed": args.seed,
    }


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return Timing((time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats)


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass(frozen=True)
class PairedUtilisation:
    """Step times, each paired with a GEMM ceiling measured right after it, and the MFU medians."""

    step_wall: float  # median seconds per step
    gemm_wall: float  # median GEMM GFLOP/s (wall)
    mfu_wall: float  # median over pairs of achieved / adjacent ceiling (wall time)
    mfu_cpu: float  # the same on process CPU time
    mfu_wall_spread: tuple[float, float]  # (min, max) over pairs
    own_gemm_wall: float  # median GEMM GFLOP/s in the products' own precision (wall)
    mfu_own: float  # median over pairs of achieved / adjacent ceiling in that precision


def paired_utilisation(
    step: Callable[[], Any],
    flops_per_step: float,
    pairs: int,
    warmup: int = 2,
    products: torch.dtype = torch.float32,
) -> PairedUtilisation:
    """MFU robust to other work sharing the cores: every step is followed by a short GEMM burst.

    On a shared 2-core machine the throughput available to the process drifts by 10-20% over a
    minute. Dividing each step's achieved FLOP/s by the ceiling measured a moment later cancels
    most of that drift; the medians over the pairs are what is reported. The ceiling is fp32 (the
    figure the targets are stated against); where the step's products are another precision, a
    second burst in that precision gives ``mfu_own``, the utilisation of what that precision can do.
    """
    for _ in range(warmup):
        step()
    matmul_ceiling(repeats=3)  # warm the GEMM path too
    if products != torch.float32:
        matmul_ceiling(repeats=3, dtype=products)
    threads = torch.get_num_threads()
    walls, gemms, owns, mfu_w, mfu_c, mfu_o = [], [], [], [], [], []
    for _ in range(pairs):
        t = timed(step, 1, warmup=0)
        g_wall, g_cpu = matmul_ceiling()
        o_wall = g_wall if products == torch.float32 else matmul_ceiling(dtype=products)[0]
        walls.append(t.wall)
        gemms.append(g_wall)
        owns.append(o_wall)
        mfu_w.append(flops_per_step / t.wall / 1e9 / g_wall)
        mfu_c.append(flops_per_step / (t.cpu / threads) / 1e9 / g_cpu)
        mfu_o.append(flops_per_step / t.wall / 1e9 / o_wall)
    return PairedUtilisation(
        step_wall=statistics.median(walls),
        gemm_wall=statistics.median(gemms),
        mfu_wall=statistics.median(mfu_w),
        mfu_cpu=statistics.median(mfu_c),
        mfu_wall_spread=(min(mfu_w), max(mfu_w)),
        own_gemm_wall=statistics.median(owns),
        mfu_own=statistics.median(mfu_o),
    )


def matmul_ceiling(
    n: int = 1536, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Dense GEMM throughput of this process in ``dtype`` (fp32 unless asked): (GFLOP/s wall,
    GFLOP/s per CPU-second). Also in that dtype when called inside a caller's autocast block."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    with torch.autocast("cpu", enabled=False):
        t = timed(lambda: torch.mm(a, b), repeats, warmup=3)
    flops = 2 * n**3
    return flops / t.wall / 1e9, flops / t.cpu / 1e9 * torch.get_num_threads()


def _llama_layer_flops(config: Any, batch: int, seq: int) -> tuple[int, int]:
    """(linear, attention) FLOPs of one forward of a llama-style decoder's layers: 2 FLOPs per
    multiply-add of every projection (q, k, v, o, gate, up, down) and of the attention products
    (full T x T)."""
    d = config.hidden_size
    f = config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    layers = config.num_hidden_layers
    per_layer_linear = (
        d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * f
    )
    linear = 2 * batch * seq * layers * per_layer_linear
    attention = 2 * 2 * batch * seq * seq * heads * head_dim * layers
    return linear, attention


def llama_decoder_forward_flops(config: Any, batch: int, seq: int, lora_params: int) -> float:
    """FLOPs of one forward of the decoder layers (what activation checkpointing recomputes)."""
    linear, attention = _llama_layer_flops(config, batch, seq)
    return float(linear + attention + 2 * batch * seq * lora_params)


def llama_train_flops(
    config: Any, batch: int, seq: int, head_tokens: int, lora_params: int
) -> float:
    """Model FLOPs of one LoRA training step on a llama-style decoder with a frozen base.

    Forward: 2 FLOPs per multiply-add for every linear layer and the attention products (full
    T x T, as usual for MFU); the LM head only on the ``head_tokens`` positions it is applied to.
    Backward: input gradients through every frozen matmul (same as forward) plus weight gradients
    of the LoRA matrices only; attention backward counted as 2x its forward.
    """
    linear, attention = _llama_layer_flops(config, batch, seq)
    tokens = batch * seq
    head = 2 * head_tokens * config.hidden_size * config.vocab_size
    lora_fwd = (
        2 * tokens * lora_params
    )  # x @ A^T @ B^T, roughly 2 FLOPs per LoRA parameter and token
    forward = linear + attention + head + lora_fwd
    backward = linear + 2 * attention + head + 2 * lora_fwd
    return float(forward + backward)
