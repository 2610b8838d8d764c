"""Bad input gets one clear line naming the field or file, exit code 2, and nothing starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from cli.main import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model.gguf"], "model path /no/such/model.gguf does not exist"),
        (["--data", "/no/such/data.jsonl"], "data path /no/such/data.jsonl does not exist"),
        (["--partition", "random"], "partition: 'random' is not one of"),
        (["--quantization", "fp4"], "quantization: 'fp4' is not one of none, int8, nf4"),
        (["--rounds", "0"], "rounds: must be >= 1"),
        (
            ["--lora-targets", "nope_proj"],
            "lora.target_modules: model has no module named 'nope_proj'",
        ),
        (["--partition", "iid", "--num-clients", "5000"], "num_clients: 5000 clients but only"),
        (["--clients-per-round", "40"], "clients-per-round: 40 exceeds the 21 clients"),
    ],
)
def test_simulate_rejects_bad_input(
    args: list[str], message: str, tiny_model_dir: Path, model_cache: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base = ["simulate", "--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    code = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and err[-1].startswith("fedtune simulate: error: ")
    assert message in err[-1]
    assert not any("simulating" in line for line in err), "the fleet must not start"
    # Issue 12: failed commands left an empty output directory or client shards.
    assert not (tmp_path / "run").exists(), "a failed command must leave no run directory"


def test_bad_row_is_named_before_anything_starts(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b", "category": "x"}\n{"prompt": "c"}\n')
    code = main(["simulate", "--model", str(tiny_model_dir), "--data", str(data),
                 "--partition", "iid", "--num-clients", "1", "--clients-per-round", "1",
                 "--min-clients", "1", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    assert f"{data}: row 2: no response field" in capsys.readouterr().err


def test_export_of_a_non_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "is neither a run directory nor a PEFT adapter directory" in capsys.readouterr().err


# ----------------------------------------------------------- issue 12: the command line


class _ReachedRay(RuntimeError):
    """Raised in place of Flower's run_simulation: every check passed and Ray would start."""

    exit_code = 99


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace Flower's run_simulation: the tests below never start Ray. A call is recorded
    (with its backend config) and ends the command with exit code 99."""
    import flwr.simulation

    calls: list[dict[str, Any]] = []

    def reached(**kw: Any) -> None:
        calls.append(kw)
        raise _ReachedRay("Ray would start here")

    monkeypatch.setattr(flwr.simulation, "run_simulation", reached)
    return calls


def _simulate(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["simulate", *args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (nothing may change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fake_run(path: Path) -> Path:
    """A run of `fedtune simulate` as it lies on disk after round 0 (shards, index, config)."""
    (path / "partitions").mkdir(parents=True)
    (path / "partitions" / "0000.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    (path / "partitions" / "index.json").write_text(
        json.dumps([{"partition_id": 0, "name": "x", "rows": 1}])
    )
    config = {"run": {"rounds": 1, "output-dir": str(path), "partition-dir": "partitions"},
              "simulation": {"data": "builtin:chatterbot", "partition": "natural:category",
                             "num_clients": 1}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    (path / "state.json").write_text('{"round": 0}\n')
    return path


def test_resume_of_a_directory_that_does_not_exist_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    """Issue 12: `--resume` on a directory that does not exist trained a new run (exit 0)."""
    out = tmp_path / "typo"
    code, err = _simulate(["--resume", "--output-dir", str(out)], capsys)
    assert code == 2 and not no_ray
    assert err == [f"fedtune simulate: error: --resume: {out} does not exist (nothing to resume)"]
    assert not out.exists()


def test_resume_of_a_directory_that_is_not_a_run_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    """Issue 12: `--resume` on the user's own directory trained a new run beside their files."""
    (tmp_path / "notes.txt").write_text("my notes")
    before = _snapshot(tmp_path)
    code, err = _simulate(["--resume", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and not no_ray
    assert err == [
        f"fedtune simulate: error: --resume: {tmp_path} is not a fedtune run directory (it has "
        "no config.json)"
    ]
    assert _snapshot(tmp_path) == before


def test_an_existing_run_is_refused_without_resume_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    """Issue 12: `--output-dir` on an existing run without `--resume` was refused only after Ray
    started, and by then the run's partitions/ and index.json had been rewritten."""
    run = _fake_run(tmp_path / "run")
    before = _snapshot(run)
    code, err = _simulate(["--output-dir", str(run), "--partition", "iid", "--num-clients", "3"],
                          capsys)  # fmt: skip
    assert code == 2 and not no_ray
    assert err[-1] == (
        f"fedtune simulate: error: output directory {run} already holds a run; pass --resume to "
        "continue it or choose another --output-dir"
    )
    assert _snapshot(run) == before


def test_a_new_run_is_refused_in_a_directory_holding_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    (tmp_path / "config.json").write_text('{"mine": true}')
    before = _snapshot(tmp_path)
    code, err = _simulate(["--output-dir", str(tmp_path)], capsys)
    assert code == 2 and not no_ray
    assert err[-1].endswith("is not empty; a new run needs a new or empty directory")
    assert _snapshot(tmp_path) == before


def test_resume_refuses_a_different_data_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    run = _fake_run(tmp_path / "run")
    before = _snapshot(run)
    code, err = _simulate(["--resume", "--output-dir", str(run), "--partition", "iid"], capsys)
    assert code == 2 and not no_ray
    assert err[-1].startswith(
        f"fedtune simulate: error: partition: the run in {run} was split with "
        "'natural:category', not 'iid'"
    )
    assert _snapshot(run) == before


def test_a_csv_with_a_byte_order_mark_is_accepted(
    tmp_path: Path,
    tiny_model_dir: Path,
    model_cache: Path,
    capsys: pytest.CaptureFixture[str],
    no_ray: list[dict[str, Any]],
) -> None:
    """Issue 12: a CSV with a UTF-8 byte-order mark was refused (`found response,
    \\ufeffinstruction`). Here every check passes and the command gets to starting Ray; that
    failure (standing in for any failure before round 0) leaves no run directory behind."""
    data = tmp_path / "excel.csv"
    data.write_bytes("\ufeffinstruction,response,category\nq1,a1,x\nq2,a2,y\n".encode())
    out = tmp_path / "run"
    code, err = _simulate(
        ["--data", str(data), "--clients-per-round", "2", "--model", str(tiny_model_dir),
         "--quantization", "none", "--cache-dir", str(model_cache), "--output-dir", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 99, err
    assert len(no_ray) == 1 and no_ray[0]["num_supernodes"] == 2  # natural:category: x and y
    assert not out.exists()


def test_ray_is_asked_to_start_on_loopback(
    tmp_path: Path,
    tiny_model_dir: Path,
    model_cache: Path,
    capsys: pytest.CaptureFixture[str],
    no_ray: list[dict[str, Any]],
) -> None:
    """What `fedtune simulate` passes to ray.init (tests/integration/test_ray_loopback.py checks
    the sockets of a real simulation)."""
    code, _ = _simulate(
        ["--model", str(tiny_model_dir), "--quantization", "none", "--cache-dir",
         str(model_cache), "--output-dir", str(tmp_path / "run")],
        capsys,
    )  # fmt: skip
    assert code == 99
    init = no_ray[0]["backend_config"]["init_args"]
    assert init["address"] == "local" and init["_node_ip_address"] == "127.0.0.1"


def test_a_truncated_gguf_is_named_and_leaves_no_cache_stub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[dict[str, Any]]
) -> None:
    """Issue 12: a truncated GGUF failed with `cannot reshape array of size 18214336 into shape
    (49152,612)` and left a cache stub."""
    from tests.tiny_model import build_tiny_gguf

    whole = build_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    part = tmp_path / "part.gguf"
    part.write_bytes(whole[: len(whole) // 2])
    cache, out = tmp_path / "cache", tmp_path / "run"
    code, err = _simulate(["--model", str(part), "--cache-dir", str(cache), "--output-dir",
                           str(out)], capsys)  # fmt: skip
    assert code == 2 and not no_ray
    assert err[-1].startswith(
        f"fedtune simulate: error: {part}: truncated or not a GGUF model (its tensors end at byte"
    )
    assert not cache.exists() and not out.exists()


def test_coordinator_run_refuses_a_used_output_directory_before_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _fake_run(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    before = _snapshot(tmp_path)
    base = ["coordinator", "run", "--control-address", "127.0.0.1:1", "--insecure",
            "--model", "/no/such/model.gguf"]  # fmt: skip
    assert main([*base, "--output-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(mine)]) == 2
    assert f"output directory {mine} is not empty" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
