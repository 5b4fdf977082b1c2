"""Tests for qcall.qkd.sim.privacy (Toeplitz hashing) and .verify (universal hash)."""

from __future__ import annotations

import numpy as np
import pytest

import qcall.qkd.sim.privacy as privacy
from qcall.qkd.sim.privacy import toeplitz_hash, toeplitz_hash_reference
from qcall.qkd.sim.verify import verification_tag


def bits(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, n, dtype=np.uint8)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 1), (17, 5), (64, 64), (1000, 333),
                                      (4096, 4096), (5000, 1)])
def test_fft_matches_matrix_product(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 7 + m)
    x, s = bits(rng, n), bits(rng, n + m - 1)
    assert np.array_equal(toeplitz_hash(x, s, m), toeplitz_hash_reference(x, s, m))


def test_chunked_columns_match(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x, s = bits(rng, 3000), bits(rng, 3000 + 700 - 1)
    whole = toeplitz_hash(x, s, 700)
    monkeypatch.setattr(privacy, "CHUNK_BITS", 256)
    assert np.array_equal(toeplitz_hash(x, s, 700), whole)
    assert np.array_equal(whole, toeplitz_hash_reference(x, s, 700))


def test_matrix_is_toeplitz_and_linear() -> None:
    rng = np.random.default_rng(4)
    n, m = 40, 12
    s = bits(rng, n + m - 1)
    cols = [toeplitz_hash(np.eye(n, dtype=np.uint8)[j], s, m) for j in range(n)]
    t = np.stack(cols, axis=1)
    assert np.array_equal(t[1:, 1:], t[:-1, :-1])  # constant diagonals
    x, y = bits(rng, n), bits(rng, n)
    both = toeplitz_hash(x, s, m) ^ toeplitz_hash(y, s, m)
    assert np.array_equal(toeplitz_hash(x ^ y, s, m), both)


def test_universal_collision_rate() -> None:
    # For fixed x != y, Pr_seed[T x == T y] = 2**-m for a Toeplitz family.
    rng = np.random.default_rng(5)
    n, m, trials = 200, 4, 3000
    x = bits(rng, n)
    y = x.copy()
    y[17] ^= 1
    y[150] ^= 1
    hits = 0
    for _ in range(trials):
        s = bits(rng, n + m - 1)
        hits += bool(np.array_equal(toeplitz_hash(x, s, m), toeplitz_hash(y, s, m)))
    assert abs(hits / trials - 1 / 16) < 5 * np.sqrt((1 / 16) * (15 / 16) / trials)


def test_output_is_balanced() -> None:
    rng = np.random.default_rng(6)
    x = bits(rng, 50_000)
    out = toeplitz_hash(x, bits(rng, 50_000 + 20_000 - 1), 20_000)
    assert out.size == 20_000
    assert abs(out.mean() - 0.5) < 5 * 0.5 / np.sqrt(20_000)


def test_length_checks() -> None:
    x = np.zeros(10, dtype=np.uint8)
    with pytest.raises(ValueError, match="output length"):
        toeplitz_hash(x, np.zeros(30, np.uint8), -1)
    with pytest.raises(ValueError, match="seed"):
        toeplitz_hash(x, np.zeros(5, np.uint8), 3)
    assert toeplitz_hash(x, np.zeros(0, np.uint8), 0).size == 0
    with pytest.raises(ValueError, match="seed"):
        verification_tag(x, np.zeros(10, np.uint8))


def test_verification_tag_is_the_64_row_toeplitz_hash() -> None:
    rng = np.random.default_rng(7)
    for n in (1, 100, 12_345):
        x, s = bits(rng, n), bits(rng, n + 63)
        rows = toeplitz_hash(x, s, 64)
        assert verification_tag(x, s) == sum(int(b) << i for i, b in enumerate(rows))


def test_verification_tag_detects_single_bit_differences() -> None:
    rng = np.random.default_rng(8)
    x = bits(rng, 10_000)
    for pos in rng.integers(0, 10_000, 50):
        y = x.copy()
        y[pos] ^= 1
        s = bits(rng, 10_063)
        assert verification_tag(x, s) != verification_tag(y, s)
