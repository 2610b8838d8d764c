"""A client's stable name, what it answers the coordinator's identity query with.

- A device: its registered name, ``device-name`` in its node config (``fedtune device`` sets it
  to the stem of its key file, the name the coordinator registers for that key).
- A simulated client: the name of its partition (a natural partition's value, e.g. ``ai``;
  ``client-007`` for IID and Dirichlet shards), read from the partitions' ``index.json``.
- Otherwise ``partition-<id>`` for a node with a partition id; a node with neither cannot be
  named and says so.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARTITION_INDEX = "index.json"


@functools.lru_cache(maxsize=4)
def _partition_names(index_file: str) -> dict[int, str]:
    rows = json.loads(Path(index_file).read_text(encoding="utf-8"))
    return {int(r["partition_id"]): str(r["name"]) for r in rows}


def client_identity(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> str:
    """This node's stable name (see the module docstring); ``ValueError`` if it has none."""
    name = node_config.get("device-name")
    if name not in (None, ""):
        return str(name)
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        part_dir = node_config.get("partition-dir") or run_config.get("partition-dir")
        if part_dir:
            index = Path(str(part_dir)) / PARTITION_INDEX
            if index.is_file():
                names = _partition_names(str(index))
                if pid in names:
                    return names[pid]
        return f"partition-{pid}"
    raise ValueError(
        "device-name: this node has no name to report (set node config 'device-name', or run "
        "through `fedtune device` or `fedtune simulate`)"
    )
