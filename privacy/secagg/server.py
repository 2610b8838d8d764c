"""The coordinator side of SecAgg+: a session object fed one stage of replies at a time.

What it holds about any one client is public keys, commitments, ciphertexts it cannot open, the
*running sum* of masked vectors (a client's masked vector is added on arrival and not kept), and,
in the last stage, either shares of a surviving client's self-mask seed or shares of a dropped
client's masking key, never both: see ``CoordinatorView`` for the exact inventory.

A client's shares have k + 1 holders: its k neighbours and itself (it keeps one share of its own
self-mask seed b, and reveals it at unmasking while it is alive; it never reveals a share of its
own masking key, and the coordinator never asks for the key of a live client). Dropouts at any
stage are tolerated while every secret that must be rebuilt keeps ``threshold`` live holders: b of
a client whose input is in the sum among its live neighbours and itself, the masking key of a
client that dropped after sharing keys among its live neighbours. Otherwise ``SecAggAborted`` is
raised with the reason and the session produces nothing. Malformed, tampered or replayed replies
are rejected with the client named (``MessageRejected`` reasons in ``rejected``) and the client is
treated as dropped at that stage; a client whose shares do not match its own commitments is
excluded.

Every byte from a client is untrusted. A reply is decoded under a size bound sized for the round's
degree (``message_limit``) and the depth of its type; *any* failure while decoding or checking one
client's reply, whatever its type, is a rejection of that client at that stage, never an exception
out of the session. Only ``SecAggAborted`` (the round cannot produce its sum) leaves a ``receive_*``
method because of what clients sent.

Public keys. Each advertised X25519 key must be a canonical encoding of a point on the curve
outside the small subgroup (``primitives.check_public_key``: an all-zero key used to make every
honest neighbour fail), differ from the sender's other key and from every key seen in earlier
rounds of the run (``known_keys``: an honest client draws two fresh keys per round, so a key seen
before is a replay). A sender breaking any of these is excluded. Two clients advertising the same
key in one round are both dropped from the round and the pair counts as a dispute, like a
complaint below: which of the two copied the other cannot be told from here (an honest
coordinator shows no key before the advertise stage is over, but the rule does not rely on it).

Complaints. A client that cannot open a neighbour's sealed shares says so in its masked-input
header. The coordinator cannot tell who is lying: the accused dealt bad shares, or the accuser
claims so falsely. The rule is symmetric, so that a complaint costs the accuser what it costs the
accused:

1. *in the round*, both parties of every complaint leave: neither input is in the sum (their
   masked vectors are discarded before any is added) and both count as dropped after sharing keys
   (their pairwise masks are removed through their neighbours' key shares);
2. *across the run* (``ComplaintLedger``), a client that has been party to disputes (complaints,
   either side, and shared keys) with ``limit`` different clients (2 by default) is excluded.

An honest client is party to a dispute only when a hostile client is the other party (under an
honest coordinator and authenticated transport, honest clients never dispute each other). So all
of an honest client's counterparts are hostile, and with fewer than ``limit`` hostile clients in
the run no honest client is ever excluded, while a hostile client is excluded as soon as it has
disputed with ``limit`` clients (the rule of "dispute control" in multi-party computation: a party
with more disputes than there are corrupt parties is corrupt). With the default limit 2 this
covers one hostile client: it can never get an honest client excluded, and it is excluded itself
as soon as it involves a second client (a hostile client that complains about many neighbours at
once is excluded after that round). ``limit`` colluding clients can get an honest one excluded
(two colluders both complaining about it). What a single hostile client can still do is keep the
*same* honest neighbour out of every round in which it complains about it, giving up its own
contribution each time; the coordinator cannot tell which of the two lies. The earlier rule (the
accused alone excluded at once) let any client exclude any honest neighbour at no cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from privacy.secagg import primitives as P
from privacy.secagg import shamir
from privacy.secagg.client import b_commitment, mask_key, share_hash
from privacy.secagg.encoding import EncodingPlan
from privacy.secagg.graph import Graph, default_degree, default_threshold, random_graph
from privacy.secagg.messages import (
    B_SHARE,
    CIPHERTEXT_BYTES,
    SESSION_BYTES,
    SK_SHARE,
    Advertise,
    KeyDirectory,
    MaskedHeader,
    MessageRejected,
    Peer,
    RevealedShare,
    RoundParams,
    SealedShares,
    SecAggAborted,
    SecAggError,
    Setup,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    from_bytes,
    message_limit,
)

ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK = "advertise", "share-keys", "masked-input", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK)
_M = TypeVar("_M")


@dataclass(frozen=True)
class Dropout:
    node: int
    stage: str
    reason: str


@dataclass(frozen=True)
class SecAggResult:
    ring_sum: np.ndarray  # the unmasked sum of the contributors' encoded vectors, mod 2^bits
    contributors: tuple[int, ...]  # clients whose input is in the sum (U3)
    recovered: tuple[int, ...]  # clients that dropped after sharing keys; their masks removed
    # Clients that left, with the stage and why. Those that left at the unmask stage are still
    # contributors (their input is in the sum; their neighbours' shares removed their masks).
    dropouts: tuple[Dropout, ...]
    excluded: tuple[Dropout, ...]  # clients caught misbehaving (not to be sampled again)
    stage_counts: Mapping[str, int]  # clients still present after each stage


@dataclass
class CoordinatorView:
    """Everything the coordinator keeps during a round, by kind. Nothing else is stored."""

    public_keys: dict[int, Advertise] = field(default_factory=dict)
    sealed: dict[tuple[int, int], SealedShares] = field(default_factory=dict)  # (src, dst)
    masked_sum: np.ndarray | None = None  # sum of masked vectors, never one client's alone
    own_b_hash: dict[int, bytes] = field(default_factory=dict)  # commitment to a kept b-share
    revealed: dict[tuple[int, str], dict[int, bytes]] = field(default_factory=dict)


class ServerSession:
    def __init__(
        self,
        nodes: Sequence[int],
        rnd: int,
        plan: EncodingPlan,
        vector_len: int,
        *,
        min_survivors: int = 2,
        degree: int = 0,
        threshold: int = 0,
        noise_mu: float = 0.0,
        graph: Graph | None = None,
        known_keys: Collection[bytes] = (),
    ) -> None:
        """``known_keys``: public keys advertised in earlier rounds of the run (a client
        advertising one of them again is excluded)."""
        if len(set(nodes)) != len(nodes):
            raise SecAggError("sampled nodes must be distinct")
        n = len(nodes)
        if n < 2:
            raise SecAggAborted(f"secure aggregation needs at least 2 clients, {n} sampled")
        if n > plan.max_clients:
            raise SecAggError(f"{n} clients exceed the {plan.max_clients} the encoding allows")
        k = degree or default_degree(n)
        k = min(k, n - 1)
        if k < n - 1 and k % 2:
            k += 1  # Harary graphs below the complete graph have even degree
        self.graph = graph or random_graph(nodes, min(k, n - 1))
        k = self.graph.degree()
        t = threshold or default_threshold(k)
        if not 2 <= t <= k:  # t <= k: a dropped client's key has only its k neighbours' shares
            raise SecAggError(f"secagg-threshold: must be in [2, {k}] (the degree), got {t}")
        self.params = RoundParams(
            round=rnd,
            session=P.random_bytes(SESSION_BYTES),
            threshold=t,
            plan=plan,
            vector_len=vector_len,
            noise_mu=noise_mu,
        )
        self.known_keys = known_keys
        self.max_message_bytes = message_limit(max(len(v) for v in self.graph.neighbours.values()))
        self.min_survivors = max(2, min_survivors)
        self.x = {u: i + 1 for i, u in enumerate(sorted(nodes))}
        self.active: set[int] = set(nodes)
        self.sampled = tuple(sorted(nodes))
        self.view = CoordinatorView()
        self.dropouts: list[Dropout] = []
        self.excluded: dict[int, Dropout] = {}
        self.counts: dict[str, int] = {"sampled": n}
        self._directory: dict[int, frozenset[int]] = {}
        self._partners: dict[int, frozenset[int]] = {}
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._requests: dict[int, UnmaskRequest] = {}
        self._complaints: set[tuple[int, int]] = set()
        self._disputes: set[tuple[int, int]] = set()  # complaints and shared keys
        self.stage = ADVERTISE

    # -- helpers ------------------------------------------------------------------------------

    @property
    def threshold(self) -> int:
        return self.params.threshold

    def nbrs(self, u: int) -> frozenset[int]:
        return self.graph.neighbours[u]

    def _drop(self, node: int, stage: str, reason: str) -> None:
        self.dropouts.append(Dropout(node, stage, reason))
        self.active.discard(node)

    def _exclude(self, node: int, stage: str, reason: str) -> None:
        self.excluded.setdefault(node, Dropout(node, stage, reason))

    @property
    def complaints(self) -> frozenset[tuple[int, int]]:
        """(accuser, accused) pairs of this round's accepted complaints."""
        return frozenset(self._complaints)

    @property
    def disputes(self) -> frozenset[tuple[int, int]]:
        """Pairs of clients of which one misbehaved and the coordinator cannot tell which: this
        round's complaints and pairs that advertised the same public key. For the
        ``ComplaintLedger``."""
        return frozenset(self._complaints | self._disputes)

    def advertised_keys(self) -> set[bytes]:
        """Every public key accepted this round (to pass as ``known_keys`` to later rounds)."""
        return {k for adv in self.view.public_keys.values() for k in (adv.pk_enc, adv.pk_mask)}

    def _gather(
        self, stage: str, replies: Mapping[int, bytes], failures: Mapping[int, str]
    ) -> dict[int, bytes]:
        if self.stage != stage:
            raise SecAggError(f"stage {stage!r} received while expecting {self.stage!r}")
        got = {}
        for u in sorted(self.active):
            if u in replies:
                got[u] = replies[u]
            else:
                self._drop(u, stage, failures.get(u, "no reply"))
        return got

    def _prune(self, stage: str) -> None:
        """Drop clients with fewer than t live holders of their shares (their live neighbours and
        themselves): their self masks could never be removed."""
        changed = True
        while changed:
            changed = False
            for u in sorted(self.active):
                live = len(self.nbrs(u) & self.active)
                if live + 1 < self.threshold:
                    self._drop(
                        u,
                        stage,
                        f"only {live} live neighbour(s): {live + 1} share holder(s) with itself, "
                        f"threshold is {self.threshold}",
                    )
                    changed = True

    def _need_survivors(self, stage: str) -> None:
        if len(self.active) < self.min_survivors:
            raise SecAggAborted(
                f"{stage}: {len(self.active)} client(s) left, at least {self.min_survivors} needed"
            )

    def _decode(self, cls: type[_M], node: int, payload: bytes) -> _M:
        try:
            msg = from_bytes(cls, payload, max_bytes=self.max_message_bytes)
        except Exception as exc:  # from_bytes raises only SecAggError; a bug is still the input's
            raise MessageRejected(node, f"malformed {cls.__name__}: {exc}") from None
        claimed = getattr(msg, "node", node)
        if claimed != node:
            raise MessageRejected(node, f"message claims to come from {claimed}")
        if getattr(msg, "session", None) != self.params.session:
            raise MessageRejected(node, "session id does not match this round (replayed or stale)")
        if getattr(msg, "round", None) != self.params.round:
            raise MessageRejected(
                node, f"reply is for round {getattr(msg, 'round', None)}, not {self.params.round}"
            )
        return msg

    # -- stage 1 ------------------------------------------------------------------------------

    def setup_messages(self) -> dict[int, Setup]:
        return {
            u: Setup(
                self.params,
                u,
                self.x[u],
                tuple(Peer(v, self.x[v]) for v in sorted(self.nbrs(u))),
            )
            for u in self.sampled
        }

    def receive_advertise(
        self, replies: Mapping[int, bytes], failures: Mapping[int, str] | None = None
    ) -> dict[int, KeyDirectory]:
        got = self._gather(ADVERTISE, replies, failures or {})
        adverts: dict[int, Advertise] = {}
        for u, payload in got.items():
            try:
                adverts[u] = self._decode(Advertise, u, payload)
            except MessageRejected as exc:
                self._drop(u, ADVERTISE, exc.reason)
        clean: dict[int, Advertise] = {}
        for u, adv in adverts.items():
            problem = self._key_problem(adv)
            if problem:  # its own doing: excluded
                self._drop(u, ADVERTISE, problem)
                self._exclude(u, ADVERTISE, problem)
            else:
                clean[u] = adv
        senders: dict[bytes, set[int]] = {}
        for u, adv in clean.items():
            for key in (adv.pk_enc, adv.pk_mask):
                senders.setdefault(key, set()).add(u)
        sharing: dict[int, int] = {}
        for group in senders.values():
            for a, b in itertools.combinations(sorted(group), 2):
                self._disputes.add((a, b))
                sharing.setdefault(a, b)
                sharing.setdefault(b, a)
        for u, adv in clean.items():
            if u in sharing:  # one of the two copied the other's key: both leave (a dispute)
                self._drop(u, ADVERTISE, f"advertised a public key that client {sharing[u]} also "
                           "advertised (one of the two copied it)")  # fmt: skip
            else:
                self.view.public_keys[u] = adv
        self._prune(ADVERTISE)
        self._need_survivors(ADVERTISE)
        self.counts[ADVERTISE] = len(self.active)
        out = {}
        for u in sorted(self.active):
            peers = self.nbrs(u) & self.active
            self._directory[u] = frozenset(peers)
            out[u] = KeyDirectory(
                self.params.session, tuple(self.view.public_keys[v] for v in sorted(peers))
            )
        self.stage = SHARE_KEYS
        return out

    def _key_problem(self, adv: Advertise) -> str:
        """Why the sender of ``adv`` is excluded for its keys, or "" if they are fine."""
        if adv.pk_enc == adv.pk_mask:
            return "advertised the same public key twice (its two keys must differ)"
        for name, key in (("pk-enc", adv.pk_enc), ("pk-mask", adv.pk_mask)):
            try:
                P.check_public_key(key)
            except P.InvalidPublicKey as exc:
                return f"{name}: {exc}"
            if key in self.known_keys:
                return f"{name} was advertised in an earlier round (keys must be fresh)"
        return ""

    # -- stage 2 ------------------------------------------------------------------------------

    def receive_shares(
        self, replies: Mapping[int, bytes], failures: Mapping[int, str] | None = None
    ) -> dict[int, ShareDelivery]:
        got = self._gather(SHARE_KEYS, replies, failures or {})
        for u, payload in got.items():
            try:
                bundle = self._decode(ShareBundle, u, payload)
                dsts = [i.dst for i in bundle.items]
                if len(set(dsts)) != len(dsts) or set(dsts) != self._directory[u]:
                    raise MessageRejected(
                        u, "share bundle is not addressed to exactly its key directory"
                    )
                for item in bundle.items:
                    if item.src != u:
                        raise MessageRejected(u, f"share bundle item claims sender {item.src}")
                    if len(item.ciphertext) != CIPHERTEXT_BYTES:
                        raise MessageRejected(
                            u,
                            f"ciphertext of {len(item.ciphertext)} bytes, expected "
                            f"{CIPHERTEXT_BYTES}",
                        )
                for item in bundle.items:
                    self.view.sealed[(u, item.dst)] = item
                self.view.own_b_hash[u] = bundle.own_b_hash
            except MessageRejected as exc:
                self._drop(u, SHARE_KEYS, exc.reason)
        self._prune(SHARE_KEYS)
        self._need_survivors(SHARE_KEYS)
        self._u2 = frozenset(self.active)
        self.counts[SHARE_KEYS] = len(self.active)
        out = {}
        for v in sorted(self.active):
            srcs = sorted(self.nbrs(v) & self._u2)
            self._partners[v] = frozenset(srcs)
            out[v] = ShareDelivery(
                self.params.session, tuple(self.view.sealed[(u, v)] for u in srcs)
            )
        self.stage = MASKED_INPUT
        return out

    # -- stage 3 ------------------------------------------------------------------------------

    def receive_masked(
        self,
        replies: Mapping[int, tuple[bytes, np.ndarray]],
        failures: Mapping[int, str] | None = None,
    ) -> dict[int, UnmaskRequest]:
        headers = {u: h for u, (h, _) in replies.items()}
        got = self._gather(MASKED_INPUT, headers, failures or {})
        valid: dict[int, tuple[MaskedHeader, np.ndarray]] = {}
        for v, payload in got.items():
            try:
                header = self._decode(MaskedHeader, v, payload)
                vec = self._check_vector(v, replies)
                accused = [c.node for c in header.complaints]
                if not set(accused) <= self._partners[v] or len(set(accused)) != len(accused):
                    raise MessageRejected(v, "complains about clients that sent it no shares")
            except MessageRejected as exc:
                self._drop(v, MASKED_INPUT, exc.reason)
                continue
            valid[v] = (header, vec)
        # The complaint rule (module docstring): both parties of a complaint leave the round.
        leaving: dict[int, str] = {}
        for v, (header, _vec) in sorted(valid.items()):
            for c in header.complaints:
                self._complaints.add((v, c.node))
                self._disputes.add((v, c.node))
                leaving.setdefault(v, f"complained about client {c.node}: {c.reason}")
                leaving.setdefault(c.node, f"client {v} could not use its shares: {c.reason}")
        for u, reason in sorted(leaving.items()):
            if u in valid:
                del valid[u]
                self._drop(u, MASKED_INPUT, f"left the round over a complaint: {reason}")
        # Only the running sum is kept: the coordinator never stores one masked vector.
        for _v, (_header, vec) in sorted(valid.items()):
            if self.view.masked_sum is None:
                self.view.masked_sum = np.zeros(
                    self.params.vector_len, dtype=self.params.plan.dtype
                )
            self.view.masked_sum += vec
        valid.clear()
        self._u3 = frozenset(self.active)
        self.counts[MASKED_INPUT] = len(self.active)
        self._need_survivors(MASKED_INPUT)
        for u in sorted(self._u2):
            holders = self._holders(u)
            if u in self._u3:
                if len(holders) + 1 < self.threshold:
                    raise SecAggAborted(
                        f"masked-input: client {u} survived but only {len(holders)} live "
                        f"neighbour(s) and itself hold shares of its self-mask seed, threshold "
                        f"is {self.threshold}",
                        culprits=(),
                    )
            elif len(holders) < self.threshold:
                raise SecAggAborted(
                    f"masked-input: client {u} dropped after sharing keys but only "
                    f"{len(holders)} live neighbour(s) hold shares of its masking key, threshold "
                    f"is {self.threshold}",
                    culprits=(),
                )
        out = {}
        for v in sorted(self._u3):
            out[v] = UnmaskRequest(
                self.params.session,
                # v itself included: it reveals its own b-share
                survivors=tuple(sorted((self.nbrs(v) & self._u3) | {v})),
                dropped=tuple(sorted(self.nbrs(v) & (self._u2 - self._u3))),
            )
        self._requests = out
        self.stage = UNMASK
        return out

    def _check_vector(self, v: int, replies: Mapping[int, tuple[bytes, np.ndarray]]) -> np.ndarray:
        plan = self.params.plan
        vec = replies[v][1]
        if not isinstance(vec, np.ndarray):
            raise MessageRejected(v, f"masked vector is a {type(vec).__name__}, not an array")
        if vec.dtype != plan.dtype or vec.shape != (self.params.vector_len,):
            raise MessageRejected(
                v,
                f"masked vector is {vec.dtype}{list(vec.shape)}, expected "
                f"{plan.dtype}[{self.params.vector_len}]",
            )
        if plan.ring_bits < vec.dtype.itemsize * 8 and int(vec.max(initial=0)) >> plan.ring_bits:
            raise MessageRejected(v, f"masked vector has values outside Z_2^{plan.ring_bits}")
        return vec

    def _holders(self, u: int) -> set[int]:
        """Live clients (in U3) that received u's shares and did not reject them."""
        return {
            v
            for v in self.nbrs(u) & self._u3
            if u in self._partners.get(v, ()) and (v, u) not in self._complaints
        }

    # -- stage 4 ------------------------------------------------------------------------------

    def receive_unmask(
        self, replies: Mapping[int, bytes], failures: Mapping[int, str] | None = None
    ) -> SecAggResult:
        got = self._gather(UNMASK, replies, failures or {})
        self.counts[UNMASK] = len(self.active)
        shares: dict[tuple[int, str], dict[int, int]] = {}
        for v, payload in got.items():
            try:
                accepted = self._check_response(v, payload)
            except MessageRejected as exc:
                # Its input is in the sum already; its shares are not used.
                self._exclude(v, UNMASK, exc.reason)
                continue
            for s in accepted:
                shares.setdefault((s.target, s.kind), {})[self.x[v]] = shamir.share_from_bytes(s.y)
                self.view.revealed.setdefault((s.target, s.kind), {})[v] = s.y

        masked = self.view.masked_sum
        assert masked is not None
        total = masked.astype(masked.dtype, copy=True)
        bits, n = self.params.plan.ring_bits, self.params.vector_len
        for u in sorted(self._u3):
            b_seed = self._recover(u, B_SHARE, shares)
            if b_commitment(self.params.session, u, b_seed) != self.view.public_keys[u].b_commit:
                raise SecAggAborted(
                    f"unmask: the self-mask seed rebuilt from client {u}'s shares does not match "
                    "its commitment: it dealt inconsistent shares",
                    culprits=(u,),
                )
            total -= P.expand(b_seed, n, bits)
        recovered = sorted(self._u2 - self._u3)
        for u in recovered:
            sk = self._recover(u, SK_SHARE, shares)
            if P.public_key_of(sk) != self.view.public_keys[u].pk_mask:
                raise SecAggAborted(
                    f"unmask: the masking key rebuilt from client {u}'s shares does not match its "
                    "public key: it dealt inconsistent shares",
                    culprits=(u,),
                )
            for v in sorted(self.nbrs(u) & self._u3):
                mask = P.expand(
                    mask_key(sk, self.view.public_keys[v].pk_mask, self.params.session, u, v),
                    n,
                    bits,
                )
                if v < u:  # v added this mask; take it off
                    total -= mask
                else:
                    total += mask
        if bits < total.dtype.itemsize * 8:
            total &= total.dtype.type((1 << bits) - 1)
        self.stage = "done"
        return SecAggResult(
            ring_sum=total,
            contributors=tuple(sorted(self._u3)),
            recovered=tuple(recovered),
            dropouts=tuple(self.dropouts),
            excluded=tuple(self.excluded.values()),
            stage_counts=dict(self.counts),
        )

    def _check_response(self, v: int, payload: bytes) -> list[RevealedShare]:
        resp = self._decode(UnmaskResponse, v, payload)
        req = self._requests[v]
        allowed = {u: B_SHARE for u in req.survivors} | {u: SK_SHARE for u in req.dropped}
        targets = [s.target for s in resp.shares]
        if len(set(targets)) != len(targets):
            raise MessageRejected(v, "revealed two shares of one client")
        for s in resp.shares:
            if allowed.get(s.target) != s.kind:
                raise MessageRejected(
                    v, f"revealed a {s.kind}-share of {s.target} it was not asked"
                )
            try:
                shamir.share_from_bytes(s.y)
            except shamir.ShamirError as exc:
                raise MessageRejected(v, f"share of {s.target}: {exc}") from None
            if s.target == v:  # its own b-share (the only own share a client may reveal)
                want = self.view.own_b_hash[v]
            else:
                sealed = self.view.sealed[(s.target, v)]
                want = sealed.b_hash if s.kind == B_SHARE else sealed.sk_hash
            if share_hash(s.kind, self.params.session, s.target, v, s.y, s.salt) != want:
                raise MessageRejected(
                    v,
                    f"returned a share of client {s.target} that does not match the commitment "
                    f"{s.target} made when dealing it (inconsistent shares)",
                )
        return list(resp.shares)

    def _recover(
        self, u: int, kind: str, shares: Mapping[tuple[int, str], dict[int, int]]
    ) -> bytes:
        got = shares.get((u, kind), {})
        what = "self-mask seed" if kind == B_SHARE else "masking key (it dropped)"
        if len(got) < self.threshold:
            raise SecAggAborted(
                f"unmask: {len(got)} share(s) of client {u}'s {what} came back, "
                f"threshold is {self.threshold}"
            )
        try:
            return shamir.combine(got, self.threshold, P.SEED_BYTES)
        except shamir.ShamirError as exc:
            raise SecAggAborted(
                f"unmask: shares of client {u}'s {what} are inconsistent ({exc}): it dealt "
                "inconsistent shares",
                culprits=(u,),
            ) from None


@dataclass
class ComplaintLedger:
    """Complaints over a whole run (the rule in the module docstring): a client that has been
    party to complaints, on either side, with ``limit`` different clients is excluded."""

    limit: int = 2
    counterparts: dict[int, dict[int, int]] = field(default_factory=dict)  # node -> {other: round}

    def __post_init__(self) -> None:
        if self.limit < 2:
            raise ValueError(f"complaint limit must be >= 2, got {self.limit}")

    def record(self, rnd: int, complaints: Iterable[tuple[int, int]]) -> list[Dropout]:
        """Add a round's (accuser, accused) pairs; return the clients that now reach the limit."""
        reached = []
        for accuser, accused in sorted(set(complaints)):
            for node, other in ((accuser, accused), (accused, accuser)):
                seen = self.counterparts.setdefault(node, {})
                if other in seen:
                    continue
                seen[other] = rnd
                if len(seen) == self.limit:
                    pairs = ", ".join(f"client {o} (round {r})" for o, r in sorted(seen.items()))
                    reached.append(
                        Dropout(
                            node,
                            MASKED_INPUT,
                            f"party to complaints with {self.limit} different clients ({pairs}): "
                            "an honest client meets a complaint only from or about a hostile one",
                        )
                    )
        return reached
