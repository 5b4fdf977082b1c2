"""The OTP media packet transform: one-time-pad encryption + one-time MAC (docs/otp.md §3).

Each direction of a call has its own *pad*: a sequence of key blocks, block
``i`` being one ETSI GS QKD 014 key whose key_ID both sides agreed for index
``i`` (:mod:`qcall.otp.keystream`). A packet takes ``32 + len(payload)`` fresh
bytes from one block, at offset ``o``::

    mac_key = block[o : o+32]                     (r ‖ s, qcall.otp.mac)
    pad     = block[o+32 : o+32+len(payload)]
    C       = payload XOR pad
    packet  = H ‖ u32(i) ‖ u16(o) ‖ C ‖ tag      H = the RTP header, in clear
    tag     = one_time_mac(mac_key, H ‖ u32(i) ‖ u16(o) ‖ C)

The sender (:class:`PadSender`) hands out bytes strictly in order and erases
them; a packet never straddles two blocks (the rest of a block too short for
the next packet is erased unused, counted as ``wasted``). The receiver
(:class:`PadReceiver`) accepts a packet only if its whole key range is unused,
its tag verifies, and only then marks the range used and erases it: a replay, a
forged packet, a packet for a block it does not hold are rejected with
:class:`~qcall.exceptions.OTPPacketError`, and change nothing.

Pure: no clock, no I/O. Key bytes live in ``bytearray`` s that are zeroed once
used (Python cannot promise that no other copy exists; the KME's copy is
deleted by ETSI 014 delivery semantics).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from qcall.exceptions import OTPPacketError
from qcall.otp.mac import KEY_BYTES, TAG_BYTES, one_time_mac, verify

__all__ = [
    "LOCATOR_BYTES",
    "MAX_PAYLOAD",
    "PadReceiver",
    "PadSender",
    "PadStats",
    "key_bytes_per_packet",
    "open_packet",
    "rtp_header_length",
    "seal_packet",
]

#: ``u32`` block index ‖ ``u16`` offset, after the RTP header.
LOCATOR_BYTES: Final = 6

#: Largest payload an OTP packet carries (a low-bitrate Opus frame is 20–80 bytes).
MAX_PAYLOAD: Final = 480

#: Blocks kept after a newer one carried a packet, for late (reordered) packets.
RETAIN_BLOCKS: Final = 4


def key_bytes_per_packet(payload_bytes: int) -> int:
    """Pad bytes one packet of ``payload_bytes`` consumes: MAC key + pad."""
    return KEY_BYTES + payload_bytes


def rtp_header_length(packet: bytes) -> int:
    """Length of the RTP header of ``packet`` (RFC 3550 §5.1, §5.3.1).

    Raises:
        OTPPacketError: not an RTP version 2 packet, or the header is truncated.
    """
    if len(packet) < 12 or packet[0] >> 6 != 2:
        raise OTPPacketError("malformed", "OTP packet rejected: not an RTP v2 packet")
    length = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10:  # X: header extension, 4-byte header + u16 words
        if len(packet) < length + 4:
            raise OTPPacketError("malformed", "OTP packet rejected: truncated RTP extension")
        (words,) = struct.unpack_from("!H", packet, length + 2)
        length += 4 + 4 * words
    if len(packet) < length:
        raise OTPPacketError("malformed", "OTP packet rejected: truncated RTP header")
    return length


def _xor(data: bytes, pad: bytes | bytearray) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad[:n], "big")).to_bytes(n, "big")


def seal_packet(rtp: bytes, index: int, offset: int, key: bytes | bytearray) -> bytes:
    """Turn an RTP packet into an OTP packet with the given pad bytes (no bookkeeping).

    Args:
        rtp: the RTP packet (header in clear, payload encrypted).
        index: the pad block index ``i``.
        offset: ``o``, where in block ``i`` the packet's key bytes start.
        key: exactly ``32 + len(payload)`` pad bytes, ``block[o:o+32+len(payload)]``.

    Raises:
        OTPPacketError: ``rtp`` is not RTP or ``key`` has the wrong length.
    """
    hlen = rtp_header_length(rtp)
    payload = rtp[hlen:]
    if len(key) != key_bytes_per_packet(len(payload)):
        raise OTPPacketError("malformed", "OTP packet rejected: pad length does not fit payload")
    body = rtp[:hlen] + struct.pack("!IH", index, offset) + _xor(payload, key[KEY_BYTES:])
    return body + one_time_mac(bytes(key[:KEY_BYTES]), body)


def open_packet(packet: bytes) -> tuple[int, int, int, int]:
    """Parse an OTP packet's layout.

    Returns:
        ``(header_length, index, offset, ciphertext_length)``.

    Raises:
        OTPPacketError: malformed (too short for locator and tag).
    """
    hlen = rtp_header_length(packet)
    clen = len(packet) - hlen - LOCATOR_BYTES - TAG_BYTES
    if clen < 0:
        raise OTPPacketError("malformed", "OTP packet rejected: too short for locator and tag")
    index, offset = struct.unpack_from("!IH", packet, hlen)
    return hlen, index, offset, clen


@dataclass
class PadStats:
    """What one side's pads did (no key bytes)."""

    packets: int = 0
    key_bytes: int = 0
    wasted_bytes: int = 0
    blocks: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


@dataclass(eq=False)
class _Block:
    index: int
    key_id: str
    data: bytearray = field(repr=False)
    used: bytearray = field(repr=False)  # receiver: 1 per consumed byte
    position: int = 0  # sender: next unused offset

    def erase(self, start: int, end: int) -> None:
        self.data[start:end] = bytes(end - start)


