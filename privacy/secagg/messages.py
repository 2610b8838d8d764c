"""The SecAgg+ stage messages as frozen dataclasses, with a strict bytes codec (JSON, byte strings
as hex; never pickle). The Flower layer carries these bytes in a ConfigRecord and the masked vector
in an ArrayRecord; nothing here knows about Flower.

Stages of one round (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the clients still present after each):
  1. setup -> advertise       the client trains, makes two X25519 key pairs and a self-mask seed b,
                              and sends its public keys and a commitment to b          (U1)
  2. key directory -> shares  the client Shamir-shares b and its masking key into k + 1 shares,
                              one per neighbour (each bundle sealed with AES-GCM for that
                              neighbour) and one it keeps, committing to its own b-share (U2)
  3. share delivery -> masked input   the client stores its neighbours' shares and uploads its
                              encoded update plus self mask plus pairwise masks          (U3)
  4. unmask request -> shares the client reveals b-shares of surviving neighbours and its own
                              b-share, and masking-key shares of neighbours that dropped after
                              stage 2; never both for one client, never its own key share (U4)

Every reply (advertise, shares, masked header, unmask response) names its sender, the round's
session id and the round number; the coordinator checks all three.

The decoder treats its input as hostile: before parsing it refuses a message over ``max_bytes``
(``MAX_MESSAGE_BYTES`` unless the caller knows a tighter bound), anything but ASCII, and nesting
deeper than the message type's own structure (``max_depth``: 5,000 nested ``[`` used to overflow
the parser's recursion); while parsing it refuses duplicate object keys, ``NaN``/``Infinity``,
non-finite floats and integers of more than 20 digits. Any failure, of whatever type, comes out as
``SecAggError`` naming the message type and what was wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, TypeVar, get_args, get_origin

import numpy as np

from privacy.secagg import shamir
from privacy.secagg.encoding import EncodingPlan

SESSION_BYTES = 16
PUBLIC_KEY_BYTES = 32
HASH_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES, TAG_BYTES = 12, 16  # AES-GCM
# A sealed bundle: nonce, then (src, dst as 8 bytes each, b-share, salt, key share, salt), tag.
SEALED_PLAIN_BYTES = 8 + 8 + 2 * (shamir.SHARE_BYTES + SALT_BYTES)
CIPHERTEXT_BYTES = NONCE_BYTES + SEALED_PLAIN_BYTES + TAG_BYTES
# The largest message anyone decodes without a tighter, caller-known bound. A share bundle, key
# directory or client state costs under 1 KiB per neighbour, so this covers thousands of
# neighbours; the coordinator passes a bound sized for the round's degree (``message_limit``).
MAX_MESSAGE_BYTES = 4 << 20
MAX_REASON_CHARS = 200  # a complaint's reason, as the client words it
_MAX_INT_DIGITS = 20  # 2^64 - 1 has 20 digits; every int field is < 2^64


def message_limit(degree: int) -> int:
    """A bound on the encoded size of any SecAgg message of a round whose clients have at most
    ``degree`` neighbours (about 1 KiB per neighbour is needed; 2 KiB plus 16 KiB are allowed)."""
    return (16 << 10) + (2 << 10) * (degree + 1)


class SecAggError(ValueError):
    """Base class of secure-aggregation errors."""


class MessageRejected(SecAggError):
    """A message from ``node`` is malformed, tampered with, replayed or inconsistent."""

    def __init__(self, node: int, reason: str) -> None:
        super().__init__(f"client {node}: {reason}")
        self.node = node
        self.reason = reason


class SecAggAborted(SecAggError):
    """The round cannot produce the sum; nothing from it is kept. ``culprits`` are clients
    identified as the cause (to exclude from later rounds), if any."""

    def __init__(self, reason: str, culprits: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.culprits = culprits


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise SecAggError(what)


def _check_bytes(value: bytes, n: int, name: str) -> None:
    _need(len(value) == n, f"{name} must be {n} bytes, got {len(value)}")


@dataclass(frozen=True)
class RoundParams:
    round: int
    session: bytes  # fresh random id of this round's SecAgg session (binds every message)
    threshold: int
    plan: EncodingPlan
    vector_len: int  # ring elements per masked vector (update coordinates + the weight)
    noise_mu: float = 0.0  # Skellam parameter each client adds per coordinate (0: no DP noise)

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")
        _need(self.round >= 1, f"round must be >= 1, got {self.round}")
        _need(self.threshold >= 2, f"threshold must be >= 2, got {self.threshold}")
        _need(self.vector_len >= 2, f"vector_len must be >= 2, got {self.vector_len}")
        _need(
            math.isfinite(self.noise_mu) and self.noise_mu >= 0,
            f"noise_mu must be a finite number >= 0, got {self.noise_mu}",
        )


@dataclass(frozen=True)
class Peer:
    node: int
    x: int  # the peer's Shamir x-coordinate in this round


@dataclass(frozen=True)
class Setup:
    params: RoundParams
    node: int
    x: int
    neighbours: tuple[Peer, ...]

    def __post_init__(self) -> None:
        xs = [p.x for p in self.neighbours] + [self.x]
        nodes = [p.node for p in self.neighbours]
        _need(all(x >= 1 for x in xs), "share x-coordinates must be >= 1")
        _need(len(set(xs)) == len(xs), "share x-coordinates must be distinct")
        _need(len(set(nodes)) == len(nodes), "neighbours must be distinct")
        _need(self.node not in nodes, "a client cannot be its own neighbour")
        _need(
            len(self.neighbours) + 1 >= self.params.threshold,
            f"{len(self.neighbours)} neighbour(s) and the client itself cannot meet threshold "
            f"{self.params.threshold}",
        )


@dataclass(frozen=True)
class Advertise:
    node: int
    session: bytes
    round: int
    pk_enc: bytes  # X25519 public key for encrypting shares
    pk_mask: bytes  # X25519 public key for pairwise masks
    b_commit: bytes  # SHA-256 commitment to the self-mask seed

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")
        _check_bytes(self.pk_enc, PUBLIC_KEY_BYTES, "pk-enc")
        _check_bytes(self.pk_mask, PUBLIC_KEY_BYTES, "pk-mask")
        _check_bytes(self.b_commit, HASH_BYTES, "b-commit")
        # Whether the keys are valid, distinct and fresh is the coordinator's check
        # (server.ServerSession): a sender of bad keys is excluded, not just dropped.


@dataclass(frozen=True)
class KeyDirectory:
    session: bytes
    entries: tuple[Advertise, ...]  # the neighbours that advertised

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")


@dataclass(frozen=True)
class SealedShares:
    src: int
    dst: int
    ciphertext: bytes  # AES-GCM(nonce || ct), readable only by dst
    b_hash: bytes  # commitment to the b-share inside (checked when it is revealed)
    sk_hash: bytes  # commitment to the masking-key share inside

    def __post_init__(self) -> None:
        _check_bytes(self.ciphertext, CIPHERTEXT_BYTES, "ciphertext")
        _check_bytes(self.b_hash, HASH_BYTES, "b-hash")
        _check_bytes(self.sk_hash, HASH_BYTES, "sk-hash")


@dataclass(frozen=True)
class ShareBundle:
    node: int
    session: bytes
    round: int
    items: tuple[SealedShares, ...]
    own_b_hash: bytes  # commitment to the b-share the client keeps (checked when it reveals it)

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")
        _check_bytes(self.own_b_hash, HASH_BYTES, "own-b-hash")


@dataclass(frozen=True)
class ShareDelivery:
    session: bytes
    items: tuple[SealedShares, ...]

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")


@dataclass(frozen=True)
class Complaint:
    node: int  # the neighbour whose shares could not be used
    reason: str

    def __post_init__(self) -> None:
        _need(
            len(self.reason) <= MAX_REASON_CHARS,
            f"complaint reason has {len(self.reason)} characters, at most {MAX_REASON_CHARS}",
        )


@dataclass(frozen=True)
class MaskedHeader:
    """Travels with the masked vector (which goes as an unsigned array, not in here)."""

    node: int
    session: bytes
    round: int
    complaints: tuple[Complaint, ...] = ()

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")


@dataclass(frozen=True)
class UnmaskRequest:
    session: bytes
    survivors: tuple[int, ...]  # reveal your b-share of these (neighbours, and yourself)
    dropped: tuple[int, ...]  # reveal your masking-key share of these neighbours

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")


B_SHARE = "b"
SK_SHARE = "sk"


@dataclass(frozen=True)
class RevealedShare:
    target: int
    kind: str  # B_SHARE or SK_SHARE
    y: bytes
    salt: bytes

    def __post_init__(self) -> None:
        _need(self.kind in (B_SHARE, SK_SHARE), f"share kind must be b or sk, got {self.kind!r}")
        _check_bytes(self.y, shamir.SHARE_BYTES, "share")
        _check_bytes(self.salt, SALT_BYTES, "salt")


@dataclass(frozen=True)
class UnmaskResponse:
    node: int
    session: bytes
    round: int
    shares: tuple[RevealedShare, ...]

    def __post_init__(self) -> None:
        _check_bytes(self.session, SESSION_BYTES, "session")


# -- codec ----------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _to_json(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, tuple):
        return [_to_json(v) for v in obj]
    return obj


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def structure_depth(annotation: Any) -> int:
    """How deeply a JSON value of ``annotation`` nests (objects and arrays): the depth limit."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        hints = _hints(annotation)
        return 1 + max(
            (structure_depth(hints[f.name]) for f in dataclasses.fields(annotation)), default=0
        )
    if get_origin(annotation) is tuple:
        return 1 + structure_depth(get_args(annotation)[0])
    return 0


