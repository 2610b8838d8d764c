"""The real entry point end to end: `fedtune simulate` on Flower's simulation engine (Ray) with a
tiny model, then `fedtune export` and loading the result with PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from client.model import Quantization, attach_lora, load_base, resolve_model, set_adapter
from tests.helpers import fedtune, metric_rows

pytestmark = pytest.mark.integration

ROUND_KEYS = (
    "round",
    "train_loss",
    "eval_loss",
    "clients_sampled",
    "clients_ok",
    "bytes_down",
    "bytes_up",
    "seconds",
)


@pytest.fixture(scope="module")
def run_dir(
    tiny_model_dir: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    res = fedtune(
        "simulate",
        "--model", str(tiny_model_dir),
        "--data", "builtin:chatterbot",
        "--partition", "iid",
        "--num-clients", "3",
        "--clients-per-round", "2",
        "--rounds", "2",
        "--local-steps", "4",
        "--seq-len", "64",
        "--lr", "0.01",
        "--quantization", "nf4",
        "--strategy", "scaffold",
        "--logit-adjustment", "0.5",
        "--cache-dir", str(model_cache),
        "--output-dir", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"run directory: {out}" in res.stdout
    return out


def test_simulation_writes_a_valid_run_directory(run_dir: Path) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["rounds"] == 2 and config["run"]["quantization"] == "nf4"
    assert config["run"]["logit-adjustment"] == 0.5  # composes with SCAFFOLD end to end
    assert config["simulation"]["num_clients"] == 3 and config["simulation"]["partition"] == "iid"
    rows = metric_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert all(k in r for k in ROUND_KEYS)
        assert np.isfinite(r["eval_loss"])
    assert rows[0]["train_loss"] is None
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    fp32_bytes = 4 * sum(int(v.size) for v in adapter.values())
    assert fp32_bytes > 0
    for r in rows[1:]:
        assert r["clients_sampled"] == 2 and r["clients_ok"] == 2 and r["failures"] == []
        # Each of the 2 clients uploads its fp32 adapter delta and, under SCAFFOLD, its
        # control-variate delta of the same size; the global adapter and the server's control
        # variate go down to each.
        assert r["bytes_up"] >= 2 * 2 * fp32_bytes
        assert r["bytes_down"] >= 2 * 2 * fp32_bytes
        assert r["update_norm"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "state.json").read_text())["round"] == 2
    shards = json.loads((run_dir / "partitions" / "index.json").read_text())
    assert len(shards) == 3 and sum(s["rows"] for s in shards) > 1000
    # SCAFFOLD: the server's control variate is saved with the round, each client that trained
    # keeps its own in its state directory under the run.
    assert config["strategy"]["strategy"] == "scaffold"
    server = load_file(str(run_dir / "server-state.safetensors"))
    assert len(server) == len(adapter) and all(k.startswith("control/") for k in server)
    assert all(np.abs(v).max() > 0 for v in server.values())
    # one c_i file per round a client trained (control-rNNNNNN.safetensors), in each client's dir
    controls = sorted({p.parent for p in (run_dir / "client-state").glob("*/scaffold/control-r*")})
    assert 2 <= len(controls) <= 3


def test_export_loads_with_peft_and_reproduces_logits(
    run_dir: Path, tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "adapter"
    res = fedtune(
        "export", str(run_dir), "--output", str(exported), "--cache-dir", str(model_cache)
    )
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((run_dir / "config.json").read_text())["run"]

    # The in-memory model: base + LoRA with the run's final global adapter set directly.
    from coordinator.config import RunConfig

    run_cfg = RunConfig.from_mapping(cfg)
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    mem = attach_lora(base.model, run_cfg.lora, seed=123)
    set_adapter(mem, load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    x = torch.randint(
        0, base.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = mem(input_ids=x).logits

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, str(exported)).eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    assert torch.equal(got, want)

    merged_dir = tmp_path / "merged"
    res = fedtune(
        "export",
        str(run_dir),
        "--output",
        str(merged_dir),
        "--merge",
        "--cache-dir",
        str(model_cache),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()


def test_chat_answers_with_the_adapter(run_dir: Path, model_cache: Path) -> None:
    res = fedtune(
        "chat", "--adapter", str(run_dir), "--prompt", "What is AI?", "--compare",
        "--max-new-tokens", "8", "--cache-dir", str(model_cache),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("[base]") and lines[1].startswith("[adapted]")
