"""``fedtune coordinator start``: a Flower SuperLink with TLS and node authentication on.

The SuperLink serves devices on its Fleet API (gRPC, ``--fleet-api-type grpc-rere``) and the
operator on its Control API (HTTP; runs are submitted there). Defaults keep what needs no
exposure on loopback: only the Fleet API listens on all interfaces.

Node authentication in Flower 1.39 is a registry inside the SuperLink's database. This module
makes the operator's list of device public keys the source of truth: at start it registers every
listed key that is not registered yet and unregisters registered keys that are no longer listed
(deleting a device's ``.pub`` file and restarting revokes it). With a persistent ``--database``
the registry, the runs and their node ids survive restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.processes import (
    LineReader,
    ProcessError,
    flower_env,
    free_port,
    spawn,
    split_address,
    stop_tree,
)
from protocol.credentials import (
    CA_CERT,
    COORDINATOR_CERT,
    COORDINATOR_KEY,
    AuthorizedKey,
    KeysError,
    check_server_files,
    read_authorized_keys,
)

log = logging.getLogger("fedtune")

DEFAULT_FLEET_ADDRESS = "0.0.0.0:9092"
DEFAULT_CONTROL_ADDRESS = "127.0.0.1:9093"
INFO_FILE = "coordinator.json"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or cannot be reached; the message says why."""


class CoordinatorConfigError(ValueError):
    """A coordinator setting is missing or inconsistent; the message names the option."""


def default_coordinator_dir() -> Path:
    from client.settings import default_state_dir

    return default_state_dir() / "coordinator"


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    authorized_keys: tuple[Path, ...] = ()
    node_auth: bool = True
    fleet_address: str = DEFAULT_FLEET_ADDRESS
    control_address: str = DEFAULT_CONTROL_ADDRESS
    database: Path | None = None  # default <state_dir>/superlink.db
    ready_timeout: float = 120.0
    verbose: bool = False

    def __post_init__(self) -> None:
        split_address(self.fleet_address, "fleet-address")
        split_address(self.control_address, "control-address")
        if self.insecure and any((self.ca_cert, self.cert, self.key)):
            raise CoordinatorConfigError("--insecure and TLS files were both given; choose one")
        if not self.insecure and not all((self.ca_cert, self.cert, self.key)):
            raise CoordinatorConfigError(
                "TLS needs the CA certificate, the coordinator certificate and its key (pass "
                "--keys DIR from `fedtune keys`, or --ca-cert/--cert/--key); to run without "
                "TLS pass --insecure"
            )
        if self.node_auth and self.insecure:
            raise CoordinatorConfigError(
                "node authentication needs TLS: drop --insecure, or also pass --no-node-auth"
            )
        if self.node_auth and not self.authorized_keys:
            raise CoordinatorConfigError(
                "--authorized-keys is required with node authentication (a directory of device "
                "*.pub files, or a file with one public key per line); to accept any device "
                "pass --no-node-auth"
            )
        if self.ready_timeout <= 0:
            raise CoordinatorConfigError(f"ready-timeout: must be > 0, got {self.ready_timeout}")

    @classmethod
    def from_keys_dir(cls, keys: Path, **kw: Any) -> CoordinatorConfig:
        return cls(
            ca_cert=keys / CA_CERT, cert=keys / COORDINATOR_CERT, key=keys / COORDINATOR_KEY, **kw
        )

    @property
    def db_path(self) -> Path:
        return self.database or self.state_dir / "superlink.db"


# ------------------------------------------------------------------------ Control API access


