"""Key pools as byte streams: keys of any size cut from the supplied keys, alike on both KMEs.

A pool (:class:`KeyPool`) holds the keys one KME keeps for one ordered SAE
pair (master → slave). What is supplied to it — by the relay, a key file or
``random_keys`` — are *blocks*: ``(key_ID, bytes)`` pairs, kept in supply
order. What ETSI GS QKD 014 delivers are *keys* of the size an SAE asks for
(6.2 ``size``, any multiple of 8 between ``min_key_size`` and
``max_key_size``). A key is a *cut*: ``n`` consecutive bytes of the pool
starting at byte ``o`` of a block ``B0`` and running on, if the block ends
first, into the next blocks ``B1 … Bk`` in supply order.

Accounting is exact: a key of ``n`` bytes consumes exactly ``n`` bytes of the
pool, every byte is handed out at most once on each side of a pair, and a
handed-out byte is overwritten with zeros at once (a block leaves the pool
when its last byte has gone).

The master side (``master`` and ``local`` pools) cuts keys from the front of
the stream, oldest bytes first (:meth:`KeyPool.issue`). The slave side finds
the same bytes from the key_ID alone (:meth:`KeyPool.redeem`), with no
message between the two KMEs, because the key_ID names the cut:

* a cut that is exactly one whole block keeps that block's key_ID (so keys of
  the supplied size, taken whole, keep the supplier's key_IDs);
* any other cut gets a *derived key_ID*, an RFC 9562 version-8 UUID whose
  128 bits are, most significant first::

      ref[0:48] | 0b1000 | ref[48:60] | 0b10 | o (16) | n (16) | check (30)

  with ``ref`` the first 60 bits of SHA-256(``"qcall-kme-block/1"`` 0x00
  ``id(B0)``), ``o`` and ``n`` in bytes, and ``check`` the first 30 bits of
  SHA-256(``"qcall-kme-cut/1"`` 0x00 ``id(B0)`` 0x00 ``o`` (2 bytes, big
  endian) ``n`` (2 bytes) then 0x00 ``id(Bi)`` for each following block).
  ``id(B)`` is the block's key_ID as lower-case ASCII text.

The slave finds ``B0`` by ``ref``, walks its own blocks in supply order from
there, recomputes ``check`` over the blocks it would use and hands the bytes
out only if it matches and none of them was handed out before. If the two
KMEs' pools differ (a block that reached only one side), the check fails and
the answer is "key_ID not found", never a wrong key. ``check`` also stops an
SAE from inventing cuts: it covers the full key_IDs of the blocks, which
derived key_IDs do not reveal.

Everything here is pure (no I/O, no clock); :class:`qcall.qkd.kme.KME` holds
one :class:`KeyPool` per pair and :mod:`qcall.qkd.kmestore` records their
changes.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from qcall.typing import KeyId, SAEId

__all__ = [
    "MAX_BLOCK_BYTES",
    "MAX_CUT_BYTES",
    "Block",
    "KeyPool",
    "PoolRole",
    "block_ref",
    "cut_key_id",
    "parse_cut_key_id",
    "ranges_mask",
]

#: Largest supplied key (block), in bytes: an offset into it fits in 16 bits.
MAX_BLOCK_BYTES: Final = 0xFFFF

#: Largest key cut from a pool, in bytes (524,280 bits): its length fits in 16 bits.
MAX_CUT_BYTES: Final = 0xFFFF

_BLOCK_LABEL: Final = b"qcall-kme-block/1\x00"
_CUT_LABEL: Final = b"qcall-kme-cut/1\x00"


class PoolRole(enum.Enum):
    """Which side(s) of a pair a KME serves."""

    #: The master SAE is attached here: keys go out through ``enc_keys``.
    MASTER = "master"
    #: The slave SAE is attached here: keys go out through ``dec_keys``.
    SLAVE = "slave"
    #: Both SAEs are attached here: ``enc_keys`` first, then ``dec_keys``.
    LOCAL = "local"


def block_ref(block_id: str) -> int:
    """Return the 60-bit reference to a block that derived key_IDs carry."""
    digest = hashlib.sha256(_BLOCK_LABEL + block_id.lower().encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") >> 4


def _check(first: str, offset: int, length: int, following: Iterable[str]) -> int:
    h = hashlib.sha256(_CUT_LABEL + first.lower().encode("ascii"))
    h.update(offset.to_bytes(2, "big") + length.to_bytes(2, "big"))
    for block_id in following:
        h.update(b"\x00" + block_id.lower().encode("ascii"))
    return int.from_bytes(h.digest()[:4], "big") >> 2


def cut_key_id(first: str, offset: int, length: int, following: Sequence[str] = ()) -> KeyId:
    """Return the key_ID of a cut (see the module docstring).

    Args:
        first: key_ID of the block the cut starts in.
        offset: first byte of the cut in that block.
        length: length of the cut, in bytes (1..:data:`MAX_CUT_BYTES`).
        following: key_IDs of the further blocks the cut runs into, in order.

    Raises:
        ValueError: ``offset`` or ``length`` out of range.
    """
    if not 0 <= offset < MAX_BLOCK_BYTES or not 0 < length <= MAX_CUT_BYTES:
        raise ValueError("cut offset or length out of range")
    ref = block_ref(first)
    value = (ref >> 12) << 80  # ref[0:48]
    value |= 0x8 << 76  # version 8
    value |= (ref & 0xFFF) << 64  # ref[48:60]
    value |= 0b10 << 62  # RFC 9562 variant
    value |= offset << 46
    value |= length << 30
    value |= _check(first, offset, length, following)
    return KeyId(str(uuid.UUID(int=value)))


def parse_cut_key_id(key_id: str) -> tuple[int, int, int, int] | None:
    """Return ``(ref, offset, length, check)`` of a derived key_ID, or ``None`` if it is not one."""
    try:
        value = uuid.UUID(key_id).int
    except ValueError:
        return None
    if (value >> 76) & 0xF != 0x8 or (value >> 62) & 0b11 != 0b10:
        return None
    ref = ((value >> 80) << 12) | ((value >> 64) & 0xFFF)
    return ref, (value >> 46) & 0xFFFF, (value >> 30) & 0xFFFF, value & (2**30 - 1)


@dataclass(slots=True, eq=False)
class Block:
    """One supplied key, in a pool.

    Attributes:
        key_id: its key_ID, as supplied.
        data: its bytes; handed-out bytes are zero.
        added: when it was supplied (for expiry).
        used: bit ``i`` set: byte ``i`` was handed out.
        ref: :func:`block_ref` of its key_ID.
    """

    key_id: KeyId
    data: bytearray = field(repr=False)
    added: float
    used: int = 0
    ref: int = field(default=0, repr=False)
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)

    @property
    def left(self) -> int:
        """How many of its bytes were not handed out yet."""
        return len(self.data) - self.used.bit_count()

    def used_ranges(self) -> list[list[int]]:
        """The handed-out bytes as ``[[start, end), …]`` (for the state file)."""
        out: list[list[int]] = []
        used, i = self.used, 0
        while used >> i:
            if (used >> i) & 1:
                j = i
                while (used >> j) & 1:
                    j += 1
                out.append([i, j])
                i = j
            else:
                i += 1
        return out


def ranges_mask(ranges: object, size: int) -> int:
    """Return the bitmask of ``[[start, end), …]`` within ``size`` bytes, or raise ValueError."""
    if not isinstance(ranges, list):
        raise ValueError("used ranges must be a list")
    mask = 0
    for item in ranges:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("a used range must be [start, end]")
        start, end = item
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= size):
            raise ValueError(f"used range {item!r} is outside the {size} bytes of the key")
        mask |= ((1 << (end - start)) - 1) << start
    return mask


def _mask(start: int, end: int) -> int:
    return ((1 << (end - start)) - 1) << start


#: One piece of a cut: (block, first byte, end byte).
Segment = tuple[Block, int, int]


class KeyPool:
    """The keys of one ordered pair (master SAE → slave SAE) at one KME.

    Args:
        master, slave: the SAE IDs.
        role: which side(s) this KME serves.
        peer_kme_id: the KME hosting the other SAE.

    Master side (``master``/``local``): :meth:`issue` cuts keys from the front.
    Slave side (``slave``): :meth:`redeem` finds a cut from its key_ID. A
    ``local`` pool keeps what it issued in :attr:`issued` until the slave
    redeems it. Both methods are all-or-nothing.
    """

    def __init__(self, master: SAEId, slave: SAEId, role: PoolRole, peer_kme_id: str) -> None:
        self.master = master
        self.slave = slave
        self.role = role
        self.peer_kme_id = peer_kme_id
        #: Supplied keys still (partly) in the pool, in supply order.
        self.blocks: OrderedDict[KeyId, Block] = OrderedDict()
        #: ``local`` pools: keys issued to the master, waiting for the slave: key_ID → (key, when).
        self.issued: dict[KeyId, tuple[bytearray, float]] = {}
        self._refs: dict[int, KeyId] = {}
        self._tail: Block | None = None
        self._stored = 0  # sum of Block.left
        self._issued_bytes = 0  # sum of the issued keys' sizes
        self.alarm: str | None = None
        self.qber: float | None = None

    def __repr__(self) -> str:
        return (
            f"KeyPool({self.master}->{self.slave}, {self.role.value}, "
            f"blocks={len(self.blocks)}, bytes={self.stored_bytes()})"
        )

    # --- accounting ---------------------------------------------------------------

    def stored_bytes(self) -> int:
        """Bytes this side can still hand out (``issued`` keys excluded)."""
        return self._stored

    def held_bytes(self) -> int:
        """Bytes held in memory: blocks plus issued keys waiting for the slave."""
        return self._stored + self._issued_bytes

    @property
    def dec(self) -> Mapping[KeyId, object]:
        """What ``dec_keys`` finds by key_ID: blocks (``slave``) or issued keys (``local``)."""
        return self.blocks if self.role is PoolRole.SLAVE else self.issued

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.blocks or key_id in self.issued

    # --- blocks -------------------------------------------------------------------

    def add(self, key_id: KeyId, data: bytearray, added: float, used: int = 0) -> None:
        """Append a block (its bytes are taken over, not copied).

        Raises:
            ValueError: the key_ID is in the pool already, or (with odds of
                2**-60 per pair of blocks) its reference collides.
        """
        if key_id in self:
            raise ValueError(f"key_ID {key_id} is already in pool {self.master}->{self.slave}")
        ref = block_ref(key_id)
        if ref in self._refs:
            raise ValueError(f"key_ID {key_id} collides with {self._refs[ref]}: supply another")
        block = Block(key_id, data, added, used, ref, prev=self._tail)
        if self._tail is not None:
            self._tail.next = block
        self._tail = block
        self.blocks[key_id] = block
        self._refs[ref] = key_id
        self._stored += block.left

    def add_issued(self, key_id: KeyId, key: bytearray, when: float) -> None:
        """Put back a key issued to the master and waiting for the slave (loading a state)."""
        if key_id in self:
            raise ValueError(f"key_ID {key_id} is already in pool {self.master}->{self.slave}")
        self.issued[key_id] = (key, when)
        self._issued_bytes += len(key)

    def remove(self, block: Block) -> None:
        """Take a block out of the pool and overwrite its bytes."""
        del self.blocks[block.key_id]
        del self._refs[block.ref]
        self._stored -= block.left
        if block.prev is not None:
            block.prev.next = block.next
        if block.next is not None:
            block.next.prev = block.prev
        if self._tail is block:
            self._tail = block.prev
        block.prev = block.next = None
        block.data[:] = bytes(len(block.data))

    def erase(self, key_id: KeyId) -> bool:
        """Erase the block or issued key ``key_id``; return whether there was one."""
        block = self.blocks.get(key_id)
        if block is not None:
            self.remove(block)
        elif key_id in self.issued:
            self._erase_issued(key_id)
        else:
            return False
        return True

    def expire(self, limit: float) -> list[KeyId]:
        """Erase blocks supplied and keys issued before ``limit``; return their key_IDs."""
        old = [b for b in self.blocks.values() if b.added < limit]
        for block in old:
            self.remove(block)
        gone = [k for k, (_, when) in self.issued.items() if when < limit]
        for key_id in gone:
            self._erase_issued(key_id)
        return [b.key_id for b in old] + gone

    # --- master side --------------------------------------------------------------

    def issue(self, number: int, size: int, now: float) -> list[tuple[KeyId, bytes]]:
        """Cut ``number`` keys of ``size`` bytes from the front of the pool.

        A ``local`` pool keeps a copy of each in :attr:`issued` for the slave.

        Raises:
            ValueError: fewer than ``number * size`` bytes stored, a size out of
                range, or (a supplier reusing old key_IDs) a derived key_ID
                that is already issued; nothing is consumed then.
        """
        if self.role is PoolRole.SLAVE:
            raise ValueError("a slave pool does not issue keys")
        if not 0 < size <= MAX_CUT_BYTES:
            raise ValueError(f"key size {size} bytes is out of range")
        if self.stored_bytes() < number * size:
            raise ValueError(f"not enough key bytes for {number} keys of {size} bytes")
        blocks: Iterator[Block] = iter(self.blocks.values())
        block: Block | None = None
        start = 0
        plan: list[tuple[KeyId, list[Segment]]] = []
        for _ in range(number):
            segments: list[Segment] = []
            need = size
            while need:
                if block is None or start == len(block.data):
                    block = next(blocks)
                    start = block.used.bit_count()  # master side: a prefix is used
                take = min(need, len(block.data) - start)
                segments.append((block, start, start + take))
                start += take
                need -= take
            plan.append((_segments_key_id(segments), segments))
        ids = [key_id for key_id, _ in plan]
        if len(set(ids)) != len(ids) or any(k in self.issued for k in ids):
            raise ValueError("a derived key_ID is already issued (key_IDs reused by the supplier)")
        out: list[tuple[KeyId, bytes]] = []
        for key_id, segments in plan:
            key = self._consume(segments)
            if self.role is PoolRole.LOCAL:
                self.issued[key_id] = (bytearray(key), now)
                self._issued_bytes += len(key)
            out.append((key_id, key))
        return out

    # --- slave side ---------------------------------------------------------------

    def redeem(self, key_ids: Sequence[KeyId]) -> tuple[list[bytes], list[KeyId]]:
        """Hand out the keys with ``key_ids`` (slave side), all or nothing.

        Returns:
            ``(keys, [])`` with the keys in the order of ``key_ids``; or
            ``([], missing)`` if some are unknown, already handed out, or
            overlap another of ``key_ids`` — then nothing is consumed.
        """
        if self.role is PoolRole.MASTER:
            return [], list(key_ids)
        if self.role is PoolRole.LOCAL:
            missing = [k for k in key_ids if k not in self.issued]
            if missing:
                return [], missing
            return [self._erase_issued(k) for k in key_ids], []
        plans: list[list[Segment]] = []
        missing = []
        taken: dict[KeyId, int] = {}  # block key_ID -> bytes claimed by this request
        for key_id in key_ids:
            segments = self._find(key_id)
            if segments is None or any(
                (b.used | taken.get(b.key_id, 0)) & _mask(s, e) for b, s, e in segments
            ):
                missing.append(key_id)
                continue
            for b, s, e in segments:
                taken[b.key_id] = taken.get(b.key_id, 0) | _mask(s, e)
            plans.append(segments)
        if missing:
            return [], missing
        return [self._consume(segments) for segments in plans], []

    def _find(self, key_id: KeyId) -> list[Segment] | None:
        """Return the cut that ``key_id`` names in this pool, or ``None``."""
        block = self.blocks.get(key_id)
        if block is not None:
            return [(block, 0, len(block.data))]
        parsed = parse_cut_key_id(key_id)
        if parsed is None:
            return None
        ref, offset, length, check = parsed
        first = self._refs.get(ref)
        if first is None or length == 0:
            return None
        cur: Block | None = self.blocks[first]
        if offset >= len(self.blocks[first].data):
            return None
        segments: list[Segment] = []
        need, start = length, offset
        while need:
            if cur is None:
                return None
            take = min(need, len(cur.data) - start)
            segments.append((cur, start, start + take))
            need -= take
            cur, start = cur.next, 0
        following = [b.key_id for b, _, _ in segments[1:]]
        if _check(segments[0][0].key_id, offset, length, following) != check:
            return None
        return segments

    def _consume(self, segments: list[Segment]) -> bytes:
        """Copy a cut out, zero its bytes, mark them used; drop emptied blocks."""
        parts = []
        for block, start, end in segments:
            parts.append(bytes(block.data[start:end]))
            block.data[start:end] = bytes(end - start)
            block.used |= _mask(start, end)
            self._stored -= end - start
            if block.left == 0:
                self.remove(block)
        return b"".join(parts)

    def _erase_issued(self, key_id: KeyId) -> bytes:
        """Take an issued key out of the pool; return a copy, overwrite the pool's."""
        buf = self.issued.pop(key_id)[0]
        key = bytes(buf)
        buf[:] = bytes(len(buf))
        self._issued_bytes -= len(key)
        return key


def _segments_key_id(segments: list[Segment]) -> KeyId:
    first, start, end = segments[0]
    if len(segments) == 1 and start == 0 and end == len(first.data):
        return first.key_id
    length = sum(e - s for _, s, e in segments)
    return cut_key_id(first.key_id, start, length, [b.key_id for b, _, _ in segments[1:]])
