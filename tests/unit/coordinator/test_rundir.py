"""The run directory's checks before anything is written: which directories a new run or a
resume accepts, what a resumed run may change, paths stored relative to the run (a moved or
copied run resumes), and clean-up of what a failed new run created."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coordinator.rundir import (
    RunDirectory,
    RunDirError,
    check_new_output_dir,
    check_resume_config,
    read_config,
    removed_on_failure,
    resume_mismatch,
    stored_config,
)


def record(run_dir: Path, **changes: object) -> dict[str, object]:
    run = {
        "rounds": 1,
        "lora-rank": 2,
        "output-dir": str(run_dir),
        "partition-dir": str(run_dir / "partitions"),
        "central-eval-data": "",
        "cache-dir": "/home/a/.cache/fedtune",
        "model": "/models/m.gguf",
    }
    run.update(changes)
    return {"run": run, "simulation": {"data": "builtin:chatterbot"}}


def make_run(path: Path, **changes: object) -> Path:
    RunDirectory.open(path, record(path, **changes), resume=False)
    (path / "state.json").write_text('{"round": 0}\n')
    return path


def test_a_new_run_needs_a_new_or_empty_directory(tmp_path: Path) -> None:
    check_new_output_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_new_output_dir(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        check_new_output_dir(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')  # not a run: the user's own file
    with pytest.raises(RunDirError, match=f"output directory {mine} is not empty"):
        check_new_output_dir(mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        check_new_output_dir(tmp_path / "file")


def test_resume_needs_a_run(tmp_path: Path) -> None:
    """Issue 12: `--resume` on a directory that is not a run, or does not exist, trained a new
    run there with exit 0."""
    with pytest.raises(RunDirError, match=f"--resume: {tmp_path / 'nope'} does not exist"):
        read_config(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not a fedtune run directory \(it has no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="is not a fedtune run configuration"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{truncated")
    with pytest.raises(RunDirError, match=r"config\.json cannot be read"):
        read_config(tmp_path)
    assert read_config(make_run(tmp_path / "run"))["run"]["rounds"] == 1


def test_config_json_stores_paths_inside_the_run_relative_to_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", **{"central-eval-data": str(tmp_path / "run" / "eval.jsonl")})
    saved = json.loads((run / "config.json").read_text())["run"]
    assert saved["partition-dir"] == "partitions"
    assert saved["central-eval-data"] == "eval.jsonl"
    assert saved["model"] == "/models/m.gguf"  # outside the run: as given
    outside = stored_config(run, record(run, **{"partition-dir": "/data/parts"}))
    assert outside["run"]["partition-dir"] == "/data/parts"


@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_moved_or_copied_run_resumes(tmp_path: Path, how: str) -> None:
    """Issue 12: a moved or copied run directory could not be resumed (`setting 'partition-dir'
    was ...`)."""
    old = make_run(tmp_path / "old")
    new = tmp_path / "elsewhere" / "run"
    new.parent.mkdir()
    (shutil.move if how == "move" else shutil.copytree)(old, new)
    resumed = record(new, rounds=3, **{"cache-dir": "/other/machine/cache"})
    check_resume_config(new, resumed)
    RunDirectory.open(new, resumed, resume=True)
    assert json.loads((new / "config.json").read_text())["run"]["partition-dir"] == "partitions"
    with pytest.raises(RunDirError, match="setting 'lora-rank' was 2, now 4"):
        check_resume_config(new, record(new, **{"lora-rank": 4}))


def test_runs_written_before_relative_paths_also_resume_when_moved(tmp_path: Path) -> None:
    """config.json files written by older fedtune hold absolute paths under their old place."""
    saved = record(Path("/old/place/run"))
    assert resume_mismatch(saved, record(tmp_path / "run"), tmp_path / "run") is None
    moved_data = record(tmp_path / "run", **{"partition-dir": "/old/place/run/partitions"})
    assert resume_mismatch(saved, moved_data, tmp_path / "run") == (
        "setting 'partition-dir' was 'partitions', now '/old/place/run/partitions'"
    )


def test_a_failed_new_run_leaves_nothing(tmp_path: Path) -> None:
    """Issue 12: failed commands left empty output directories and client shards."""
    new = tmp_path / "new"
    with pytest.raises(ValueError, match="boom"), removed_on_failure(new):
        (new / "partitions").mkdir(parents=True)
        (new / "partitions" / "0000.jsonl").write_text("{}\n")
        raise ValueError("boom")
    assert not new.exists()

    empty = tmp_path / "empty"  # there before: kept, and emptied of what the command wrote
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt), removed_on_failure(empty):
        (empty / "partitions").mkdir()
        (empty / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_a_run_with_a_saved_round_is_kept_when_it_fails_later(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(RuntimeError), removed_on_failure(run):
        make_run(run)  # round 0 saved: it can be resumed
        raise RuntimeError("round 2 failed")
    assert (run / "state.json").is_file() and (run / "config.json").is_file()
    with removed_on_failure(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()