def _new_block(index: int, key_id: str, key: bytes) -> _Block:
    if not 0 <= index < 2**32:
        raise ValueError(f"block index {index} out of range")
    if not KEY_BYTES < len(key) <= 65535:
        raise ValueError(f"pad block must be 33..65535 bytes, not {len(key)}")
    return _Block(index, key_id, bytearray(key), bytearray(len(key)))


class PadSender:
    """The outbound pad of one direction: hands out each byte once, in order."""

    def __init__(self) -> None:
        self._blocks: list[_Block] = []
        self._next_index = 0
        self.stats = PadStats()

    def __repr__(self) -> str:
        return f"<PadSender blocks={len(self._blocks)} available={self.available}>"

    @property
    def available(self) -> int:
        """Unused pad bytes held (some may be wasted at block ends)."""
        return sum(len(b.data) - b.position for b in self._blocks)

    def add_block(self, index: int, key_id: str, key: bytes) -> None:
        """Append block ``index`` (agreed with the peer) to the pad.

        Raises:
            ValueError: ``index`` is not the next index, or the key has a bad size.
        """
        if index != self._next_index:
            raise ValueError(f"pad block {index} out of order: expected {self._next_index}")
        self._blocks.append(_new_block(index, key_id, key))
        self._next_index += 1
        self.stats.blocks += 1

    def can_send(self, payload_bytes: int) -> bool:
        """Whether a packet of this payload size has fresh key now."""
        need = key_bytes_per_packet(payload_bytes)
        return any(len(b.data) - b.position >= need for b in self._blocks)

    def protect(self, rtp: bytes) -> bytes | None:
        """Encrypt and authenticate ``rtp`` with fresh pad bytes, then erase them.

        Returns:
            The OTP packet, or ``None`` if no fresh key is held (nothing consumed).

        Raises:
            OTPPacketError: ``rtp`` is not RTP or its payload exceeds :data:`MAX_PAYLOAD`.
        """
        hlen = rtp_header_length(rtp)
        if len(rtp) - hlen > MAX_PAYLOAD:
            raise OTPPacketError("oversize", f"payload over {MAX_PAYLOAD} bytes not sent")
        need = key_bytes_per_packet(len(rtp) - hlen)
        if not self.can_send(len(rtp) - hlen):
            return None
        while True:
            block = self._blocks[0]
            if len(block.data) - block.position >= need:
                break
            # Too short for this packet: erase the rest, never use it.
            self.stats.wasted_bytes += len(block.data) - block.position
            block.erase(block.position, len(block.data))
            self._blocks.pop(0)
        start = block.position
        packet = seal_packet(rtp, block.index, start, block.data[start : start + need])
        block.erase(start, start + need)
        block.position += need
        if block.position == len(block.data):
            self._blocks.pop(0)
        self.stats.packets += 1
        self.stats.key_bytes += need
        return packet


class PadReceiver:
    """The inbound pad of one direction: each byte authenticates one packet at most."""

    def __init__(self, retain: int = RETAIN_BLOCKS) -> None:
        self._blocks: dict[int, _Block] = {}
        self._highest = -1
        self._retain = retain
        self._next_index = 0
        self.stats = PadStats()

    def __repr__(self) -> str:
        return f"<PadReceiver blocks={sorted(self._blocks)}>"

    @property
    def block_indexes(self) -> list[int]:
        """Indexes of the blocks held."""
        return sorted(self._blocks)

    def add_block(self, index: int, key_id: str, key: bytes) -> None:
        """Hold block ``index`` (fetched by its agreed key_ID).

        Raises:
            ValueError: ``index`` is not the next index, or a bad key size.
        """
        if index != self._next_index:
            raise ValueError(f"pad block {index} out of order: expected {self._next_index}")
        self._blocks[index] = _new_block(index, key_id, key)
        self._next_index += 1
        self.stats.blocks += 1

    def unprotect(self, packet: bytes) -> bytes:
        """Check and decrypt an OTP packet; return the RTP packet.

        Raises:
            OTPPacketError: ``reason`` is ``malformed``, ``unknown-block`` (not
                agreed yet), ``retired`` (too old), ``replayed`` (its key range was used
                before), ``out-of-range`` or ``forged`` (tag mismatch). Nothing
                changes then.
        """
        try:
            hlen, index, offset, clen = open_packet(packet)
        except OTPPacketError as exc:
            self.stats.reject(exc.reason)
            raise
        block = self._blocks.get(index)
        if block is None:
            reason = "unknown-block" if index >= self._next_index else "retired"
            self.stats.reject(reason)
            raise OTPPacketError(reason, f"OTP packet rejected: {reason} (block {index})")
        end = offset + key_bytes_per_packet(clen)
        if end > len(block.data):
            self.stats.reject("out-of-range")
            raise OTPPacketError("out-of-range", f"OTP packet rejected: range past block {index}")
        if any(block.used[offset:end]):
            self.stats.reject("replayed")
            text = f"OTP packet rejected: pad range reused (block {index})"
            raise OTPPacketError("replayed", text)
        body, tag = packet[:-TAG_BYTES], packet[-TAG_BYTES:]
        if not verify(bytes(block.data[offset : offset + KEY_BYTES]), body, tag):
            self.stats.reject("forged")
            raise OTPPacketError("forged", f"OTP packet rejected: bad tag (block {index})")
        start = hlen + LOCATOR_BYTES
        plain = _xor(packet[start : start + clen], block.data[offset + KEY_BYTES : end])
        block.used[offset:end] = b"\1" * (end - offset)
        block.erase(offset, end)
        self.stats.packets += 1
        self.stats.key_bytes += end - offset
        self._retire(index)
        return packet[:hlen] + plain

    def _retire(self, index: int) -> None:
        if index <= self._highest:
            return
        self._highest = index
        for old in [i for i in self._blocks if i <= index - self._retain]:
            block = self._blocks.pop(old)
            block.erase(0, len(block.data))
