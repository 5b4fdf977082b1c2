"""Wire format between two network sites, and the link key pads of a cross-site link (pure).

Two :class:`~qcall.qkd.site.NetworkSite` processes — each running its own
part of a topology, on its own host — share one TCP connection (optionally
TLS) that carries everything the split link needs:

* the simulated **optical layer's output**: the transmitter site (the link's
  ``a`` end, BB84 Alice) simulates the fibre and sends Bob's detector record
  (:class:`Optics`); it stands in for the photons;
* every **post-processing message** (:class:`PostProcessing`), each one a
  frame of the link's :class:`~qcall.qkd.sim.channel.ChannelEnd` —
  authenticated with the pre-shared MAC key, sequence-numbered — exactly
  the bytes :class:`~qcall.qkd.sim.AuthenticatedChannel` carries in one
  process; then each end's Wegman–Carter block tag (:class:`BlockTag`);
* the **trusted-node relay hop** across the link (:class:`RelayKey`): the
  key ``K`` one-time-padded with link key, plus an HMAC-SHA-256 tag keyed
  with 256 more bits of link key (the hop authentication that
  ``docs/relay.md`` asks of a deployment), and the answer (:class:`RelayResult`).

Frame: ``type (u8) | length (u32, big endian) | payload``; payloads are
binary or small JSON objects. :class:`FrameReader` is a Sans-I/O decoder:
feed bytes, take frames. Parsers raise :class:`~qcall.exceptions.SiteLinkError`
naming the field. Key bytes never appear in reprs or errors.

:class:`PadBook` keeps one end's copy of the split link's key, per block and
per direction, so that the two sites — which consume it at different
moments — always pick the same bytes: a relay message names its pad by
``(block, offset)``.
"""

from __future__ import annotations

import enum
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcall.exceptions import SiteLinkError

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "BlockTag",
    "FrameReader",
    "FrameType",
    "Hello",
    "Optics",
    "PadBook",
    "PostProcessing",
    "RelayKey",
    "RelayResult",
    "SiteMessage",
    "encode_frame",
    "parse_frame",
]

#: Version spoken in :class:`Hello`.
PROTOCOL_VERSION = 1
#: Largest frame payload accepted (an :class:`Optics` of a big block is a few MB).
MAX_FRAME = 64 << 20
_HEAD = struct.Struct(">BI")
_U64 = struct.Struct(">Q")


class FrameType(enum.IntEnum):
    """The ``type`` byte of a frame."""

    HELLO = 1
    OPTICS = 2
    POST_PROCESSING = 3
    BLOCK_TAG = 4
    RELAY_KEY = 5
    RELAY_RESULT = 6


def _json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SiteLinkError(f"{what}: payload is not JSON") from None
    if not isinstance(data, dict):
        raise SiteLinkError(f"{what}: payload is not an object")
    return data


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SiteLinkError(f"{what}.{name}: missing or wrong type")
    return value


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Hello:
    """First frame of each side: who it is and where its channel counters stand.

    ``send_seq``/``recv_seq`` are the sender's classical-channel counters:
    after a reconnection each side moves its ``recv_seq`` forward to the
    peer's ``send_seq`` (never backward, so old frames cannot be replayed)
    and a half-done block is discarded.
    """

    version: int
    topology: str
    split: str
    node: str
    send_seq: int
    recv_seq: int

    type = FrameType.HELLO

    def payload(self) -> bytes:
        return _dump(self.__dict__)

    @classmethod
    def parse(cls, payload: bytes) -> Hello:
        d = _json(payload, "Hello")
        return cls(
            version=_field(d, "version", int, "Hello"),
            topology=_field(d, "topology", str, "Hello"),
            split=_field(d, "split", str, "Hello"),
            node=_field(d, "node", str, "Hello"),
            send_seq=_field(d, "send_seq", int, "Hello"),
            recv_seq=_field(d, "recv_seq", int, "Hello"),
        )


