"""RFC 9162 Merkle trees: the CT reference vectors, corrupted proofs, and every small size."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest

from qcall.exceptions import LogProofError
from qcall.seal.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    mth,
    node_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from tests.utils import load_vectors

V = load_vectors("seal_merkle_rfc6962.json")
LEAVES = [bytes.fromhex(x) for x in V["leaves"]]
ROOTS = [bytes.fromhex(x) for x in V["roots"]]
SOME = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def tree_of(n: int) -> MerkleTree:
    return MerkleTree(leaf_hash(i.to_bytes(4, "big")) for i in range(n))


def test_hashes_are_domain_separated() -> None:
    assert EMPTY_ROOT.hex() == V["empty_root"]
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    expected = hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert node_hash(b"a" * 32, b"b" * 32) == expected
    assert MerkleTree().root() == EMPTY_ROOT == mth([])


def test_roots_match_the_reference_vectors() -> None:
    tree = MerkleTree(leaf_hash(x) for x in LEAVES)
    for n in range(1, 9):
        assert tree.root(n) == ROOTS[n - 1] == mth(LEAVES[:n])


@pytest.mark.parametrize("case", V["inclusion"], ids=lambda c: f"{c['index']}of{c['tree_size']}")
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    tree = MerkleTree(leaf_hash(x) for x in LEAVES)
    index, size = case["index"], case["tree_size"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert tree.inclusion_proof(index, size) == proof
    leaf, root = leaf_hash(LEAVES[index]), ROOTS[size - 1]
    verify_inclusion(leaf, index, size, proof, root)
    # The probes of the reference tests: each must fail.
    probes = [
        (leaf, index - 1, size, proof, root),
        (leaf, index + 1, size, proof, root),
        (leaf, index ^ 2, size, proof, root),
        (leaf, index, size * 2, proof, root),
        (leaf, index, size // 2, proof, root),
        (leaf_hash(b"WrongLeaf"), index, size, proof, root),
        (leaf, index, size, proof, EMPTY_ROOT),
        (leaf, index, size, proof, SOME),
        (leaf, index, size, [*proof, root], root),
        (leaf, index, size, [root, *proof], root),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 8]) + bad[i][1:]
        probes.append((leaf, index, size, bad, root))
    if proof:
        probes.append((leaf, index, size, proof[:-1], root))
    if len(proof) > 1:
        probes.append((leaf, index, size, [SOME, *proof[1:]], root))
    for probe in probes:
        if probe[1] < 0:
            continue
        with pytest.raises(LogProofError):
            verify_inclusion(*probe)


@pytest.mark.parametrize("case", V["consistency"], ids=lambda c: f"{c['first']}to{c['second']}")
def test_consistency_vectors(case: dict[str, Any]) -> None:
    tree = MerkleTree(leaf_hash(x) for x in LEAVES)
    m, n = case["first"], case["second"]
    proof = [bytes.fromhex(h) for h in case["proof"]]
    assert tree.consistency_proof(m, n) == proof
    r1, r2 = ROOTS[m - 1], ROOTS[n - 1]
    verify_consistency(m, n, r1, r2, proof)
    if not proof:
        return
    probes = [
        (m - 1, n, r1, r2, proof),
        (m + 1, n, r1, r2, proof),
        (m ^ 2, n, r1, r2, proof),
        (m, n * 2, r1, r2, proof),
        (m, n // 2, r1, r2, proof),
        (m, n, SOME, r2, proof),
        (m, n, r1, SOME, proof),
        (m, n, r2, r1, proof),
        (m, n, r1, r2, []),
        (m, n, r1, r2, [*proof, r1]),
        (m, n, r1, r2, [*proof, r2]),
        (m, n, r1, r2, [r1, *proof]),
        (m, n, r1, r2, [r2, *proof]),
        (m, n, r1, r2, [proof[0], *proof]),
        (m, n, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 16]) + bad[i][1:]
        probes.append((m, n, r1, r2, bad))
    for probe in probes:
        with pytest.raises(LogProofError):
            verify_consistency(*probe)


def test_trivial_consistency_rules() -> None:
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, SOME, [])
    verify_consistency(3, 3, SOME, SOME, [])
    with pytest.raises(LogProofError, match="two different roots for the same tree size 3"):
        verify_consistency(3, 3, SOME, EMPTY_ROOT, [])
    with pytest.raises(LogProofError, match="must be empty"):
        verify_consistency(0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    with pytest.raises(LogProofError, match="cannot extend"):
        verify_consistency(2, 1, SOME, SOME, [SOME])
    with pytest.raises(LogProofError, match="33 bytes"):
        verify_consistency(1, 2, SOME, SOME, [SOME + b"x"])
    with pytest.raises(LogProofError, match="not in a tree"):
        root_from_inclusion_proof(SOME, 0, 0, [])


def test_every_proof_of_small_trees_verifies() -> None:
    tree = tree_of(40)
    leaves = [i.to_bytes(4, "big") for i in range(40)]
    for n in range(1, 41):
        root = tree.root(n)
        assert root == mth(leaves[:n])
        for i in range(n):
            verify_inclusion(tree.leaf(i), i, n, tree.inclusion_proof(i, n), root)
        for m in range(0, n + 1):
            verify_consistency(m, n, tree.root(m), root, tree.consistency_proof(m, n))


def test_append_extend_and_truncate_agree() -> None:
    rng = random.Random(7)
    hashes = [leaf_hash(rng.randbytes(8)) for _ in range(1000)]
    a = MerkleTree()
    for h in hashes:
        a.append(h)
    b = MerkleTree()
    i = 0
    while i < len(hashes):
        step = rng.randint(1, 90)
        b.extend(hashes[i : i + step])
        i += step
    assert a.size == b.size == 1000
    for n in (1, 2, 3, 511, 512, 513, 999, 1000):
        assert a.root(n) == b.root(n)
    root_700 = a.root(700)
    a.truncate(700)
    assert a.size == 700 and a.root() == root_700
    a.extend(hashes[700:])
    assert a.root() == b.root()


def test_proof_size_grows_as_log_n() -> None:
    tree = tree_of(5000)
    assert len(tree.inclusion_proof(1234)) == 13  # ceil(log2 5000)
    assert len(tree.inclusion_proof(4999)) <= 13


def test_bad_arguments() -> None:
    tree = tree_of(4)
    with pytest.raises(ValueError, match=r"not in 0\.\.4"):
        tree.root(5)
    with pytest.raises(ValueError, match="leaf 4 is not in a tree of 4"):
        tree.inclusion_proof(4)
    with pytest.raises(ValueError, match="32 bytes"):
        tree.append(b"short")
    with pytest.raises(IndexError):
        tree.leaf(9)
