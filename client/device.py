"""``fedtune client start``: join a coordinator from a device.

Three processes, supervised here:

* a **worker** (``python -m client.worker``) that keeps the base model in memory between
  messages (Flower starts a fresh ClientApp process per message; see ``client/worker.py``);
* a Flower **SuperNode** (``flower-supernode``, gRPC-rere) holding the device's node key and the
  deployment's root certificate; its ClientApp processes forward each message to the worker;
* this supervisor: it checks the inputs up front (one clear line per problem), probes the
  coordinator before every (re)connection and says why it cannot be reached, backs off
  exponentially, restarts a worker that died, and stops everything on SIGINT/SIGTERM.

Device settings come from flags or a small TOML file (flags win); they reach the ClientApp as
the SuperNode's node config, where ``client.settings.ClientSettings.resolve`` reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import subprocess
import sys
import time
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

from client.probe import CertificateMismatch, Unreachable, probe
from client.processes import (
    Backoff,
    LineReader,
    executable,
    flower_env,
    free_port,
    spawn,
    split_address,
    stop_tree,
)
from protocol.credentials import KeysError, load_certificate, load_node_private_key

log = logging.getLogger("fedtune")

# How long a SuperNode keeps reconnecting on its own before it exits and this supervisor takes
# over (with a probe that says why, and exponential backoff).
SUPERNODE_RECONNECT_SECONDS = 60.0
WORKER_READY_SECONDS = 60.0
PREPARE_TIMEOUT_SECONDS = 3600.0


class DeviceError(RuntimeError):
    """The device cannot join; ``exit_code`` tells scripts which kind of failure it was."""

    exit_code = 2


class NodeRefused(DeviceError):
    """The coordinator refused this device (its key is not registered)."""

    exit_code = 3


class GaveUp(DeviceError):
    """The coordinator stayed unreachable for the whole ``max-wait`` budget."""

    exit_code = 4


class SettingsError(ValueError):
    """A device setting (flag or TOML) is malformed; names the setting and the file."""


def _setting(
    default: Any,
    help: str,
    *,
    node: bool = False,
    flag: str = "",
    size: bool = False,
    toml: bool = True,
) -> Any:
    """A ``DeviceConfig`` field and its one description: the TOML key and the ``client start``
    flag are the field's name with dashes (``flag`` names another, e.g. ``--no-worker``);
    ``node``: passed on to the ClientApp under the same key (``node_config``) when set; ``size``:
    a byte size written like ``3GB`` (``parse_size``); ``toml=False``: no TOML key, no flag."""
    meta = {"help": help, "node": node, "flag": flag, "size": size, "toml": toml}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DeviceConfig:
    """A device's settings. One field per setting: its TOML key, its ``client start`` flag and
    what reaches the ClientApp all derive from here (``TOML_KEYS``, ``add_flags``,
    ``node_config``)."""

    coordinator: str = _setting("", "the coordinator's Fleet API HOST:PORT")
    data: str = _setting("", "this device's data file or directory")
    root_cert: Path | None = _setting(None, "the deployment's ca.pem")
    key: Path | None = _setting(None, "this device's node key (NAME.key)")
    insecure: bool = _setting(False, "connect WITHOUT TLS (testing only; logged loudly)")
    state_dir: Path | None = _setting(None, "state kept across restarts")
    cache_dir: Path | None = _setting(None, "model cache directory")
    model: str = _setting("", "base model on this device (default: the run's)", node=True)
    quantization: str = _setting("", "nf4 | int8 | none (default: the run's)", node=True)
    compute_dtype: str = _setting(
        "",
        "fp32 | bf16 | auto: precision of training's matrix products (default: the run's)",
        node=True,
    )
    threads: int = _setting(0, "CPU threads for training (0: all)", node=True)
    max_memory: int = _setting(
        0,
        "memory budget of the worker, e.g. 2GB: training plans micro-batches and "
        "checkpointing to stay within it and refuses a round that cannot (default: none)",
        node=True,
        size=True,
    )  # bytes; 0 = no limit
    quantize_to_fit: bool | None = _setting(
        None,
        "training may fall back to a smaller quantization (none, int8, nf4) to fit",
        node=True,
    )  # None: the run's
    device: str = _setting("", "auto | cpu | cuda | mps (default auto)", node=True)
    heldout_fraction: float | None = _setting(None, "rows kept for eval", node=True)
    runtime_port: int = _setting(0, "local SuperNode API port")  # 0 = pick a free one
    max_wait: float = _setting(
        0.0, "give up after this many seconds without reaching the coordinator (0: never)"
    )
    worker: bool = _setting(
        True,
        "no long-lived worker: each message loads the model in a fresh process",
        flag="--no-worker",
    )  # False: Flower's per-message processes load the model every time
    verbose: bool = _setting(False, "library warnings and debug logs", toml=False)

    def __post_init__(self) -> None:
        if not self.coordinator:
            raise SettingsError("coordinator: required (HOST:PORT of the coordinator's Fleet API)")
        split_address(self.coordinator, "coordinator")
        if not self.data:
            raise SettingsError("data: required (this device's data file or directory)")
        if self.threads < 0:
            raise SettingsError(f"threads: must be >= 0, got {self.threads}")
        if self.max_memory and self.max_memory < 64 * 2**20:
            raise SettingsError(f"max-memory: {self.max_memory} bytes is below 64 MiB")
        if self.max_wait < 0:
            raise SettingsError(f"max-wait: must be >= 0, got {self.max_wait}")
        if self.insecure and self.root_cert is not None:
            raise SettingsError("insecure: --insecure and --root-cert were both given; choose one")
        if self.heldout_fraction is not None and not 0.0 <= self.heldout_fraction < 1.0:
            raise SettingsError(f"heldout-fraction: must be in [0, 1), got {self.heldout_fraction}")
        if self.quantization:
            from client.defaults import Quantization

            Quantization.parse(self.quantization)
        if self.compute_dtype:
            from client.defaults import ComputeDtype

            try:
                ComputeDtype.parse(self.compute_dtype, field="compute-dtype")
            except ValueError as exc:
                raise SettingsError(str(exc)) from None


# ------------------------------------------------------------------------------ settings


def _without_none(hint: Any) -> type:
    """``Path | None`` -> ``Path``: str, int, float, bool or Path."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return cast(type, args[0] if args else hint)


