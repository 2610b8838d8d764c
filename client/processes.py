"""Starting, watching and stopping Flower's processes (SuperLink, SuperNode) and the device worker.

Flower's processes spawn their own children (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``), some in new sessions, so stopping one means stopping its whole tree:
``stop_tree`` collects descendants first, asks politely (SIGTERM), waits a bounded time, then
kills what is left. On Linux every child also gets a parent-death signal, so a supervisor that is
killed outright (SIGKILL) does not leave orphans serving the federation.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import psutil

log = logging.getLogger("fedtune")


class ProcessError(RuntimeError):
    """A helper process is missing, failed to start or did not become ready in time."""


def executable(name: str) -> Path:
    """A console script installed next to this Python (Flower's ``flower-*`` commands)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ProcessError(
            f"{name} not found next to {sys.executable}; is flwr installed in this environment?"
        )
    return path


def flower_env(
    flwr_home: Path | None, extra: Mapping[str, str] | None = None, *, fast_tasks: bool = False
) -> dict[str, str]:
    """Environment for Flower's processes: this environment's bin first on PATH (SuperLink and
    SuperNode start ``flower-superexec`` by name) and an optional private ``FLWR_HOME``."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Flower's telemetry would try to reach the internet from every process.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Nor ask PyPI for newer Flower releases (fedtune pins 1.39.x on purpose).
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if fast_tasks:
        # A SuperNode's SuperExec checks for new ClientApp tasks every second by default; on a
        # device that check is local and in memory, and the wait is per message. (Not on the
        # coordinator: there every check is a write to the SuperLink's database.)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    env.update(extra or {})
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start ``cmd`` with its output piped (read it with ``LineReader``)."""
    try:
        return subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            preexec_fn=_die_with_parent,
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {cmd[0]}: {exc.strerror or exc}") from exc


def stop_tree(proc: subprocess.Popen[str] | psutil.Process | int, timeout: float = 10.0) -> None:
    """Stop a process and every descendant: SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=timeout)
    # Children started in between (a ClientApp launched while we were waiting) die too.
    with contextlib.suppress(psutil.Error):
        alive += [c for c in psutil.Process(pid).children(recursive=True) if c not in alive]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)
    if isinstance(proc, subprocess.Popen):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


class LineReader:
    """Reads a child's output on a thread: keeps the last lines, forwards what ``show`` accepts
    to ``sink``, and lets the supervisor wait for a line matching a condition."""

    def __init__(
        self,
        proc: subprocess.Popen[str],
        *,
        prefix: str = "",
        show: Callable[[str], bool] = lambda _line: True,
        sink: Callable[[str], None] | None = None,
        keep: int | None = 200,  # None: every line
    ) -> None:
        self.proc = proc
        self.prefix = prefix
        self.show = show
        self.sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.muted = False  # set when the supervisor has taken over reporting (shutdown)
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"reader-{proc.pid}")
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = strip_ansi(raw.rstrip("\n"))
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            if line.strip() and not self.muted and self.show(line):
                self.sink(f"{self.prefix}{line}")
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> str | None:
        """The first kept line that matches, waiting at most ``timeout`` s; None if the output
        ended or the time ran out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    return None
                self._cond.wait(timeout=min(left, 0.5))

    def find(self, match: Callable[[str], bool]) -> str | None:
        with self._cond:
            return next((line for line in self.lines if match(line)), None)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


class LoggedProcess:
    """A command started in its own session whose whole output a ``LineReader`` keeps and copies to
    ``<log_dir>/<name>.log``: what scripts driving a whole deployment (the integration test, the
    deployment benchmark) wait on and show when something goes wrong."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.popen: subprocess.Popen[str] = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its own process group: a caller can kill the whole device
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._log = (log_dir / f"{name}.log").open("w", buffering=1)
        self.reader = LineReader(
            self.popen, sink=lambda line: print(line, file=self._log), keep=None
        )

    @property
    def lines(self) -> list[str]:
        return list(self.reader.lines)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching ``pattern``, waiting at most ``timeout`` seconds."""
        rx = re.compile(pattern)
        line = self.reader.wait_for(lambda text: rx.search(text) is not None, timeout)
        if line is None:
            raise ProcessError(
                f"{self.name}: no output line matching {pattern!r} in time; last lines:\n"
                f"{self.tail()}"
            )
        return cast(re.Match[str], rx.search(line))

    def wait_exit(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ProcessError(
                f"{self.name} still running after {timeout:g}s; last lines:\n{self.tail()}"
            ) from None
        self.reader.join(timeout=10)
        self._log.close()
        return code


def strip_ansi(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b" and i + 1 < len(text) and text[i + 1] == "[":
            j = i + 2
            while j < len(text) and not text[j].isalpha():
                j += 1
            i = j + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_address(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); errors name ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}: expected HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class Backoff:
    """Exponential backoff with a cap and a total budget (``budget`` 0 = no limit)."""

    def __init__(self, first: float = 1.0, cap: float = 60.0, budget: float = 0.0) -> None:
        self.first, self.cap, self.budget = first, cap, budget
        self.delay = first
        self.started = time.monotonic()

    def reset(self) -> None:
        self.delay = self.first
        self.started = time.monotonic()

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None when the budget is spent."""
        elapsed = time.monotonic() - self.started
        if self.budget and elapsed >= self.budget:
            return None
        delay = self.delay
        if self.budget:
            delay = min(delay, max(0.0, self.budget - elapsed))
        self.delay = min(self.cap, self.delay * 2)
        return delay
