"""RFC 9162 Merkle tree hashes and proofs, Sans-I/O.

Certificate Transparency 2.0 (RFC 9162, section 2.1), with SHA-256 as in every CT log:

* **Leaf hash** ``HASH(0x00 ‖ d)`` and **node hash** ``HASH(0x01 ‖ left ‖ right)``
  (§2.1.1, the domain separation of RFC 6962 §2.1);
* **MTH** of ``n`` leaves: ``k`` is the largest power of two smaller than ``n``,
  ``MTH(D[n]) = HASH(0x01 ‖ MTH(D[0:k]) ‖ MTH(D[k:n]))``; ``MTH({})`` = ``HASH()``;
* **inclusion proofs** ``PATH(m, D[n])`` (§2.1.3.1) and their verification (§2.1.3.2);
* **consistency proofs** ``PROOF(m, D[n])`` (§2.1.4.1) and their verification (§2.1.4.2).

:class:`MerkleTree` is an append-only tree that keeps the hash of every *perfect*
subtree (``2**j`` leaves starting at a multiple of ``2**j``), one flat ``bytearray``
per level: appending a leaf costs one node hash (amortised), and any MTH, path or
proof for any size up to the current one takes ``O(log n)`` hashes, since every
subtree RFC 9162 splits off is perfect except along the right edge. A tree of
10**6 leaves holds 64 MB and builds in about two seconds (``scripts/bench_seal.py``).

The verification functions are the pure RFC algorithms; they take the proof as a
list of 32-byte hashes and raise :class:`~qcall.exceptions.LogProofError`
naming what failed. They are checked against the CT reference implementation's
vectors (``tests/vectors/seal_merkle_rfc6962.json``) and against an independent
reimplementation (``tests/test_seal_interop.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from qcall.exceptions import LogProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "leaf_hash",
    "mth",
    "node_hash",
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_inclusion",
]

#: Output length of SHA-256: every leaf, node and root hash.
HASH_SIZE = 32
#: ``MTH({})``, the root of the empty tree: SHA-256 of the empty string (§2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()
#: Largest tree size accepted by the verifiers (2**63 - 1, a signed u64).
MAX_TREE_SIZE = (1 << 63) - 1

_LEAF = b"\x00"
_NODE = b"\x01"
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """``HASH(0x00 ‖ data)`` (RFC 9162 §2.1.1)."""
    return _sha256(_LEAF + data).digest()


def node_hash(left: bytes | bytearray, right: bytes | bytearray) -> bytes:
    """``HASH(0x01 ‖ left ‖ right)`` (RFC 9162 §2.1.1)."""
    return _sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def mth(leaves: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf *inputs*, straight from the definition.

    Quadratic-free but recursive: meant for tests and small lists; use
    :class:`MerkleTree` for a log.
    """
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = _split(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


class MerkleTree:
    """An append-only Merkle tree of leaf hashes (RFC 9162 §2.1), pure and in memory.

    Args:
        leaf_hashes: initial leaf hashes (32 bytes each), in log order.
    """

    __slots__ = ("_levels", "_size")

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    def __repr__(self) -> str:
        return f"MerkleTree(size={self._size})"

    def __len__(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    # --- growing and shrinking ------------------------------------------------------

    def append(self, leaf: bytes) -> int:
        """Append one leaf hash; return its index."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf)}")
        index = self._size
        self._levels[0] += leaf
        self._size += 1
        level, n = 0, self._size
        while n % 2 == 0:  # a new perfect subtree completes at the next level
            row = self._levels[level]
            h = node_hash(row[-2 * HASH_SIZE : -HASH_SIZE], row[-HASH_SIZE:])
            level += 1
            n //= 2
            if level == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level] += h
        return index

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Append many leaf hashes, one level at a time (the fast path for bulk loads)."""
        added = bytearray()
        for leaf in leaves:
            if len(leaf) != HASH_SIZE:
                raise ValueError(f"leaf hash must be {HASH_SIZE} bytes, got {len(leaf)}")
            added += leaf
        if not added:
            return
        self._levels[0] += added
        self._size += len(added) // HASH_SIZE
        level = 0
        while (self._size >> (level + 1)) > 0:
            row = self._levels[level]
            if level + 1 == len(self._levels):
                self._levels.append(bytearray())
            parent = self._levels[level + 1]
            have, want = len(parent) // HASH_SIZE, self._size >> (level + 1)
            if have == want:
                break
            mv = memoryview(row)
            parent += b"".join(
                _sha256(_NODE + mv[2 * i * HASH_SIZE : (2 * i + 2) * HASH_SIZE]).digest()
                for i in range(have, want)
            )
            level += 1

    def truncate(self, size: int) -> None:
        """Forget every leaf from ``size`` on (undo of an append whose commit failed)."""
        if not 0 <= size <= self._size:
            raise ValueError(f"cannot truncate a tree of {self._size} leaves to {size}")
        for level, row in enumerate(self._levels):
            del row[(size >> level) * HASH_SIZE :]
        self._size = size

    # --- hashes -----------------------------------------------------------------------

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        if not 0 <= index < self._size:
            raise IndexError(f"leaf {index} is not in a tree of {self._size}")
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        """``MTH(D[start:end])`` for ``0 <= start < end <= size``."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:  # a perfect, aligned subtree: stored
            level = n.bit_length() - 1
            i = start >> level
            return bytes(self._levels[level][i * HASH_SIZE : (i + 1) * HASH_SIZE])
        k = _split(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"tree size {size} is not in 0..{self._size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        """``MTH(D[size])``: the root of the first ``size`` leaves (default: all)."""
        size = self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    # --- proofs -----------------------------------------------------------------------

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """``PATH(index, D[size])`` (RFC 9162 §2.1.3.1), from the leaf up."""
        size = self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size}")
        proof: list[bytes] = []
        self._path(index, 0, size, proof)
        return proof

    def _path(self, m: int, start: int, end: int, out: list[bytes]) -> None:
        n = end - start
        if n == 1:
            return
        k = _split(n)
        if m < k:
            self._path(m, start, start + k, out)
            out.append(self._subtree(start + k, end))
        else:
            self._path(m - k, start + k, end, out)
            out.append(self._subtree(start, start + k))

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """``PROOF(first, D[second])`` (RFC 9162 §2.1.4.1); empty when ``first`` is 0
        or equals ``second``."""
        second = self._check_size(second)
        if not 0 <= first <= second:
            raise ValueError(f"first size {first} is not in 0..{second}")
        proof: list[bytes] = []
        if 0 < first < second:
            self._subproof(first, 0, second, True, proof)
        return proof

    def _subproof(self, m: int, start: int, end: int, whole: bool, out: list[bytes]) -> None:
        n = end - start
        if m == n:
            if not whole:
                out.append(self._subtree(start, end))
            return
        k = _split(n)
        if m <= k:
            self._subproof(m, start, start + k, whole, out)
            out.append(self._subtree(start + k, end))
        else:
            self._subproof(m - k, start + k, end, False, out)
            out.append(self._subtree(start, start + k))


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ------------------------------------------


def _check_hashes(what: str, hashes: Sequence[bytes]) -> None:
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise LogProofError(f"{what}[{i}] is {len(h)} bytes, not {HASH_SIZE}")


def root_from_inclusion_proof(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes]
) -> bytes:
    """The root that ``proof`` leads to from ``leaf`` at ``index`` (§2.1.3.2, steps 1-4).

    Raises:
        LogProofError: the index is outside the tree, or the proof has the wrong
            length for this index and size.
    """
    if not 0 <= index < tree_size <= MAX_TREE_SIZE:
        raise LogProofError(f"leaf index {index} is not in a tree of size {tree_size}")
    if len(leaf) != HASH_SIZE:
        raise LogProofError(f"leaf hash is {len(leaf)} bytes, not {HASH_SIZE}")
    _check_hashes("inclusion proof", proof)
    fn, sn = index, tree_size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise LogProofError(
                f"inclusion proof is too long: {len(proof)} hashes for leaf {index} "
                f"of a tree of size {tree_size}"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise LogProofError(
            f"inclusion proof is too short: {len(proof)} hashes for leaf {index} "
            f"of a tree of size {tree_size}"
        )
    return r


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    Raises:
        LogProofError: naming why (bad size or length, or the root differs).
    """
    got = root_from_inclusion_proof(leaf, index, tree_size, proof)
    if got != root:
        raise LogProofError(
            f"inclusion proof for leaf {index} leads to root {got.hex()[:16]}…, "
            f"not the tree head's {root.hex()[:16]}… (size {tree_size})"
        )


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``second`` leaves extends the tree of ``first`` (§2.1.4.2).

    ``first == second`` needs an empty proof and equal roots; ``first == 0`` needs an
    empty proof (every tree extends the empty one).

    Raises:
        LogProofError: naming why the proof fails (a rewritten or forked history).
    """
    if not 0 <= first <= second <= MAX_TREE_SIZE:
        raise LogProofError(f"tree size {second} cannot extend a tree of size {first}")
    _check_hashes("consistency proof", proof)
    if first == 0 or first == second:
        if proof:
            raise LogProofError(
                f"consistency proof from {first} to {second} must be empty, has {len(proof)}"
            )
        if first == second and first_root != second_root:
            raise LogProofError(
                f"two different roots for the same tree size {first}: "
                f"{first_root.hex()[:16]}… and {second_root.hex()[:16]}…"
            )
        return
    if not proof:  # step 1
        raise LogProofError(f"consistency proof from {first} to {second} is empty")
    path = list(proof)
    if first & (first - 1) == 0:  # step 2: first is an exact power of 2
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            raise LogProofError(f"consistency proof from {first} to {second} is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # step 7
    if sn != 0:
        raise LogProofError(f"consistency proof from {first} to {second} is too short")
    if fr != first_root:
        raise LogProofError(
            f"consistency proof does not lead to the root of size {first}: the log "
            "rewrote its history"
        )
    if sr != second_root:
        raise LogProofError(
            f"consistency proof does not lead to the root of size {second}: the log "
            "rewrote its history"
        )
