"""The client side of SecAgg+: four pure steps, each ``(state, message) -> (state, reply)``.

The state is a frozen dataclass that serialises to bytes (``to_bytes``/``from_bytes`` in
``messages``), so a client may keep it wherever it keeps state between messages (Flower's
``Context.state``). Every step checks the round's session id and what it has been asked, and
refuses with ``SecAggError`` rather than reveal more than the protocol allows: in particular a
client answers one unmask request per round and never reveals both shares of one neighbour.

A client splits its self-mask seed b and its masking key into k + 1 shares: one sealed for each
neighbour and one it keeps. At unmasking it reveals its own b-share along with its neighbours', so
a surviving client whose neighbours dropped still counts itself towards the t shares of b. Its own
key share is discarded at once: the key is only rebuilt for a client that dropped, which cannot
answer then, and a live client never lets a share of its own key out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np

from privacy.secagg import primitives as P
from privacy.secagg import shamir
from privacy.secagg.encoding import to_ring
from privacy.secagg.messages import (
    B_SHARE,
    MAX_REASON_CHARS,
    SALT_BYTES,
    SK_SHARE,
    Advertise,
    Complaint,
    KeyDirectory,
    MaskedHeader,
    RevealedShare,
    SealedShares,
    SecAggError,
    Setup,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)

ADVERTISED, SHARED, MASKED, DONE = "advertised", "shared", "masked", "done"
_PLAIN = struct.Struct(f">QQ{shamir.SHARE_BYTES}s{SALT_BYTES}s{shamir.SHARE_BYTES}s{SALT_BYTES}s")
# (tests/unit/privacy/test_secagg_regressions.py checks _PLAIN.size == SEALED_PLAIN_BYTES)


@dataclass(frozen=True)
class HeldShares:
    """What neighbour ``src`` entrusted to this client."""

    src: int
    b_y: bytes
    b_salt: bytes
    sk_y: bytes
    sk_salt: bytes


@dataclass(frozen=True)
class ClientState:
    stage: str
    setup: Setup
    sk_enc: bytes
    sk_mask: bytes
    b_seed: bytes
    directory: tuple[Advertise, ...] = ()
    held: tuple[HeldShares, ...] = ()
    partners: tuple[int, ...] = ()  # neighbours whose pairwise masks are in this client's input
    own_b_y: bytes = b""  # this client's own share of its b (the (k+1)-th share)
    own_b_salt: bytes = b""


def share_aad(session: bytes, rnd: int, src: int, dst: int) -> bytes:
    return P.encode_fields((P.DOMAIN, "shares", session, rnd, src, dst))


def share_hash(kind: str, session: bytes, src: int, dst: int, y: bytes, salt: bytes) -> bytes:
    return P.commit("share", kind, session, src, dst, y, salt)


def b_commitment(session: bytes, node: int, b_seed: bytes) -> bytes:
    return P.commit("self-mask-seed", session, node, b_seed)


def mask_key(sk_mask: bytes, pk_mask: bytes, session: bytes, a: int, b: int) -> bytes:
    return P.agree(sk_mask, pk_mask, "pairwise-mask", session, a, b)


def _reason(exc: Exception) -> str:
    """An error as a complaint reason: printable, at most ``MAX_REASON_CHARS`` characters."""
    text = "".join(c if c.isprintable() else " " for c in str(exc))
    return text[:MAX_REASON_CHARS]


def _check_session(state: ClientState, session: bytes, stage: str) -> None:
    if session != state.setup.params.session:
        raise SecAggError(f"{stage}: session id does not match this round (stale or replayed)")


def _expect(state: ClientState, stage: str, step: str) -> None:
    if state.stage != stage:
        raise SecAggError(f"{step}: out of order (client is at stage {state.stage!r})")


# -- stage 1 --------------------------------------------------------------------------------------


def advertise(setup: Setup) -> tuple[ClientState, Advertise]:
    sk_enc, pk_enc = P.generate_keypair()
    sk_mask, pk_mask = P.generate_keypair()
    b_seed = P.random_bytes(P.SEED_BYTES)
    state = ClientState(ADVERTISED, setup, sk_enc, sk_mask, b_seed)
    msg = Advertise(
        node=setup.node,
        session=setup.params.session,
        round=setup.params.round,
        pk_enc=pk_enc,
        pk_mask=pk_mask,
        b_commit=b_commitment(setup.params.session, setup.node, b_seed),
    )
    return state, msg


# -- stage 2 --------------------------------------------------------------------------------------


def share_keys(state: ClientState, directory: KeyDirectory) -> tuple[ClientState, ShareBundle]:
    _expect(state, ADVERTISED, "share keys")
    _check_session(state, directory.session, "share keys")
    setup = state.setup
    xs = {p.node: p.x for p in setup.neighbours}
    entries = directory.entries
    nodes = [e.node for e in entries]
    if len(set(nodes)) != len(nodes):
        raise SecAggError("share keys: a neighbour appears twice in the key directory")
    unknown = [n for n in nodes if n not in xs]
    if unknown:
        raise SecAggError(f"share keys: directory names non-neighbour {unknown[0]}")
    keys = [e.pk_enc for e in entries] + [e.pk_mask for e in entries]
    if len(set(keys)) != len(keys):
        raise SecAggError("share keys: two neighbours advertised the same public key")
    if any(e.session != setup.params.session or e.round != setup.params.round for e in entries):
        raise SecAggError("share keys: a directory entry belongs to another session or round")
    own = {P.public_key_of(state.sk_enc), P.public_key_of(state.sk_mask)}
    for e in entries:
        if own & {e.pk_enc, e.pk_mask}:
            raise SecAggError(f"share keys: neighbour {e.node} advertised this client's own key")
        for key in (e.pk_enc, e.pk_mask):
            try:
                P.check_public_key(key)
            except P.InvalidPublicKey as exc:
                raise SecAggError(f"share keys: neighbour {e.node}: {exc}") from None
    t = setup.params.threshold
    if len(entries) + 1 < t:
        raise SecAggError(
            f"share keys: {len(entries)} neighbour(s) left, with this client {len(entries) + 1} "
            f"share holder(s), threshold is {t}"
        )

    holders = [xs[n] for n in nodes] + [setup.x]  # the neighbours, and this client itself
    b_shares = shamir.split(state.b_seed, t, holders)
    sk_shares = shamir.split(state.sk_mask, t, holders)  # the own key share is never used
    session, rnd, me = setup.params.session, setup.params.round, setup.node
    own_b_y, own_b_salt = shamir.share_to_bytes(b_shares[setup.x]), P.random_bytes(SALT_BYTES)
    items = []
    for e in entries:
        x = xs[e.node]
        b_y, sk_y = shamir.share_to_bytes(b_shares[x]), shamir.share_to_bytes(sk_shares[x])
        b_salt, sk_salt = P.random_bytes(SALT_BYTES), P.random_bytes(SALT_BYTES)
        key = P.agree(state.sk_enc, e.pk_enc, "share-encryption", session, me, e.node)
        plain = _PLAIN.pack(me, e.node, b_y, b_salt, sk_y, sk_salt)
        items.append(
            SealedShares(
                src=me,
                dst=e.node,
                ciphertext=P.seal(key, plain, share_aad(session, rnd, me, e.node)),
                b_hash=share_hash(B_SHARE, session, me, e.node, b_y, b_salt),
                sk_hash=share_hash(SK_SHARE, session, me, e.node, sk_y, sk_salt),
            )
        )
    own_b_hash = share_hash(B_SHARE, session, me, me, own_b_y, own_b_salt)
    new = replace(state, stage=SHARED, directory=entries, own_b_y=own_b_y, own_b_salt=own_b_salt)
    return new, ShareBundle(me, session, rnd, tuple(items), own_b_hash)


# -- stage 3 --------------------------------------------------------------------------------------


def _open_shares(state: ClientState, item: SealedShares, pk_enc: bytes) -> HeldShares:
    setup = state.setup
    session, rnd, me = setup.params.session, setup.params.round, setup.node
    key = P.agree(state.sk_enc, pk_enc, "share-encryption", session, me, item.src)
    plain = P.open_sealed(key, item.ciphertext, share_aad(session, rnd, item.src, me))
    if len(plain) != _PLAIN.size:
        raise SecAggError("decrypted share bundle has the wrong length")
    src, dst, b_y, b_salt, sk_y, sk_salt = _PLAIN.unpack(plain)
    if src != item.src or dst != me:
        raise SecAggError(f"bundle is addressed {src}->{dst}, expected {item.src}->{me}")
    if share_hash(B_SHARE, session, src, me, b_y, b_salt) != item.b_hash:
        raise SecAggError("b-share does not match its sender's commitment")
    if share_hash(SK_SHARE, session, src, me, sk_y, sk_salt) != item.sk_hash:
        raise SecAggError("key share does not match its sender's commitment")
    shamir.share_from_bytes(b_y)
    shamir.share_from_bytes(sk_y)
    return HeldShares(src, b_y, b_salt, sk_y, sk_salt)


def masked_input(
    state: ClientState, delivery: ShareDelivery, encoded: np.ndarray
) -> tuple[ClientState, MaskedHeader, np.ndarray]:
    """Store the neighbours' shares and mask ``encoded`` (int64, the quantized update with its
    weight and any DP noise already added) into the ring."""
    _expect(state, SHARED, "masked input")
    _check_session(state, delivery.session, "masked input")
    params = state.setup.params
    if encoded.shape != (params.vector_len,):
        raise SecAggError(
            f"masked input: encoded vector has shape {encoded.shape}, expected "
            f"({params.vector_len},)"
        )
    directory = {e.node: e for e in state.directory}
    srcs = [i.src for i in delivery.items]
    if len(set(srcs)) != len(srcs):
        raise SecAggError("masked input: a neighbour's shares were delivered twice")
    strangers = [s for s in srcs if s not in directory]
    if strangers:
        raise SecAggError(f"masked input: shares from {strangers[0]}, not a neighbour")
    if len(srcs) + 1 < params.threshold:
        raise SecAggError(
            f"masked input: {len(srcs)} neighbour(s) shared keys, with this client "
            f"{len(srcs) + 1} share holder(s), threshold is {params.threshold}"
        )
    held, complaints = [], []
    for item in delivery.items:
        try:
            held.append(_open_shares(state, item, directory[item.src].pk_enc))
        except (SecAggError, ValueError) as exc:  # ShamirError, DecryptionFailed, bad key
            complaints.append(Complaint(item.src, _reason(exc)))

    me, bits = state.setup.node, params.plan.ring_bits
    y = to_ring(encoded, bits)
    y += P.expand(state.b_seed, params.vector_len, bits)  # uint arithmetic wraps mod 2^width
    for src in sorted(srcs):
        mask = P.expand(
            mask_key(state.sk_mask, directory[src].pk_mask, params.session, me, src),
            params.vector_len,
            bits,
        )
        if me < src:
            y += mask
        else:
            y -= mask
    if bits < y.dtype.itemsize * 8:
        y &= y.dtype.type((1 << bits) - 1)
    new = replace(state, stage=MASKED, held=tuple(held), partners=tuple(sorted(srcs)))
    return new, MaskedHeader(me, params.session, params.round, tuple(complaints)), y


# -- stage 4 --------------------------------------------------------------------------------------


def unmask(state: ClientState, request: UnmaskRequest) -> tuple[ClientState, UnmaskResponse]:
    _expect(state, MASKED, "unmask")
    _check_session(state, request.session, "unmask")
    me, t = state.setup.node, state.setup.params.threshold
    survivors, dropped = set(request.survivors), set(request.dropped)
    if survivors & dropped:
        raise SecAggError(
            f"unmask: {sorted(survivors & dropped)[0]} is listed as both survivor and dropped"
        )
    if me in dropped:
        raise SecAggError("unmask: this client is listed as dropped")
    if me not in survivors:  # its input is in the sum: its own b-share is part of the unmasking
        raise SecAggError("unmask: this client is not listed as a survivor")
    partners = set(state.partners)
    outsiders = (survivors | dropped) - partners - {me}
    if outsiders:
        raise SecAggError(f"unmask: {sorted(outsiders)[0]} is not a masking partner")
    if len(survivors) < t:  # then this client's own self mask could not be removed either
        raise SecAggError(
            f"unmask: only {len(survivors)} client(s) (this one included) survive, threshold is {t}"
        )
    shares = []
    for h in state.held:
        if h.src in survivors:
            shares.append(RevealedShare(h.src, B_SHARE, h.b_y, h.b_salt))
        elif h.src in dropped:
            shares.append(RevealedShare(h.src, SK_SHARE, h.sk_y, h.sk_salt))
    shares.append(RevealedShare(me, B_SHARE, state.own_b_y, state.own_b_salt))
    # The round is over for this client: forget its secrets.
    done = replace(
        state,
        stage=DONE,
        sk_enc=b"",
        sk_mask=b"",
        b_seed=b"",
        held=(),
        own_b_y=b"",
        own_b_salt=b"",
    )
    return done, UnmaskResponse(me, request.session, state.setup.params.round, tuple(shares))
