"""Issue 13, point 3: a 10,000-client fleet costs nothing per client before it is sampled.

Set-up is the split (an index, three files) and Flower's node registration; memory is measured
with tracemalloc (Python allocations, exact and independent of machine speed). A worker keeps
at most ``client-data-cache`` tokenized client datasets, however many clients it serves."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from client.settings import ClientSettings
from client.shards import is_indexed, shard_records
from simulations.partition import PartitionSpec
from simulations.runner import split_data, write_shards

NUM_CLIENTS = 10_000
ROWS = 20_000
MIB = 2**20


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "rows.jsonl"
    with path.open("w") as fh:
        for i in range(ROWS):
            row = {"instruction": f"What is {i} plus one?", "response": f"It is {i + 1}."}
            fh.write(json.dumps(row) + "\n")
    return path


def test_splitting_20000_rows_for_10000_clients_writes_an_index_in_bounded_memory(
    data: Path, tmp_path: Path
) -> None:
    tracemalloc.start()
    try:
        records, shards, index = split_data(str(data), PartitionSpec.parse("iid"), NUM_CLIENTS, 0)
        write_shards(records, shards, index, tmp_path / "partitions")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    files = sorted(f.name for f in (tmp_path / "partitions").iterdir())
    assert files == ["index.json", "offsets.npy", "records.jsonl", "rows.npy"]
    assert is_indexed(tmp_path / "partitions") and len(index) == NUM_CLIENTS
    assert peak < 64 * MIB, f"split + index of 10,000 clients peaked at {peak / MIB:.0f} MiB"
    # Client 9,999's rows come back from the index.
    assert shard_records(tmp_path / "partitions", 9999) == [records[i] for i in shards[9999]]


def test_registering_10000_nodes_in_flower_stays_in_bounded_memory() -> None:
    from flwr.server.superlink.fleet.vce.vce_api import (
        _register_node_info_stores,
        _register_nodes,
    )
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run_config: dict[str, bool | float | int | str] = {
        f"option-{i}": "x" * 20 for i in range(90)
    }  # about the size of fedtune's run config
    run = Run.create_empty(run_id=1)
    run.override_config = run_config
    tracemalloc.start()
    try:
        mapping = _register_nodes(NUM_CLIENTS, factory)
        stores = _register_node_info_stores(mapping, run)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(mapping.values()) == list(range(NUM_CLIENTS)) and len(stores) == NUM_CLIENTS
    assert peak < 64 * MIB, f"registering 10,000 nodes peaked at {peak / MIB:.0f} MiB"


def test_a_worker_keeps_at_most_client_data_cache_tokenized_clients(
    data: Path, tmp_path: Path, tiny_model_dir: Path, model_cache: Path
) -> None:
    from client import app as client_app
    from client.model import Quantization, attach_lora, load_base, resolve_model
    from protocol.messages import LoraSpec

    records, shards, index = split_data(str(data), PartitionSpec.parse("iid"), 500, 0)
    write_shards(records, shards, index, tmp_path / "partitions")
    base = load_base(resolve_model(str(tiny_model_dir)), Quantization.NONE, model_cache)
    runtime = client_app.Runtime(base, attach_lora(base.model, LoraSpec(rank=2)))
    run = {"partition-dir": str(tmp_path / "partitions"), "client-data-cache": 8,
           "heldout-fraction": 0.0}  # fmt: skip
    seen = []
    for pid in range(40):
        settings = ClientSettings.resolve({"partition-id": pid, "num-partitions": 500}, run)
        local = runtime.local_data(settings, seq_len=48)
        assert len(local.train) == len(shards[pid])  # its own 40 rows, tokenized
        seen.append(local)
        assert len(runtime._data) == min(pid + 1, 8)
    # The 8 most recent are kept (the same objects); an older one is tokenized again.
    again = ClientSettings.resolve({"partition-id": 39, "num-partitions": 500}, run)
    assert runtime.local_data(again, seq_len=48) is seen[39]
    first = ClientSettings.resolve({"partition-id": 0, "num-partitions": 500}, run)
    assert runtime.local_data(first, seq_len=48) is not seen[0]
    assert len(runtime._data) == 8
