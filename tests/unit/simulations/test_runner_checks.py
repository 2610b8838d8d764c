"""The simulator's checks that run before anything is written: the data split in memory and the
data settings of a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.config import ConfigError
from coordinator.rundir import RunDirError
from simulations.partition import PartitionSpec
from simulations.runner import resume_settings, split_data


def saved_run(path: Path, data: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "run": {"rounds": 1},
                "simulation": {"data": data, "partition": "iid", "num_clients": 3},
            }
        )
    )
    return path


def test_resume_takes_the_runs_data_split_and_accepts_the_same_one_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d.jsonl"
    run = saved_run(tmp_path / "run", str(data))
    assert resume_settings(run, None, None, None) == (str(data), "iid", 3)
    monkeypatch.chdir(tmp_path)  # the same file, named relative to the current directory
    assert resume_settings(run, "d.jsonl", "iid", 3) == (str(data), "iid", 3)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"data": "builtin:chatterbot"}, "data: the run in .* was split with '.*d.jsonl'"),
        ({"partition_spec": "natural:category"}, "partition: .* with 'iid', not 'natural"),
        ({"num_clients": 4}, "num-clients: .* with 3, not 4"),
    ],
)
def test_resume_refuses_another_data_split(
    tmp_path: Path, given: dict[str, object], message: str
) -> None:
    run = saved_run(tmp_path / "run", str(tmp_path / "d.jsonl"))
    kw: dict[str, object] = {"data": None, "partition_spec": None, "num_clients": None, **given}
    with pytest.raises(ConfigError, match=message):
        resume_settings(run, **kw)  # type: ignore[arg-type]


def test_resume_of_a_deployment_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"run": {"rounds": 1}}')
    with pytest.raises(RunDirError, match="is not a run of fedtune simulate"):
        resume_settings(tmp_path, None, None, None)


def test_split_data_checks_everything_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "excel.csv"
    data.write_bytes("\ufeffinstruction,response,category\nq1,a1,x\nq2,a2,y\nq3,a3,y\n".encode())
    records, shards, index = split_data(str(data), PartitionSpec.parse("natural:category"), None, 0)
    assert [r["instruction"] for r in records] == ["q1", "q2", "q3"]
    assert shards == [[0], [1, 2]]
    assert index == [
        {"partition_id": 0, "name": "x", "rows": 1},
        {"partition_id": 1, "name": "y", "rows": 2},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["excel.csv"]
