"""Progress: client names, the round ETA, the last round's metrics, quiet; a fake clock."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from rich.console import Console

from coordinator.progress import Progress, format_seconds, last_round_summary, round_eta


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The fedtune logger's messages (the CLI turns its propagation off, so not caplog)."""
    logger = logging.getLogger("fedtune")
    handler, saved = Lines(), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def test_round_eta() -> None:
    assert round_eta(30.0, 100.0, 10.0, 1, 4) == 70.0  # the last round took 100 s
    assert round_eta(130.0, 100.0, 10.0, 1, 4) == 0.0
    assert round_eta(30.0, None, 10.0, 2, 5) == 15.0  # 5 s per client, 3 to go
    assert round_eta(30.0, None, 10.0, 0, 5) is None
    assert round_eta(30.0, None, 10.0, 2, 5, later_phases=40.0) == 55.0  # evaluate still to come
    assert format_seconds(3725.4) == "1:02:05" and format_seconds(None) == "?"


def test_last_round_summary() -> None:
    row = {"eval_loss": 2.31, "task_accuracy": 0.412, "train_loss": 9.0}
    assert last_round_summary(row) == "held-out loss 2.3100  task accuracy 0.4120"
    assert last_round_summary(None) == ""


def test_log_lines_name_clients_and_give_the_eta(logged: list[str]) -> None:
    clock = Clock()
    p = Progress(3, live=False, names={7: "device-7"}, clock=clock)
    p.phase(0, "evaluate", 2)
    clock.now += 10
    p.client_done(7, True)
    clock.now += 10
    p.client_done(2**63 + 1, False)
    p.round_done({"round": 0, "eval_loss": 3.0, "seconds": 20.0, "task_accuracy": 0.25})
    p.phase(1, "train", 2)
    clock.now += 30
    p.client_done(7, True)
    p.round_done({"round": 1, "train_loss": 2.0, "eval_loss": 2.5, "seconds": 50.0})
    p.phase(2, "train", 2)
    clock.now += 20
    p.client_done(7, True)
    got = logged
    assert got[0] == "round 0/3 evaluate: waiting for 2 client(s)"
    # no finished round yet: the phase's pace, 10 s per client, one to go
    assert got[1] == "round 0/3 evaluate: client device-7 ok (1/2), round ETA 0:00:10"
    assert got[2] == f"round 0/3 evaluate: client {2**63 + 1} FAILED (2/2), round ETA 0:00:00"
    assert "task_accuracy 0.2500" in got[3]
    # train: 30 s per client, one to go, then an evaluate phase like round 0's (20 s)
    assert got[5] == "round 1/3 train: client device-7 ok (1/2), round ETA 0:00:50"
    # round 1 took 50 s; round 2 is 20 s in
    assert got[-1] == "round 2/3 train: client device-7 ok (1/2), round ETA 0:00:30"


def test_quiet_shows_nothing(logged: list[str]) -> None:
    p = Progress(1, live=False, quiet=True)
    p.phase(1, "train", 1)
    p.client_done(5, True)
    p.round_done({"round": 1, "eval_loss": 1.0, "seconds": 1.0})
    assert logged == []


def test_live_bar_shows_names_eta_and_last_round() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=220, color_system=None)
    clock = Clock()
    p = Progress(2, names={7: "device-7"}, console=console, clock=clock)
    p.phase(0, "evaluate", 1)
    clock.now += 4
    p.client_done(7, True)
    p.round_done({"round": 0, "eval_loss": 3.0, "task_accuracy": 0.25, "seconds": 4.0})
    p.phase(1, "train", 2)
    clock.now += 3
    p.client_done(7, True)
    p._bar.refresh()
    text = out.getvalue()
    p.close()
    assert "round 1/2 train" in text and "1/2 clients" in text
    assert "last reply: device-7 ok" in text
    assert "round ETA 0:00:07" in text  # 3 s per client, one to go, then 4 s of evaluate
    assert "last round: held-out loss 3.0000  task accuracy 0.2500" in text
    assert "round 0/2: train_loss -  eval_loss 3.0000  task_accuracy 0.2500" in text
