"""Cryptographic building blocks of SecAgg+, all from ``cryptography`` (OpenSSL underneath).

- key agreement: X25519, with every derived key passed through HKDF-SHA256 whose ``info`` names
  the purpose, the round's session id and the two parties, so no key is ever used for two things;
- authenticated encryption of the shares routed through the coordinator: AES-256-GCM with the
  sender, the receiver and the session in the associated data (a ciphertext moved to another
  pair, another round or another stage fails to open);
- mask expansion: AES-256-CTR keystream (a 256-bit seed per mask, never folded to fewer bits);
- commitments: SHA-256 over length-prefixed fields.

Nothing here keeps state; secrets are plain ``bytes``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat
from cryptography.hazmat.primitives.serialization import NoEncryption as _NoEncryption

KEY_BYTES = 32
SEED_BYTES = 32
NONCE_BYTES = 12
DOMAIN = b"fedtune-secagg-v1"


class DecryptionFailed(ValueError):
    """A ciphertext did not authenticate (tampered, replayed, or meant for someone else)."""


class InvalidPublicKey(ValueError):
    """A peer's X25519 public key is malformed, not on the curve or of low order."""


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def _field(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def encode_fields(parts: Iterable[bytes | int | str]) -> bytes:
    """Unambiguous concatenation (length-prefixed); ints as unsigned 64-bit, str as UTF-8."""
    out = bytearray()
    for p in parts:
        if isinstance(p, bool):
            raise TypeError("bool is not a field")
        if isinstance(p, int):
            out += _field(p.to_bytes(8, "big"))
        elif isinstance(p, str):
            out += _field(p.encode())
        else:
            out += _field(bytes(p))
    return bytes(out)


def commit(tag: str, *parts: bytes | int | str) -> bytes:
    """SHA-256 commitment, domain-separated by ``tag``."""
    return hashlib.sha256(encode_fields((DOMAIN, tag, *parts))).digest()


# -- X25519 ---------------------------------------------------------------------------------------


def generate_keypair() -> tuple[bytes, bytes]:
    """(private key, public key), both 32 raw bytes."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, _NoEncryption()),
        sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


# Curve25519: p = 2^255 - 19, Montgomery form v^2 = u^3 + A u^2 + u.
_P25519 = (1 << 255) - 19
_A25519 = 486662


@functools.cache
def _probe_key() -> X25519PrivateKey:
    # Any scalar does: X25519 clamps it to a multiple of 8, which sends every point of order
    # 1, 2, 4 or 8 to the all-zero output that the library refuses.
    return X25519PrivateKey.from_private_bytes(bytes(range(32)))


def _check_point(public_key: bytes) -> X25519PublicKey:
    if len(public_key) != KEY_BYTES:
        raise InvalidPublicKey(f"a public key is {KEY_BYTES} bytes, got {len(public_key)}")
    u = int.from_bytes(public_key, "little")
    if u >= _P25519:
        raise InvalidPublicKey("public key is not a canonical X25519 encoding")
    rhs = (u * u * u + _A25519 * u * u + u) % _P25519
    if rhs and pow(rhs, (_P25519 - 1) // 2, _P25519) != 1:
        raise InvalidPublicKey("public key is not a point of Curve25519 (it is on the twist)")
    return X25519PublicKey.from_public_bytes(public_key)


def _exchange(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # the library refuses an all-zero result: a low-order point
        raise InvalidPublicKey("public key is a low-order point (all-zero shared secret)") from None


@functools.lru_cache(maxsize=4096)
def check_public_key(public_key: bytes) -> None:
    """Refuse a peer key unless it is the canonical encoding of a point on Curve25519 (not its
    twist) outside the small subgroup. Raises ``InvalidPublicKey`` saying which. (Results are
    cached per key: a key is checked once per process however often it is used.)

    X25519 itself accepts any 32 bytes: a non-canonical encoding (u >= p, or the unused top bit
    set) names the same point as a canonical one, so two such keys would pass a byte comparison
    for distinctness; a low-order point (u = 0, u = 1, ...) makes every shared secret all-zero
    (the library then raises, which is how honest neighbours used to crash); a point on the
    twist is never what an honest client sends."""
    _exchange(_probe_key(), _check_point(public_key))


def public_key_of(private_key: bytes) -> bytes:
    sk = X25519PrivateKey.from_private_bytes(private_key)
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(
    private_key: bytes, peer_public: bytes, purpose: str, session: bytes, a: int, b: int
) -> bytes:
    """A 32-byte key shared by nodes ``a`` and ``b`` (order-independent), for one purpose.

    Raises ``InvalidPublicKey`` for a malformed or low-order peer key (X25519 all-zero output).
    """
    check_public_key(peer_public)
    shared = X25519PrivateKey.from_private_bytes(private_key).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    lo, hi = sorted((a, b))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=hashlib.sha256(DOMAIN + session).digest(),
        info=encode_fields((DOMAIN, purpose, lo, hi)),
    ).derive(shared)


# -- AES-GCM --------------------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + 16:
        raise DecryptionFailed("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailed("authentication failed") from None


# -- PRG ------------------------------------------------------------------------------------------

_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def wire_dtype(bits: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ``bits``-bit ring elements."""
    for width, dt in _DTYPES.items():
        if bits <= width:
            return np.dtype(dt)
    raise ValueError(f"ring of {bits} bits is wider than 64")


def expand(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` pseudo-random elements of Z_(2^bits) from a 32-byte seed (AES-256-CTR)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    dt = wire_dtype(bits)
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    stream = enc.update(bytes(count * dt.itemsize)) + enc.finalize()
    out = np.frombuffer(stream, dtype=dt.newbyteorder("<")).astype(dt, copy=True)
    if bits < dt.itemsize * 8:
        out &= dt.type((1 << bits) - 1)
    return out


def secure_rng() -> np.random.Generator:
    """A numpy Generator driven by AES-128 in counter mode (randomgen's ``AESCounter``) with a
    fresh 128-bit key from the OS: for stochastic rounding and DP noise, where a predictable
    generator would let an observer strip the randomness back off."""
    from randomgen import AESCounter

    return np.random.Generator(AESCounter(key=int.from_bytes(os.urandom(16), "little")))
