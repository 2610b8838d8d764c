"""Progress of a federated run: which round, which phase, how many clients have replied.

On a terminal this is a live rich progress bar; elsewhere (CI logs, files) one log line per event.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("fedtune")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


class Progress:
    def __init__(self, rounds: int, *, live: bool | None = None) -> None:
        self.rounds = rounds
        self.live = sys.stderr.isatty() if live is None else live
        self._bar: Any = None
        self._task: Any = None
        self._done = 0
        self._total = 0
        self._label = ""

    def phase(self, rnd: int, name: str, clients: int) -> None:
        self._done, self._total = 0, clients
        self._label = f"round {rnd}/{self.rounds} {name}"
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TimeElapsedColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            if self._bar is None:
                self._bar = Bar(
                    "[bold]{task.description}",
                    BarColumn(),
                    MofNCompleteColumn(),
                    "clients",
                    TimeElapsedColumn(),
                    transient=True,
                )
                self._bar.start()
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(self._label, total=clients)
        else:
            log.info("%s: waiting for %d client(s)", self._label, clients)

    def client_done(self, node: int, ok: bool) -> None:
        self._done += 1
        if self.live and self._bar is not None:
            self._bar.update(self._task, advance=1)
        else:
            log.info(
                "%s: client %d %s (%d/%d)",
                self._label,
                node,
                "ok" if ok else "FAILED",
                self._done,
                self._total,
            )

    def round_done(self, row: dict[str, Any]) -> None:
        msg = (
            f"round {row['round']}/{self.rounds}: train_loss {_fmt(row.get('train_loss'))}  "
            f"eval_loss {_fmt(row.get('eval_loss'))}"
        )
        if row.get("central_eval_loss") is not None:
            msg += f"  central_eval_loss {_fmt(row['central_eval_loss'])}"
        msg += (
            f"  clients {row.get('clients_ok', 0)}/{row.get('clients_sampled', 0)}"
            f"  up {row.get('bytes_up', 0) / 1e6:.2f} MB  {row.get('seconds', 0):.1f}s"
        )
        if row.get("status") == "failed":
            msg += f"  FAILED: {row.get('reason')}"
        if self.live and self._bar is not None:
            self._bar.console.log(msg)
        else:
            log.info(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
