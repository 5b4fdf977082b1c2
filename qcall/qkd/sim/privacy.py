"""Privacy amplification by Toeplitz hashing.

A random ``m x n`` Toeplitz matrix over GF(2) is a 2-universal hash family
(Krawczyk, "LFSR-based hashing and authentication", CRYPTO '94; Carter &
Wegman 1979); by the leftover hash lemma (Impagliazzo, Levin, Luby 1989;
Renner, PhD thesis, ETH 2005, Cor. 5.6.1) it extracts ``m`` nearly uniform
bits from ``n`` bits about which Eve knows at most ``n - m - 2 log(1/eps)``.

The matrix is given by ``n + m - 1`` seed bits, ``T[i, j] = s[i - j + n - 1]``,
so ``y = T x`` is a slice of the integer convolution of ``s`` and ``x`` taken
mod 2: ``y[i] = (s * x)[i + n - 1] mod 2``. We compute the convolution with
a real FFT (float64 is exact here: every sum is an integer <= 2**22, far below
2**53, and chunks keep it so), i.e. O((n + m) log(n + m)) instead of O(n m).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["toeplitz_hash", "toeplitz_hash_reference"]

Bits = npt.NDArray[np.uint8]

#: Largest number of key bits convolved at once (keeps float64 exact and memory small).
CHUNK_BITS = 1 << 22


def _next_fast_len(n: int) -> int:
    """Smallest 2**a * 3**b >= n (fast sizes for pocketfft)."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def _conv_slice(seed: Bits, x: Bits, m: int) -> npt.NDArray[np.int64]:
    """Integer ``(seed * x)[len(x) - 1 : len(x) - 1 + m]`` via FFT."""
    n = x.size
    # A circular convolution of length >= len(seed) = n + m - 1 leaves the
    # outputs [n - 1, n - 1 + m) free of wrap-around terms.
    size = _next_fast_len(seed.size)
    fs = np.fft.rfft(seed.astype(np.float64), size)
    fx = np.fft.rfft(x.astype(np.float64), size)
    full = np.fft.irfft(fs * fx, size)
    return np.rint(full[n - 1 : n - 1 + m]).astype(np.int64)


def toeplitz_hash(bits: Bits, seed: Bits, m: int) -> Bits:
    """Return ``T(seed) @ bits mod 2``, an ``m``-bit array.

    Args:
        bits: the reconciled key, ``n`` values in {0, 1} (``uint8``).
        seed: ``n + m - 1`` random bits defining the Toeplitz matrix.
        m: output length (``m <= n`` for privacy amplification).

    Raises:
        ValueError: inconsistent lengths.
    """
    n = int(bits.size)
    if m < 0:
        raise ValueError(f"toeplitz_hash: output length m={m} must be >= 0")
    if seed.size != n + m - 1 and m > 0:
        raise ValueError(f"toeplitz_hash: seed has {seed.size} bits, need {n + m - 1}")
    if m == 0:
        return np.zeros(0, dtype=np.uint8)
    acc = np.zeros(m, dtype=np.int64)
    # Column chunks [j0, j1) of T are Toeplitz with seed s[n - j1 : n - j0 + m - 1].
    for j0 in range(0, n, CHUNK_BITS):
        j1 = min(n, j0 + CHUNK_BITS)
        acc += _conv_slice(seed[n - j1 : n - j0 + m - 1], bits[j0:j1], m)
    return (acc & 1).astype(np.uint8)


def toeplitz_hash_reference(bits: Bits, seed: Bits, m: int) -> Bits:
    """Straightforward O(n m) matrix product, for tests (small sizes only)."""
    n = int(bits.size)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    t = seed[i - j + n - 1].astype(np.int64)
    out: Bits = ((t @ bits.astype(np.int64)) & 1).astype(np.uint8)
    return out
