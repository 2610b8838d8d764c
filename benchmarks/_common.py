"""Shared helpers for the benchmarks: timing, peak memory, FLOP counting, machine load."""

from __future__ import annotations

import os
import resource
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


def matmul_ceiling(n: int = 1536, repeats: int = 10) -> tuple[float, float]:
    """Dense fp32 GEMM throughput of this process: (GFLOP/s wall, GFLOP/s per CPU-second)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = timed(lambda: torch.mm(a, b), repeats, warmup=3)
    flops = 2 * n**3
    return flops / t.wall / 1e9, flops / t.cpu / 1e9 * torch.get_num_threads()


def llama_train_flops(
    config: Any, batch: int, seq: int, head_tokens: int, lora_params: int
) -> float:
    """Model FLOPs of one LoRA training step on a llama-style decoder with a frozen base.

    Forward: 2 FLOPs per multiply-add for every linear layer and the attention products (full
    T x T, as usual for MFU); the LM head only on the ``head_tokens`` positions it is applied to.
    Backward: input gradients through every frozen matmul (same as forward) plus weight gradients
    of the LoRA matrices only; attention backward counted as 2x its forward.
    """
    d = config.hidden_size
    f = config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    layers = config.num_hidden_layers
    tokens = batch * seq
    per_layer_linear = (
        d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * f
    )
    linear = 2 * tokens * layers * per_layer_linear
    attention = 2 * 2 * batch * seq * seq * heads * head_dim * layers
    head = 2 * head_tokens * d * config.vocab_size
    lora_fwd = (
        2 * tokens * lora_params
    )  # x @ A^T @ B^T, roughly 2 FLOPs per LoRA parameter and token
    forward = linear + attention + head + lora_fwd
    backward = linear + 2 * attention + head + 2 * lora_fwd
    return float(forward + backward)
