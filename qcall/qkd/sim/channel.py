"""Authenticated classical channel between the two ends of a QKD link.

QKD needs an authenticated (not secret) classical channel. Each end holds a
copy of a pre-shared secret: a 32-byte MAC key and a pool of one-time-pad
bits. Two layers of authentication:

* **Every frame** carries ``HMAC-SHA-256(k_mac, header || payload)[:16]``,
  so a tampered, replayed, reordered or reflected frame is rejected at once
  (:class:`~qcall.exceptions.ChannelAuthenticationError`), before it is parsed.
* **Every block** ends with a Wegman-Carter style tag in each direction
  (Wegman & Carter, "New hash functions and their use in authentication and
  set equality", JCSS 22 (1981)): ``HMAC(k_mac, direction || H(transcript))[:16]
  XOR r`` with ``r`` 128 fresh pad bits used once. (HMAC stands in for an
  almost-strongly-universal hash; the pad and its consumption are real.) A
  block's key is released only after both tags verify. This costs 256 bits of
  key per block, which :class:`~qcall.qkd.sim.link.SimulatedLink` reports and
  pays back from the block's key into the pad pool.

Frame: ``version (1) | direction (1) | seq (u32) | length (u32) | payload | tag (16)``.
Both ends see the same transcript (the protocol strictly alternates), so
they consume pad bits in the same order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from qcall.exceptions import ChannelAuthenticationError, KeyExhaustedError

from .messages import Message, decode, encode

__all__ = ["ALICE", "BOB", "TAG_BITS", "AuthenticatedChannel", "ChannelEnd", "TranscriptEntry"]

logger = logging.getLogger(__name__)

ALICE = 0
BOB = 1
VERSION = 1
TAG_BYTES = 16
TAG_BITS = 8 * TAG_BYTES
_HEADER = struct.Struct("<BBII")


@dataclass
class TranscriptEntry:
    """One frame on the channel (sizes only, no contents)."""

    sender: int
    seq: int
    message_type: str
    size: int


class ChannelEnd:
    """One party's end: seals outgoing and opens incoming frames.

    Args:
        party: :data:`ALICE` or :data:`BOB`.
        mac_key: 32-byte pre-shared MAC key.
        pad: pre-shared one-time-pad bytes for tags.
    """

    def __init__(self, party: int, mac_key: bytes, pad: bytes) -> None:
        if len(mac_key) < 32:
            raise ValueError("mac_key must be at least 32 bytes")
        self.party = party
        self._mac_key = bytes(mac_key)
        self._pad = bytearray(pad)
        self._pad_pos = 0
        self.send_seq = 0
        self.recv_seq = 0
        self.pad_bits_consumed = 0
        self._transcript = hashlib.sha256()

    def __repr__(self) -> str:
        return (f"ChannelEnd(party={'Alice' if self.party == ALICE else 'Bob'}, "
                f"pad_left={self.pad_available} bytes)")

    @property
    def pad_available(self) -> int:
        """Bytes of one-time pad left."""
        return len(self._pad) - self._pad_pos

    def replenish(self, key: bytes) -> None:
        """Append fresh (verified, shared) key bytes to the pad pool."""
        del self._pad[: self._pad_pos]
        self._pad_pos = 0
        self._pad.extend(key)

    def _next_pad(self) -> bytes:
        if self.pad_available < TAG_BYTES:
            raise KeyExhaustedError("classical channel: authentication key pool is empty")
        r = bytes(self._pad[self._pad_pos : self._pad_pos + TAG_BYTES])
        self._pad_pos += TAG_BYTES
        self.pad_bits_consumed += TAG_BITS
        return r

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._mac_key, body, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, msg: Message) -> bytes:
        """Encode and authenticate one message; returns the frame to transmit."""
        payload = encode(msg)
        body = _HEADER.pack(VERSION, self.party, self.send_seq, len(payload)) + payload
        self.send_seq += 1
        frame = body + self._tag(body)
        self._transcript.update(frame)
        return frame

    def reset_transcript(self) -> None:
        """Start a new block transcript without tagging the current one."""
        self._transcript = hashlib.sha256()

    def block_tags(self) -> tuple[bytes, bytes]:
        """Wegman-Carter tags over this block's transcript: (Alice's, Bob's).

        Consumes 2 x 128 pad bits (Alice's tag first, at both ends) and starts
        a new transcript.
        """
        if self.pad_available < 2 * TAG_BYTES:
            raise KeyExhaustedError("classical channel: authentication key pool is empty")
        digest = self._transcript.digest()
        self._transcript = hashlib.sha256()
        tags = []
        for party in (ALICE, BOB):
            mac = hmac.new(self._mac_key, bytes([party]) + digest, hashlib.sha256).digest()
            tags.append(bytes(a ^ b for a, b in zip(mac[:TAG_BYTES], self._next_pad(),
                                                    strict=True)))
        return tags[0], tags[1]

    def open(self, frame: bytes) -> Message:
        """Verify and decode a frame from the other end.

        Raises:
            ChannelAuthenticationError: bad tag, version, direction or sequence number.
            PostProcessingError: the authenticated payload is malformed.
        """
        seq = self.recv_seq
        self.recv_seq += 1
        self._transcript.update(frame)
        if len(frame) < _HEADER.size + TAG_BYTES:
            raise ChannelAuthenticationError(f"frame #{seq}: too short ({len(frame)} bytes)")
        body, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        if not hmac.compare_digest(self._tag(body), tag):
            raise ChannelAuthenticationError(f"frame #{seq}: authentication tag does not verify")
        version, sender, fseq, length = _HEADER.unpack_from(body)
        if version != VERSION:
            raise ChannelAuthenticationError(f"frame #{seq}: version {version} unsupported")
        if sender != 1 - self.party:
            raise ChannelAuthenticationError(f"frame #{seq}: direction field {sender} is wrong")
        if fseq != seq:
            raise ChannelAuthenticationError(f"frame #{seq}: seq field {fseq} (replay/reorder)")
        if length != len(body) - _HEADER.size:
            raise ChannelAuthenticationError(f"frame #{seq}: length field {length} is wrong")
        return decode(body[_HEADER.size :])


@dataclass
class AuthenticatedChannel:
    """The classical channel: two ends, a transcript, counters, and an optional adversary.

    ``tamper``, if set, sees every frame in transit and returns the frame to
    deliver (tests use it to play a man in the middle). With ``debug``, every
    message is logged (type and sizes only).

    Args:
        mac_key: pre-shared MAC key (both ends get a copy).
        pad: pre-shared pad bytes (both ends get a copy).
    """

    mac_key: bytes
    pad: bytes
    tamper: Callable[[int, bytes], bytes] | None = None
    transcript: list[TranscriptEntry] = field(default_factory=list)
    messages: list[int] = field(default_factory=lambda: [0, 0])
    bytes_sent: list[int] = field(default_factory=lambda: [0, 0])
    keep_transcript: bool = True
    debug: bool = False

    def __post_init__(self) -> None:
        self.ends = (ChannelEnd(ALICE, self.mac_key, self.pad),
                     ChannelEnd(BOB, self.mac_key, self.pad))
        # The ends hold their own copies; drop ours.
        self.mac_key = b""
        self.pad = b""

    def __repr__(self) -> str:
        return (f"AuthenticatedChannel(messages={self.messages}, bytes={self.bytes_sent}, "
                f"auth_bits={self.auth_bits_consumed})")

    @property
    def auth_bits_consumed(self) -> int:
        """One-time-pad bits spent on block tags (both ends spend the same bits)."""
        return self.ends[ALICE].pad_bits_consumed

    def discard_block(self) -> None:
        """Forget the current block's transcript at both ends (after an aborted block)."""
        for end in self.ends:
            end.reset_transcript()

    def authenticate_block(self) -> None:
        """Exchange and check the end-of-block Wegman-Carter tags (both directions).

        Raises:
            ChannelAuthenticationError: the two ends saw different transcripts.
        """
        alice_a, alice_b = self.ends[ALICE].block_tags()
        bob_a, bob_b = self.ends[BOB].block_tags()
        for sender, sent, expected in ((ALICE, alice_a, bob_a), (BOB, bob_b, alice_b)):
            self.messages[sender] += 1
            self.bytes_sent[sender] += TAG_BYTES
            received = sent if self.tamper is None else self.tamper(sender, sent)
            if not hmac.compare_digest(received, expected):
                raise ChannelAuthenticationError(
                    f"block tag from {'Alice' if sender == ALICE else 'Bob'} does not verify")

    def transfer(self, sender: int, msg: Message) -> Message:
        """Seal ``msg`` at ``sender``'s end, carry it, and open it at the other end."""
        frame = self.ends[sender].seal(msg)
        self.messages[sender] += 1
        self.bytes_sent[sender] += len(frame)
        if self.keep_transcript:
            self.transcript.append(
                TranscriptEntry(sender, self.ends[sender].send_seq - 1, type(msg).__name__,
                                len(frame)))
        if self.debug:
            # Message reprs show sizes only, never bits.
            logger.debug("%s %s (%d bytes)", "A>" if sender == ALICE else "<B", msg, len(frame))
        if self.tamper is not None:
            frame = self.tamper(sender, frame)
        return self.ends[1 - sender].open(frame)