_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_NESTING = np.zeros(256, dtype=np.int8)  # +1 for an opening bracket, -1 for a closing one
_NESTING[[ord("["), ord("{")]] = 1
_NESTING[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in ``data`` outside JSON strings, without parsing it.

    A quote delimits a string unless an odd run of backslashes precedes it. For valid JSON (and
    for any prefix the parser would accept before failing) this is exact, so the parser never
    recurses deeper than it reports. Linear time, vectorised, about 20 bytes of temporaries per
    input byte (int32 indices: inputs must be under 2 GiB, far above any message limit)."""
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size == 0:
        return 0
    idx = np.arange(a.size, dtype=np.int32)
    # the last non-backslash at or before each position
    last_other = np.maximum.accumulate(np.where(a == _BACKSLASH, np.int32(-1), idx))
    # a quote at i is escaped when an odd run of backslashes ends at i - 1
    escaped = np.zeros(a.size, dtype=bool)
    escaped[1:] = (idx[:-1] - last_other[:-1]) % 2 == 1
    delim = (a == _QUOTE) & ~escaped
    inside = (np.cumsum(delim, dtype=np.int32) - delim) % 2 == 1  # opening quote excluded
    step = np.where(inside | delim, np.int8(0), _NESTING[a])
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def _from_json(value: Any, annotation: Any, name: str) -> Any:
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        _need(isinstance(value, dict), f"{name}: expected an object")
        hints = _hints(annotation)
        fields = {f.name for f in dataclasses.fields(annotation)}
        extra = set(value) - fields
        _need(not extra, f"{name}: unexpected field(s) {sorted(extra)[:3]}")
        kwargs = {}
        for f in dataclasses.fields(annotation):
            if f.name not in value:
                _need(f.default is not dataclasses.MISSING, f"{name}.{f.name}: missing")
                continue
            kwargs[f.name] = _from_json(value[f.name], hints[f.name], f"{name}.{f.name}")
        try:
            return annotation(**kwargs)
        except SecAggError as exc:
            raise SecAggError(f"{name}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise SecAggError(f"{name}: {exc}") from None
    if get_origin(annotation) is tuple:
        (item, _ellipsis) = get_args(annotation)
        _need(isinstance(value, list), f"{name}: expected a list")
        return tuple(_from_json(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if annotation is bytes:
        _need(isinstance(value, str), f"{name}: expected hex bytes")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise SecAggError(f"{name}: not valid hex") from None
    if annotation is int:
        _need(isinstance(value, int) and not isinstance(value, bool), f"{name}: expected an int")
        _need(0 <= value < 1 << 64, f"{name}: out of range")
        return value
    if annotation is float:
        _need(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"{name}: expected a number",
        )
        _need(math.isfinite(value), f"{name}: not a finite number")
        return float(value)
    if annotation is str:
        _need(isinstance(value, str), f"{name}: expected a string")
        _need(value.isprintable(), f"{name}: contains unprintable characters")
        return value
    raise TypeError(f"unsupported field type {annotation!r}")  # programming error


def to_bytes(msg: Any) -> bytes:
    return json.dumps(_to_json(msg), separators=(",", ":"), sort_keys=True).encode()


class _Malformed(ValueError):
    """Raised by the parser hooks below."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Malformed(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > _MAX_INT_DIGITS:
        raise _Malformed(f"an integer of {len(digits)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Malformed(f"number {text[:40]} is not finite")
    return value


def _no_constant(text: str) -> Any:
    raise _Malformed(f"{text} is not JSON")


def from_bytes(cls: type[_T], data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> _T:
    """Decode and validate; raises ``SecAggError`` naming the bad field, and nothing else for any
    input (see the module docstring for the limits checked before parsing)."""
    what = cls.__name__
    if not isinstance(data, bytes):
        raise SecAggError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SecAggError(f"{what}: message of {len(data)} bytes is over the {max_bytes} allowed")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SecAggError(f"{what}: not ASCII JSON") from None
    depth, limit = json_depth(data), structure_depth(typing.cast(Any, cls))
    if depth > limit:
        raise SecAggError(f"{what}: nested {depth} levels deep, at most {limit} allowed")
    try:
        raw = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
        out: _T = _from_json(raw, cls, what)
    except SecAggError:
        raise  # from _from_json: already names the field
    except _Malformed as exc:
        raise SecAggError(f"{what}: {exc}") from None
    except Exception as exc:  # anything else the parser or a constructor raises: still malformed
        raise SecAggError(f"{what}: not valid ({type(exc).__name__}: {str(exc)[:120]})") from None
    return out
