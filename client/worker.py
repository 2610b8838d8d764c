"""The device worker: one long-lived process per device that keeps the base model in memory.

Flower 1.39 runs every message in a fresh ``flwr-clientapp`` process. Importing torch,
transformers and peft and loading the quantized base takes 10-15 s per message on a small CPU,
more than a short training round. So on a device the ClientApp (``client.device_app``) is a thin
forwarder: it hands each message and the node's context to this worker over a local Unix socket
and returns the worker's reply. The worker runs the simulator's ClientApp (``client.app.app``)
on the message, so what it computes is identical; only where the model lives changes.

Wire format on the socket (both directions), never pickle::

    b"FTW1" | header length (u32, big endian) | body length (u64) | header (JSON) | body

The request header names the operation (``message`` or ``ping``) and a wall-clock
``deadline`` after which the sender no longer waits; the body holds the Flower ``Message`` and
the node's ``Context`` as Flower's own protobufs (``pack``: length-prefixed parts). The reply
header says ``ok`` or gives the ``error``; its body holds the reply ``Message`` and the updated
``Context`` (its ``state`` carries stage-to-stage protocol state such as secure aggregation's).

This module's top level imports only the standard library: the per-message ClientApp process
imports it and must stay light. ``serve`` imports the ML stack.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fedtune")

MAGIC = b"FTW1"
_PREFIX = struct.Struct(">4sIQ")
_PART = struct.Struct(">Q")
MAX_HEADER = 1 << 20
MAX_BODY = 1 << 30
OPS = ("message", "ping")
# Run-config keys that describe the coordinator's machine, never the device's.
COORDINATOR_ONLY_KEYS = ("output-dir", "cache-dir", "central-eval-data", "partition-dir")
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class WorkerError(RuntimeError):
    """The worker could not be reached, did not answer in time, or broke the wire format."""


# ------------------------------------------------------------------------------------ framing


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise WorkerError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, header: Mapping[str, Any], body: bytes = b"") -> None:
    head = json.dumps(dict(header)).encode()
    if len(head) > MAX_HEADER or len(body) > MAX_BODY:
        raise WorkerError(f"frame too large (header {len(head)} B, body {len(body)} B)")
    sock.sendall(_PREFIX.pack(MAGIC, len(head), len(body)) + head)
    if body:
        sock.sendall(body)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    magic, n_head, n_body = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise WorkerError(f"not a fedtune worker frame (magic {magic!r})")
    if n_head > MAX_HEADER or n_body > MAX_BODY:
        raise WorkerError(f"frame too large (header {n_head} B, body {n_body} B)")
    try:
        header = json.loads(_recv_exact(sock, n_head))
    except json.JSONDecodeError as exc:
        raise WorkerError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WorkerError("frame header is not a JSON object")
    return header, _recv_exact(sock, n_body)


def pack(*parts: bytes) -> bytes:
    """Several byte strings in one body: each prefixed by its length (u64, big endian)."""
    return b"".join(_PART.pack(len(p)) + p for p in parts)


def unpack(body: bytes) -> list[bytes]:
    parts, i = [], 0
    while i < len(body):
        if i + _PART.size > len(body):
            raise WorkerError("truncated body")
        (n,) = _PART.unpack_from(body, i)
        i += _PART.size
        if i + n > len(body):
            raise WorkerError("truncated body")
        parts.append(body[i : i + n])
        i += n
    return parts


def call(
    path: str | Path,
    header: Mapping[str, Any],
    body: bytes,
    timeout: float,
    connect_timeout: float = 10.0,
) -> tuple[dict[str, Any], bytes]:
    """Send one request to the worker at ``path`` and wait at most ``timeout`` s for the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise WorkerError(
                f"device worker is not running (no listener at {path}); is `fedtune client "
                "start` running?"
            ) from None
        except OSError as exc:
            raise WorkerError(f"cannot reach device worker at {path}: {exc}") from None
        sock.settimeout(timeout)
        try:
            send_frame(sock, header, body)
            return recv_frame(sock)
        except TimeoutError:
            raise WorkerError(f"device worker gave no reply within {timeout:g}s") from None
        except (ConnectionError, struct.error) as exc:
            raise WorkerError(f"device worker connection failed: {exc}") from None


def socket_path(state_dir: Path) -> Path:
    """Where a device's worker listens: in its state dir, or (paths too long for a Unix socket)
    in a private directory under the system temp dir."""
    candidate = state_dir / "worker.sock"
    if len(str(candidate)) <= _MAX_UNIX_PATH:
        return candidate
    import hashlib

    tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    base = Path(tempfile.gettempdir()) / f"fedtune-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{tag}.sock"


# ------------------------------------------------------------------------------------ server


@dataclass(frozen=True)
class WorkerConfig:
    socket: Path
    max_memory: int = 0  # bytes; 0 = no limit
    io_timeout: float = 60.0  # reading a request / writing a reply

    def __post_init__(self) -> None:
        if self.max_memory < 0:
            raise ValueError(f"max-memory: must be >= 0, got {self.max_memory}")


Handler = Callable[[str, dict[str, Any], bytes], bytes]


