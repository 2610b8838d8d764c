"""Progress of a federated run: which round, which phase, which clients have replied, how long the
round has left, and how the last round went.

On a terminal this is a live rich progress bar per phase; elsewhere (CI logs, files, a deployed
ServerApp whose output is streamed) one log line per event. ``quiet`` shows nothing (failures are
still logged as warnings by the round loop). Clients are shown by display name where ``names``
(node id -> name) has one, else by node id.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("fedtune")

# Shown after "last round:" when a row has them, in this order.
ROUND_METRICS = (
    ("eval_loss", "held-out loss"),
    ("central_eval_loss", "coordinator loss"),
    ("task_accuracy", "task accuracy"),
    ("task_macro_f1", "macro-F1"),
    ("client_task_accuracy", "clients' task accuracy"),
)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_seconds(seconds: float | None) -> str:
    """h:mm:ss (or "?" when unknown)."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def round_eta(
    round_elapsed: float,
    previous_round: float | None,
    phase_elapsed: float,
    done: int,
    total: int,
    later_phases: float = 0.0,
) -> float | None:
    """Seconds until the current round ends: the last training round's duration minus the time
    spent in this one; before any training round has finished, the current phase's pace (seconds
    per client so far times the clients still to reply) plus ``later_phases`` (the last
    evaluate phase's duration while training). None when there is nothing to go on."""
    if previous_round is not None:
        return max(0.0, previous_round - round_elapsed)
    if done > 0 and total >= done:
        return phase_elapsed / done * (total - done) + later_phases
    return None


def last_round_summary(row: Mapping[str, Any] | None) -> str:
    """ "held-out loss 2.3100  task accuracy 0.4120" of the last finished round ("" if none)."""
    if not row:
        return ""
    parts = [
        f"{label} {_fmt(row[key])}" for key, label in ROUND_METRICS if row.get(key) is not None
    ]
    return "  ".join(parts)


class Progress:
    def __init__(
        self,
        rounds: int,
        *,
        live: bool | None = None,
        quiet: bool = False,
        names: Mapping[int, str] | None = None,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rounds = rounds
        self.quiet = quiet
        self.live = (console is not None or sys.stderr.isatty()) if live is None else live
        self.names: dict[int, str] = dict(names or {})
        self._console = console
        self._clock = clock
        self._bar: Any = None
        self._task: Any = None
        self._done = 0
        self._total = 0
        self._label = ""
        self._round = -1
        self._round_start = clock()
        self._phase_start = clock()
        self._previous_round: float | None = None  # wall time of the last training round
        self._phase_name = ""
        self._eval_phase = 0.0  # wall time of the last evaluate phase
        self._last_row: dict[str, Any] | None = None
        self._last_client = ""

    def set_names(self, names: Mapping[int, str]) -> None:
        self.names.update(names)

    def name(self, node: int) -> str:
        return self.names.get(node, str(node))

    # -- what the round loop calls --------------------------------------------------------

    def phase(self, rnd: int, name: str, clients: int) -> None:
        now = self._clock()
        if self._phase_name == "evaluate":
            self._eval_phase = now - self._phase_start
        self._phase_name = name
        if rnd != self._round:
            self._round, self._round_start = rnd, now
        self._phase_start = now
        self._done, self._total, self._last_client = 0, clients, ""
        self._label = f"round {rnd}/{self.rounds} {name}"
        if self.quiet:
            return
        if self.live:
            bar = self._ensure_bar()
            if self._task is not None:
                bar.remove_task(self._task)
            self._task = bar.add_task(self._label, total=clients, **self._fields())
        else:
            log.info("%s: waiting for %d client(s)", self._label, clients)

    def client_done(self, node: int, ok: bool) -> None:
        self._done += 1
        self._last_client = f"{self.name(node)} {'ok' if ok else 'FAILED'}"
        if self.quiet:
            return
        if self.live and self._bar is not None:
            self._bar.update(self._task, advance=1, **self._fields())
        else:
            log.info(
                "%s: client %s (%d/%d), round ETA %s",
                self._label,
                self._last_client,
                self._done,
                self._total,
                format_seconds(self.eta()),
            )

    def round_done(self, row: dict[str, Any]) -> None:
        self._last_row = dict(row)
        if int(row.get("round", 0)) > 0 and row.get("seconds") is not None:
            self._previous_round = float(row["seconds"])
        if self.quiet:
            return
        msg = f"round {row['round']}/{self.rounds}: train_loss {_fmt(row.get('train_loss'))}  "
        msg += f"eval_loss {_fmt(row.get('eval_loss'))}"
        for key in ("central_eval_loss", "task_accuracy", "task_macro_f1", "task_exact_match",
                    "client_task_accuracy", "client_task_macro_f1"):  # fmt: skip
            if row.get(key) is not None:
                msg += f"  {key} {_fmt(row[key])}"
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
            self._task = None

    # -- helpers --------------------------------------------------------------------------

    def eta(self) -> float | None:
        now = self._clock()
        return round_eta(
            now - self._round_start,
            self._previous_round,
            now - self._phase_start,
            self._done,
            self._total,
            self._eval_phase if self._phase_name != "evaluate" else 0.0,
        )

    def _fields(self) -> dict[str, str]:
        last = last_round_summary(self._last_row)
        return {
            "client": self._last_client or "-",
            "eta": format_seconds(self.eta()),
            "last": f"last round: {last}" if last else "",
        }

    def _ensure_bar(self) -> Any:
        if self._bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            kwargs: dict[str, Any] = {"transient": True}
            if self._console is not None:
                kwargs["console"] = self._console
            self._bar = Bar(
                "[bold]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                "clients",
                TimeElapsedColumn(),
                "[dim]last reply:[/] {task.fields[client]}",
                "[dim]round ETA[/] {task.fields[eta]}",
                "{task.fields[last]}",
                **kwargs,
            )
            self._bar.start()
        return self._bar