# The settings a TOML file and the flags give (not ``verbose``: the CLI's own flag).
_FIELDS: dict[str, Field[Any]] = {f.name: f for f in fields(DeviceConfig) if f.metadata["toml"]}
# TOML key -> (field name, type); the flags are the same names (``add_flags``).
TOML_KEYS: dict[str, tuple[str, type]] = {
    name.replace("_", "-"): (name, _without_none(hint))
    for name, hint in typing.get_type_hints(DeviceConfig).items()
    if name in _FIELDS
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, each defaulting to None (not given: the TOML file's, or the
    default)."""
    for key, (name, kind) in TOML_KEYS.items():
        meta = _FIELDS[name].metadata
        flag = meta["flag"] or f"--{key}"
        if kind is bool:
            const = not _FIELDS[name].default if meta["flag"] else True
            parser.add_argument(flag, dest=name, action="store_const", const=const,
                                default=None, help=meta["help"])  # fmt: skip
        else:
            typed: dict[str, Any] = {} if kind is str or meta["size"] else {"type": kind}
            parser.add_argument(flag, dest=name, default=None, help=meta["help"], **typed)


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """``build_config``'s flags from parsed ``add_flags`` arguments (sizes parsed)."""
    out: dict[str, Any] = {}
    for key, (name, _) in TOML_KEYS.items():
        value = getattr(args, name)
        if _FIELDS[name].metadata["size"] and value is not None:
            value = parse_size(value, key)
        out[name] = value
    return out


def parse_size(text: str | int, what: str = "max-memory") -> int:
    """Bytes from ``3GB``, ``512m``, ``2GiB`` or a plain number of bytes (multiples are 1024)."""
    from client.defaults import parse_size as parse

    try:
        return parse(text, what)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def read_settings_file(path: Path) -> dict[str, Any]:
    """The TOML file as ``DeviceConfig`` keyword arguments; every problem names file and key."""
    try:
        raw = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config {path}: cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config {path}: invalid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in TOML_KEYS:
            known = ", ".join(TOML_KEYS)
            raise SettingsError(f"config {path}: unknown setting {key!r} (known: {known})")
        name, kind = TOML_KEYS[key]
        if kind is Path:
            if not isinstance(value, str):
                raise SettingsError(f"config {path}: {key}: expected a path string, got {value!r}")
            p = Path(value).expanduser()
            out[name] = p if p.is_absolute() else (path.parent / p)
        elif _FIELDS[name].metadata["size"]:
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise SettingsError(f"config {path}: {key}: expected a size, got {value!r}")
            out[name] = parse_size(value, key)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SettingsError(f"config {path}: {key}: expected {kind.__name__}, got {value!r}")
        else:
            out[name] = value
    if "data" in out and not str(out["data"]).startswith("builtin:"):
        d = Path(out["data"]).expanduser()
        out["data"] = str(d if d.is_absolute() else path.parent / d)
    return out


def build_config(file: Path | None, flags: Mapping[str, Any]) -> DeviceConfig:
    """TOML file values, then flags that were given (not None) on top."""
    values: dict[str, Any] = read_settings_file(file) if file else {}
    known = {f.name for f in fields(DeviceConfig)}
    for name, value in flags.items():
        if name not in known:
            raise TypeError(name)
        if value is not None:
            values[name] = value
    try:
        return DeviceConfig(**values)
    except ValueError as exc:
        if file and not isinstance(exc, SettingsError):
            raise SettingsError(f"config {file}: {exc}") from None
        raise


def check_inputs(cfg: DeviceConfig) -> DeviceConfig:
    """Read every input once before starting anything; returns the config with defaults and
    absolute paths filled in. Each problem is one ``ValueError`` naming the file."""
    from client.data import load_records
    from client.defaults import default_cache_dir
    from client.settings import default_state_dir

    if not cfg.data.startswith("builtin:"):
        data = Path(cfg.data).expanduser().resolve()
        load_records(data)  # DataError: missing, unreadable, empty or malformed
        cfg = replace(cfg, data=str(data))
    if cfg.key is not None:
        load_node_private_key(cfg.key)
        cfg = replace(cfg, key=cfg.key.expanduser().resolve())
    else:
        log.warning(
            "no node key (--key): this device can only join a coordinator started with "
            "--no-node-auth"
        )
    if cfg.root_cert is not None:
        load_certificate(cfg.root_cert, "root certificate")
        cfg = replace(cfg, root_cert=cfg.root_cert.expanduser().resolve())
    if cfg.insecure:
        log.warning("!" * 78)
        log.warning("!! --insecure: TLS is OFF; this device cannot verify the coordinator and")
        log.warning("!! its adapter updates travel unencrypted. Use only for local testing.")
        log.warning("!" * 78)
    name = cfg.key.stem if cfg.key is not None else "device"
    state = (cfg.state_dir or default_state_dir() / "clients" / name).expanduser().resolve()
    cache = (cfg.cache_dir or default_cache_dir()).expanduser().resolve()
    return replace(cfg, state_dir=state, cache_dir=cache)


def node_config(cfg: DeviceConfig, socket: Path | None) -> dict[str, Any]:
    """What the SuperNode passes to every ClientApp call as ``context.node_config``."""
    assert cfg.state_dir is not None and cfg.cache_dir is not None
    out: dict[str, Any] = {
        "data-path": cfg.data,
        "cache-dir": str(cfg.cache_dir),
        "state-dir": str(cfg.state_dir),
    }
    if socket is not None:
        out["worker-socket"] = str(socket)
    if cfg.key is not None:  # the name the coordinator registers for this key (client/identity)
        out["device-name"] = cfg.key.stem
    for f in fields(cfg):  # the device's own choices, where it made one
        value = getattr(cfg, f.name)
        if f.metadata["node"] and value != f.default:
            out[f.name.replace("_", "-")] = value
    return out


def supernode_command(cfg: DeviceConfig, node_config_file: Path, runtime_port: int) -> list[str]:
    cmd = [
        str(executable("flower-supernode")),
        "--grpc-rere",
        "--superlink",
        cfg.coordinator,
        "--node-config",
        str(node_config_file),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--max-wait-time",
        str(SUPERNODE_RECONNECT_SECONDS),
    ]
    if cfg.insecure:
        cmd.append("--insecure")
    elif cfg.root_cert is not None:
        cmd += ["--root-certificates", str(cfg.root_cert)]
    if cfg.key is not None:
        cmd += ["--auth-supernode-private-key", str(cfg.key)]
    return cmd


# ------------------------------------------------------------------------------ supervision


_SUPERNODE_NOISE = (
    "uvicorn",
    "Uvicorn running",
    "Started server process",
    "Waiting for application",
    "Application startup complete",
    "FastAPI lifespan",
    "Shutting down",
    "Finished server process",
    "Application shutdown complete",
    "Starting Flower SuperExec",
    "SuperExec terminated",
    "Sent successfully",
    "Received successfully",
    "Start `flwr-clientapp` process",
    "INFO:     ",
)


def _show(verbose: bool) -> Any:
    def show(line: str) -> bool:
        if verbose:
            return True
        stripped = line.strip()
        return (
            bool(stripped) and stripped != "INFO :" and not any(n in line for n in _SUPERNODE_NOISE)
        )

    return show


def _refusal(reader: LineReader) -> str | None:
    if reader.find(lambda ln: "[code: 2004]" in ln or "Failed to activate SuperNode" in ln):
        return "activation refused"
    return None


def _exit_reason(reader: LineReader) -> str:
    lines = [ln.strip() for ln in reader.lines if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if "Exit Code" in lines[i]:
            detail = [ln for ln in lines[i + 1 : i + 4] if not ln.startswith("For more")]
            return " ".join([lines[i], *detail])
    return lines[-1] if lines else "no output"


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed; out of memory?)" if -code == signal.SIGKILL else ""
        return f"{name}{hint}"
    return f"exit code {code}"


class Device:
    """The supervisor's state: the worker and SuperNode processes it owns."""

    def __init__(self, cfg: DeviceConfig) -> None:
        assert cfg.state_dir is not None and cfg.cache_dir is not None
        self.cfg = cfg
        self.state = cfg.state_dir
        self.worker: subprocess.Popen[str] | None = None
        self.node: subprocess.Popen[str] | None = None
        self.worker_restarts: list[float] = []
        self.readers: list[LineReader] = []
        from client.worker import socket_path

        self.socket = socket_path(self.state) if cfg.worker else None
        self.env = flower_env(self.state / "flwr", _thread_env(cfg.threads), fast_tasks=True)

    # -- worker --------------------------------------------------------------------------

    def start_worker(self) -> None:
        assert self.socket is not None
        cmd = [sys.executable, "-m", "client.worker", "--socket", str(self.socket),
               "--max-memory", str(self.cfg.max_memory)]  # fmt: skip
        if self.cfg.model:
            # The device names its model: build its disk cache before the first round asks.
            from client.defaults import Quantization

            quant = self.cfg.quantization or Quantization.NF4.value
            cmd += ["--prepare-first", self.cfg.model, quant, str(self.cfg.cache_dir),
                    "--prepare-timeout", str(PREPARE_TIMEOUT_SECONDS)]  # fmt: skip
        self.worker = spawn(cmd, self.env)
        reader = LineReader(self.worker, prefix="worker | ", show=_show(self.cfg.verbose))
        self.readers.append(reader)
        deadline = time.monotonic() + WORKER_READY_SECONDS
        while not self.socket.exists():
            if self.worker.poll() is not None:
                reader.join()
                raise DeviceError(f"device worker failed to start: {_python_error(reader)}")
            if time.monotonic() > deadline:
                raise DeviceError(f"device worker did not listen within {WORKER_READY_SECONDS:g}s")
            time.sleep(0.1)

    def check_worker(self) -> None:
        """Restart a worker that died; give up if it keeps dying."""
        if self.worker is None or self.worker.poll() is None:
            return
        why = _describe_exit(self.worker.returncode)
        now = time.monotonic()
        self.worker_restarts = [t for t in self.worker_restarts if now - t < 300] + [now]
        if len(self.worker_restarts) > 5:
            raise DeviceError(f"device worker keeps dying ({why}); last 5 restarts within 5 min")
        log.warning("device worker exited (%s); restarting it", why)
        stop_tree(self.worker)
        self.start_worker()

    # -- supernode -----------------------------------------------------------------------

    def start_node(self) -> LineReader:
        conf = self.state / "node-config.toml"
        _write_toml(conf, node_config(self.cfg, self.socket))
        port = self.cfg.runtime_port or free_port()
        self.node = spawn(supernode_command(self.cfg, conf, port), self.env)
        reader = LineReader(self.node, prefix="", show=_show(self.cfg.verbose))
        self.readers.append(reader)
        return reader

    def stop(self) -> None:
        for reader in self.readers:
            reader.muted = True
        for proc in (self.node, self.worker):
            if proc is not None:
                stop_tree(proc)

    def reach_coordinator(self, backoff: Backoff) -> None:
        """Probe until the coordinator answers; say why each try failed."""
        host, port = split_address(self.cfg.coordinator, "coordinator")
        while True:
            try:
                probe(host, port, self.cfg.root_cert, insecure=self.cfg.insecure, timeout=10.0)
                return
            except Unreachable as exc:
                delay = backoff.next_delay()
                if delay is None:
                    raise GaveUp(
                        f"coordinator {self.cfg.coordinator} unreachable for "
                        f"{self.cfg.max_wait:g}s: {exc}"
                    ) from None
                log.warning("coordinator unreachable: %s; retrying in %.0fs", exc, delay)
                time.sleep(delay)
                self.check_worker()

    def serve(self) -> None:
        """Connect, serve, reconnect; returns only by exception (or KeyboardInterrupt)."""
        backoff = Backoff(first=1.0, cap=60.0, budget=self.cfg.max_wait)
        joined_once = False
        while True:
            self.reach_coordinator(backoff)
            reader = self.start_node()
            assert self.node is not None
            joined = False
            while self.node.poll() is None and not _refusal(reader):
                if not joined and reader.find(lambda ln: "SuperNode ID:" in ln):
                    line = reader.find(lambda ln: "SuperNode ID:" in ln) or ""
                    node_id = line.split("SuperNode ID:")[-1].strip()
                    log.info("joined coordinator %s as node %s", self.cfg.coordinator, node_id)
                    joined = joined_once = True
                    backoff.reset()
                self.check_worker()
                time.sleep(0.5)
            # From here on this supervisor reports; the dying processes' chatter is noise.
            reader.muted = True
            if _refusal(reader):
                raise NodeRefused(
                    f"coordinator {self.cfg.coordinator} refused this device: its public key "
                    f"({_key_hint(self.cfg.key)}) is not registered there; ask the operator to add "
                    "the .pub file to the coordinator's --authorized-keys and restart it"
                )
            stop_tree(self.node, timeout=30)
            reader.join()
            reason = _exit_reason(reader)
            if "Unable to parse the private key" in reason:
                raise DeviceError(f"node key {self.cfg.key}: Flower cannot parse it ({reason})")
            delay = backoff.next_delay()
            if delay is None:
                raise GaveUp(
                    f"lost the coordinator {self.cfg.coordinator} and could not reconnect within "
                    f"{self.cfg.max_wait:g}s: {reason}"
                )
            what = "connection to the coordinator lost" if joined_once else "could not join"
            log.warning("%s (%s); retrying in %.0fs", what, reason, delay)
            time.sleep(delay)


def _key_hint(key: Path | None) -> str:
    if key is None:
        return "no --key given"
    from protocol.credentials import fingerprint

    try:
        fp = fingerprint(load_node_private_key(key).public_key())
    except KeysError:
        fp = "unreadable"
    return f"{key.with_suffix('.pub').name}, {fp}"


def _python_error(reader: LineReader) -> str:
    lines = [ln.strip() for ln in reader.lines if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return errs[-1] if errs else (lines[-1] if lines else "no output")


def _thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def _write_toml(path: Path, values: Mapping[str, Any]) -> None:
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(dict(values)))
    tmp.replace(path)


def start(cfg: DeviceConfig) -> int:
    """Run the device in the foreground until SIGINT/SIGTERM (exit 0) or a fatal error."""
    cfg = check_inputs(cfg)
    host, port = split_address(cfg.coordinator, "coordinator")
    # A wrong CA or host name, or TLS on one side only (--insecure against a TLS coordinator, or
    # TLS against an insecure one), is a configuration error: one line, no retries. The probe
    # before each reconnection below raises the same errors.
    with contextlib.suppress(Unreachable):  # retried with backoff below
        probe(host, port, cfg.root_cert, insecure=cfg.insecure, timeout=10.0)
    assert cfg.state_dir is not None
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dev = Device(cfg)

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        if cfg.worker:
            dev.start_worker()
        else:
            log.warning(
                "--no-worker: every message runs in a fresh process that loads the model again"
            )
        dev.serve()
        return 0  # pragma: no cover - serve() returns only by exception
    except KeyboardInterrupt:
        log.info("stopping the device")
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        dev.stop()


__all__ = [
    "CertificateMismatch",
    "DeviceConfig",
    "DeviceError",
    "GaveUp",
    "NodeRefused",
    "SettingsError",
    "build_config",
    "parse_size",
    "start",
]