def default_handler() -> Handler:
    """Run ``client.app``'s ClientApp on the forwarded message and context (imports the ML
    stack); returns the reply and the context as Flower protobufs."""
    from flwr.common.serde import (
        context_from_proto,
        context_to_proto,
        message_from_proto,
        message_to_proto,
    )
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from client.app import app as client_app

    def handle(op: str, header: dict[str, Any], body: bytes) -> bytes:
        parts = unpack(body)
        if len(parts) != 2:
            raise WorkerError(f"expected a message and a context, got {len(parts)} parts")
        msg = message_from_proto(ProtoMessage.FromString(parts[0]))
        context = context_from_proto(ProtoContext.FromString(parts[1]))
        context.run_config = {
            k: v for k, v in context.run_config.items() if k not in COORDINATOR_ONLY_KEYS
        }
        reply = client_app(msg, context)
        return pack(
            message_to_proto(reply).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        )

    return handle


def _reason(exc: BaseException, max_memory: int) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if max_memory and (isinstance(exc, MemoryError) or "can't allocate memory" in str(exc).lower()):
        return f"device memory limit max-memory={max_memory / 2**20:.0f}MiB exceeded ({text})"
    return text


class Worker:
    def __init__(self, cfg: WorkerConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        self.stop = threading.Event()
        self.served = 0
        self._sock: socket.socket | None = None

    def listen(self) -> None:
        path = self.cfg.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: only this user may talk to it
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock

    def serve_forever(self) -> None:
        assert self._sock is not None, "call listen() first"
        try:
            while not self.stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    self._serve_one(conn)
        finally:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.cfg.socket.unlink()

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(self.cfg.io_timeout)
        try:
            header, body = recv_frame(conn)
        except (WorkerError, OSError, struct.error) as exc:
            log.warning("worker: dropped a malformed request: %s", exc)
            return
        op = header.get("op")
        t0 = time.perf_counter()
        reply: dict[str, Any]
        out = b""
        deadline = header.get("deadline")
        if op == "ping":
            reply = {"ok": True, "pid": os.getpid(), "served": self.served}
        elif isinstance(deadline, int | float) and time.time() > deadline:
            # Queued behind slow work until its sender gave up: computing it would only delay
            # the next, still-wanted message.
            reply = {"ok": False, "error": "request expired before the device worker reached it"}
        elif op not in OPS:
            reply = {"ok": False, "error": f"unknown worker operation {op!r}"}
        else:
            try:
                out = self.handler(str(op), header, body)
                reply = {"ok": True}
                self.served += 1
            except Exception as exc:  # the reason travels back to the coordinator
                log.warning("worker: %s failed: %s", op, exc, exc_info=log.isEnabledFor(10))
                reply = {"ok": False, "error": _reason(exc, self.cfg.max_memory)}
        reply["seconds"] = time.perf_counter() - t0
        try:
            send_frame(conn, reply, out)
        except (OSError, WorkerError) as exc:
            log.warning("worker: could not deliver the %s reply: %s", op, exc)


def apply_memory_limit(max_bytes: int) -> None:
    """Cap this process's data segment so an oversized round fails with an error reply
    (and the device stays usable) instead of drawing the OOM killer.

    The ClientApp plans training to keep the *resident* memory within ``max_bytes``
    (``client.memory``). The data segment is virtual and larger: it counts the address space
    malloc reserves per thread arena and thread stacks (784 MiB for an NF4 client whose RSS was
    630 MiB), so the cap, a safety net, sits at twice the budget."""
    if max_bytes:
        cap = 2 * max_bytes
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def prepare_in_child(model: str, quantization: str, cache_dir: str, timeout: float) -> str:
    """Build the model's disk cache in a short-lived child process, so the dequantization peak
    never counts against this long-lived process's memory. Returns "" or the error."""
    import subprocess

    cmd = [sys.executable, "-m", "client.worker", "--socket", "-", "--prepare",
           model, quantization, cache_dir]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"preparing {model} took over {timeout:g}s"
    if res.returncode == 0:
        return ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0]]
    return (errors or lines or [f"exit code {res.returncode}"])[-1]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__)
    p.add_argument("--socket", type=Path, required=True)
    p.add_argument("--max-memory", type=int, default=0, help="bytes (0: no limit)")
    p.add_argument(
        "--prepare",
        nargs=3,
        metavar=("MODEL", "QUANTIZATION", "CACHE_DIR"),
        help="only build the on-disk model cache for MODEL/QUANTIZATION, then exit",
    )
    p.add_argument(
        "--prepare-first",
        nargs=3,
        metavar=("MODEL", "QUANTIZATION", "CACHE_DIR"),
        help="build that cache (in a child process) before serving",
    )
    p.add_argument("--prepare-timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s worker %(message)s", datefmt="%H:%M:%S"
    )
    if args.prepare:
        from client.logs import quiet_libraries

        quiet_libraries()
        from client.model import Quantization, prepare, resolve_model

        model, quant, cache = args.prepare
        prepare(resolve_model(model), [Quantization.parse(quant)], Path(cache))
        return 0

    cfg = WorkerConfig(socket=args.socket, max_memory=args.max_memory)
    # Listen before anything slow, so the supervisor sees the worker at once; messages that
    # arrive meanwhile wait in the socket's backlog (the ClientApp's wait is bounded).
    worker = Worker(cfg, handler=lambda *_: b"")
    worker.listen()
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    if args.prepare_first:
        model, quant, cache = args.prepare_first
        error = prepare_in_child(model, quant, cache, args.prepare_timeout)
        if error:
            log.warning("could not prepare model %s (%s): %s", model, quant, error)
        else:
            log.info("model %s (%s) is cached in %s", model, quant, cache)
    from client.logs import quiet_libraries

    quiet_libraries()
    apply_memory_limit(cfg.max_memory)
    worker.handler = default_handler()
    log.info("ready on %s (pid %d)", cfg.socket, os.getpid())
    worker.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
