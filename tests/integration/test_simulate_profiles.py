"""``fedtune simulate --device-profiles`` on Flower's simulation engine (tiny model): profiles
assigned by seed reach the workers (quantization, memory budget), unavailable clients are not
sampled, and every round records each sampled client's profile and the simulated wall-clock.
Issue 13, point 7."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client.model import native_bf16
from client.profiles import Fleet, available, load_profiles
from tests.helpers import metric_rows

pytestmark = pytest.mark.integration

PROFILES = """\
slow:
  share: 0.5
  memory: 3GB
  tokens_per_second: 8
  availability: 0.5
  uplink_mbps: 5
  downlink_mbps: 20
  quantization: int8
fast:
  share: 0.5
  tokens_per_second: 400
  availability: 1.0
  uplink_mbps: 100
  downlink_mbps: 100
"""


def test_device_profiles_shape_the_simulated_rounds(
    tiny_model_dir: Path, model_cache: Path, tmp_path: Path
) -> None:
    (tmp_path / "fleet.yaml").write_text(PROFILES)
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", "--model", str(tiny_model_dir),
         "--quantization", "none", "--cache-dir", str(model_cache),
         "--data", "builtin:chatterbot", "--partition", "iid", "--num-clients", "8",
         "--clients-per-round", "3", "--min-clients", "1", "--rounds", "3",
         "--local-steps", "2", "--seq-len", "32", "--eval-clients", "2", "--seed", "5",
         "--device-profiles", str(tmp_path / "fleet.yaml"), "--output-dir", str(out)],
        capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # The simulator knows which partition each node serves (simulations/engine.py): the
    # coordinator names clients without asking them.
    log = res.stdout + res.stderr
    assert "named 8 node(s) from the simulation's partitions" in log
    assert "their client names" not in log
    names = {
        s["partition_id"]: s["name"]
        for s in json.loads((out / "partitions/index.json").read_text())
    }
    fleet = Fleet.build(load_profiles(tmp_path / "fleet.yaml"), 8, seed=5)
    saved = json.loads((out / "config.json").read_text())
    assert saved["simulation"]["device_profiles"] == {"fast": 4, "slow": 4}
    assert saved["run"]["device-profiles"] == "partitions/profiles.json"  # the run's own copy
    rows = metric_rows(out)
    bf16 = native_bf16(torch.device("cpu"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        rnd = row["round"]
        up = [c for c in range(8) if available(5, rnd, c, fleet.profile(c).availability)]
        assert row["clients_unavailable"] == 8 - len(up)
        sampled = row["client_profiles"]
        assert len(sampled) == min(3, len(up))
        assert sorted(row["clients"]) == sorted(names[c["partition_id"]] for c in sampled)
        assert {c["partition_id"] for c in sampled} <= set(up)
        for c in sampled:
            assert c["profile"] == fleet.profile(c["partition_id"]).name
            assert c["simulated_seconds"] > 0
        assert row["simulated_seconds"] == max(c["simulated_seconds"] for c in sampled)
        # Each client trained in its profile's quantization (int8 on 'slow', the run's 'none'
        # on 'fast') and planned within its profile's memory budget (3 GB on 'slow', none).
        # 'fast' computes in the default 'auto' precision, so where that is bf16 its
        # unquantized base is held in bf16.
        expected = {"slow": (8, 3072.0), "fast": (16 if bf16 else 32, 0.0)}
        got = sorted(
            (m["weight_bits"], m.get("max_memory_mb") or 0.0) for m in row["client_memory"]
        )
        want = sorted(expected[fleet.profile(c["partition_id"]).name] for c in sampled)
        assert got == want and row["clients_ok"] == len(sampled)
