"""Verification of reconciled keys by a universal hash.

After Cascade, Alice picks a fresh random ``64 x n`` Toeplitz matrix (seed of
``n + 63`` bits), sends it with her 64-bit tag, and Bob compares with his own
tag. Toeplitz matrices form a universal family, so two different keys collide
with probability at most ``2**-64`` (Krawczyk 1994; the "error verification"
step of e.g. Fung, Ma, Chau, PRA 81, 012318 (2010)). The 64 tag bits are
public and are subtracted from the final key length.

The tag is the same function as :func:`qcall.qkd.sim.privacy.toeplitz_hash`
with ``m = 64``; here it is 64 BLAS dot products over sliding windows of the
reversed seed, which is much faster than an FFT for so few rows.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["TAG_BITS", "verification_tag"]

Bits = npt.NDArray[np.uint8]

TAG_BITS = 64


def verification_tag(bits: Bits, seed: Bits) -> int:
    """Return the 64-bit Toeplitz hash of ``bits`` (bit i of the tag is row i).

    Args:
        bits: ``n`` key bits (``uint8`` 0/1).
        seed: ``n + 63`` random bits.

    Raises:
        ValueError: the seed length does not match.
    """
    n = int(bits.size)
    if seed.size != n + TAG_BITS - 1:
        raise ValueError(f"verification_tag: seed has {seed.size} bits, need {n + TAG_BITS - 1}")
    # float32 sums of 0/1 are exact below 2**24.
    dtype = np.float32 if n < (1 << 24) else np.float64
    x = bits.astype(dtype)
    r = seed[::-1].astype(dtype)
    tag = 0
    for i in range(TAG_BITS):
        start = TAG_BITS - 1 - i
        tag |= (int(np.dot(x, r[start : start + n])) & 1) << i
    return tag
