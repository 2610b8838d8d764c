"""Issue 13 point 2: saving a round is all or nothing. The process is killed (``os._exit`` in a
forked child, so no ``finally`` or ``except`` runs: what ``kill -9`` leaves) at every named step of
``RunDirectory.save_round``; the run directory then resumes at a saved round, never a mix of two,
and finishing the run gives the same bytes as a run that was never killed."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from client import durable
from coordinator import rundir as rundir_module
from coordinator.rundir import RunDirectory, RunDirError

STEPS = [
    "staged",
    "committed",
    "server-state-installed",
    "adapter-moved-aside",
    "adapter-installed",
    "metrics-installed",
    "state-installed",
    "done",
]
KILLED = 137


def adapter_of(rnd: int) -> dict[str, np.ndarray]:
    return {"w": np.full((64, 64), float(rnd), np.float32)}


def writer(rnd: int) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        directory.mkdir()
        save_file(adapter_of(rnd), str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text('{"r": 2}\n')

    return write


def save(run: RunDirectory, rnd: int) -> None:
    run.save_round(
        rnd,
        writer(rnd),
        {"privacy": {"ledger": list(range(rnd))}, "sampler": {"round": rnd}},
        {"m": np.full(8, rnd, np.float64)},
        row={"round": rnd, "loss": 1.0 / (rnd + 1)},
    )


def run_rounds(path: Path, rounds: range) -> None:
    run = RunDirectory.open(path, {"run": {"rounds": 3}}, resume=path.exists())
    for rnd in rounds:
        save(run, rnd)


def files(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _killed_child(path: str, step: str, crash_round: int) -> None:
    def crash(name: str) -> None:
        if name == step and current[0] == crash_round:
            os._exit(KILLED)

    current = [0]
    rundir_module.checkpoint_step = crash  # type: ignore[assignment]
    run = RunDirectory.open(Path(path), {"run": {"rounds": 3}}, resume=True)
    for rnd in range(crash_round + 1):
        current[0] = rnd
        save(run, rnd)
    os._exit(0)


def kill_during(path: Path, step: str, crash_round: int) -> None:
    proc = multiprocessing.get_context("fork").Process(
        target=_killed_child, args=(str(path), step, crash_round)
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == KILLED, f"the child was not killed at {step!r}"


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_every_step_of_a_save_then_resume_is_equal(tmp_path: Path, step: str) -> None:
    reference = tmp_path / "reference"
    run_rounds(reference, range(3))
    want = files(reference)

    crashed = tmp_path / "crashed"
    kill_during(crashed, step, crash_round=2)
    run = RunDirectory(crashed)
    state, adapter = run.load_state()  # type: ignore[misc]
    committed = STEPS.index(step) >= STEPS.index("committed")
    # Round 2 counts once it committed, and then all of it (adapter, server state, row) is in
    # place; before that the directory is round 1, all of it.
    rnd = 2 if committed else 1
    assert state["round"] == rnd and state["sampler"] == {"round": rnd}
    np.testing.assert_array_equal(adapter["w"], adapter_of(rnd)["w"])
    np.testing.assert_array_equal(run.load_server_arrays(rnd)["m"], np.full(8, rnd))
    assert [r["round"] for r in run.read_metrics()] == list(range(rnd + 1))
    leftovers = [p.name for p in crashed.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    if not committed:
        save(run, 2)  # the round is redone
    assert files(crashed) == want


def test_a_torn_metrics_line_and_a_truncated_scratch_file_are_cleaned_up(tmp_path: Path) -> None:
    path = tmp_path / "run"
    run_rounds(path, range(2))
    want_rows = RunDirectory(path).read_metrics()
    with (path / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "lo')  # an append cut short
    scratch = path / ".round-2.tmp-abc"
    (scratch / "adapter").mkdir(parents=True)
    (scratch / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00\x01")  # truncated
    (path / ".state.jsonxyz.tmp").write_text("{")
    run = RunDirectory(path)
    state, _ = run.load_state()  # type: ignore[misc]
    assert state["round"] == 1
    assert run.read_metrics() == want_rows
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []


def test_rows_the_state_does_not_cover_are_dropped_and_duplicates_kept_once(
    tmp_path: Path,
) -> None:
    """Today's failure: a crash after state.json and before the metrics row lost a row for good
    (rounds [0, 1, 3, 4]); with a duplicated or later row the reconciliation keeps one per
    saved round."""
    path = tmp_path / "run"
    run_rounds(path, range(3))
    run = RunDirectory(path)
    rows = run.read_metrics()
    with (path / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(rows[1]) + "\n")
        fh.write(json.dumps({"round": 3, "loss": 0.0}) + "\n")
    run.load_state()
    assert run.read_metrics() == rows


def test_a_replaced_adapter_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run"
    run_rounds(path, range(2))
    save_file(adapter_of(7), str(path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(RunDirError, match="is not the adapter of round 1"):
        RunDirectory(path).load_state()


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    durable.write_text_atomic(target, "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            durable.write_text_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left
    durable.write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_rows_are_appended_also_when_they_are_long(tmp_path: Path) -> None:
    """A row is appended when the file ends with the previous round (found by reading the end of
    the file, rows of any length); an install redone after the append adds nothing."""
    path = tmp_path / "run"
    run = RunDirectory.open(path, {"run": {"rounds": 3}}, resume=False)
    clients = [f"client-{i:05d}" for i in range(20_000)]  # a row of ~300 kB
    for rnd in range(3):
        run.save_round(rnd, writer(rnd), row={"round": rnd, "clients": clients})
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2]
    assert run._last_row_round() == 2
    run._install_row(2, {"round": 2, "clients": clients})  # a redo of the last install
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_run_killed_right_after_committing_round_0_is_a_run(tmp_path: Path) -> None:
    path = tmp_path / "run"
    kill_during(path, "committed", crash_round=0)
    assert not (path / "state.json").exists()  # round 0 committed, not yet installed
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        RunDirectory.open(path, {"run": {"rounds": 3}}, resume=False)
    with pytest.raises(RunDirError, match="setting 'lora-rank' was None, now 9"):
        RunDirectory.open(path, {"run": {"rounds": 3, "lora-rank": 9}}, resume=True)
    run = RunDirectory.open(path, {"run": {"rounds": 3}}, resume=True)
    state, _ = run.load_state()  # type: ignore[misc]
    assert state["round"] == 0 and [r["round"] for r in run.read_metrics()] == [0]
