"""Malformed and hostile messages for fuzzing the wire, each labelled with what the protocol
requires of the receiver, and drivers that push them through the real decoders and the real SecAgg+
state machines. Used by the Hypothesis suites in tests/unit and by benchmarks/fuzz.py.

Labels. ``invalid=True``: the message breaks the protocol in a way the receiver can and must catch
(malformed, wrong type, bad key, wrong round, tampered share, ...): it must be refused, or its
effect undone (a tampered bundle makes its receiver complain, and both leave the round).
``invalid=False`` marks hostile but well-formed moves that no receiver can tell from honest ones
(a false complaint, withholding shares): those must not crash anything nor exclude an honest
client. Values that are well-formed but wrong (a poisoned update or masked vector) are not
generated here: secure aggregation cannot see them (README "Security").

Every mutation is drawn from a ``random.Random``: Hypothesis passes one it controls
(``st.randoms()``), the benchmark a seeded one.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from privacy.secagg import client as C
from privacy.secagg import shamir
from privacy.secagg.encoding import EncodingPlan, plan_encoding, quantize
from privacy.secagg.local import plaintext_ring_sum
from privacy.secagg.messages import (
    MAX_MESSAGE_BYTES,
    Advertise,
    KeyDirectory,
    MaskedHeader,
    SecAggAborted,
    SecAggError,
    Setup,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    from_bytes,
    message_limit,
    to_bytes,
)
from privacy.secagg.primitives import generate_keypair, secure_rng
from privacy.secagg.server import (
    ADVERTISE,
    MASKED_INPUT,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    ComplaintLedger,
    Dropout,
    ServerSession,
)
from protocol import keys

Json = Any

_P = (1 << 255) - 19


def _le(u: int) -> bytes:
    return (u % (1 << 256)).to_bytes(32, "little")


def _twist_point(rng: random.Random) -> bytes:
    while True:
        u = rng.randrange(2, _P - 1)
        rhs = (u**3 + 486662 * u * u + u) % _P
        if rhs and pow(rhs, (_P - 1) // 2, _P) == _P - 1:
            return _le(u)


# X25519 public keys no honest client sends: low order (the all-zero key of the issue among them),
# non-canonical encodings, points of the twist.
LOW_ORDER_KEYS = [
    bytes(32),
    _le(1),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
]


def bad_key(rng: random.Random) -> tuple[str, bytes]:
    choice = rng.randrange(6)
    if choice == 0:
        return "low-order key", rng.choice(LOW_ORDER_KEYS)
    if choice == 1:
        return "non-canonical key (u >= p)", _le(_P + rng.randrange(0, 19))
    if choice == 2:  # the same point as a valid key, with the unused top bit set
        _sk, pk = generate_keypair()
        return "non-canonical key (top bit)", pk[:31] + bytes([pk[31] | 0x80])
    if choice == 3:
        return "key on the twist", _twist_point(rng)
    if choice == 4:
        return "u = p - 1", _le(_P - 1)
    return "low-order key, non-canonical", _le(_P + 1)


# -- JSON helpers ---------------------------------------------------------------------------------


def _paths(value: Json, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``value`` (object keys and list indices), the root excluded."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _get(value: Json, path: tuple[Any, ...]) -> Json:
    for p in path:
        value = value[p]
    return value


def _set(value: Json, path: tuple[Any, ...], new: Json) -> None:
    _get(value, path[:-1])[path[-1]] = new


def _is_hex(v: Json) -> bool:
    return isinstance(v, str) and len(v) % 2 == 0 and all(c in "0123456789abcdef" for c in v)


def _dumps(value: Json) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_NOWHERE = (object(),)  # a target path that matches nothing below


def _dumps_duplicating(value: Json, target: tuple[Any, ...], dup: Json) -> str:
    """``value`` as JSON text where the object at ``target`` starts with a duplicate of its
    first key carrying ``dup`` (a parser keeping the last copy would see the honest value)."""

    def below(key: Any) -> tuple[Any, ...]:
        return target[1:] if target and target[0] == key else _NOWHERE

    if isinstance(value, dict):
        items = [
            f"{json.dumps(k)}:{_dumps_duplicating(v, below(k), dup)}" for k, v in value.items()
        ]
        if target == ():
            items.insert(0, f"{json.dumps(next(iter(value)))}:{json.dumps(dup)}")
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return (
            "[" + ",".join(_dumps_duplicating(v, below(i), dup) for i, v in enumerate(value)) + "]"
        )
    return json.dumps(value)


# Fields with a default: leaving one out (at its default value) is not a change.
_DEFAULTED = {"complaints", "noise_mu", "noise_bound", "l2_clip"}


@dataclass(frozen=True)
class Tampered:
    kind: str
    invalid: bool
    payload: Any  # bytes for messages; (header bytes, vector) at the masked-input stage


def structural(payload: bytes, rng: random.Random, size_limit: int) -> Tampered:
    """Damage that needs no knowledge of the message: every result is invalid."""
    raw = json.loads(payload)
    choice = rng.randrange(13)
    if choice == 0:
        return Tampered("truncated", True, payload[: rng.randrange(0, len(payload))])
    if choice == 1:
        n = rng.choice([50, 1000, 5000, 20000])
        return Tampered(f"{n} nested [", True, b"[" * n + b"]" * rng.choice([0, n]))
    if choice == 2:
        n = rng.choice([50, 1000, 3000, 10000])
        return Tampered(f'{n} nested {{"a":', True, b'{"a":' * n + b"1" + b"}" * n)
    if choice == 3:
        return Tampered("random bytes", True, rng.randbytes(rng.randrange(0, 300)))
    if choice == 4:
        pos = rng.randrange(1, len(payload))
        return Tampered("non-ASCII byte", True, payload[:pos] + "é".encode() + payload[pos:])
    if choice == 5:
        return Tampered("over the size limit", True, payload + b" " * (size_limit + 1))
    paths = _paths(raw)
    leaves = [p for p in paths if not isinstance(_get(raw, p), dict | list)]
    if choice == 6:
        ints = [p for p in leaves if type(_get(raw, p)) is int]
        p = rng.choice(ints or leaves)
        text = _dumps(raw).decode()
        token = json.dumps(_get(raw, p))
        # NaN/Infinity in place of the first occurrence of the value
        spliced = text.replace(":" + token, ":" + rng.choice(["NaN", "Infinity", "-Infinity"]), 1)
        if spliced == text:
            spliced = text[:-1] + ',"x":NaN}'
        return Tampered("NaN literal", True, spliced.encode())
    if choice == 7:
        objects = [()] + [p for p in paths if isinstance(_get(raw, p), dict) and _get(raw, p)]
        target = rng.choice(objects)
        first = next(iter(_get(raw, target)))
        dup = rng.choice([0, 1, "00", True, None, [], _get(raw, (*target, first))])
        text = _dumps_duplicating(raw, target, dup)
        return Tampered("duplicate key", True, text.encode())
    if choice == 8:
        keyed = [p for p in paths if isinstance(p[-1], str) and p[-1] not in _DEFAULTED]
        p = rng.choice(keyed)
        del _get(raw, p[:-1])[p[-1]]
        return Tampered(f"field {p[-1]!r} removed", True, _dumps(raw))
    if choice == 9:
        objects = [()] + [p for p in paths if isinstance(_get(raw, p), dict)]
        target = _get(raw, rng.choice(objects))
        target[rng.choice(["extra", "node2", "admin", "Round"])] = rng.choice([1, "x", None])
        return Tampered("extra field", True, _dumps(raw))
    if choice == 10:
        p = rng.choice(leaves)
        old = _get(raw, p)
        options: list[Json] = [True, False, None, [], {}, "x", -1]
        if type(old) is not float:
            options.append(1.5)
        if type(old) is int:
            options += [float(old), str(old), old + 0.5]
        if isinstance(old, str):
            options += [len(old), [old]]
        new = rng.choice([o for o in options if not (type(o) is type(old) and o == old)])
        _set(raw, p, new)
        return Tampered(f"type of {p[-1]!r} changed", True, _dumps(raw))
    if choice == 11:
        ints = [p for p in leaves if type(_get(raw, p)) is int]
        if ints:
            p = rng.choice(ints)
            _set(raw, p, rng.choice([-1, 1 << 64, 10**30, -(1 << 70)]))
            return Tampered(f"{p[-1]!r} out of range", True, _dumps(raw))
    hexes = [p for p in leaves if _is_hex(_get(raw, p)) and _get(raw, p)]
    if hexes:
        p = rng.choice(hexes)
        old = _get(raw, p)
        new = rng.choice([old[:-2], old + "00", old[:-1] + "z", old[:-1], ""])
        _set(raw, p, new)
        return Tampered(f"hex {p[-1]!r} malformed", True, _dumps(raw))
    return Tampered("truncated", True, payload[: len(payload) // 2])


def _flip_hex(h: str, rng: random.Random) -> str:
    b = bytearray(bytes.fromhex(h))
    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return b.hex()


# -- SecAgg replies (client -> coordinator) -------------------------------------------------------


@dataclass
class RoundView:
    """What a hostile client knows when it tampers with its reply."""

    node: int
    rnd: int
    nodes: list[int]
    partners: list[int] = field(default_factory=list)  # who sent it shares (masked-input stage)
    others_keys: list[bytes] = field(default_factory=list)  # other clients' keys, this round
    old_keys: list[bytes] = field(default_factory=list)  # keys seen in earlier rounds
    ring_bits: int = 32
    vector_len: int = 0


def tamper_reply(
    stage: str, payload: bytes, view: RoundView, rng: random.Random, size_limit: int
) -> Tampered:
    """A hostile version of ``view.node``'s honest reply ``payload`` at ``stage``: damage to the
    structure (30%), a wrong sender, session or round (20%), or a stage-specific lie (50%)."""
    draw = rng.random()
    if draw < 0.3:
        return structural(payload, rng, size_limit)
    raw = json.loads(payload)
    if draw < 0.5:
        common = rng.randrange(3)
        if common == 0:
            raw["node"] = rng.choice([n for n in view.nodes if n != view.node] + [12345])
            return Tampered("claims another sender", True, _dumps(raw))
        if common == 1:
            raw["session"] = rng.randbytes(16).hex()
            return Tampered("other session", True, _dumps(raw))
        raw["round"] = rng.choice([view.rnd - 1, view.rnd + 1, 0, view.rnd + 1000])
        return Tampered("other round", True, _dumps(raw))
    if stage == ADVERTISE:
        return _tamper_advertise(raw, view, rng)
    if stage == SHARE_KEYS:
        return _tamper_bundle(raw, view, rng)
    if stage == UNMASK:
        return _tamper_unmask(raw, view, rng)
    return _tamper_header(raw, view, rng)


def _tamper_advertise(raw: dict[str, Json], view: RoundView, rng: random.Random) -> Tampered:
    which = rng.choice(["pk_enc", "pk_mask"])
    choice = rng.randrange(5)
    if choice == 0 or (choice == 3 and not view.old_keys) or (choice == 2 and not view.others_keys):
        what, key = bad_key(rng)
        raw[which] = key.hex()
        return Tampered(f"{which}: {what}", True, _dumps(raw))
    if choice == 1:
        raw["pk_enc"] = raw["pk_mask"]
        return Tampered("pk-enc equals pk-mask", True, _dumps(raw))
    if choice == 2:
        raw[which] = rng.choice(view.others_keys).hex()
        # Not possible under an honest coordinator (no key is shown before this stage ends), but
        # the rule must not rely on it: both leave the round, neither is excluded at once.
        return Tampered(f"{which}: another client's key", True, _dumps(raw))
    if choice == 3:
        raw[which] = rng.choice(view.old_keys).hex()
        return Tampered(f"{which}: a key from an earlier round", True, _dumps(raw))
    raw["b_commit"] = _flip_hex(raw["b_commit"], rng)  # caught when its seed is rebuilt
    return Tampered("b-commit does not match the seed", True, _dumps(raw))


def _tamper_bundle(raw: dict[str, Json], view: RoundView, rng: random.Random) -> Tampered:
    items = raw["items"]
    choice = rng.randrange(8)
    i = rng.randrange(len(items))
    if choice == 0:
        del items[i]
        return Tampered("a share bundle item missing", True, _dumps(raw))
    if choice == 1:
        items.append(copy.deepcopy(items[i]))
        return Tampered("a share bundle item twice", True, _dumps(raw))
    if choice == 2:
        items[i]["dst"] = rng.choice(
            [d for d in [view.node, 424242, *[it["dst"] for it in items]] if d != items[i]["dst"]]
        )
        return Tampered("item addressed elsewhere", True, _dumps(raw))
    if choice == 3:
        items[i]["src"] = rng.choice([n for n in view.nodes if n != view.node] + [7])
        return Tampered("item from another sender", True, _dumps(raw))
    if choice == 4:
        items[i]["ciphertext"] = _flip_hex(items[i]["ciphertext"], rng)
        return Tampered("ciphertext tampered", True, _dumps(raw))
    if choice == 5:
        name = rng.choice(["b_hash", "sk_hash"])
        items[i][name] = _flip_hex(items[i][name], rng)
        return Tampered(f"{name} does not match the share", True, _dumps(raw))
    if choice == 6 and len(items) > 1:
        j = (i + 1) % len(items)
        items[i]["ciphertext"], items[j]["ciphertext"] = (
            items[j]["ciphertext"],
            items[i]["ciphertext"],
        )
        return Tampered("ciphertexts swapped", True, _dumps(raw))
    raw["own_b_hash"] = _flip_hex(raw["own_b_hash"], rng)
    return Tampered("own-b-hash does not match its share", True, _dumps(raw))


def _tamper_header(raw: dict[str, Json], view: RoundView, rng: random.Random) -> Tampered:
    choice = rng.randrange(5)
    partners = view.partners or [n for n in view.nodes if n != view.node]
    if choice == 0:
        raw["complaints"] = [{"node": rng.choice(partners), "reason": "cannot open its shares"}]
        return Tampered("false complaint", False, _dumps(raw))
    if choice == 1:
        stranger = rng.choice([view.node, 999, *[n for n in view.nodes if n not in partners]])
        raw["complaints"] = [{"node": stranger, "reason": "x"}]
        return Tampered("complaint about a non-partner", True, _dumps(raw))
    if choice == 2:
        c = {"node": rng.choice(partners), "reason": "x"}
        raw["complaints"] = [c, dict(c)]
        return Tampered("complaint twice", True, _dumps(raw))
    if choice == 3:
        reason = rng.choice(["x" * 5000, "bad\nline", "\x00", "\ud800"])
        raw["complaints"] = [{"node": rng.choice(partners), "reason": reason}]
        return Tampered("complaint reason too long or unprintable", True, _dumps(raw))
    raw["complaints"] = [{"node": p, "reason": "x"} for p in partners]
    return Tampered("complains about every partner", False, _dumps(raw))


def tamper_vector(vec: np.ndarray, view: RoundView, rng: random.Random) -> tuple[str, Any]:
    """A masked vector the coordinator must refuse."""
    choice = rng.randrange(6)
    if choice == 0:
        return "vector dtype float32", vec.astype(np.float32)
    if choice == 1:
        return "vector dtype int64", vec.astype(np.int64)
    if choice == 2:
        return "vector too short", vec[: rng.randrange(0, len(vec))]
    if choice == 3:
        return "vector 2-D", vec.reshape(1, -1)
    if choice == 4:
        return "not an array", rng.choice([None, b"\x00" * 8, [1, 2], 3])
    if view.ring_bits < 8 * vec.dtype.itemsize:
        out = vec.copy()
        out[rng.randrange(len(out))] = 1 << view.ring_bits
        return "vector value outside the ring", out
    return "vector of another length", np.zeros(len(vec) + 1, dtype=vec.dtype)


def _tamper_unmask(raw: dict[str, Json], view: RoundView, rng: random.Random) -> Tampered:
    shares = raw["shares"]
    choice = rng.randrange(8)
    i = rng.randrange(len(shares))
    if choice == 0:
        del shares[i]
        return Tampered("a share withheld", False, _dumps(raw))
    if choice == 1:
        shares.append(dict(shares[i]))
        return Tampered("a share twice", True, _dumps(raw))
    if choice == 2:
        shares[i]["kind"] = "sk" if shares[i]["kind"] == "b" else "b"
        return Tampered("share of the other kind", True, _dumps(raw))
    if choice == 3:
        asked = {s["target"] for s in shares}
        strangers = [n for n in [*view.nodes, 31337] if n not in asked]
        shares.append({**shares[i], "target": rng.choice(strangers)})
        return Tampered("share of a client it was not asked about", True, _dumps(raw))
    if choice == 4:
        shares[i]["y"] = _flip_hex(shares[i]["y"], rng)
        return Tampered("share value tampered", True, _dumps(raw))
    if choice == 5:
        shares[i]["salt"] = _flip_hex(shares[i]["salt"], rng)
        return Tampered("share salt tampered", True, _dumps(raw))
    if choice == 6:
        shares[i]["y"] = shamir.share_to_bytes(shamir.PRIME + rng.randrange(100)).hex()
        return Tampered("share outside the field", True, _dumps(raw))
    shares[i]["kind"] = rng.choice(["B", "", "sk ", "bb"])
    return Tampered("share of an unknown kind", True, _dumps(raw))


# -- messages to an honest client (coordinator -> client) -----------------------------------------


def tamper_down(kind: type, payload: bytes, node: int, rng: random.Random) -> Tampered:
    """A tampered Setup / KeyDirectory / ShareDelivery / UnmaskRequest for honest client
    ``node``. Invalid ones must make the client refuse (``SecAggError``) or, for a delivery whose
    ciphertexts do not open, complain; none may crash it."""
    if rng.random() < 0.4:
        return structural(payload, rng, MAX_MESSAGE_BYTES)
    raw = json.loads(payload)
    if kind is KeyDirectory and raw["entries"]:
        e = rng.choice(raw["entries"])
        choice = rng.randrange(5)
        if choice == 0:
            what, key = bad_key(rng)
            e[rng.choice(["pk_enc", "pk_mask"])] = key.hex()
            return Tampered(f"directory: {what}", True, _dumps(raw))
        if choice == 1:
            e["node"] = 777
            return Tampered("directory names a non-neighbour", True, _dumps(raw))
        if choice == 2:
            raw["entries"].append(copy.deepcopy(e))
            return Tampered("directory entry twice", True, _dumps(raw))
        if choice == 3:
            e["round"] = e["round"] + 1
            return Tampered("directory entry of another round", True, _dumps(raw))
        e["pk_mask"] = e["pk_enc"]
        return Tampered("directory entry with one key twice", True, _dumps(raw))
    if kind is ShareDelivery and raw["items"]:
        it = rng.choice(raw["items"])
        choice = rng.randrange(4)
        if choice == 0:
            it["ciphertext"] = _flip_hex(it["ciphertext"], rng)
            return Tampered("delivered ciphertext tampered (complain)", True, _dumps(raw))
        if choice == 1:
            it["src"] = 555
            return Tampered("shares from a stranger", True, _dumps(raw))
        if choice == 2:
            raw["items"].append(copy.deepcopy(it))
            return Tampered("shares delivered twice", True, _dumps(raw))
        it["b_hash"] = _flip_hex(it["b_hash"], rng)
        return Tampered("delivered commitment tampered (complain)", True, _dumps(raw))
    if kind is UnmaskRequest:
        choice = rng.randrange(4)
        if choice == 0 and raw["survivors"]:
            raw["dropped"] = [*raw["dropped"], raw["survivors"][0]]
            return Tampered("survivor also listed as dropped", True, _dumps(raw))
        if choice == 1:
            raw["dropped"] = [*raw["dropped"], node]
            raw["survivors"] = [s for s in raw["survivors"] if s != node]
            return Tampered("client listed as dropped", True, _dumps(raw))
        if choice == 2:
            raw["survivors"] = [*raw["survivors"], 888]
            return Tampered("unmask names a non-partner", True, _dumps(raw))
        raw["survivors"] = [node]
        return Tampered("too few survivors", True, _dumps(raw))
    if kind is Setup:
        choice = rng.randrange(4)
        if choice == 0:
            raw["params"]["threshold"] = len(raw["neighbours"]) + 5
            return Tampered("threshold above the holders", True, _dumps(raw))
        if choice == 1 and raw["neighbours"]:
            raw["neighbours"][0]["x"] = raw["x"]
            return Tampered("two holders share an x", True, _dumps(raw))
        if choice == 2:
            raw["params"]["noise_mu"] = rng.choice([-1.0, -0.5])
            return Tampered("negative noise", True, _dumps(raw))
        raw["params"]["plan"]["ring_bits"] = rng.choice([0, 1, 65, 200])
        return Tampered("ring bits out of range", True, _dumps(raw))
    return structural(payload, rng, MAX_MESSAGE_BYTES)


# -- one SecAgg round with a hostile client -------------------------------------------------------


# How the server words a departure under the dispute rule (privacy/secagg/server.py).
RULE_DEPARTURES = ("left the round over a complaint", "advertised a public key that client")


class HonestClientCrash(Exception):
    """An honest client raised something other than SecAggError."""


@dataclass
class RoundOutcome:
    kind: str  # the mutation applied ("" when none)
    invalid: bool
    stage: str
    completed: bool = False
    aborted: str = ""
    sum_exact: bool = True
    hostile_rejected: bool = False  # dropped, excluded or named as culprit
    hostile_contributed: bool = False
    excluded: list[Dropout] = field(default_factory=list)  # this round, ledger included
    # Honest clients that left the round: by the dispute rule (a complaint, a shared key: the
    # rule's price), and for any other reason (harm: the hostile message was acted on).
    honest_left_by_rule: int = 0
    honest_harmed: int = 0
    advertised: set[bytes] = field(default_factory=set)


def fleet(n: int, vector_len: int, seed: int) -> tuple[dict[int, np.ndarray], EncodingPlan]:
    plan = plan_encoding(n, clip=0.1, weight_cap=1000)
    rng = np.random.default_rng(seed)
    nodes = sorted({int(x) + 2**63 for x in rng.integers(0, 2**62, size=n)})
    enc = {
        u: quantize(
            rng.normal(0, 0.03, vector_len - 1), int(rng.integers(1, 2000)), plan, secure_rng()
        )
        for u in nodes
    }
    return enc, plan


def hostile_round(
    encoded: Mapping[int, np.ndarray],
    plan: EncodingPlan,
    rnd: int,
    hostile: int,
    stage: str,
    rng: random.Random | None,
    *,
    ledger: ComplaintLedger | None = None,
    known_keys: set[bytes] | None = None,
    excluded: set[int] | None = None,
) -> RoundOutcome:
    """One SecAgg+ round in which client ``hostile`` tampers with its reply at ``stage`` (no
    tampering when ``rng`` is None). Raises whatever the coordinator raises other than
    ``SecAggAborted`` (that is a crash), and ``HonestClientCrash``."""
    nodes = sorted(u for u in encoded if u not in (excluded or set()))
    vector_len = len(next(iter(encoded.values())))
    sess = ServerSession(nodes, rnd, plan, vector_len, known_keys=known_keys or set())
    limit = message_limit(max(len(v) for v in sess.graph.neighbours.values()))
    out = RoundOutcome("", False, stage)
    states: dict[int, C.ClientState] = {}
    view = RoundView(
        hostile,
        rnd,
        nodes,
        old_keys=sorted(known_keys or ()),
        ring_bits=plan.ring_bits,
        vector_len=vector_len,
    )

    def honest(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SecAggError:
            return None
        except Exception as exc:
            raise HonestClientCrash(f"{type(exc).__name__}: {exc}") from exc

    def maybe_tamper(st: str, u: int, payload: bytes) -> bytes:
        if u != hostile or st != stage or rng is None:
            return payload
        t = tamper_reply(st, payload, view, rng, limit)
        out.kind, out.invalid = t.kind, t.invalid
        return t.payload  # type: ignore[no-any-return]

    try:
        replies: dict[int, bytes] = {}
        for u, s in sess.setup_messages().items():
            r = honest(lambda s=s: C.advertise(from_bytes(Setup, to_bytes(s))))
            if r is not None:
                states[u], adv = r
                replies[u] = to_bytes(adv)
        view.others_keys = [k for u, p in replies.items() if u != hostile for k in _keys_of(p)]
        replies = {u: maybe_tamper(ADVERTISE, u, p) for u, p in replies.items()}
        directories = sess.receive_advertise(replies)
        out.advertised = sess.advertised_keys()

        replies = {}
        for u, d in directories.items():
            r = honest(
                lambda u=u, d=d: C.share_keys(states[u], from_bytes(KeyDirectory, to_bytes(d)))
            )
            if r is not None:
                states[u], bundle = r
                replies[u] = maybe_tamper(SHARE_KEYS, u, to_bytes(bundle))
        deliveries = sess.receive_shares(replies)

        masked: dict[int, tuple[bytes, Any]] = {}
        for u, dl in deliveries.items():
            delivery = from_bytes(ShareDelivery, to_bytes(dl))
            r = honest(lambda u=u, dl=delivery: C.masked_input(states[u], dl, encoded[u]))
            if r is None:
                continue
            states[u], header, vec = r
            payload: Any = vec
            h = to_bytes(header)
            if u == hostile and stage == MASKED_INPUT and rng is not None:
                view.partners = sorted(i.src for i in delivery.items)
                if rng.random() < 0.3:
                    out.kind, payload = tamper_vector(vec, view, rng)
                    out.invalid = True
                else:
                    h = maybe_tamper(MASKED_INPUT, u, h)
            masked[u] = (h, payload)
        requests = sess.receive_masked(masked)

        replies = {}
        for u, rq in requests.items():
            r = honest(
                lambda u=u, rq=rq: C.unmask(states[u], from_bytes(UnmaskRequest, to_bytes(rq)))
            )
            if r is not None:
                states[u], resp = r
                replies[u] = maybe_tamper(UNMASK, u, to_bytes(resp))
        result = sess.receive_unmask(replies)
    except SecAggAborted as exc:
        out.aborted = exc.reason
        out.hostile_rejected = hostile in exc.culprits or _rejected(sess, hostile)
        out.excluded = list(sess.excluded.values()) + [
            Dropout(c, "abort", exc.reason) for c in exc.culprits
        ]
        out.advertised = sess.advertised_keys()
    else:
        out.completed = True
        want = plaintext_ring_sum(encoded, result.contributors, plan.ring_bits)
        out.sum_exact = bool(np.array_equal(result.ring_sum.astype(np.uint64), want))
        out.hostile_rejected = _rejected(sess, hostile)
        out.hostile_contributed = hostile in result.contributors
        out.excluded = list(result.excluded)
    if ledger is not None:
        out.excluded += ledger.record(rnd, sess.disputes)
    for d in sess.dropouts:
        if d.node != hostile:
            if d.reason.startswith(RULE_DEPARTURES):
                out.honest_left_by_rule += 1
            else:
                out.honest_harmed += 1
    return out


def _keys_of(payload: bytes) -> list[bytes]:
    raw = json.loads(payload)
    return [bytes.fromhex(raw["pk_enc"]), bytes.fromhex(raw["pk_mask"])]


def _rejected(sess: ServerSession, node: int) -> bool:
    return node in {d.node for d in sess.dropouts} or node in sess.excluded


# -- an honest client fed tampered coordinator messages -------------------------------------------


@dataclass
class ClientOutcome:
    kind: str
    invalid: bool
    refused: bool = False  # SecAggError
    complained: bool = False


DOWN_KINDS: tuple[type, ...] = (Setup, KeyDirectory, ShareDelivery, UnmaskRequest)


def honest_client_case(
    encoded: Mapping[int, np.ndarray], plan: EncodingPlan, kind: type, rng: random.Random
) -> ClientOutcome:
    """Run an honest round up to the message of type ``kind`` for one client, tamper with that
    message and hand it to the client's real decoder and step. Raises ``HonestClientCrash`` for
    anything but ``SecAggError``."""
    nodes = sorted(encoded)
    vector_len = len(next(iter(encoded.values())))
    sess = ServerSession(nodes, 1, plan, vector_len)
    victim = nodes[rng.randrange(len(nodes))]
    states: dict[int, C.ClientState] = {}
    outcome = ClientOutcome("", False)

    def feed(cls: type, msg: Any, step: Callable[[Any], Any]) -> Any:
        t = tamper_down(cls, to_bytes(msg), victim, rng)
        outcome.kind, outcome.invalid = t.kind, t.invalid
        try:
            return step(from_bytes(cls, t.payload))
        except SecAggError:
            outcome.refused = True
            return None
        except Exception as exc:
            raise HonestClientCrash(f"{t.kind}: {type(exc).__name__}: {exc}") from exc

    setups = sess.setup_messages()
    if kind is Setup:
        feed(Setup, setups[victim], C.advertise)
        return outcome
    advs = {}
    for u, s in setups.items():
        states[u], advs[u] = C.advertise(s)
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    if kind is KeyDirectory:
        feed(KeyDirectory, dirs[victim], lambda d: C.share_keys(states[victim], d))
        return outcome
    bundles = {}
    for u, d in dirs.items():
        states[u], bundles[u] = C.share_keys(states[u], d)
    dels = sess.receive_shares({u: to_bytes(b) for u, b in bundles.items()})
    if kind is ShareDelivery:
        r = feed(
            ShareDelivery,
            dels[victim],
            lambda d: C.masked_input(states[victim], d, encoded[victim]),
        )
        if r is not None:
            outcome.complained = bool(r[1].complaints)
        return outcome
    masked = {}
    for u, dl in dels.items():
        states[u], h, y = C.masked_input(states[u], dl, encoded[u])
        masked[u] = (to_bytes(h), y)
    reqs = sess.receive_masked(masked)
    feed(UnmaskRequest, reqs[victim], lambda r: C.unmask(states[victim], r))
    return outcome


def honest_messages(encoded: Mapping[int, np.ndarray], plan: EncodingPlan) -> dict[type, bytes]:
    """One honest message of each SecAgg+ type (as client ``min(encoded)`` sends or receives
    it), from a real round."""
    nodes = sorted(encoded)
    me = nodes[0]
    sess = ServerSession(nodes, 1, plan, len(encoded[me]))
    got: dict[type, bytes] = {}
    states, advs = {}, {}
    setups = sess.setup_messages()
    got[Setup] = to_bytes(setups[me])
    for u, s in setups.items():
        states[u], advs[u] = C.advertise(s)
    got[Advertise] = to_bytes(advs[me])
    dirs = sess.receive_advertise({u: to_bytes(a) for u, a in advs.items()})
    got[KeyDirectory] = to_bytes(dirs[me])
    bundles = {}
    for u, d in dirs.items():
        states[u], bundles[u] = C.share_keys(states[u], d)
    got[ShareBundle] = to_bytes(bundles[me])
    dels = sess.receive_shares({u: to_bytes(b) for u, b in bundles.items()})
    got[ShareDelivery] = to_bytes(dels[me])
    masked = {}
    for u, dl in dels.items():
        states[u], h, y = C.masked_input(states[u], dl, encoded[u])
        masked[u] = (to_bytes(h), y)
    got[MaskedHeader] = masked[me][0]
    reqs = sess.receive_masked(masked)
    got[UnmaskRequest] = to_bytes(reqs[me])
    _st, resp = C.unmask(states[me], reqs[me])
    got[UnmaskResponse] = to_bytes(resp)
    return got


# -- plain replies (train update, evaluation result) ----------------------------------------------


def honest_update(rnd: int, spec_arrays: Mapping[str, np.ndarray], seed: int) -> RecordDict:
    from protocol.messages import ClientUpdate, encode_update

    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in spec_arrays.items()}
    return encode_update(ClientUpdate(delta, 10, {"train-loss": 1.5}), rnd=rnd)


def honest_eval(rnd: int) -> RecordDict:
    from protocol.messages import EvalResult, encode_eval_result

    return encode_eval_result(EvalResult(2.0, 100, 5, {"eval-seconds": 0.1}), rnd=rnd)


def _copy(content: RecordDict) -> RecordDict:
    out = RecordDict()
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = ArrayRecord(
                {
                    k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=bytes(a.data))
                    for k, a in rec.items()
                }
            )
        else:
            out[name] = type(rec)(dict(rec))
    return out


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def tamper_plain_reply(content: RecordDict, rnd: int, rng: random.Random) -> Tampered:
    """A train reply (it has an ``update`` record) or evaluation reply, damaged. All invalid."""
    c = _copy(content)
    meta = c[keys.REPLY_META]
    metrics = c[keys.METRICS]
    is_update = keys.UPDATE in c
    choice = rng.randrange(12 if is_update else 8)
    if choice == 0:
        del c[rng.choice(list(c.keys()))]
        return Tampered("record removed", True, c)
    if choice == 1:
        meta[keys.SCHEMA] = rng.choice(
            [
                True,
                float(keys.SCHEMA_VERSION),
                str(keys.SCHEMA_VERSION),
                keys.SCHEMA_VERSION + 1,
                0,
                2**70,
            ]
        )
        return Tampered("schema-version wrong or of the wrong type", True, c)
    if choice == 2:
        meta[keys.ROUND] = rng.choice([rnd - 1, rnd + 1, float(rnd), str(rnd), True, 0])
        return Tampered("round wrong or of the wrong type", True, c)
    if choice == 3:
        del meta[rng.choice([keys.SCHEMA, keys.ROUND])]
        return Tampered("reply-meta field missing", True, c)
    if choice == 4:
        key = rng.choice(
            [keys.NUM_EXAMPLES] + ([keys.NUM_TOKENS, keys.LOSS] if not is_update else [])
        )
        if key == keys.LOSS:
            metrics[key] = rng.choice([-1.0, float("nan"), float("inf"), [1.0]])
        else:
            metrics[key] = rng.choice(
                [-1, 2.5, float("nan"), float("inf"), [1, 2], -(2**63)] + ([0] if is_update else [])
            )
        return Tampered(f"{key} invalid", True, c)
    if choice == 5:
        metrics[rng.choice(["train-loss", "eval-seconds", "x"])] = rng.choice(
            [float("nan"), float("inf"), -float("inf"), [1.0, 2.0]]
        )
        return Tampered("metric not a finite number", True, c)
    if choice == 6:
        swap = rng.choice(list(c.keys()))
        kinds: list[Any] = [ConfigRecord({"a": 1}), MetricRecord({"a": 1}), ArrayRecord()]
        others = [r for r in kinds if type(r) is not type(content[swap])]
        del c[swap]  # (replacing a record by one of another kind makes Flower log a warning)
        c[swap] = rng.choice(others)
        return Tampered("record of the wrong kind", True, c)
    if choice == 7 or not is_update:
        del metrics[keys.NUM_EXAMPLES]
        return Tampered("num-examples missing", True, c)
    arrays = c[keys.UPDATE]
    name = rng.choice(list(arrays.keys()))
    good = arrays[name].numpy()
    if choice == 8:
        bad = rng.choice(
            [
                good.astype(np.float64),
                good.astype(np.float16),
                good.astype(np.int32),
                good.reshape(-1),
                good[..., :-1],
                np.full_like(good, np.nan),
                np.full_like(good, np.inf),
            ]
        )
        arrays[name] = Array(np.ascontiguousarray(bad))
        return Tampered("tensor of the wrong dtype, shape or values", True, c)
    if choice == 9:
        data = bytes(arrays[name].data)
        mutated = rng.choice(
            [
                data[: rng.randrange(len(data))],
                rng.randbytes(len(data)),
                _npy(np.array([{"x": 1}], dtype=object)),
            ]
        )
        arrays[name] = Array(
            dtype=arrays[name].dtype,
            shape=tuple(arrays[name].shape),
            stype=arrays[name].stype,
            data=mutated,
        )
        return Tampered("tensor bytes corrupt", True, c)
    if choice == 10:
        if rng.random() < 0.5:
            del arrays[name]
            return Tampered("tensor missing", True, c)
        arrays["extra." + name] = Array(good)
        return Tampered("extra tensor", True, c)
    arrays[name] = Array(
        dtype=rng.choice(["float32", "object", "bogus"]),
        shape=rng.choice([(2**40,), tuple(good.shape), (0,)]),
        stype=rng.choice(["numpy.ndarray", "torch.Tensor", ""]),
        data=arrays[name].data,
    )
    if (arrays[name].dtype, tuple(arrays[name].shape), arrays[name].stype) == (
        "float32",
        tuple(good.shape),
        "numpy.ndarray",
    ):
        arrays[name] = Array(
            dtype="float32",
            shape=tuple(good.shape),
            stype="numpy.ndarray",
            data=_npy(good.astype(np.float64)),
        )
    return Tampered("tensor metadata lies", True, c)


ALL_STAGES = STAGES
