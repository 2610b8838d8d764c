"""Shamir sharing, the PRG and mask cancellation: Hypothesis properties and fixed cases."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import primitives as P
from privacy.secagg import shamir
from privacy.secagg.graph import default_degree, default_threshold, harary, random_graph

secrets32 = st.binary(min_size=32, max_size=32)


@settings(max_examples=60, deadline=None)
@given(secret=secrets32, n=st.integers(2, 12), data=st.data())
def test_any_t_shares_rebuild_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, t, xs)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, t) == secret


def _lagrange(points: dict[int, int], at: int) -> int:
    """Reference interpolation (independent of shamir.interpolate), any x including 0."""
    p, total = shamir.PRIME, 0
    for xi, yi in points.items():
        num = den = 1
        for xj in points:
            if xj != xi:
                num = num * (at - xj) % p
                den = den * (xi - xj) % p
        total = (total + yi * num * pow(den, -1, p)) % p
    return total


@settings(max_examples=40, deadline=None)
@given(secret=secrets32, other=secrets32, t=st.integers(2, 8))
def test_fewer_than_t_shares_say_nothing_about_the_secret(
    secret: bytes, other: bytes, t: int
) -> None:
    """Perfect hiding: any t-1 shares of ``secret`` are also t-1 shares of ``other`` (the
    polynomial through (0, other) and those shares has degree t-1), so together with a t-th share
    of that polynomial they rebuild ``other``."""
    xs = list(range(1, t + 2))
    shares = shamir.split(secret, t, xs)
    few = {x: shares[x] for x in xs[: t - 1]}
    alt = {0: int.from_bytes(other, "big"), **few}  # t points: a degree t-1 polynomial
    x_new = xs[-1]
    forged = {**few, x_new: _lagrange(alt, x_new)}
    assert shamir.combine(forged, t) == other
    assert shamir.combine({**few, x_new: shares[x_new]}, t) == secret


@settings(max_examples=30, deadline=None)
@given(secret=secrets32, t=st.integers(2, 6), extra=st.integers(1, 4), data=st.data())
def test_a_wrong_share_beyond_t_is_detected(
    secret: bytes, t: int, extra: int, data: st.DataObject
) -> None:
    xs = list(range(1, t + extra + 1))
    shares = shamir.split(secret, t, xs)
    victim = data.draw(st.sampled_from(xs))
    shares[victim] = (shares[victim] + 1) % shamir.PRIME
    with pytest.raises(shamir.ShamirError):
        shamir.combine(shares, t)


def test_shamir_rejects_bad_arguments() -> None:
    with pytest.raises(shamir.ShamirError, match="cannot meet threshold"):
        shamir.split(b"\x01" * 32, 3, [1, 2])
    with pytest.raises(shamir.ShamirError, match="distinct"):
        shamir.split(b"\x01" * 32, 2, [1, 1, 2])
    with pytest.raises(shamir.ShamirError, match=r"\[1, p\)"):
        shamir.split(b"\x01" * 32, 2, [0, 1])
    with pytest.raises(shamir.ShamirError, match="threshold is 3"):
        shamir.combine({1: 5, 2: 6}, 3)
    with pytest.raises(shamir.ShamirError, match="66 bytes"):
        shamir.share_from_bytes(b"\x00" * 10)


def test_prg_is_deterministic_per_seed_and_uniform() -> None:
    seed = bytes(range(32))
    a, b = P.expand(seed, 200_000, 32), P.expand(seed, 200_000, 32)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint32
    c = P.expand(bytes(31) + b"\x01", 200_000, 32)
    assert (a != c).mean() > 0.999
    # 16 equal bins of the top 4 bits: chi-square with 15 dof stays far below 60
    counts = np.bincount(a >> 28, minlength=16)
    chi2 = float(((counts - a.size / 16) ** 2 / (a.size / 16)).sum())
    assert chi2 < 60
    small = P.expand(seed, 1000, 20)
    assert small.dtype == np.uint32 and int(small.max()) < 1 << 20
    with pytest.raises(ValueError, match="32 bytes"):
        P.expand(b"short", 10, 32)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 12), bits=st.sampled_from([8, 13, 16, 32]), data=st.data())
def test_pairwise_masks_cancel_over_any_harary_graph(
    n: int, bits: int, data: st.DataObject
) -> None:
    """Each client adds +PRG(s_uv) for neighbours v > u and -PRG(s_uv) for v < u, with s_uv from
    X25519 agreement: summed over all clients every mask cancels exactly, mod 2^bits."""
    k_choices = [k for k in range(2, n) if k % 2 == 0] + [n - 1]
    k = data.draw(st.sampled_from(k_choices))
    nodes = [7 + 13 * i for i in range(n)]
    g = harary(nodes, k)
    keys = {u: P.generate_keypair() for u in nodes}
    session = os.urandom(16)
    L = 64
    total = np.zeros(L, dtype=P.wire_dtype(bits))
    for u in nodes:
        for v in g.neighbours[u]:
            s = P.agree(keys[u][0], keys[v][1], "pairwise-mask", session, u, v)
            m = P.expand(s, L, bits)
            total = total + m if u < v else total - m
    total &= total.dtype.type((1 << bits) - 1)
    assert not total.any()


def test_key_agreement_is_symmetric_and_purpose_bound() -> None:
    (sa, pa), (sb, pb) = P.generate_keypair(), P.generate_keypair()
    s = os.urandom(16)
    assert P.agree(sa, pb, "x", s, 1, 2) == P.agree(sb, pa, "x", s, 2, 1)
    assert P.agree(sa, pb, "x", s, 1, 2) != P.agree(sa, pb, "y", s, 1, 2)
    assert P.agree(sa, pb, "x", s, 1, 2) != P.agree(sa, pb, "x", os.urandom(16), 1, 2)


def test_sealed_shares_fail_under_tampering_or_another_context() -> None:
    key = os.urandom(32)
    blob = P.seal(key, b"share", b"aad-1")
    assert P.open_sealed(key, blob, b"aad-1") == b"share"
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    for bad_blob, aad in ((bytes(flipped), b"aad-1"), (blob, b"aad-2")):
        with pytest.raises(P.DecryptionFailed):
            P.open_sealed(key, bad_blob, aad)


def test_graph_degree_threshold_and_regularity() -> None:
    assert default_degree(10) == 9  # small rounds: complete graph
    assert default_degree(100) == 20 and default_degree(50) == 18
    # a strict majority of the k + 1 share holders (the neighbours and the client itself)
    assert default_threshold(20) == 11 and default_threshold(2) == 2
    assert default_threshold(9) == 6 and default_threshold(5) == 4 and default_threshold(4) == 3
    g = random_graph(list(range(100, 150)), 18)
    assert all(len(v) == 18 for v in g.neighbours.values())
    assert all(u not in v for u, v in g.neighbours.items())
    assert all(u in g.neighbours[v] for u, vs in g.neighbours.items() for v in vs)  # symmetric
    orders = {tuple(sorted(random_graph(list(range(20)), 4).neighbours[0])) for _ in range(10)}
    assert len(orders) > 1  # the ordering is random per round
