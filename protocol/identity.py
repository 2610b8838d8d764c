"""The identity query: the coordinator asks each node once for its stable name (a simulated
client's partition name such as ``ai``, a device's registered name), so that sampling, metrics and
progress name clients the same way in every run. Flower's node ids are random per simulation."""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from protocol import keys
from protocol.errors import ProtocolError

MAX_NAME = 200


def check_identity(name: object, what: str = "identity") -> str:
    """``name`` if it is a usable client name (non-empty printable text, at most 200
    characters); ``ProtocolError`` naming what is wrong otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ProtocolError(f"{what}: must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME:
        raise ProtocolError(f"{what}: longer than {MAX_NAME} characters")
    if not name.isprintable():
        raise ProtocolError(f"{what}: holds control characters: {name!r}")
    return name


def encode_identity_query() -> RecordDict:
    return RecordDict({keys.IDENTITY: ConfigRecord({keys.SCHEMA: keys.SCHEMA_VERSION})})


def is_identity_query(content: RecordDict) -> bool:
    return keys.IDENTITY in content


def encode_identity_reply(name: str) -> RecordDict:
    rec = ConfigRecord({keys.SCHEMA: keys.SCHEMA_VERSION, keys.IDENTITY_NAME: check_identity(name)})
    return RecordDict({keys.IDENTITY: rec})


def decode_identity_reply(content: RecordDict) -> str:
    what = "identity reply"
    rec = content.get(keys.IDENTITY)
    if not isinstance(rec, ConfigRecord):
        raise ProtocolError(f"{what}: record {keys.IDENTITY!r} is missing")
    if rec.get(keys.SCHEMA) != keys.SCHEMA_VERSION:
        raise ProtocolError(
            f"{what}: schema version {rec.get(keys.SCHEMA)!r}, expected {keys.SCHEMA_VERSION}"
        )
    return check_identity(rec.get(keys.IDENTITY_NAME), f"{what} {keys.IDENTITY_NAME}")
