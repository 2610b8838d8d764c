"""The Flower ServerApp: reads the run configuration and hands the Grid to the round loop."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.config import RunConfig, resolve_output_dir
from coordinator.fleet import FleetModel
from coordinator.progress import Progress
from coordinator.rounds import run_federation

log = logging.getLogger("fedtune")


def _log_to_stderr() -> None:
    """A deployed ServerApp runs in Flower's own process, where nobody configured logging:
    send fedtune's progress lines to stderr, which Flower streams to `fedtune coordinator run`.
    (Under `fedtune simulate` the CLI already did this, and nothing changes.)"""
    if log.handlers:
        return
    from client.logs import quiet_libraries

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet_libraries()


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    config_record: dict[str, Any] | None = None,
    progress: Progress | None = None,
    node_names: Callable[[Iterable[int]], Mapping[int, str]] | None = None,
    fleet: FleetModel | None = None,
) -> ServerApp:
    """Build the ServerApp. ``overrides`` win over the run config (``fedtune simulate`` passes its
    resolved options; ``flwr run`` uses ``[tool.flwr.app.config]`` alone). ``node_names``: the
    clients' names where the caller knows them (``fedtune simulate``), else nodes are asked."""
    fixed = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        cfg = RunConfig.from_mapping({**context.run_config, **fixed})
        out = resolve_output_dir(cfg)
        record = config_record or {"run": cfg.to_mapping()}
        try:
            run_federation(
                grid,
                cfg,
                Path(out),
                resume=resume,
                progress=progress,
                config_record=record,
                node_names=node_names,
                fleet=fleet,
            )
        finally:
            if progress is not None:
                progress.close()

    return app


app = make_server_app()
