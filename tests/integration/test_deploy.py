"""A real deployment on loopback: `fedtune keys`, a TLS + node-auth coordinator, three device
clients (tiny model) and a two-round run; a fourth device with an unregistered key is refused;
one device is killed (SIGKILL, its whole process tree) as round 2 starts and the round completes
with the other two (min-clients 2).

Every wait is bounded, every process started here is stopped in the fixture's teardown, and
only 127.0.0.1 with random free ports is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

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

# Seconds per phase. Far above a busy machine's client start-up (a fresh process per message); the
# killed client in round 2 is declared unavailable by Flower's heartbeat (~45 s) long before it.
ROUND_TIMEOUT = 300


@dataclass
class Deployment:
    root: Path
    run_dir: Path
    run: Proc
    run_code: int
    rogue: Proc
    rogue_code: int
    killed_node: int
    node_ids: dict[str, int]


def _kill_group_now(proc: Proc) -> list[psutil.Process]:
    """SIGKILL a device outright: its supervisor, worker and SuperNode, no cleanup."""
    family = [psutil.Process(proc.popen.pid)]
    with contextlib.suppress(psutil.Error):
        family += family[0].children(recursive=True)
    os.killpg(proc.popen.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return family


@pytest.fixture(scope="module")
def deployment(
    tiny_model_dir: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    logs = root / "logs"
    logs.mkdir()
    # d4 is never registered
    keys, authorized = device_keys(root, ["d1", "d2", "d3", "d4"], ["d1", "d2", "d3"])
    shards = write_shards(root, 4)

    fleet = f"127.0.0.1:{free_port()}"
    control = f"127.0.0.1:{free_port()}"
    started: list[Proc] = []
    seen_pids: set[int] = set()

    def track() -> None:
        for p in started:
            with contextlib.suppress(psutil.Error):
                seen_pids.update(c.pid for c in psutil.Process(p.popen.pid).children(True))
            seen_pids.add(p.popen.pid)

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
        # Devices start while the coordinator is still coming up: they retry with backoff.
        devices = {d: client(d, shards[i]) for i, d in enumerate(("d1", "d2", "d3"))}
        rogue = client("d4", shards[3])
        coord.wait_for(r"coordinator ready", START_TIMEOUT)
        assert coord.wait_for(r"(\d+) device key\(s\) registered", 1).group(1) == "3"
        node_ids = {
            d: int(p.wait_for(r"joined coordinator \S+ as node (\d+)", START_TIMEOUT).group(1))
            for d, p in devices.items()
        }
        rogue_code = rogue.wait_exit(START_TIMEOUT)
        track()

        run_dir = root / "run"
        run = start(
            "run", "coordinator", "run", "--state-dir", str(root / "coord"),
            "--model", str(tiny_model_dir), "--cache-dir", str(model_cache),
            "--rounds", "2", "--clients-per-round", "3", "--min-clients", "2",
            "--local-steps", "3", "--seq-len", "64", "--lr", "0.01",
            "--round-timeout", str(ROUND_TIMEOUT), "--node-wait-timeout", "120",
            "--output-dir", str(run_dir), "--poll-interval", "1",
        )  # fmt: skip
        # Round 1 is over (its row is logged) and round 2's messages are about to go out.
        run.wait_for(r"round 1/2: train_loss", RUN_TIMEOUT)
        track()
        _kill_group_now(devices["d3"])
        run_code = run.wait_exit(RUN_TIMEOUT)
        track()
        yield Deployment(
            root=root,
            run_dir=run_dir,
            run=run,
            run_code=run_code,
            rogue=rogue,
            rogue_code=rogue_code,
            killed_node=node_ids["d3"],
            node_ids=node_ids,
        )
    finally:
        track()
        for proc in reversed(started):
            stop_tree(proc.popen, timeout=15)
        alive = [p for p in seen_pids if psutil.pid_exists(p) and _not_zombie(p)]
        for pid in alive:  # anything that escaped its tree (it would be a bug) dies here
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        assert not alive, f"processes outlived their parents: {alive}"


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_two_rounds_complete_and_write_the_run_directory(deployment: Deployment) -> None:
    d = deployment
    assert d.run_code == 0, "\n".join(d.run.lines[-40:])
    assert f"run directory: {d.run_dir}" in d.run.lines
    config = json.loads((d.run_dir / "config.json").read_text())["run"]
    assert config["rounds"] == 2 and config["min-clients"] == 2
    rows = metric_rows(d.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval_clients_ok"] == 3 and np.isfinite(rows[0]["eval_loss"])
    r1 = rows[1]
    assert r1["status"] == "ok" and r1["clients_sampled"] == 3 and r1["clients_ok"] == 3
    assert r1["failures"] == [] and r1["update_norm"] > 0
    assert r1["bytes_up"] > 0 and r1["bytes_down"] > 0
    assert json.loads((d.run_dir / "state.json").read_text())["round"] == 2
    assert (d.run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (d.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The devices' names, read from the coordinator after the run, name them in the report.
    names = json.loads((d.run_dir / "config.json").read_text())["node_names"]
    assert {names[str(node)] for node in d.node_ids.values()} == set(d.node_ids)
    report = (d.run_dir / "report.html").read_text()
    assert 'id="plot-loss"' in report and all(name in report for name in d.node_ids)


def test_progress_is_streamed_to_the_operator(deployment: Deployment) -> None:
    out = "\n".join(deployment.run.lines)
    assert "round 1/2 train: waiting for 3 client(s)" in out
    for name in deployment.node_ids:  # clients by their device names, not node ids
        assert f"round 1/2 train: client {name} ok" in out


def test_killed_client_does_not_stall_round_2(deployment: Deployment) -> None:
    rows = metric_rows(deployment.run_dir)
    r2 = rows[2]
    assert r2["status"] == "ok"
    assert r2["clients_sampled"] == 3 and r2["clients_ok"] == 2
    assert [f["client"] for f in r2["failures"]] == ["d3"]  # the killed device, by name
    assert deployment.node_ids["d3"] == deployment.killed_node
    reason = r2["failures"][0]["reason"]
    assert reason == f"no reply within {ROUND_TIMEOUT}s" or "Node Unavailable" in reason
    # The coordinator said which client it dropped and why, while the run went on.
    assert any("round 2: client d3 dropped" in line for line in deployment.run.lines)
    assert r2["update_norm"] > 0


def test_unregistered_device_is_refused(deployment: Deployment) -> None:
    assert deployment.rogue_code == 3, "\n".join(deployment.rogue.lines[-20:])
    last = deployment.rogue.lines[-1]
    assert last.startswith("fedtune client start: error: coordinator 127.0.0.1:")
    assert "refused this device" in last and "d4.pub" in last and "not registered" in last
    assert not any("joined coordinator" in line for line in deployment.rogue.lines)
