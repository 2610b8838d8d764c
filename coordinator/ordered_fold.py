"""Fold updates into the running sum in the order the clients were sampled, not the order their
replies arrive.

Floating-point addition is not associative: the same updates summed in another order can differ
in the last bits, and a run then stops being byte-for-byte reproducible. Replies arrive in the
order clients finish, which varies when several clients train at once (several simulation
workers, real devices). ``OrderedFold`` adds each update as soon as every client before it in
the sampled order has either been added or is known not to contribute; an update that arrives
early waits in a small buffer. With clients answering roughly in order (a simulation's workers
take clients in order) the buffer holds about one update per worker. It holds at most ``window``
updates: past that, the earliest waiting ones are added at once and the sum is no longer
guaranteed to be in sampled order (``in_order`` becomes False and the transport says so in the
round's metrics), so memory stays O(window x adapter) whatever the clients do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Add = Callable[[Any], None]

DEFAULT_WINDOW = 16


class OrderedFold:
    def __init__(self, order: Sequence[int], add: Add, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.order = list(order)
        self.position = {node: i for i, node in enumerate(self.order)}
        self.add = add
        self.window = window
        self.next = 0  # index in ``order`` of the first client not yet settled
        self.waiting: dict[int, Any] = {}  # node -> its update, arrived early
        self.settled: set[int] = set()  # added, or known not to contribute
        self.in_order = True
        self.peak_waiting = 0

    def offer(self, node: int, item: Any) -> None:
        """``node``'s update has arrived (validated and prepared)."""
        self.waiting[node] = item
        self.peak_waiting = max(self.peak_waiting, len(self.waiting))
        self._advance()
        if len(self.waiting) > self.window:
            self.in_order = False
            for waiting in sorted(self.waiting, key=self.position.__getitem__):
                if len(self.waiting) <= self.window // 2:
                    break
                self._add(waiting)

    def skip(self, node: int) -> None:
        """``node`` will not contribute (it failed, or its reply was refused)."""
        self.settled.add(node)
        self._advance()

    def finish(self) -> None:
        """Add whatever still waits, in sampled order (the clients before it never answered)."""
        for node in sorted(self.waiting, key=self.position.__getitem__):
            self._add(node)

    def _add(self, node: int) -> None:
        self.add(self.waiting.pop(node))
        self.settled.add(node)

    def _advance(self) -> None:
        while self.next < len(self.order):
            node = self.order[self.next]
            if node in self.waiting:
                self._add(node)
            elif node not in self.settled:
                return
            self.next += 1
