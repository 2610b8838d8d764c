"""``fedtune coordinator run``: submit a federated fine-tuning run to a running coordinator.

The run is a Flower App Bundle (FAB) that holds only a ``pyproject.toml``: its components name
``coordinator.server_app:app`` and ``client.device_app:app`` and its config is the resolved
``RunConfig``. The code that runs is fedtune as installed on the coordinator and on each device,
never code shipped with the run. The ServerApp writes the same run directory as ``simulate`` (on
the coordinator's disk); its log lines are streamed here while the run's status is polled.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from coordinator.config import RunConfig
from coordinator.superlink import ControlEndpoint, CoordinatorError, describe_http_error

log = logging.getLogger("fedtune")

SERVER_APP = "coordinator.server_app:app"
DEVICE_APP = "client.device_app:app"
FAB_NAME = "fedtune-run"


class RunFailed(RuntimeError):
    """The run ended without completing; the message carries the coordinator's reason."""


@dataclass(frozen=True)
class SubmitConfig:
    run: RunConfig
    endpoint: ControlEndpoint
    poll_interval: float = 2.0
    lost_contact_after: float = 300.0  # give up when the coordinator is unreachable this long
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError(f"poll-interval: must be > 0, got {self.poll_interval}")


def fedtune_version() -> str:
    try:
        return metadata.version("fedtune")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def build_fab(run: RunConfig) -> bytes:
    """A config-only FAB: Flower's own builder validates it; the apps are the installed ones."""
    import tomli_w
    from flwr.cli.build import build_fab_from_files

    pyproject = {
        "project": {
            "name": FAB_NAME,
            "version": fedtune_version(),
            "description": "A fedtune federated fine-tuning run",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedtune",
                    "components": {"serverapp": SERVER_APP, "clientapp": DEVICE_APP},
                    "config": run.to_mapping(),
                }
            }
        },
    }
    fab, _ = build_fab_from_files({"pyproject.toml": tomli_w.dumps(pyproject).encode()})
    return bytes(fab)


def start_run(endpoint: ControlEndpoint, run: RunConfig) -> int:
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab = build_fab(run)
    req = StartRunRequest(
        fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
        override_config=user_config_to_proto({}),
        federation="",
    )
    client = endpoint.client()
    try:
        res = client.StartRun(req)
    except Exception as exc:
        raise CoordinatorError(describe_http_error(exc, endpoint)) from None
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise CoordinatorError("the coordinator did not start the run (no run id returned)")
    return int(res.run_id)


# Lines a ServerApp process prints that are not the operator's to act on.
_NOISE = (
    "Start `flwr-serverapp` process",
    "Successfully installed",
    "Failed to load",
    "_pytree.py",
    "register_constant",
    "warnings.warn(",
    "FutureWarning",
    "DeprecationWarning",
    "Loading weights",
    "Writing model shards",
)


def show_log_line(line: str) -> bool:
    return bool(line.strip()) and not any(n in line for n in _NOISE)


class LogStream:
    """Streams a run's log lines on a daemon thread, reconnecting after drops.

    Flower's log stream has no read timeout, so nothing ever waits on this thread: the status
    poll decides when the run is over.
    """

    def __init__(
        self, endpoint: ControlEndpoint, run_id: int, sink: Callable[[str], None], verbose: bool
    ) -> None:
        self.endpoint, self.run_id, self.sink, self.verbose = endpoint, run_id, sink, verbose
        self.after = 0.0
        self.stop = threading.Event()
        self.lines = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="run-logs")
        self._thread.start()

    def _run(self) -> None:
        from flwr.proto.control_pb2 import StreamLogsRequest

        while not self.stop.is_set():
            client = None
            try:
                client = self.endpoint.client()
                req = StreamLogsRequest(run_id=self.run_id, after_timestamp=self.after)
                for res in client.StreamLogs(req):
                    self.after = max(self.after, float(res.latest_timestamp))
                    for line in res.log_output.replace("\r", "\n").splitlines():
                        if self.verbose or show_log_line(line):
                            self.lines += 1
                            self.sink(line.rstrip())
                    if self.stop.is_set():
                        return
            except Exception:
                pass  # dropped or not available yet; the status poll reports lost contact
            finally:
                if client is not None:
                    client.close()
            self.stop.wait(2.0)

    def flush(self, timeout: float = 5.0) -> None:
        """Give late lines (the final round, the exit reason) a bounded moment to arrive."""
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline and seen != self.lines:
            seen = self.lines
            time.sleep(1.0)
        self.stop.set()


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    sub_status: str
    details: str


def wait_for_run(cfg: SubmitConfig, run_id: int) -> RunOutcome:
    """Poll the run's status until it finishes (each call times out; contact lost for longer
    than ``lost_contact_after`` ends the wait with an error)."""
    from flwr.proto.control_pb2 import ListRunsRequest

    client = cfg.endpoint.client()
    last_ok = time.monotonic()
    try:
        while True:
            try:
                res = client.ListRuns(ListRunsRequest(run_id=run_id))
                last_ok = time.monotonic()
                run = res.run_dict.get(run_id)
                if run is None:
                    raise CoordinatorError(f"the coordinator does not know run {run_id}")
                if run.status.status == "finished":
                    return RunOutcome(run_id, run.status.sub_status, run.status.details)
            except CoordinatorError:
                raise
            except Exception as exc:
                if time.monotonic() - last_ok > cfg.lost_contact_after:
                    raise CoordinatorError(
                        f"lost contact with the coordinator for {cfg.lost_contact_after:g}s "
                        f"({describe_http_error(exc, cfg.endpoint)}); run {run_id} may still be "
                        "running there"
                    ) from None
            time.sleep(cfg.poll_interval)
    finally:
        client.close()


def stop_run(endpoint: ControlEndpoint, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    client = endpoint.client()
    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    finally:
        client.close()


def submit(cfg: SubmitConfig, sink: Callable[[str], None] | None = None) -> RunOutcome:
    """Start the run, stream its log, wait for it to finish. Ctrl-C stops the run."""
    sink = sink or (lambda line: print(line, file=sys.stderr, flush=True))
    run_id = start_run(cfg.endpoint, cfg.run)
    log.info("run %d started; run directory %s (on the coordinator)", run_id, cfg.run.output_dir)
    stream = LogStream(cfg.endpoint, run_id, sink, cfg.verbose)
    try:
        outcome = wait_for_run(cfg, run_id)
    except KeyboardInterrupt:
        log.info("stopping run %d on the coordinator", run_id)
        try:
            stop_run(cfg.endpoint, run_id)
        except Exception as exc:
            log.error("could not stop run %d: %s", run_id, describe_http_error(exc, cfg.endpoint))
        stream.stop.set()
        raise
    stream.flush()
    if outcome.sub_status != "completed":
        raise RunFailed(
            f"run {run_id} {outcome.sub_status}: {outcome.details or 'no reason given'}"
            " (see the log lines above)"
        )
    return outcome


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    """The same summary as ``simulate`` prints, when the run directory is on this machine."""
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    from coordinator.rundir import summary

    return dict(summary(run_dir))