@dataclass(frozen=True)
class Optics:
    """Bob's detector record of one block (what the fibre delivered to the receiver)."""

    block: int
    n_pulses: int
    indices: np.ndarray[Any, np.dtype[np.int64]] = field(repr=False)
    basis: np.ndarray[Any, np.dtype[np.uint8]] = field(repr=False)
    bit: np.ndarray[Any, np.dtype[np.uint8]] = field(repr=False)

    type = FrameType.OPTICS

    def __repr__(self) -> str:
        return f"Optics(block={self.block}, n_pulses={self.n_pulses}, clicks={self.indices.size})"

    def payload(self) -> bytes:
        """``block, n_pulses (u64), count (u32), width (u8)``, index gaps, packed bits.

        Indices go as gaps from the previous one (the first from 0), each in
        ``width`` bytes (1, 2, 4 or 8: the smallest that holds the largest gap):
        at 66 km about one pulse in 250 clicks, so 2 bytes instead of 8.
        """
        count = int(self.indices.size)
        gaps = np.diff(self.indices, prepend=np.int64(0)) if count else self.indices
        largest = int(gaps.max()) if count else 0
        width = next(w for w in (1, 2, 4, 8) if largest < 1 << (8 * w))
        return (
            struct.pack(">QQIB", self.block, self.n_pulses, count, width)
            + gaps.astype(f">u{width}").tobytes()
            + np.packbits(self.basis).tobytes()
            + np.packbits(self.bit).tobytes()
        )

    @classmethod
    def parse(cls, payload: bytes) -> Optics:
        if len(payload) < 21:
            raise SiteLinkError("Optics: too short")
        block, n_pulses, count, width = struct.unpack_from(">QQIB", payload)
        if width not in (1, 2, 4, 8):
            raise SiteLinkError(f"Optics.width: {width} is not 1, 2, 4 or 8")
        packed = (count + 7) // 8
        if len(payload) != 21 + width * count + 2 * packed:
            raise SiteLinkError("Optics.count: does not match the payload length")
        gaps = np.frombuffer(payload, f">u{width}", count, 21).astype(np.uint64)
        if count and (
            int(gaps.max()) >= n_pulses or int(gaps.astype(np.float64).sum()) >= n_pulses
            or bool(np.any(gaps[1:] == 0))
        ):  # fmt: skip
            raise SiteLinkError("Optics.indices: not sorted, distinct and within n_pulses")
        indices = np.cumsum(gaps).astype(np.int64)
        at = 21 + width * count
        raw = np.frombuffer(payload, np.uint8, 2 * packed, at)
        basis = np.unpackbits(raw[:packed])[:count]
        bit = np.unpackbits(raw[packed:])[:count]
        return cls(block, n_pulses, indices, basis, bit)


@dataclass(frozen=True)
class PostProcessing:
    """One authenticated classical-channel frame of block ``block``."""

    block: int
    frame: bytes = field(repr=False)

    type = FrameType.POST_PROCESSING

    def payload(self) -> bytes:
        return _U64.pack(self.block) + self.frame

    @classmethod
    def parse(cls, payload: bytes) -> PostProcessing:
        if len(payload) < 8:
            raise SiteLinkError("PostProcessing: too short")
        return cls(_U64.unpack_from(payload)[0], payload[8:])


@dataclass(frozen=True)
class BlockTag:
    """A side's Wegman–Carter tag over block ``block``'s transcript (16 bytes)."""

    block: int
    tag: bytes = field(repr=False)

    type = FrameType.BLOCK_TAG

    def payload(self) -> bytes:
        return _U64.pack(self.block) + self.tag

    @classmethod
    def parse(cls, payload: bytes) -> BlockTag:
        if len(payload) != 24:
            raise SiteLinkError("BlockTag.tag: must be 16 bytes")
        return cls(_U64.unpack_from(payload)[0], payload[8:])


