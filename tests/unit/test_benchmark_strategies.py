"""benchmarks/strategies.py --reuse: which saved runs a changed invocation may keep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.strategies import parse_args, previous, saved_config


def saved(out: Path, *argv: str) -> dict[str, Any]:
    """What a finished invocation with ``argv`` leaves in ``out/strategies.json``."""
    result = {
        "config": saved_config(parse_args(["--out", str(out), *argv])),
        "base_loss": 2.8,
        "centralized_by_lr": {"0.002": {"loss": 2.5, "steps": 8, "lr": 0.002}},
        "fedavg": {"strategy": "fedavg", "losses": [2.8, 2.6]},
    }
    (out / "strategies.json").write_text(json.dumps(result))
    return result


def again(out: Path, *argv: str) -> dict[str, Any]:
    return previous(parse_args(["--out", str(out), "--reuse", *argv]))


def test_strategy_options_keep_only_the_centralized_runs(tmp_path: Path) -> None:
    first = saved(tmp_path, "--option", "proximal-mu=0.1")
    assert again(tmp_path, "--option", "proximal-mu=0.1") == first  # nothing changed
    for argv in (
        ["--option", "server-momentum=0.5"],  # a server option only federated runs read
        ["--option", "ffa-lora=true"],  # the ceiling stays a centralized run of the whole adapter
        [],  # the option dropped
        ["--lr", "0.004", "--option", "proximal-mu=0.1"],  # the clients' lr
    ):
        kept = again(tmp_path, *argv)
        assert kept["centralized_by_lr"] == first["centralized_by_lr"], argv
        assert "fedavg" not in kept, argv


def test_options_the_centralized_run_reads_retrain_everything(tmp_path: Path) -> None:
    saved(tmp_path, "--option", "server-momentum=0.5")
    assert again(tmp_path, "--option", "server-momentum=0.5", "--option", "lora-rank=4") == {}
    assert again(tmp_path, "--option", "server-momentum=0.5", "--local-steps", "2") == {}
    assert previous(parse_args(["--out", str(tmp_path), "--option", "server-momentum=0.5"])) == {}


def test_a_file_from_before_central_lr_keeps_its_centralized_run(tmp_path: Path) -> None:
    old = saved(tmp_path)
    del old["centralized_by_lr"]
    old["centralized"] = {"loss": 2.5, "steps": 8}  # no lr: trained at the clients' --lr
    (tmp_path / "strategies.json").write_text(json.dumps(old))
    kept = again(tmp_path, "--option", "server-momentum=0.5")
    lr = f"{old['config']['lr']:g}"
    assert kept["centralized_by_lr"] == {lr: {"loss": 2.5, "steps": 8, "lr": old["config"]["lr"]}}
    assert "fedavg" not in kept
