"""The Wegman–Carter one-time MAC of OTP media packets (docs/otp.md §2).

A polynomial hash over the prime field GF(p), p = 2^127 − 1, keyed with a
one-time point ``r`` and masked with a one-time pad ``s`` (Wegman and Carter,
"New hash functions and their use in authentication and set equality", JCSS 22
(1981); the polynomial evaluation hash of den Boer and of Bierbrauer et al.,
CRYPTO '93)::

    m_1 … m_n   = the message cut into 15-byte blocks, the last one zero-padded
    m_(n+1)     = len(message) in bytes
    h_r(M)      = m_1·r^(n+1) + m_2·r^n + … + m_(n+1)·r   (mod p)   (Horner)
    tag         = (h_r(M) + s) mod p, as 16 bytes big-endian

``r`` and ``s`` are the first and the last 16 bytes of a 32-byte one-time key,
each read as a big-endian integer and reduced mod p. The key must never be used
for a second message: then an attacker who sees one (message, tag) forges
another with probability at most ``(n+1)/p + 2^-126`` (docs/otp.md §5), whatever
their computing power. Pure functions; the key bytes never reach a log or repr.
"""

from __future__ import annotations

import hmac
from typing import Final

__all__ = [
    "BLOCK_BYTES",
    "KEY_BYTES",
    "TAG_BYTES",
    "P",
    "forgery_bound",
    "one_time_mac",
    "poly_hash",
    "verify",
]

#: The field's prime, the Mersenne prime 2^127 − 1.
P: Final = (1 << 127) - 1

#: Message block size: 15 bytes, so every block is below 2^120 < p.
BLOCK_BYTES: Final = 15

#: One-time MAC key: ``r`` (16 bytes) ‖ ``s`` (16 bytes).
KEY_BYTES: Final = 32

#: Tag size: one element of GF(p), big-endian.
TAG_BYTES: Final = 16


def poly_hash(r: int, message: bytes) -> int:
    """Evaluate the polynomial hash ``h_r(message)`` in GF(p) (Horner's rule).

    Args:
        r: the evaluation point, ``0 <= r < p``.
        message: any bytes.

    Returns:
        ``h_r(message)``, an integer in ``[0, p)``.
    """
    acc = 0
    for start in range(0, len(message), BLOCK_BYTES):
        block = message[start : start + BLOCK_BYTES].ljust(BLOCK_BYTES, b"\0")
        acc = (acc + int.from_bytes(block, "big")) * r % P
    return (acc + len(message)) * r % P


def one_time_mac(key: bytes, message: bytes) -> bytes:
    """Return the 16-byte tag of ``message`` under the one-time ``key``.

    Raises:
        ValueError: ``key`` is not :data:`KEY_BYTES` long.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"one-time MAC key must be {KEY_BYTES} bytes, not {len(key)}")
    r = int.from_bytes(key[:16], "big") % P
    s = int.from_bytes(key[16:], "big") % P
    return ((poly_hash(r, message) + s) % P).to_bytes(TAG_BYTES, "big")


def verify(key: bytes, message: bytes, tag: bytes) -> bool:
    """Whether ``tag`` authenticates ``message`` under ``key`` (constant-time compare)."""
    return hmac.compare_digest(one_time_mac(key, message), tag)


def forgery_bound(message_bytes: int) -> float:
    """Upper bound on one forgery attempt's success against messages of this size.

    ``(n+1)/p + 2^-126`` with ``n = ceil(message_bytes / 15)`` (docs/otp.md §5).
    """
    blocks = -(-message_bytes // BLOCK_BYTES) + 1
    return blocks / P + 2.0**-126
