"""`fedtune simulate --secagg` on Flower's simulation engine with the tiny model: the same run with
plaintext FedAvg and with secure aggregation gives the same adapter within quantization error, and
a run with 30% of the clients crashing mid-protocol completes with their masks removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.integration


def simulate(out: Path, model: Path, cache: Path, *extra: str) -> list[dict]:  # type: ignore[type-arg]
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "simulate",
            "--model",
            str(model),
            "--data",
            "builtin:chatterbot",
            "--partition",
            "iid",
            "--num-clients",
            "4",
            "--clients-per-round",
            "4",
            "--min-clients",
            "2",
            "--local-steps",
            "3",
            "--seq-len",
            "64",
            "--lr",
            "0.01",
            "--quantization",
            "none",
            "--eval-clients",
            "1",
            "--cache-dir",
            str(cache),
            "--output-dir",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_secagg_equals_plaintext_and_survives_thirty_percent_dropout(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    plain = simulate(tmp_path / "plain", tiny_model_dir, model_cache, "--rounds", "1")
    secure = simulate(tmp_path / "secure", tiny_model_dir, model_cache, "--rounds", "1", "--secagg")
    assert plain[1]["status"] == secure[1]["status"] == "ok"
    assert secure[1]["clients_ok"] == 4 and secure[1]["num_examples"] == plain[1]["num_examples"]
    step = secure[1]["secagg"]["step"]
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "secure" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    moved = max(float(np.abs(a[k]).max()) for k in a)
    # quantization: < one step per client per coordinate, times weight-cap / total weight
    assert worst <= 4 * step * 65536 / plain[1]["num_examples"] + 1e-6, worst
    assert moved > 100 * worst  # the adapters moved, and moved the same way

    dropout = ("--inject-dropout", "0.3", "--dropout-stage", "masked-input")
    rows = simulate(
        tmp_path / "drop", tiny_model_dir, model_cache, "--rounds", "2", "--secagg", *dropout
    )
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_sampled"] == 4 and r["clients_ok"] == 3
        (f,) = r["failures"]
        assert f["stage"] == "masked-input" and "injected dropout" in f["reason"]
        assert r["secagg"]["recovered"] == [f["client"]]  # by client name
        assert r["update_norm"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
