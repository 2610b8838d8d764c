"""Shamir secret sharing over the prime field GF(p), p = 2^521 - 1 (a Mersenne prime).

A 32-byte secret is read as an integer below 2^256 < p. ``split`` hides it as the constant term of
a random polynomial of degree t-1 and evaluates it at the holders' x-coordinates (distinct,
nonzero); any t shares give it back by Lagrange interpolation at 0, fewer reveal nothing about it.
Coefficients come from ``secrets`` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


class ShamirError(ValueError):
    pass


def _check_x(x: int) -> None:
    if not 0 < x < PRIME:
        raise ShamirError(f"share x-coordinate must be in [1, p), got {x}")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` per holder x; any ``threshold`` of them recover it."""
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(set(xs)) != len(xs):
        raise ShamirError("share x-coordinates must be distinct")
    if len(xs) < threshold:
        raise ShamirError(f"{len(xs)} holders cannot meet threshold {threshold}")
    for x in xs:
        _check_x(x)
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ShamirError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x) for x in xs}


def _eval(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def interpolate(shares: Mapping[int, int], at: int = 0) -> int:
    """f(at) for the unique polynomial of degree < len(shares) through ``shares``."""
    if not shares:
        raise ShamirError("no shares")
    xs = list(shares)
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate x-coordinates")
    total = 0
    for i, xi in enumerate(xs):
        _check_x(xi)
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + shares[xi] % PRIME * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, int], threshold: int, secret_len: int = 32) -> bytes:
    """Recover the secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Raises ``ShamirError`` with fewer shares, if the result does not fit ``secret_len`` bytes, or
    if the remaining shares do not lie on the same polynomial (see ``inconsistent``).
    """
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} share(s), threshold is {threshold}")
    bad = inconsistent(shares, threshold)
    if bad:
        raise ShamirError(f"shares at x={bad[:3]} do not lie on the polynomial of the others")
    base = dict(list(shares.items())[:threshold])
    s = interpolate(base)
    if s >= 1 << (8 * secret_len):
        raise ShamirError("shares do not encode a secret of the expected size")
    return s.to_bytes(secret_len, "big")


def inconsistent(shares: Mapping[int, int], threshold: int) -> list[int]:
    """x-coordinates beyond the first ``threshold`` whose share disagrees with the polynomial
    through the first ``threshold`` (empty when all shares are consistent)."""
    items = list(shares.items())
    base = dict(items[:threshold])
    return [x for x, y in items[threshold:] if interpolate(base, at=x) != y % PRIME]


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ShamirError("share value outside the field")
    return y
