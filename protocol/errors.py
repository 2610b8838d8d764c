"""Exceptions raised by the wire contract."""


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
