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
import os
from collections.abc import Iterator
from typing import Any

LOOPBACK = "127.0.0.1"
RAY_MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def local_ray(num_cpus: int, *, address: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the ``ray.init`` arguments for the simulation, to be used inside the block.

    Without ``address``: a new local Ray instance with ``num_cpus`` CPUs whose servers listen on
    127.0.0.1 only. With ``address`` (an existing cluster, e.g. a future ``--ray-address``):
    attach to it; that cluster binds where it was started, and Ray refuses ``num_cpus`` there.
    """
    if address:
        yield {"address": address}
        return
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
        yield {"address": "local", "_node_ip_address": LOOPBACK, "num_cpus": num_cpus}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(RAY_MULTI_NODE_ENV, None)
        else:
            os.environ[RAY_MULTI_NODE_ENV] = old_env
