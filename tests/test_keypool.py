"""Key pools as byte streams (qcall/qkd/keypool.py): cuts, derived key_IDs, exact accounting."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings, strategies as st

from qcall.qkd.keypool import (
    MAX_CUT_BYTES,
    KeyPool,
    PoolRole,
    block_ref,
    cut_key_id,
    parse_cut_key_id,
    ranges_mask,
)
from qcall.qkd.kme import random_keys
from qcall.typing import KeyId, SAEId

A, B = SAEId("alice"), SAEId("bob")


def pair(blocks: list[tuple[KeyId, bytes]]) -> tuple[KeyPool, KeyPool]:
    """The master and the slave pool of alice->bob, supplied alike."""
    master = KeyPool(A, B, PoolRole.MASTER, "KME-B")
    slave = KeyPool(A, B, PoolRole.SLAVE, "KME-A")
    for key_id, key in blocks:
        master.add(key_id, bytearray(key), 0.0)
        slave.add(key_id, bytearray(key), 0.0)
    return master, slave


def test_derived_key_id_layout() -> None:
    first = "6f1c2a44-0d5e-4b7a-9c1e-2f3a4b5c6d7e"
    key_id = cut_key_id(first, 16, 64, ["0e2d2b0c-1111-4222-8333-444455556666"])
    parsed = uuid.UUID(key_id)
    assert parsed.version == 8 and parsed.variant == uuid.RFC_4122
    ref, offset, length, _check = parse_cut_key_id(key_id) or (0, 0, 0, 0)
    assert (ref, offset, length) == (block_ref(first), 16, 64)
    # every part of the cut is bound: another offset, length or following block changes it
    assert cut_key_id(first, 17, 64, ["0e2d2b0c-1111-4222-8333-444455556666"]) != key_id
    assert cut_key_id(first, 16, 63, ["0e2d2b0c-1111-4222-8333-444455556666"]) != key_id
    assert cut_key_id(first, 16, 64, [str(uuid.uuid4())]) != key_id
    assert cut_key_id(first.upper(), 16, 64, ["0E2D2B0C-1111-4222-8333-444455556666"]) == key_id
    # the vectors of docs/etsi014.md, "Key sizes"
    assert key_id == "27f40dca-00b0-8d04-8004-001022e27765"
    assert cut_key_id(first, 0, 16) == "27f40dca-00b0-8d04-8000-000400ec475a"
    assert parse_cut_key_id(str(uuid.uuid4())) is None  # a version-4 key_ID is not a cut
    assert parse_cut_key_id("nonsense") is None
    with pytest.raises(ValueError):
        cut_key_id(first, 0, MAX_CUT_BYTES + 1)


def test_whole_blocks_keep_their_key_ids() -> None:
    blocks = random_keys(3, 256)
    master, slave = pair(blocks)
    got = master.issue(2, 32, now=1.0)
    assert got == blocks[:2]  # the supplier's key_IDs and bytes
    keys, missing = slave.redeem([blocks[1][0], blocks[0][0]])
    assert (keys, missing) == ([blocks[1][1], blocks[0][1]], [])
    assert slave.redeem([blocks[0][0]]) == ([], [blocks[0][0]])  # once only


def test_cuts_of_any_size_are_exact_and_found_by_the_slave() -> None:
    blocks = random_keys(8, 256)  # 256 bytes of pool
    stream = b"".join(k for _, k in blocks)
    master, slave = pair(blocks)
    sizes = [16, 64, 32, 9, 128]  # 128, 512, 256, 72, 1024 bits: 249 bytes
    issued = [master.issue(1, n, now=0.0)[0] for n in sizes]
    assert b"".join(k for _, k in issued) == stream[:249]  # each byte once, in order
    assert master.stored_bytes() == 7
    assert [len(k) for _, k in issued] == sizes
    # the slave finds every cut from its key_ID alone, in any order
    ids = [k for k, _ in reversed(issued)]
    keys, missing = slave.redeem(ids)
    assert missing == [] and keys == [k for _, k in reversed(issued)]
    assert slave.stored_bytes() == 7 and len(slave.blocks) == 1  # the last, partly used block
    assert slave.redeem(ids[:1]) == ([], ids[:1])
    with pytest.raises(ValueError, match="not enough"):
        master.issue(1, 8, now=0.0)  # 7 bytes left


def test_handed_out_bytes_are_zeroed_and_blocks_leave() -> None:
    blocks = random_keys(2, 256)
    master, _ = pair(blocks)
    held = master.blocks[blocks[0][0]].data
    master.issue(1, 40, now=0.0)  # all of block 0, 8 bytes of block 1
    assert blocks[0][0] not in master.blocks and held == bytes(32)
    rest = master.blocks[blocks[1][0]]
    assert rest.data[:8] == bytes(8) and rest.data[8:] == blocks[1][1][8:]
    assert rest.used_ranges() == [[0, 8]] and ranges_mask([[0, 8]], 32) == rest.used


def test_a_cut_over_blocks_the_slave_lacks_is_refused_not_wrong() -> None:
    """A block that reached one KME only: the check fails, no wrong key comes out."""
    blocks = random_keys(3, 256)
    extra = random_keys(1, 256)[0]
    master = KeyPool(A, B, PoolRole.MASTER, "KME-B")
    slave = KeyPool(A, B, PoolRole.SLAVE, "KME-A")
    for key_id, key in blocks:
        master.add(key_id, bytearray(key), 0.0)
    for key_id, key in [blocks[0], extra, blocks[1], blocks[2]]:
        slave.add(key_id, bytearray(key), 0.0)
    master.issue(1, 16, now=0.0)
    key_id, _key = master.issue(1, 32, now=0.0)[0]  # block 0 [16:32) + block 1 [0:16)
    assert slave.redeem([key_id]) == ([], [key_id])
    assert slave.stored_bytes() == 128  # nothing consumed


def test_overlapping_or_invented_cuts_are_refused() -> None:
    blocks = random_keys(2, 256)
    master, slave = pair(blocks)
    (first, _), (second, _) = master.issue(2, 16, now=0.0)
    # an SAE that saw `first` invents the cut after it: the check covers the
    # block's full key_ID, which derived key_IDs do not reveal
    value = uuid.UUID(first).int & ~(0xFFFF << 46) | (16 << 46)
    assert slave.redeem([KeyId(str(uuid.UUID(int=value)))])[1]  # refused
    # two key_IDs of one request may not share a byte
    whole = blocks[0][0]
    assert slave.redeem([first, whole])[1] == [whole]
    assert slave.redeem([first, second])[1] == []


def test_local_pool_keeps_issued_keys_for_the_slave() -> None:
    pool = KeyPool(A, B, PoolRole.LOCAL, "KME-A")
    blocks = random_keys(2, 256)
    for key_id, key in blocks:
        pool.add(key_id, bytearray(key), 10.0)
    ((kid, key),) = pool.issue(1, 48, now=20.0)
    assert pool.stored_bytes() == 16 and pool.held_bytes() == 64
    # expiry counts from the supply for blocks, from the issue for issued keys
    assert pool.expire(limit=15.0) == [blocks[1][0]] and pool.held_bytes() == 48
    assert pool.redeem([kid]) == ([key], []) and pool.held_bytes() == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 80), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
def test_every_byte_once_on_each_side(sizes: list[int], rnd: object) -> None:
    """Random sizes on the master, redeemed in random order on the slave: exact."""
    import random

    assert isinstance(rnd, random.Random)
    blocks = random_keys(20, 256)  # 640 bytes
    stream = b"".join(k for _, k in blocks)
    master, slave = pair(blocks)
    issued: list[tuple[KeyId, bytes]] = []
    for n in sizes:
        if master.stored_bytes() < n:
            break
        issued += master.issue(1, n, now=0.0)
    total = sum(len(k) for _, k in issued)
    assert b"".join(k for _, k in issued) == stream[:total]
    assert master.stored_bytes() == len(stream) - total
    order = list(issued)
    rnd.shuffle(order)
    while order:
        batch, order = order[:3], order[3:]
        keys, missing = slave.redeem([k for k, _ in batch])
        assert missing == [] and keys == [k for _, k in batch]
    assert slave.stored_bytes() == len(stream) - total
    for key_id, _ in issued:
        assert slave.redeem([key_id])[1] == [key_id]
