"""benchmarks/strategies.py --reuse: which saved runs a changed invocation may keep; --ceiling-from:
which centralized runs another directory may lend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.strategies import ceiling_from, parse_args, previous, saved_config


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


def lender(out: Path, *argv: str) -> dict[str, Any]:
    """A centralized-only run's directory (``--strategies ''``) with its adapter saved."""
    result = saved(out, "--strategies", "", *argv)
    (out / "adapters").mkdir()
    (out / "adapters" / "centralized@0.002.safetensors").write_bytes(b"saved")
    return result


def borrow(src: Path, *argv: str) -> dict[str, Any]:
    return ceiling_from(parse_args(["--ceiling-from", str(src), *argv]))


def test_ceiling_from_lends_the_centralized_runs_to_other_client_settings(tmp_path: Path) -> None:
    made = lender(tmp_path, "--central-lr", "2e-3")
    # The federated side may differ in what only it reads: the clients' lr, strategy options.
    for argv in ([], ["--lr", "0.004"], ["--option", "proximal-mu=0.1"]):
        assert borrow(tmp_path, "--central-lr", "2e-3", *argv) == made["centralized_by_lr"]


def test_ceiling_from_refuses_what_it_cannot_lend(tmp_path: Path) -> None:
    lender(tmp_path, "--central-lr", "2e-3")
    with pytest.raises(SystemExit, match=r"other centralized settings \(local_steps=3\)"):
        borrow(tmp_path, "--central-lr", "2e-3", "--local-steps", "16")
    with pytest.raises(SystemExit, match=r"no centralized run at lr 0\.004"):
        borrow(tmp_path, "--central-lr", "2e-3,4e-3")
    (tmp_path / "adapters" / "centralized@0.002.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"adapters/centralized@0\.002\.safetensors is missing"):
        borrow(tmp_path, "--central-lr", "2e-3")
    with pytest.raises(SystemExit, match=r"no strategies\.json there"):
        borrow(tmp_path / "elsewhere", "--central-lr", "2e-3")
    (tmp_path / "strategies.json").write_text("{")
    with pytest.raises(SystemExit, match=r"strategies\.json: not JSON"):
        borrow(tmp_path, "--central-lr", "2e-3")
