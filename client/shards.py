"""A simulated fleet's client shards as one index into one data file.

``fedtune simulate`` writes, once, into its ``partitions/`` directory:

* ``records.jsonl``  -- every row of the dataset, in order;
* ``rows.npy``       -- int64, the row numbers of all shards, shard after shard;
* ``offsets.npy``    -- int64, ``num_clients + 1`` values: shard ``p`` is
  ``rows[offsets[p]:offsets[p + 1]]``.

So splitting 20,000 rows over 10,000 clients writes three files, not 10,000, and nothing per
client is read or built before that client is sampled. A worker process reads the data file
once (``_records``, cached) and memory-maps the index.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.data import DataError, Record, load_records

RECORDS = "records.jsonl"
ROWS = "rows.npy"
OFFSETS = "offsets.npy"


def is_indexed(partition_dir: Path) -> bool:
    """Does ``partition_dir`` hold an index (this layout), rather than one file per client?"""
    return (partition_dir / OFFSETS).is_file()


def flatten(shards: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, offsets) of ``shards``: all row numbers shard after shard, and where each starts.

    >>> flatten([[0, 2], [1]])
    (array([0, 2, 1]), array([0, 2, 3]))
    """
    offsets = np.zeros(len(shards) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in shards])
    rows = (
        np.concatenate([np.asarray(s, dtype=np.int64) for s in shards])
        if shards
        else np.zeros(0, dtype=np.int64)
    )
    return rows, offsets


def write_index(records: Sequence[Record], shards: Sequence[Sequence[int]], out_dir: Path) -> None:
    """Write the data file and the index of ``shards`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / RECORDS).open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    rows, offsets = flatten(shards)
    np.save(out_dir / ROWS, rows)
    np.save(out_dir / OFFSETS, offsets)


def shard_rows(partition_dir: Path, partition_id: int) -> np.ndarray:
    """The row numbers of shard ``partition_id`` (read from the memory-mapped index)."""
    rows, offsets = _index(str(partition_dir))
    if not 0 <= partition_id < len(offsets) - 1:
        raise DataError(
            f"partition-id: {partition_id} is not a shard of {partition_dir} "
            f"({len(offsets) - 1} shards)"
        )
    return np.asarray(rows[offsets[partition_id] : offsets[partition_id + 1]])


def shard_records(partition_dir: Path, partition_id: int) -> list[Record]:
    """The rows of shard ``partition_id``."""
    records = _records(str(partition_dir / RECORDS))
    return [records[int(i)] for i in shard_rows(partition_dir, partition_id)]


@functools.lru_cache(maxsize=2)
def _records(path: str) -> list[Record]:
    return load_records(path)


@functools.lru_cache(maxsize=2)
def _index(partition_dir: str) -> tuple[Any, Any]:
    d = Path(partition_dir)
    return np.load(d / ROWS, mmap_mode="r"), np.load(d / OFFSETS, mmap_mode="r")
