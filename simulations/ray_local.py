"""Where the Ray instance of ``fedtune simulate`` listens: on loopback only, unless attached to a
cluster.

Ray's servers (GCS, raylet and its object manager, the runtime-env agent, and the gRPC server of
every worker and of the driver) take connections without authentication. Measured with Ray 2.55.1
on Linux: a local ``ray.init()`` takes the address of the machine's outward interface as its node
IP; the GCS, raylet and worker servers then listen on all interfaces (``::``) and the runtime-env
agent on that address. When the node IP is 127.0.0.1 they all listen on 127.0.0.1 instead.

``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: ``ray.init`` replaces 127.0.0.1
by a "remotely reachable" address (``ray._private.services.resolve_ip_for_localhost``) unless
Ray's multi-node support is off, which is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's own
default on macOS and Windows). Ray reads that variable once, on import, into
``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; so ``local_ray`` sets both for the duration of
the block (Ray's child processes inherit the variable) and restores them afterwards.

``address="local"`` also stops ``ray.init`` from attaching to a cluster it finds on its own (one
named by ``RAY_ADDRESS``, or the latest ``ray start`` on this machine, /tmp/ray being shared by
every user), which would listen wherever that cluster was told to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune")

LOOPBACK = "127.0.0.1"
RAY_MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
# Where `ray start` records the address of the latest head node started on this machine.
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
CONNECT_TIMEOUT = 5.0


class RayAddressError(ValueError):
    """``--ray-address`` (or ``RAY_ADDRESS``) names no reachable Ray cluster."""


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ValueError naming the text."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(f"ray-address: {text!r} is not auto or HOST:PORT")
    return host, int(port)


def can_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Does something accept TCP connections on (host, port) within ``timeout`` s?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_ray_address(
    given: str,
    env: Mapping[str, str],
    reachable: Callable[[str, int], bool] = can_connect,
    current_cluster: Path = RAY_CURRENT_CLUSTER,
) -> str:
    """The ``HOST:PORT`` of the cluster to attach to for ``--ray-address given``.

    ``auto`` means ``RAY_ADDRESS`` if set, else the latest ``ray start --head`` on this machine;
    an explicit ``HOST:PORT`` wins over ``RAY_ADDRESS``. The address must accept connections
    (checked with a timeout): a stale ``RAY_ADDRESS`` or a cluster that was stopped gives a
    one-line ``RayAddressError`` instead of Ray's long retries."""
    if given != "auto":
        host, port = parse_host_port(given)
        if not reachable(host, port):
            raise RayAddressError(f"ray-address: no Ray cluster answers at {given}")
        return given
    from_env = env.get(RAY_ADDRESS_ENV, "").strip()
    if from_env and from_env not in ("auto", "local"):
        host, port = parse_host_port(from_env)
        if not reachable(host, port):
            raise RayAddressError(
                f"ray-address: auto uses {RAY_ADDRESS_ENV}={from_env} from the environment, and "
                f"no Ray cluster answers there (stale?); unset {RAY_ADDRESS_ENV} or give "
                "--ray-address HOST:PORT"
            )
        return from_env
    try:
        recorded = current_cluster.read_text().strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise RayAddressError(
            f"ray-address: auto found no running cluster ({RAY_ADDRESS_ENV} is not set and "
            f"{current_cluster} does not exist); start one with `ray start --head` or give "
            "--ray-address HOST:PORT"
        )
    host, port = parse_host_port(recorded)
    if not reachable(host, port):
        raise RayAddressError(
            f"ray-address: auto found {recorded} in {current_cluster}, and no Ray cluster "
            "answers there (stopped?); give --ray-address HOST:PORT"
        )
    return recorded


@contextlib.contextmanager
def _without_ray_address() -> Iterator[None]:
    """``RAY_ADDRESS`` removed for the block (Ray and its child processes read it), then put
    back: the address to use is passed explicitly."""
    old = os.environ.pop(RAY_ADDRESS_ENV, None)
    if old:
        log.info("ignoring %s=%s from the environment for this run", RAY_ADDRESS_ENV, old)
    try:
        yield
    finally:
        if old is not None:
            os.environ[RAY_ADDRESS_ENV] = old


WORKER_NICENESS = 0  # the simulated clients run at the caller's priority (Ray's default: 15)


@contextlib.contextmanager
def local_ray(num_cpus: int, *, address: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the ``ray.init`` arguments for the simulation, to be used inside the block.

    Without ``address``: a new local Ray instance with ``num_cpus`` CPUs whose servers listen on
    127.0.0.1 only (a ``RAY_ADDRESS`` in the environment is ignored). With ``address``
    (``--ray-address``: ``auto`` or ``HOST:PORT``, see ``resolve_ray_address``): attach to that
    cluster; it binds where it was started, and Ray refuses ``num_cpus``/``num_gpus`` there.
    """
    if address:
        resolved = resolve_ray_address(address, os.environ)
        log.info("attaching to the Ray cluster at %s", resolved)
        host, _ = parse_host_port(resolved)
        # A head on loopback: ray.init would otherwise swap 127.0.0.1 for this machine's
        # outward address, where that head does not listen, and retry for minutes.
        single = _single_node() if _is_loopback(host) else contextlib.nullcontext()
        with _without_ray_address(), single:
            yield {"address": resolved}
        return
    with _without_ray_address(), _single_node():
        yield {
            "address": "local",
            "_node_ip_address": LOOPBACK,
            "num_cpus": num_cpus,
            # Ray starts its workers at niceness 15; the simulated clients' training is the work
            # a simulation is for, so on a busy machine it must not wait behind everything else.
            "_system_config": {"worker_niceness": WORKER_NICENESS},
        }


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _single_node() -> Iterator[None]:
    """Ray's multi-node support off for the block (see the module docstring)."""
    from ray._private import ray_constants  # Ray is imported by Flower's simulation anyway

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a Ray release this was not made for
        raise RuntimeError(
            "cannot keep Ray on loopback with this Ray version (no "
            "ray._private.ray_constants.ENABLE_RAY_CLUSTER); see simulations/ray_local.py"
        )
    old_env = os.environ.get(RAY_MULTI_NODE_ENV)
    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_MULTI_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(RAY_MULTI_NODE_ENV, None)
        else:
            os.environ[RAY_MULTI_NODE_ENV] = old_env
