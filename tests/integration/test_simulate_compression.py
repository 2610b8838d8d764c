"""``fedtune simulate`` (Flower's simulation engine, Ray) with compressed updates, error feedback
and mixed ranks: the whole CLI path, tiny model. The residuals live in each simulated client's
state directory inside the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import fedtune, metric_rows

pytestmark = pytest.mark.integration


def test_simulate_int4_error_feedback_and_mixed_ranks(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = fedtune(
        "simulate",
        "--model", str(tiny_model_dir),
        "--data", "builtin:chatterbot",
        "--partition", "iid",
        "--num-clients", "3",
        "--clients-per-round", "3",
        "--rounds", "2",
        "--local-steps", "2",
        "--seq-len", "64",
        "--lr", "0.01",
        "--quantization", "none",
        "--lora-rank", "2",
        "--client-ranks", "1,2",
        "--compress", "int4",
        "--compress-block-size", "32",
        "--error-feedback",
        "--cache-dir", str(model_cache),
        "--output-dir", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_ok"] == 3, r.get("reason")
        assert r["compress"] == "int4" and r["bytes_up_ratio"] < 0.3
        assert sorted(r["client_ranks"].values()) == [1, 1, 2]
    residuals = sorted(out.parent.rglob("compression/residual.safetensors"))
    assert len(residuals) == 3, residuals
    shapes = sorted(
        next(v.shape[0] for k, v in load_file(str(p)).items() if "lora_A" in k) for p in residuals
    )
    assert shapes == [1, 1, 2]  # each client's residual at its own rank
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())
