"""The SuperLink fedtune starts waits longer for SQLite's write lock than Flower's 5 s."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore

from coordinator.superlink import CoordinatorConfig, _superlink_command
from coordinator.superlink_main import lengthen_sqlite_lock_wait, with_busy_timeout


def test_with_busy_timeout_replaces_or_adds() -> None:
    assert with_busy_timeout((("busy_timeout", "5000"), ("journal_mode", "WAL")), 90) == (
        ("busy_timeout", "90"),
        ("journal_mode", "WAL"),
    )
    assert with_busy_timeout((("foreign_keys", "ON"),), 7) == (
        ("busy_timeout", "7"),
        ("foreign_keys", "ON"),
    )


def _store(path: Path) -> SqlObjectStore:
    store = SqlObjectStore(str(path))
    store.initialize()
    return store


def test_flower_connections_wait_out_a_lock_longer_than_five_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after
    db = tmp_path / "state.db"
    assert _store(db).query("PRAGMA busy_timeout")[0]["timeout"] == 5000  # Flower's default

    assert lengthen_sqlite_lock_wait(120_000)
    store = _store(db)
    assert store.query("PRAGMA busy_timeout")[0]["timeout"] == 120_000

    # Another writer holds the lock for 6 s: Flower's 5 s would fail, this write waits.
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(6.0, holder.execute, args=("COMMIT",))
    release.start()
    t0 = time.monotonic()
    store.query("CREATE TABLE waited (x INTEGER)")
    waited = time.monotonic() - t0
    release.join()
    holder.close()
    # It waited out the whole 6 s lock (longer than Flower's 5 s would allow) and then wrote;
    # the upper bound is the 120 s busy timeout, far above any machine's jitter.
    assert waited >= 5.9, waited


def test_the_coordinator_starts_superlink_through_it(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(state_dir=tmp_path, insecure=True, node_auth=False)
    cmd = _superlink_command(cfg)
    assert cmd[1:3] == ["-m", "coordinator.superlink_main"]
    assert cmd[cmd.index("--fleet-api-type") + 1] == "grpc-rere"
