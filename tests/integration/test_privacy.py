"""Differential privacy through the real entry point (`fedtune simulate` on Flower's simulation
engine, tiny model): the issue's done-when check for client-level DP, and sample-level DP-SGD
with FFA-LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp
from safetensors.numpy import load_file

from tests.helpers import fedtune, metric_rows

pytestmark = pytest.mark.integration


def recompute_epsilon(run: Path) -> float:
    """Epsilon from the run directory alone: the ledger in state.json and the delta and
    accountant in config.json, composed with dp-accounting directly."""
    privacy = json.loads((run / "config.json").read_text())["privacy"]
    ledger = json.loads((run / "state.json").read_text())["privacy"]["ledger"]
    events = []
    for e in ledger["events"]:
        single = dpa.PoissonSampledDpEvent(
            e["sampling_rate"], dpa.GaussianDpEvent(e["noise_multiplier"])
        )
        events.append(dpa.SelfComposedDpEvent(single, e["count"]))
    acc = rdp.RdpAccountant() if privacy["accountant"] == "rdp" else pld.PLDAccountant()
    return float(acc.compose(dpa.ComposedDpEvent(events)).get_epsilon(privacy["delta"]))


def test_client_level_dp_reaches_the_target_epsilon(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = fedtune(
        "simulate",
        "--model", str(tiny_model_dir),
        "--data", "builtin:chatterbot",
        "--partition", "iid",
        "--num-clients", "4",
        "--clients-per-round", "2",
        "--rounds", "3",
        "--local-steps", "2",
        "--seq-len", "64",
        "--lr", "0.01",
        "--quantization", "nf4",
        "--dp", "client",
        "--target-epsilon", "8",
        "--clip-norm", "0.5",
        "--cache-dir", str(model_cache),
        "--output-dir", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["epsilon"] == 0.0
    for r in rows[1:]:
        assert 0 < r["epsilon"] <= 8.0 and r["delta"] == 1e-5
        assert np.isfinite(r["eval_loss"])
    privacy = json.loads((out / "config.json").read_text())["privacy"]
    assert privacy["target_epsilon"] == 8.0 and privacy["calibrated_rounds"] == 3
    assert privacy["sampling_rate"] == 0.5 and privacy["clip_norm"] == 0.5
    assert privacy["noise_multiplier"] > 0
    # The done-when check: the final epsilon, recomputed independently, agrees to 1e-6 ...
    assert recompute_epsilon(out) == pytest.approx(rows[-1]["epsilon"], abs=1e-6)
    # ... and the calibration spent the budget: a 4th round would pass it.
    assert rows[-1]["epsilon"] > 7.0
    assert f"privacy: ({rows[-1]['epsilon']:.4g}, 1e-05)-DP" in res.stdout


def test_sample_level_dpsgd_with_ffa_lora(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = fedtune(
        "simulate",
        "--model", str(tiny_model_dir),
        "--data", "builtin:chatterbot",
        "--partition", "iid",
        "--num-clients", "3",
        "--clients-per-round", "2",
        "--rounds", "2",
        "--local-steps", "2",
        "--batch-size", "8",
        "--seq-len", "64",
        "--quantization", "int8",
        "--dp", "sample",
        "--noise-multiplier", "1.0",
        "--clip-norm", "1.0",
        "--ffa-lora",
        "--cache-dir", str(model_cache),
        "--output-dir", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients_ok"] == 2 and r["status"] == "ok"
        assert r["client_epsilon_max"] > 0
        assert r["num_examples"] == 2  # DP-SGD clients report a weight of 1, not their size
    # Every client that trained keeps its ledger in its own state directory.
    ledgers = sorted((out / "client-state").glob("*/privacy/sample-ledger.json"))
    assert ledgers
    counts = [json.loads(p.read_text())["events"][0]["count"] for p in ledgers]
    assert sum(counts) == 2 * 2 * 2  # 2 rounds x 2 clients x 2 local steps
    # FFA-LoRA: the A matrices of the final adapter are still the shared initialisation.
    from client.model import Quantization, attach_lora, get_adapter, load_base, resolve_model
    from coordinator.config import RunConfig

    cfg = RunConfig.from_mapping(json.loads((out / "config.json").read_text())["run"])
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    init = get_adapter(attach_lora(base.model, cfg.lora, seed=cfg.seed))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k, v in init.items():
        if ".lora_A." in k:
            np.testing.assert_array_equal(saved[k], v)
    assert any(np.abs(saved[k] - init[k]).max() > 0 for k in init if ".lora_B." in k)
