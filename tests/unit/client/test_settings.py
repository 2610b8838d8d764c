from __future__ import annotations

from pathlib import Path

import pytest

from client.model import ComputeDtype, Quantization
from client.settings import ClientSettings


def test_node_config_wins_over_run_config() -> None:
    s = ClientSettings.resolve(
        {"quantization": "int8", "data-path": "/data/mine.jsonl", "threads": 3},
        {"quantization": "nf4", "model": "/models/m.gguf", "cache-dir": "/c", "state-dir": "/s"},
    )
    assert s.quantization is Quantization.INT8
    assert s.model == "/models/m.gguf"
    assert s.data_path == "/data/mine.jsonl"
    assert s.cache_dir == Path("/c") and s.state_dir == Path("/s") and s.threads == 3


def test_simulated_client_reads_its_shard_and_keeps_state_in_the_run() -> None:
    s = ClientSettings.resolve(
        {"partition-id": 7, "num-partitions": 9}, {"partition-dir": "/run/partitions"}
    )
    assert s.data_path == "/run/partitions/0007.jsonl"
    assert s.state_dir == Path("/run/client-state/0007")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "data-path: no data configured"),
        ({"data-path": "x", "quantization": "q3"}, "quantization: 'q3' is not one of"),
        ({"data-path": "x", "heldout-fraction": 2.0}, "heldout-fraction: must be in"),
        ({"data-path": "x", "threads": -1}, "threads: must be >= 0"),
        ({"data-path": "x", "max-memory": "lots"}, "max-memory: expected a size such as 3GB"),
        ({"data-path": "x", "quantize-to-fit": "maybe"}, "quantize-to-fit: expected true/false"),
    ],
)
def test_errors_name_the_setting(node: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        ClientSettings.resolve(node, {})


def test_mixed_fleet_assigns_quantization_round_robin() -> None:
    run = {
        "partition-dir": "/run/partitions",
        "client-quantization": "nf4, int8,none",
        "quantization": "nf4",
    }
    modes = [ClientSettings.resolve({"partition-id": i}, run).quantization for i in range(5)]
    assert modes == [
        Quantization.NF4,
        Quantization.INT8,
        Quantization.NONE,
        Quantization.NF4,
        Quantization.INT8,
    ]
    # A device's own setting still wins.
    own = ClientSettings.resolve({"partition-id": 1, "quantization": "none"}, run)
    assert own.quantization is Quantization.NONE


def test_memory_budget_from_the_device_or_a_simulated_profile() -> None:
    device = ClientSettings.resolve({"data-path": "x", "max-memory": 2**30}, {})
    assert device.max_memory == 2**30 and not device.quantize_to_fit
    run = {"partition-dir": "/run/partitions", "client-max-memory": "768MB, 2GB",
           "quantize-to-fit": True}  # fmt: skip
    budgets = [ClientSettings.resolve({"partition-id": i}, run).max_memory for i in range(3)]
    assert budgets == [768 * 2**20, 2 * 2**30, 768 * 2**20]
    assert ClientSettings.resolve({"partition-id": 0}, run).quantize_to_fit
    # A device's own budget wins; no budget anywhere means none.
    assert ClientSettings.resolve({"partition-id": 1, "max-memory": "1GB"}, run).max_memory == 2**30
    assert ClientSettings.resolve({"data-path": "x"}, {}).max_memory == 0


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({}, "auto"),
        ({"compute-dtype": "bf16"}, "bf16"),
        ({"max-memory": "1GB"}, "fp32"),  # a budgeted device keeps fp32 unless told otherwise
        ({"max-memory": "1GB", "compute-dtype": "bf16"}, "bf16"),
    ],
)
def test_compute_dtype_auto_by_default_and_fp32_under_a_budget(
    node: dict[str, str], expected: str
) -> None:
    s = ClientSettings.resolve({"data-path": "/d.jsonl", **node}, {})
    assert s.compute_dtype is ComputeDtype(expected)
