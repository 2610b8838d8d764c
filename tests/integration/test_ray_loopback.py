"""`fedtune simulate` on the real Ray engine (tiny model): every socket the Ray processes listen on
is a loopback address, and a run directory that was copied elsewhere resumes there.

Issue 12: "during `fedtune simulate`, Ray's processes listen on all interfaces with no
authentication"; "a run directory that was moved or copied cannot be resumed".
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from cli.main import main
from coordinator.progress import Progress

pytestmark = pytest.mark.integration


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # "::ffff:127.0.0.1": an IPv4 loopback on a dual-stack socket
    return addr.is_loopback


def bound_sockets() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket of this
    process and all its descendants (Ray's GCS, raylet, agents and workers are among them)."""
    me = psutil.Process()
    out = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            listening = c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN
            udp = c.type == socket.SOCK_DGRAM and c.laddr
            if listening or udp:
                out.append((name, c.laddr.ip, c.laddr.port))
    return out


@pytest.fixture()
def watch_sockets(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, str, int]]]:
    """Record the bound sockets at the end of every round, while Ray's processes are up."""
    seen: list[list[tuple[str, str, int]]] = []
    original = Progress.round_done

    def round_done(self: Progress, row: dict[str, Any]) -> None:
        seen.append(bound_sockets())
        original(self, row)

    monkeypatch.setattr(Progress, "round_done", round_done)
    return seen


def test_simulation_listens_on_loopback_only_and_a_copied_run_resumes(
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,
    watch_sockets: list[list[tuple[str, str, int]]],
) -> None:
    args = ["simulate", "--model", str(tiny_model_dir), "--quantization", "none",
            "--cache-dir", str(model_cache), "--data", "builtin:chatterbot", "--partition", "iid",
            "--num-clients", "2", "--clients-per-round", "2", "--local-steps", "2",
            "--seq-len", "32", "--eval-clients", "2"]  # fmt: skip
    first = tmp_path / "first"
    assert main([*args, "--rounds", "1", "--output-dir", str(first)]) == 0

    # Rounds 0 and 1 ended while Ray was up: its sockets were all seen, all on loopback.
    assert len(watch_sockets) == 2
    for snapshot in watch_sockets:
        names = {name for name, _, _ in snapshot}
        assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers were seen
        exposed = [s for s in snapshot if not is_loopback(s[1])]
        assert exposed == [], f"Ray sockets not on loopback: {exposed}"

    # The run, copied elsewhere, resumes there for one more round; the original is untouched.
    copy = tmp_path / "moved" / "run"
    shutil.copytree(first, copy)
    before = (first / "metrics.jsonl").read_text()
    assert main(["simulate", "--resume", "--rounds", "2", "--output-dir", str(copy),
                 *args[1:]]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["clients_ok"] == 2
    assert (first / "metrics.jsonl").read_text() == before
    saved = json.loads((copy / "config.json").read_text())
    assert saved["run"]["partition-dir"] == "partitions" and saved["run"]["rounds"] == 2
    assert len(watch_sockets) == 3  # round 2 of the resumed run, on a second Ray instance
    assert all(is_loopback(ip) for _, ip, _ in watch_sockets[2])


def test_simulated_clients_run_at_the_callers_priority() -> None:
    """Ray starts workers at niceness +15; the simulator's private Ray starts them at the
    caller's, so a busy machine does not starve the clients' training (seen: a simulation's
    clients at +15 got a few percent of a core beside ordinary processes)."""
    import os

    import ray

    from simulations.ray_local import local_ray

    with local_ray(1) as args:
        ray.init(**args, include_dashboard=False, logging_level="error")
        try:

            @ray.remote
            def niceness() -> int:
                return os.nice(0)

            assert ray.get(niceness.remote(), timeout=600) == os.nice(0)
        finally:
            ray.shutdown()
