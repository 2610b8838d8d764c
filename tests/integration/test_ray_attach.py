"""``fedtune simulate --ray-address``: attach to a Ray cluster started with ``ray start --head``
on loopback, finish a 2-round run on its workers, stop the head (by its PID: never ``ray stop``,
which would end every Ray process on the machine). A stale ``RAY_ADDRESS`` in the environment
does not get in the way of an explicit address, and makes ``auto`` fail in one line.

Issue 13, point 6."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from simulations.ray_local import can_connect

pytestmark = pytest.mark.integration

RAY = Path(sys.executable).with_name("ray")
HEAD_START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], tree: list[psutil.Process]) -> None:
    """SIGTERM the head (``ray start --block`` then ends what it started), then SIGKILL
    whatever of its process tree is still there, each by PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture()
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, psutil.Process]]:
    """A Ray head on 127.0.0.1 with 2 CPUs and its own temp dir (so /tmp/ray, which other
    users' ``auto`` reads, is not touched)."""
    port = free_port()
    temp = Path(tempfile_short())
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])  # fmt: skip
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    head = psutil.Process(proc.pid)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while not can_connect("127.0.0.1", port, timeout=5.0):
            assert proc.poll() is None, f"ray start --head exited with {proc.returncode}"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1.0)
        tree = head.children(recursive=True)
        yield f"127.0.0.1:{port}", head
    finally:
        tree = list({p.pid: p for p in [*tree, *_children(head)]}.values())
        _stop(proc, tree)
        shutil.rmtree(temp, ignore_errors=True)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return list(p.children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def tempfile_short() -> str:
    """A short temp dir: Ray's socket paths inside it must stay under 107 bytes."""
    import tempfile

    return tempfile.mkdtemp(prefix="rh-", dir="/tmp")


def test_simulation_attaches_to_a_running_cluster(
    ray_head: tuple[str, psutil.Process],
    tiny_model_dir: Path,
    model_cache: Path,
    tmp_path: Path,
) -> None:
    address, head = ray_head
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # stale: nothing listens there
    args = [sys.executable, "-m", "cli.main", "simulate", "--model", str(tiny_model_dir),
            "--quantization", "none", "--cache-dir", str(model_cache),
            "--data", "builtin:chatterbot", "--partition", "iid", "--num-clients", "3",
            "--clients-per-round", "2", "--rounds", "2", "--local-steps", "2",
            "--seq-len", "32", "--eval-clients", "2"]  # fmt: skip

    # `auto` takes the stale RAY_ADDRESS and says so in one line, before anything starts.
    stale = subprocess.run([*args, "--ray-address", "auto", "--output-dir", str(tmp_path / "x")],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert stale.returncode == 2, stale.stderr
    assert "RAY_ADDRESS=127.0.0.1:1 from the environment, and no Ray cluster answers" in (
        stale.stderr
    )
    assert not (tmp_path / "x").exists()

    # The explicit address wins; the clients run as actors of the head's raylet.
    actors: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            actors.update(p.pid for p in _children(head) if "ClientAppActor" in _name(p))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = subprocess.run([*args, "--ray-address", address, "--output-dir", str(out)],
                             env=env, capture_output=True, text=True, timeout=2400)  # fmt: skip
    finally:
        done.set()
        watcher.join(timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients_ok"] for r in rows[1:]] == [2, 2]
    saved = json.loads((out / "config.json").read_text())
    assert saved["simulation"]["ray_address"] == address
    assert actors, "no ClientAppActor ran under the head node"
    assert head.is_running()  # the run detached; the cluster is still up


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return ""
