"""A real deployment on loopback with mixed LoRA ranks and compressed updates: `fedtune keys`, a
TLS + node-auth coordinator, three device clients (tiny model, a fresh process per message) and a
two-round run with ``--client-ranks 2,4 --lora-rank 4 --compress int8 --compress-down int8``.

The devices get ranks round-robin over the node ids (sorted); each is sent its rank's slice, and
the run's metrics name each client's rank and the bytes against fp32. Every wait is bounded and
every process started here is stopped in the fixture's teardown (as tests/integration/
test_deploy.py; the shared helpers are in tests/helpers.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from client.processes import LoggedProcess as Proc
from client.processes import free_port, stop_tree
from tests.helpers import (
    RUN_TIMEOUT,
    START_TIMEOUT,
    client_args,
    coordinator_args,
    device_keys,
    fedtune_cmd,
    metric_rows,
    write_shards,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ranked_run(
    tiny_model_dir: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Proc, int, dict[str, int]]]:
    root = tmp_path_factory.mktemp("deploy-ranks")
    logs = root / "logs"
    logs.mkdir()
    names = ["d1", "d2", "d3"]
    keys, authorized = device_keys(root, names, names)
    shards = write_shards(root, 3)
    fleet = f"127.0.0.1:{free_port()}"
    control = f"127.0.0.1:{free_port()}"
    started: list[Proc] = []

    def start(name: str, *args: str) -> Proc:
        proc = Proc(name, fedtune_cmd(*args), logs)
        started.append(proc)
        return proc

    def client(name: str, shard: Path) -> Proc:
        return start(
            name, *client_args(name, fleet, keys, shard, model_cache, root / "state" / name)
        )

    try:
        coord = start(
            "coordinator", *coordinator_args(keys, authorized, fleet, control, root / "coord")
        )
        devices = {d: client(d, shards[i]) for i, d in enumerate(names)}
        coord.wait_for(r"coordinator ready", START_TIMEOUT)
        node_ids = {
            d: int(p.wait_for(r"joined coordinator \S+ as node (\d+)", START_TIMEOUT).group(1))
            for d, p in devices.items()
        }
        run_dir = root / "run"
        run = start(
            "run", "coordinator", "run", "--state-dir", str(root / "coord"),
            "--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
            "--rounds", "2", "--clients-per-round", "3", "--min-clients", "3",
            "--local-steps", "2", "--seq-len", "64", "--lr", "0.01",
            "--lora-rank", "4", "--lora-alpha", "8", "--client-ranks", "2,4",
            "--compress", "int8", "--compress-down", "int8", "--compress-block-size", "64",
            "--round-timeout", "300", "--node-wait-timeout", "120",
            "--output-dir", str(run_dir), "--poll-interval", "1",
        )  # fmt: skip
        code = run.wait_exit(RUN_TIMEOUT)
        yield run_dir, run, code, node_ids
    finally:
        for proc in reversed(started):
            stop_tree(proc.popen, timeout=15)


def test_mixed_ranks_train_and_aggregate_on_three_devices(
    ranked_run: tuple[Path, Proc, int, dict[str, int]],
) -> None:
    run_dir, run, code, node_ids = ranked_run
    assert code == 0, "\n".join(run.lines[-40:])
    rows = metric_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round-robin over the clients by device name (the key's stem), not by node id
    want = {str(node_ids[d]): (2, 4)[i % 2] for i, d in enumerate(sorted(node_ids))}
    for r in rows[1:]:
        assert r["status"] == "ok" and r["clients_ok"] == 3, r.get("reason")
        assert r["client_ranks"] == want
        assert r["compress"] == "int8" and r["compress_down"] == "int8"
        # two rank-2 clients send half the values; int8 a quarter of the bytes (measured on
        # the tiny adapter: 0.23 up, 0.33 down with the instruction and layout records)
        assert 0 < r["bytes_up_ratio"] < 0.3 and 0 < r["bytes_down_ratio"] < 0.4
        assert r["update_norm"] > 0
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    a = next(k for k in adapter if "lora_A" in k)
    assert adapter[a].shape[0] == 4  # the global adapter keeps the largest rank
    assert np.isfinite(np.concatenate([v.ravel() for v in adapter.values()])).all()
