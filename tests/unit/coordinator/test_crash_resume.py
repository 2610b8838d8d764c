"""Issue 13 point 2: a federation killed at an exact point (``os._exit`` in a child process: no
clean-up runs, as after ``kill -9``), then resumed, ends with the same adapter bytes and the same
metrics rows (apart from time, memory and bytes) as a run that was never killed. The kill is
placed inside a round (while a client trains) and inside the checkpoint write; the resumed run
gets other node ids than the killed one (as a restarted simulation does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet import config, make_partitions, run, stable

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = "adapter/adapter_model.safetensors"
DP = {"dp": "client", "noise-multiplier": 0.8, "clip-norm": 0.5}
# SCAFFOLD: the server's control variate (server-state.safetensors) and each client's c_i (in
# client-state/, beside the run's partitions) must both continue as if never stopped.
SCAFFOLD = {"strategy": "scaffold"}
SETTINGS = {"fedavg": {}, "client-dp": DP, "scaffold": SCAFFOLD}


def killed_run(
    tiny_model_dir: Path, cache: Path, out: Path, parts: Path, kill_at: str, extra: dict
) -> None:
    cmd = [
        sys.executable, "-m", "tests.fleet",
        "--model", str(tiny_model_dir), "--cache", str(cache), "--out", str(out),
        "--parts", str(parts), "--node-seed", "5", "--kill-at", kill_at,
        "--config", json.dumps(extra),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 137, f"not killed at {kill_at}: {res.stderr[-2000:]}"


@pytest.fixture(scope="module")
def reference(
    tiny_model_dir: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list]]:
    """Uninterrupted runs, each with its own partitions and client state directories."""
    refs = {}
    for name, extra in SETTINGS.items():
        root = tmp_path_factory.mktemp(f"ref-{name}")
        parts = make_partitions(root)
        out = root / "run"
        rows = run(config(tiny_model_dir, model_cache, out, parts, **extra), parts, out, 1)
        refs[name] = (out, rows)
    return refs


@pytest.mark.parametrize(
    ("kill_at", "privacy"),
    [
        ("train:2:2", "fedavg"),  # round 2, while its second client trains
        ("staged:2", "fedavg"),  # round 2 written to scratch, not committed
        ("adapter-moved-aside:2", "fedavg"),  # between the two renames of adapter/
        ("metrics-installed:2", "fedavg"),  # the row is in, state.json still round 1
        ("train:3:1", "client-dp"),  # DP ledger and seeded cohort continue
        ("committed:1", "client-dp"),
        ("train:3:2", "scaffold"),  # a client has written its round-3 c_i, the round is lost
    ],
)
def test_killed_then_resumed_equals_uninterrupted(
    kill_at: str,
    privacy: str,
    reference: dict[str, tuple[Path, list]],
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,
) -> None:
    extra = SETTINGS[privacy]
    fleet = make_partitions(tmp_path)
    out = tmp_path / "run"
    killed_run(tiny_model_dir, model_cache, out, fleet, kill_at, extra)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    cfg = config(tiny_model_dir, model_cache, out, fleet, **extra)
    rows = run(cfg, fleet, out, node_seed=9, resume=True)

    ref_dir, ref_rows = reference[privacy]
    assert (out / WEIGHTS).read_bytes() == (ref_dir / WEIGHTS).read_bytes()
    assert [stable(r) for r in rows] == [stable(r) for r in ref_rows]
    assert json.loads((out / "state.json").read_text()) == json.loads(
        (ref_dir / "state.json").read_text()
    )
    assert (out / "server-state.safetensors").read_bytes() == (
        ref_dir / "server-state.safetensors"
    ).read_bytes()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert all(r["status"] == "ok" for r in rows[1:]), "every round trained"
    if kill_at.split(":")[0] in ("staged", "adapter-moved-aside", "metrics-installed"):
        assert leftovers, "the kill inside the checkpoint write left nothing to clean up?"