@dataclass(frozen=True)
class ControlEndpoint:
    """Where and how to reach a coordinator's Control API."""

    address: str
    root_cert: Path | None
    insecure: bool

    def client(self) -> Any:
        """A Flower ``ControlHttpClient`` (every call times out after 30 s)."""
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        root = None
        if not self.insecure and self.root_cert is not None:
            try:
                root = self.root_cert.expanduser().read_bytes()
            except OSError as exc:
                raise CoordinatorError(
                    f"root certificate {self.root_cert}: cannot be read ({exc.strerror or exc})"
                ) from None
        return ControlHttpClient.from_server_address(
            self.address,
            insecure=self.insecure,
            root_certificates=root,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    @classmethod
    def from_state_dir(cls, state_dir: Path) -> ControlEndpoint:
        info = state_dir.expanduser() / INFO_FILE
        try:
            data = json.loads(info.read_text())
        except FileNotFoundError:
            raise CoordinatorError(
                f"no coordinator found: {info} does not exist (start one with `fedtune "
                "coordinator start`, or pass --control-address)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CoordinatorError(f"{info}: cannot be read ({exc})") from None
        root = data.get("root_certificates")
        return cls(
            address=str(data["control_address"]),
            root_cert=Path(root) if root else None,
            insecure=bool(data.get("insecure", False)),
        )


def describe_http_error(exc: BaseException, endpoint: ControlEndpoint) -> str:
    """One line for a failed Control API call."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        try:
            detail = exc.response.json().get("detail", exc.response.text)
        except ValueError:
            detail = exc.response.text
        return f"coordinator refused the request ({exc.response.status_code}): {detail}"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return (
                f"coordinator control API {endpoint.address}: certificate not accepted by "
                f"{endpoint.root_cert} ({text})"
            )
        return f"cannot reach the coordinator control API at {endpoint.address}: {text}"
    if isinstance(exc, httpx.TimeoutException):
        return f"coordinator control API {endpoint.address} did not answer in time"
    return f"coordinator control API {endpoint.address}: {exc}"


def _wait_ready(endpoint: ControlEndpoint, proc: Any, reader: LineReader, timeout: float) -> Any:
    """Poll the Control API until it answers; returns the client. Fails early if the SuperLink
    exits."""
    from flwr.proto.control_pb2 import ListNodesRequest

    deadline = time.monotonic() + timeout
    client = endpoint.client()
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            reader.join()
            raise CoordinatorError(
                f"flower-superlink exited with code {proc.returncode}: {_last_error(reader)}"
            )
        try:
            client.ListNodes(ListNodesRequest())
            return client
        except Exception as exc:  # not up yet: connection refused, TLS not ready, ...
            last = describe_http_error(exc, endpoint)
            time.sleep(0.5)
    raise CoordinatorError(f"coordinator did not become ready within {timeout:g}s ({last})")


def _last_error(reader: LineReader) -> str:
    lines = [ln.strip() for ln in reader.lines if ln.strip()]
    for marker in ("Exit Code", "ERROR", "Error", "error"):
        hits = [i for i, ln in enumerate(lines) if marker in ln]
        if hits:
            i = hits[-1]
            return " ".join(lines[i : i + 3])
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------------ registry sync


@dataclass(frozen=True)
class SyncResult:
    added: list[str]
    kept: list[str]
    removed: list[int]


def sync_registry(client: Any, wanted: Sequence[AuthorizedKey]) -> SyncResult:
    """Make the SuperLink's registered node keys equal ``wanted``."""
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        RegisterNodeRequest,
        UnregisterNodeRequest,
    )

    nodes = [
        n for n in client.ListNodes(ListNodesRequest()).nodes_info if n.status != "unregistered"
    ]
    registered = {_norm(n.public_key): n for n in nodes}
    wanted_pems = {_norm(k.pem): k for k in wanted}
    added, kept, removed = [], [], []
    for pem, k in wanted_pems.items():
        if pem in registered:
            kept.append(k.name)
            continue
        client.RegisterNode(RegisterNodeRequest(public_key=k.pem, name=k.name))
        added.append(k.name)
    for pem, node in registered.items():
        if pem not in wanted_pems:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
            removed.append(int(node.node_id))
    return SyncResult(added, kept, removed)


def _norm(pem: bytes | str) -> bytes:
    raw = pem.encode() if isinstance(pem, str) else bytes(pem)
    return b"".join(raw.split())


def list_nodes(endpoint: ControlEndpoint) -> list[dict[str, Any]]:
    """Registered devices and whether they are online now (for ``fedtune coordinator nodes``)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    client = endpoint.client()
    try:
        res = client.ListNodes(ListNodesRequest())
    except Exception as exc:
        raise CoordinatorError(describe_http_error(exc, endpoint)) from None
    finally:
        client.close()
    return [
        {
            "node_id": int(n.node_id),
            "name": n.name,
            "status": n.status,
            "online_until": n.online_until,
            "last_activated_at": n.last_activated_at,
        }
        for n in res.nodes_info
    ]


# ------------------------------------------------------------------------ the command


def _superlink_command(cfg: CoordinatorConfig) -> list[str]:
    host, port = split_address(cfg.control_address, "control-address")
    cmd = [
        sys.executable,
        "-m",
        "coordinator.superlink_main",  # flower-superlink, with a longer SQLite lock wait
        "--fleet-api-type",
        "grpc-rere",
        "--fleet-api-address",
        cfg.fleet_address,
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(cfg.db_path),
        # The run's code is fedtune as installed here; never `uv sync` an app at run time.
        "--disable-runtime-dependency-installation",
    ]
    if cfg.insecure:
        cmd.append("--insecure")
    else:
        assert cfg.ca_cert and cfg.cert and cfg.key
        cmd += [
            "--ssl-ca-certfile",
            str(cfg.ca_cert),
            "--ssl-certfile",
            str(cfg.cert),
            "--ssl-keyfile",
            str(cfg.key),
        ]
    if cfg.node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


# Flower logs every HTTP request and every Fleet call; keep what an operator acts on.
_NOISE = (
    "[uvicorn.access]",
    "uvicorn.access",
    "ControlServicer.",
    "SuperLinkLifespan",
    "FastAPI lifespan",
    "Waiting for application",
    "Application startup complete",
    "Started server process",
    "Starting Flower SuperExec",
)


def _show_superlink_line(verbose: bool) -> Any:
    def show(line: str) -> bool:
        return verbose or not any(n in line for n in _NOISE)

    return show


def _warn_loudly(lines: Sequence[str]) -> None:
    bar = "!" * 78
    log.warning(bar)
    for line in lines:
        log.warning("!! %s", line)
    log.warning(bar)


def start(cfg: CoordinatorConfig) -> int:
    """Run the coordinator in the foreground until SIGINT/SIGTERM; returns an exit code."""
    keys: list[AuthorizedKey] = []
    if not cfg.insecure:
        assert cfg.ca_cert and cfg.cert and cfg.key
        names = check_server_files(cfg.ca_cert, cfg.cert, cfg.key)
        log.info("TLS certificate names: %s", ", ".join(names))
    else:
        _warn_loudly(
            [
                "--insecure: TLS is OFF. Adapter updates, run settings and node identities",
                "travel unencrypted and devices cannot verify this coordinator.",
                "Use this only on a trusted network for testing.",
            ]
        )
    if cfg.node_auth:
        keys = read_authorized_keys(cfg.authorized_keys)
    else:
        _warn_loudly(
            [
                "--no-node-auth: any device that can reach the Fleet API can join and",
                "send updates. Register device keys with --authorized-keys instead.",
            ]
        )
    control_host, _ = split_address(cfg.control_address, "control-address")
    if control_host not in LOOPBACK:
        _warn_loudly(
            [
                f"the control API listens on {cfg.control_address}: anyone who can reach it",
                "can submit runs (Flower's control API has no login in this edition).",
            ]
        )

    state = cfg.state_dir.expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg.db_path.parent.mkdir(parents=True, exist_ok=True)
    env = flower_env(state / "flwr")
    endpoint = ControlEndpoint(
        address=_client_address(cfg.control_address),
        root_cert=None if cfg.insecure else cfg.ca_cert,
        insecure=cfg.insecure,
    )
    info = state / INFO_FILE
    procs: list[Any] = []

    def launch(fleet_address: str) -> tuple[Any, LineReader]:
        proc = spawn(_superlink_command(replace(cfg, fleet_address=fleet_address)), env)
        procs.append(proc)
        return proc, LineReader(proc, prefix="superlink | ", show=_show_superlink_line(cfg.verbose))

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        if cfg.node_auth:
            # Registration phase: the Fleet API listens on a private loopback port while the
            # registry is brought in line with --authorized-keys, so no device is ever judged
            # against a stale registry. Then the coordinator restarts on its real address.
            proc, reader = launch(f"127.0.0.1:{free_port()}")
            client = _wait_ready(endpoint, proc, reader, cfg.ready_timeout)
            try:
                res = sync_registry(client, keys)
            except Exception as exc:
                raise CoordinatorError(describe_http_error(exc, endpoint)) from None
            finally:
                client.close()
            reader.muted = True
            stop_tree(proc)
            log.info(
                "node authentication on: %d device key(s) registered (%d new)%s",
                len(res.added) + len(res.kept),
                len(res.added),
                f"; {len(res.removed)} no longer listed, unregistered" if res.removed else "",
            )
        proc, reader = launch(cfg.fleet_address)
        _wait_ready(endpoint, proc, reader, cfg.ready_timeout).close()
        _write_info(info, cfg, endpoint)
        log.info(
            "coordinator ready: devices connect to %s; submit runs with `fedtune coordinator "
            "run` (control API %s); state in %s",
            cfg.fleet_address,
            endpoint.address,
            state,
        )
        while proc.poll() is None:
            time.sleep(0.5)
        reader.join()
        raise CoordinatorError(
            f"flower-superlink exited with code {proc.returncode}: {_last_error(reader)}"
        )
    except KeyboardInterrupt:
        log.info("stopping the coordinator")
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        for proc in procs:
            stop_tree(proc)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()


def _client_address(bind: str) -> str:
    host, port = split_address(bind, "control-address")
    if host in ("0.0.0.0", "::", ""):
        return f"127.0.0.1:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_info(path: Path, cfg: CoordinatorConfig, endpoint: ControlEndpoint) -> None:
    from coordinator.rundir import write_json_atomic

    write_json_atomic(
        path,
        {
            "control_address": endpoint.address,
            "fleet_address": cfg.fleet_address,
            "root_certificates": str(cfg.ca_cert.resolve()) if cfg.ca_cert else None,
            "insecure": cfg.insecure,
            "node_auth": cfg.node_auth,
            "database": str(cfg.db_path),
            "pid": os.getpid(),
        },
    )


__all__ = [
    "ControlEndpoint",
    "CoordinatorConfig",
    "CoordinatorError",
    "KeysError",
    "ProcessError",
    "start",
    "sync_registry",
]
