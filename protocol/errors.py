"""Exceptions raised by the wire contract."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ProtocolError(ValueError):
    """A message does not follow the fedtune wire contract (missing key, bad type, bad value)."""


class UpdateRejected(ProtocolError):
    """A client's update is well-formed on the wire but unusable (wrong shapes, NaN, ...).

    The coordinator drops the update, records ``reason`` in the round's metrics and carries on
    with the remaining clients.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def rejections(what: str) -> Iterator[None]:
    """Inside the block, whatever a hostile reply provokes is an ``UpdateRejected``: one raised
    passes as it is, another ``ProtocolError`` keeps its message, any other exception becomes
    ``WHAT: malformed (TYPE: MESSAGE)``."""
    try:
        yield
    except UpdateRejected:
        raise
    except ProtocolError as exc:
        raise UpdateRejected(str(exc)) from exc
    except Exception as exc:  # whatever else a hostile reply provokes is still a rejection
        raise UpdateRejected(f"{what}: malformed ({type(exc).__name__}: {exc})") from exc