@dataclass(frozen=True)
class RelayKey:
    """The relay hop across the split link: ``ciphertext = K ⊕ pad``, ``tag`` = HMAC.

    ``pad`` and the 32-byte HMAC key are link key at ``(block, offset)`` of
    the sender's direction (:class:`PadBook`). ``tag`` is
    ``HMAC-SHA-256(mac_key, header || ciphertext)`` over :meth:`header`.
    """

    relay_id: int
    key_id: str
    master: str
    slave: str
    block: int
    offset: int
    ciphertext: bytes = field(repr=False)
    tag: bytes = field(repr=False)

    type = FrameType.RELAY_KEY

    def header(self) -> bytes:
        """The authenticated fields, as bytes."""
        return _dump({
            "relay_id": self.relay_id, "key_id": self.key_id, "master": self.master,
            "slave": self.slave, "block": self.block, "offset": self.offset,
        })  # fmt: skip

    def payload(self) -> bytes:
        head = self.header()
        return (
            struct.pack(">HH", len(head), len(self.ciphertext)) + head + self.ciphertext + self.tag
        )

    @classmethod
    def parse(cls, payload: bytes) -> RelayKey:
        if len(payload) < 4:
            raise SiteLinkError("RelayKey: too short")
        hlen, clen = struct.unpack_from(">HH", payload)
        if len(payload) != 4 + hlen + clen + 32:
            raise SiteLinkError("RelayKey.length: does not match the payload")
        d = _json(payload[4 : 4 + hlen], "RelayKey")
        w = "RelayKey"
        msg = cls(
            relay_id=_field(d, "relay_id", int, w), key_id=_field(d, "key_id", str, w),
            master=_field(d, "master", str, w), slave=_field(d, "slave", str, w),
            block=_field(d, "block", int, w), offset=_field(d, "offset", int, w),
            ciphertext=payload[4 + hlen : 4 + hlen + clen], tag=payload[4 + hlen + clen :],
        )  # fmt: skip
        if msg.offset < 0 or msg.block < 0:
            raise SiteLinkError("RelayKey.offset: negative")
        return msg


@dataclass(frozen=True)
class RelayResult:
    """The receiving site's answer: the key is in the slave KME (``ok``), or why not."""

    relay_id: int
    ok: bool
    reason: str = ""

    type = FrameType.RELAY_RESULT

    def payload(self) -> bytes:
        return _dump({"relay_id": self.relay_id, "ok": self.ok, "reason": self.reason[:200]})

    @classmethod
    def parse(cls, payload: bytes) -> RelayResult:
        d = _json(payload, "RelayResult")
        return cls(
            _field(d, "relay_id", int, "RelayResult"),
            _field(d, "ok", bool, "RelayResult"),
            _field(d, "reason", str, "RelayResult"),
        )


SiteMessage = Hello | Optics | PostProcessing | BlockTag | RelayKey | RelayResult
_PARSERS: dict[int, Any] = {
    FrameType.HELLO: Hello.parse,
    FrameType.OPTICS: Optics.parse,
    FrameType.POST_PROCESSING: PostProcessing.parse,
    FrameType.BLOCK_TAG: BlockTag.parse,
    FrameType.RELAY_KEY: RelayKey.parse,
    FrameType.RELAY_RESULT: RelayResult.parse,
}


def encode_frame(msg: SiteMessage) -> bytes:
    """Return the frame carrying ``msg``."""
    payload = msg.payload()
    if len(payload) > MAX_FRAME:
        raise SiteLinkError(f"{type(msg).__name__}: {len(payload)} bytes exceed the frame limit")
    return _HEAD.pack(int(msg.type), len(payload)) + payload


def parse_frame(kind: int, payload: bytes) -> SiteMessage:
    """Decode one frame's payload.

    Raises:
        SiteLinkError: unknown type or malformed payload (names the field).
    """
    parser = _PARSERS.get(kind)
    if parser is None:
        raise SiteLinkError(f"frame type {kind}: unknown")
    message: SiteMessage = parser(payload)
    return message


