"""Issue 13 point 1: two runs with the same arguments and ``--seed`` give byte-identical adapters
and the same metrics rows (apart from time, memory and bytes on the wire), although Flower gives
the clients other node ids, in another order, in every run. Clients are sampled and named by
their partition names, which they report through the real ClientApp."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator.progress import Progress
from tests.fleet import CATEGORIES, config, make_partitions, run, stable

DP = {"dp": "client", "noise-multiplier": 0.8, "clip-norm": 0.5, "clients-per-round": 3}


@pytest.mark.parametrize("privacy", ["none", "client-dp"])
def test_two_seeded_runs_are_equal_whatever_the_node_ids(
    privacy: str,
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts = make_partitions(tmp_path)
    extra = DP if privacy == "client-dp" else {}
    outs, rows = [], []
    for node_seed in (1, 2):
        out = tmp_path / f"run{node_seed}"
        cfg = config(tiny_model_dir, model_cache, out, parts, **extra)
        with caplog.at_level(logging.INFO, logger="fedtune"):
            rows.append(run(cfg, parts, out, node_seed, progress=Progress(4, live=False)))
        outs.append(out)
    a, b = rows
    assert [r["round"] for r in a] == [0, 1, 2, 3, 4]
    assert [stable(r) for r in a] == [stable(r) for r in b]
    weights = "adapter/adapter_model.safetensors"
    assert (outs[0] / weights).read_bytes() == (outs[1] / weights).read_bytes()
    # The rows name clients by partition name, and the draws are real ones: not every client
    # in every round, and not the same clients every round.
    sampled = [tuple(r["clients"]) for r in a[1:]]
    assert all(set(s) <= set(CATEGORIES) for s in sampled)
    assert len(set(sampled)) > 1
    # Progress lines name clients the same way ("client ai ok (1/3)"), never by node id.
    done = [r.getMessage() for r in caplog.records if ": client " in r.getMessage()]
    assert done and all(m.split(": client ")[1].split()[0] in CATEGORIES for m in done)
    if privacy == "none":
        assert all(len(s) == 3 for s in sampled)
        assert all(r["status"] == "ok" for r in a[1:])
    else:
        assert a[-1]["epsilon"] > 0 and a[-1]["epsilon"] == b[-1]["epsilon"]
        settings = json.loads((outs[0] / "config.json").read_text())["privacy"]
        assert settings["sampling_rate"] == pytest.approx(3 / len(CATEGORIES))
    # A different seed draws other clients (the seed is used, not ignored).
    other = tmp_path / "other"
    cfg = config(tiny_model_dir, model_cache, other, parts, **{**extra, "seed": 8})
    c = run(cfg, parts, other, 3)
    assert [r["clients"] for r in c[1:]] != [r["clients"] for r in a[1:]]
