"""``--ray-address``: which cluster ``auto`` means, and stale addresses refused in one line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from simulations.ray_local import (
    RAY_ADDRESS_ENV,
    RayAddressError,
    can_connect,
    local_ray,
    resolve_ray_address,
)


def up(*live: str):  # type: ignore[no-untyped-def]
    return lambda host, port: f"{host}:{port}" in live


def test_an_explicit_address_wins_over_the_environment(tmp_path: Path) -> None:
    env = {RAY_ADDRESS_ENV: "10.0.0.9:6379"}
    assert resolve_ray_address("127.0.0.1:6380", env, up("127.0.0.1:6380")) == "127.0.0.1:6380"
    with pytest.raises(RayAddressError, match=r"no Ray cluster answers at 127\.0\.0\.1:6380"):
        resolve_ray_address("127.0.0.1:6380", env, up())


def test_auto_uses_ray_address_and_refuses_a_stale_one(tmp_path: Path) -> None:
    env = {RAY_ADDRESS_ENV: "10.0.0.9:6379"}
    missing = tmp_path / "none"
    assert resolve_ray_address("auto", env, up("10.0.0.9:6379"), missing) == "10.0.0.9:6379"
    with pytest.raises(RayAddressError, match=r"RAY_ADDRESS=10.0.0.9:6379 .* \(stale\?\)"):
        resolve_ray_address("auto", env, up(), missing)


def test_auto_without_the_variable_reads_the_latest_head(tmp_path: Path) -> None:
    current = tmp_path / "ray_current_cluster"
    with pytest.raises(RayAddressError, match="auto found no running cluster"):
        resolve_ray_address("auto", {}, up(), current)
    current.write_text("127.0.0.1:7000\n")
    assert resolve_ray_address("auto", {}, up("127.0.0.1:7000"), current) == "127.0.0.1:7000"
    with pytest.raises(RayAddressError, match="no Ray cluster answers there \\(stopped\\?\\)"):
        resolve_ray_address("auto", {}, up(), current)


@pytest.mark.parametrize("bad", ["nohost", "host:", ":80", "host:99999", "host:port"])
def test_a_malformed_address_is_named(bad: str) -> None:
    with pytest.raises(RayAddressError, match=f"ray-address: '{bad}' is not auto or HOST:PORT"):
        resolve_ray_address(bad, {}, up())


def test_can_connect_sees_a_listening_socket() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert can_connect("127.0.0.1", port, timeout=5.0)
    assert not can_connect("127.0.0.1", port, timeout=5.0)  # closed now


def test_a_local_run_ignores_and_restores_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.9:6379")
    with local_ray(2) as args:
        assert RAY_ADDRESS_ENV not in os.environ
        assert args["address"] == "local" and args["num_cpus"] == 2
    assert os.environ[RAY_ADDRESS_ENV] == "10.0.0.9:6379"


def test_attaching_passes_no_cpu_or_gpu_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.9:6379")  # stale; the explicit one wins
        with local_ray(2, address=address) as args:
            assert args == {"address": address}
            assert RAY_ADDRESS_ENV not in os.environ