class FrameReader:
    """Sans-I/O frame decoder: :meth:`feed` bytes, then take :meth:`frames`."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[SiteMessage]:
        """Add received bytes; return the messages now complete.

        Raises:
            SiteLinkError: an oversized or malformed frame (the connection is unusable).
        """
        self._buf += data
        out: list[SiteMessage] = []
        while len(self._buf) >= _HEAD.size:
            kind, length = _HEAD.unpack_from(self._buf)
            if length > self._max:
                raise SiteLinkError(f"frame length {length} exceeds the limit {self._max}")
            if len(self._buf) < _HEAD.size + length:
                break
            payload = bytes(self._buf[_HEAD.size : _HEAD.size + length])
            del self._buf[: _HEAD.size + length]
            out.append(parse_frame(kind, payload))
        return out


class PadBook:
    """One end's copy of a split link's key, by block and direction.

    Every block's final key is cut in two halves: the first serves relays
    from the link's ``a`` end to its ``b`` end, the second the other way, so
    the two sites never compete for the same bytes. The sender of a relay
    takes the next free bytes of its direction (:meth:`take_next`), never
    straddling blocks; the receiver takes the bytes the message names
    (:meth:`take_at`). Used bytes are erased; blocks before the one in use
    are dropped (the sender has moved past them).
    """

    DIRECTIONS = ("ab", "ba")

    def __init__(self) -> None:
        self._blocks: dict[str, OrderedDict[int, bytearray]] = {
            d: OrderedDict() for d in self.DIRECTIONS
        }
        self._used: dict[str, dict[int, int]] = {d: {} for d in self.DIRECTIONS}
        self.deposited_bits = 0
        self.consumed_bits = 0

    def __repr__(self) -> str:
        return f"PadBook(available={self.available_bits('ab')}/{self.available_bits('ba')} bits)"

    def deposit(self, block: int, key: bytes) -> None:
        """Add one block's key (this end's copy)."""
        half = len(key) // 2
        for direction, part in (("ab", key[:half]), ("ba", key[half : 2 * half])):
            if part:
                self._blocks[direction][block] = bytearray(part)
                self._used[direction][block] = 0
        self.deposited_bits += 16 * half

    def has_block(self, direction: str, block: int) -> bool:
        """Whether this end holds (possibly used up) key of ``block``."""
        return block in self._blocks[direction]

    def available_bits(self, direction: str) -> int:
        """Unused bits in ``direction``."""
        return 8 * sum(
            len(b) - self._used[direction][n] for n, b in self._blocks[direction].items()
        )

    def take_next(self, direction: str, size: int) -> tuple[int, int, bytes]:
        """Take ``size`` fresh bytes for sending; return ``(block, offset, bytes)``.

        Raises:
            SiteLinkError: not enough key in any block.
        """
        blocks = self._blocks[direction]
        for number in list(blocks):
            buf, used = blocks[number], self._used[direction][number]
            if len(buf) - used >= size:
                return number, used, self._cut(direction, number, used, size)
            self._drop(direction, number)
        raise SiteLinkError(f"split link: no key left in direction {direction}")

    def take_at(self, direction: str, block: int, offset: int, size: int) -> bytes:
        """Take the ``size`` bytes at ``(block, offset)`` that the sender used.

        Raises:
            SiteLinkError: the block is unknown here, or those bytes were
                already used (a replay) or lie outside the block.
        """
        blocks = self._blocks[direction]
        if block not in blocks:
            raise SiteLinkError(f"split link: block {block} unknown or already used")
        buf, used = blocks[block], self._used[direction][block]
        if offset < used or offset + size > len(buf):
            raise SiteLinkError(f"split link: bytes {offset}+{size} of block {block} not available")
        for number in [n for n in blocks if n < block]:
            self._drop(direction, number)
        return self._cut(direction, block, offset, size)

    def _cut(self, direction: str, block: int, offset: int, size: int) -> bytes:
        buf = self._blocks[direction][block]
        out = bytes(buf[offset : offset + size])
        buf[self._used[direction][block] : offset + size] = bytes(
            offset + size - self._used[direction][block]
        )
        self._used[direction][block] = offset + size
        self.consumed_bits += 8 * size
        if offset + size == len(buf):
            self._drop(direction, block)
        return out

    def _drop(self, direction: str, block: int) -> None:
        buf = self._blocks[direction].pop(block)
        buf[:] = bytes(len(buf))  # erase
        del self._used[direction][block]
