"""The time source of the round loop's waits (phase deadlines, polling, node waits).

Real runs use ``SystemClock``. Tests whose grid answers in-process use ``VirtualClock``: its time
moves only when the loop sleeps, so a phase deadline fires only because a node did not answer,
never because the machine was slow (a client's real training inside ``push_messages`` takes no
virtual time).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class VirtualClock:
    """Time that passes only in ``sleep`` (and ``advance``)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    advance = sleep


SYSTEM_CLOCK = SystemClock()
