"""Client shards as an index into one data file (client/shards.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.data import DataError
from client.settings import ClientSettings
from client.shards import RECORDS, flatten, is_indexed, shard_records, shard_rows, write_index


def test_flatten_gives_rows_and_offsets() -> None:
    rows, offsets = flatten([[4, 0], [], [2, 3, 1]])
    assert rows.tolist() == [4, 0, 2, 3, 1]
    assert offsets.tolist() == [0, 2, 2, 5]
    assert rows.dtype == np.int64 and offsets.dtype == np.int64


def test_written_index_returns_each_shard_rows(tmp_path: Path) -> None:
    records = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(7)]
    shards = [[0, 3], [1, 2, 6], [4, 5]]
    write_index(records, shards, tmp_path / "p")
    assert is_indexed(tmp_path / "p") and not is_indexed(tmp_path)
    # Three files, whatever the number of clients.
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == [
        "offsets.npy",
        "records.jsonl",
        "rows.npy",
    ]
    for pid, rows in enumerate(shards):
        assert shard_rows(tmp_path / "p", pid).tolist() == rows
        assert shard_records(tmp_path / "p", pid) == [records[i] for i in rows]
    with pytest.raises(DataError, match=r"partition-id: 3 is not a shard of .* \(3 shards\)"):
        shard_rows(tmp_path / "p", 3)


def test_a_simulated_client_reads_its_shard_of_the_index(tmp_path: Path) -> None:
    write_index([{"instruction": "q", "response": "a"}] * 4, [[0, 1], [2, 3]], tmp_path / "p")
    settings = ClientSettings.resolve(
        {"partition-id": 1, "num-partitions": 2}, {"partition-dir": str(tmp_path / "p")}
    )
    assert settings.data_path == str(tmp_path / "p" / RECORDS) and settings.shard == 1
    assert settings.state_dir == tmp_path / "client-state" / "0001"
    # A run directory from before the index (one file per client) still resolves.
    old = ClientSettings.resolve({"partition-id": 1}, {"partition-dir": str(tmp_path / "old")})
    assert old.data_path == str(tmp_path / "old" / "0001.jsonl") and old.shard == -1
