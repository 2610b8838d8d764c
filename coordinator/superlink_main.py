"""The process fedtune starts as the SuperLink: Flower's ``flower-superlink`` with a longer wait
for SQLite's write lock.

Flower 1.39 keeps run state and the objects nodes upload in one SQLite file and sets
``busy_timeout`` to 5 s. With eight devices pushing their updates at once on a busy two-core
coordinator, a writer waited longer than that, SQLite answered "database is locked", and one
update was lost for the round. Writers queue on that lock rather than fail, so a longer wait is
all it takes; everything else about the SuperLink is Flower's own.

    python -m coordinator.superlink_main <flower-superlink arguments>
"""

from __future__ import annotations

import logging
import sys

SQLITE_BUSY_TIMEOUT_MS = 120_000

log = logging.getLogger(__name__)


def with_busy_timeout(
    pragmas: tuple[tuple[str, str], ...], timeout_ms: int
) -> tuple[tuple[str, str], ...]:
    """``pragmas`` with ``busy_timeout`` set to ``timeout_ms`` (added if absent)."""
    rest = tuple((k, v) for k, v in pragmas if k != "busy_timeout")
    return (("busy_timeout", str(timeout_ms)), *rest)


def lengthen_sqlite_lock_wait(timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> bool:
    """Make every SQLite connection Flower opens in this process wait ``timeout_ms`` for a lock.

    Flower applies the pragmas in ``flwr.supercore.sql_mixin.SQLITE_PRAGMAS`` on each new
    connection. Returns False, changing nothing, if a Flower version lays this out differently.
    """
    from flwr.supercore import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple):
        log.warning("this Flower has no SQLITE_PRAGMAS; SQLite keeps its own lock timeout")
        return False
    setattr(sql_mixin, "SQLITE_PRAGMAS", with_busy_timeout(pragmas, timeout_ms))  # noqa: B010
    return True


def main() -> int:
    from flwr.superlink.cli import flower_superlink

    lengthen_sqlite_lock_wait()
    sys.argv[0] = "flower-superlink"
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
