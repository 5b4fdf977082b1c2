"""The OTP key-stream manager: pad blocks agreed by key_ID over the control channel.

Sans-I/O, like :mod:`qcall.handshake.protocol`: it never calls a KME, never reads
a clock, never sends. Each side of an OTP call runs one :class:`KeyStreamProtocol`;
it is the ETSI GS QKD 014 *master* of the direction it sends, the *slave* of the
other. Message flow for one batch of blocks of alice's outbound pad
(docs/otp.md §4)::

    alice (sender of this pad)                          bob (receiver)
     KeysWanted(n) → shell: enc_keys(bob, n, 4096)
     receive_keys(keys)  ── BLOCKS(first=i, key_IDs) ──▶ receive_data
                                                         → PeerKeysNeeded(i, key_IDs)
                                                         shell: dec_keys(key_IDs)
                                                         receive_peer_keys(i, keys)
     receive_data  ◀──────── ACK(first=i, n) ─────────── (inbound blocks i… held)
     blocks i… join the outbound pad: packets may use them

A sender uses a block only after the receiver's ACK, so no packet is ever sent
under key the receiver lacks, and never without fresh key: with no fresh key a
packet is dropped and counted (``tx_no_key``). It asks for more key whenever the
pad held plus the blocks in flight fall below ``prefetch_s`` seconds of packets.

When the KME cannot deliver (pool empty) and the pad held falls below
``low_water_s`` seconds, the policy acts, *before* the pad runs out: ``end``
sends END and emits :class:`KeyStreamEnded`; ``hybrid`` sends FALLBACK and emits
:class:`FellBackToHybrid` — on both sides, never silently.

Error policy: the peer's input never raises here; a malformed control message
ends the key stream (:class:`KeyStreamEnded` with the reason) and a bad media
packet raises :class:`~qcall.exceptions.OTPPacketError` from :meth:`unprotect`
only to say "drop it". Misuse by the shell (keys for an unknown batch) raises
``ValueError``.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from qcall.exceptions import OTPKeyExhaustedError, OTPPacketError
from qcall.otp.packet import PadReceiver, PadSender, key_bytes_per_packet

__all__ = [
    "BLOCK_BITS",
    "MAGIC",
    "Budget",
    "ControlMessage",
    "FellBackToHybrid",
    "KeyStreamEnded",
    "KeyStreamProtocol",
    "KeysWanted",
    "MessageType",
    "OTPPolicy",
    "PeerKeysNeeded",
    "packet_key_rate",
]

logger = logging.getLogger(__name__)

#: Size of one pad block (one ETSI 014 key), in bits: the KMEs' default maximum.
BLOCK_BITS: Final = 4096

#: First bytes of every control message (the call's control channel also carries
#: handshake messages, which start with ``"QCHS"``).
MAGIC: Final = b"QOTP"

#: Control message version.
VERSION: Final = 1

#: Largest number of blocks in one BLOCKS message.
MAX_BATCH: Final = 64

#: Packets per second of 20 ms Opus frames.
PACKETS_PER_SECOND: Final = 50


def packet_key_rate(bitrate: int, packets_per_second: int = PACKETS_PER_SECOND) -> float:
    """Pad bytes per second one direction spends at a fixed Opus ``bitrate`` (bit/s).

    ``packets_per_second × (32 + bitrate / 8 / packets_per_second)``: the MAC key
    and one pad byte per payload byte (the RTP header is authenticated, not padded).
    """
    return packets_per_second * key_bytes_per_packet(0) + bitrate / 8


class MessageType(enum.IntEnum):
    """Control message types (docs/otp.md §4.1)."""

    BLOCKS = 1
    ACK = 2
    NACK = 3
    END = 4
    FALLBACK = 5


@dataclass(frozen=True)
class ControlMessage:
    """One key-stream control message (docs/otp.md §4.1).

    ``"QOTP" ‖ u8 version ‖ u8 type ‖ u32 first ‖ u8 count ‖ body``.

    BLOCKS carries ``count`` key_IDs as ``u8 length ‖ ASCII``; ACK carries none
    (``count`` blocks accepted); NACK, END and FALLBACK carry one ``u8`` code.
    """

    type: MessageType
    first: int = 0
    count: int = 0
    key_ids: tuple[str, ...] = ()
    code: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first < 2**32:
            raise ValueError("field 'first' out of range")
        if self.type is MessageType.BLOCKS:
            if not 1 <= len(self.key_ids) <= MAX_BATCH or self.count != len(self.key_ids):
                raise ValueError("field 'key_ids' must hold 'count' (1..64) key_IDs")
            for key_id in self.key_ids:
                if not 1 <= len(key_id) <= 64 or not key_id.isascii() or not key_id.isprintable():
                    raise ValueError("field 'key_ids' holds a bad key_ID")
        elif not 0 <= self.count <= MAX_BATCH or not 0 <= self.code < 256:
            raise ValueError("field 'count' or 'code' out of range")

    def serialize(self) -> bytes:
        """The message's bytes."""
        head = MAGIC + struct.pack("!BBIB", VERSION, self.type, self.first, self.count)
        if self.type is MessageType.BLOCKS:
            return head + b"".join(bytes([len(k)]) + k.encode("ascii") for k in self.key_ids)
        if self.type is MessageType.ACK:
            return head
        return head + bytes([self.code])

    @classmethod
    def parse(cls, data: bytes) -> ControlMessage:
        """Parse a control message (hostile input).

        Raises:
            ValueError: naming the bad field.
        """
        if len(data) < 11:
            raise ValueError("control message shorter than its 11-byte header")
        if data[:4] != MAGIC:
            raise ValueError("field 'magic' is not QOTP")
        version, kind, first, count = struct.unpack_from("!BBIB", data, 4)
        if version != VERSION:
            raise ValueError(f"field 'version' is {version}, expected {VERSION}")
        try:
            mtype = MessageType(kind)
        except ValueError:
            raise ValueError(f"field 'type' is unknown ({kind})") from None
        body = data[11:]
        if mtype is MessageType.BLOCKS:
            ids, pos = [], 0
            for _ in range(count):
                if pos >= len(body) or pos + 1 + body[pos] > len(body):
                    raise ValueError("field 'key_ids' truncated")
                raw = body[pos + 1 : pos + 1 + body[pos]]
                pos += 1 + body[pos]
                try:
                    ids.append(raw.decode("ascii"))
                except UnicodeDecodeError:
                    raise ValueError("field 'key_ids' holds a non-ASCII key_ID") from None
            if pos != len(body):
                raise ValueError("trailing bytes after 'key_ids'")
            return cls(mtype, first, count, tuple(ids))
        if mtype is MessageType.ACK:
            if body:
                raise ValueError("trailing bytes after ACK")
            return cls(mtype, first, count)
        if len(body) != 1:
            raise ValueError("field 'code' must be exactly one byte")
        return cls(mtype, first, count, code=body[0])


#: Codes of NACK / END / FALLBACK.
CODE_POOL_LOW: Final = 1
CODE_KME_ERROR: Final = 2
CODE_PROTOCOL: Final = 3
CODE_HANGUP: Final = 4

_CODE_TEXT: Final = {
    CODE_POOL_LOW: "key pool low",
    CODE_KME_ERROR: "KME could not deliver the agreed keys",
    CODE_PROTOCOL: "malformed key-stream message",
    CODE_HANGUP: "call ended",
}


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeysWanted:
    """The shell should call ``enc_keys`` for ``number`` blocks, then :meth:`receive_keys`."""

    number: int
    size_bits: int = BLOCK_BITS


@dataclass(frozen=True)
class PeerKeysNeeded:
    """The shell should call ``dec_keys(key_ids)``, then :meth:`receive_peer_keys`."""

    first: int
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class _StreamStopped:
    """OTP media stopped: ``reason`` for the user; ``by_peer`` if the peer said so."""

    reason: str
    by_peer: bool = False


class KeyStreamEnded(_StreamStopped):
    """The OTP stream ended (policy ``end``, a failure, or the peer said so)."""


class FellBackToHybrid(_StreamStopped):
    """The pad ran low under policy ``hybrid``: media goes back to the hybrid SRTP keys."""


Event = KeysWanted | PeerKeysNeeded | KeyStreamEnded | FellBackToHybrid


@dataclass(frozen=True)
class OTPPolicy:
    """What an OTP call does, and how far ahead it fetches key.

    Attributes:
        on_exhausted: ``end`` the call or fall back to ``hybrid`` when the pool runs low.
        bitrate: the fixed Opus bitrate (bit/s) the pad is sized for.
        prefetch_s: keep this many seconds of pad held or in flight.
        low_water_s: with the KME empty, act when less than this is held.
        block_bits: size of a pad block (one ETSI 014 key).
    """

    on_exhausted: Literal["end", "hybrid"] = "end"
    bitrate: int = 12_000
    prefetch_s: float = 3.0
    low_water_s: float = 1.0
    block_bits: int = BLOCK_BITS

    def __post_init__(self) -> None:
        if self.on_exhausted not in ("end", "hybrid"):
            raise ValueError("on_exhausted must be 'end' or 'hybrid'")
        if not 6_000 <= self.bitrate <= 64_000:
            raise ValueError("OTP Opus bitrate must be 6000..64000 bit/s")
        if not 0 < self.low_water_s < self.prefetch_s:
            raise ValueError("need 0 < low_water_s < prefetch_s")
        if self.block_bits % 8 or not 512 <= self.block_bits <= 65535 * 8:
            raise ValueError("block_bits must be a multiple of 8 in 512..524280")

    @property
    def rate(self) -> float:
        """Pad bytes per second of one direction."""
        return packet_key_rate(self.bitrate)


@dataclass(frozen=True)
class Budget:
    """Key consumption and what is left, for the user (bytes and seconds)."""

    sent_key_bytes: int
    received_key_bytes: int
    wasted_bytes: int
    held_bytes: int
    pool_bytes: int | None
    rate: float

    @property
    def remaining_s(self) -> float | None:
        """Seconds of outbound audio the pad held plus the KME pool still cover."""
        if self.pool_bytes is None:
            return None
        return (self.held_bytes + self.pool_bytes) / self.rate

    def describe(self) -> str:
        """One line for the call display."""
        used = (self.sent_key_bytes + self.received_key_bytes) / 1024
        left = self.remaining_s
        tail = "pool unknown" if left is None else f"{left:.0f} s left"
        return f"OTP key used {used:.1f} KiB, held {self.held_bytes} B, {tail}"


class State(enum.IntEnum):
    """Key stream states."""

    RUNNING = 0
    FALLEN_BACK = 1
    ENDED = 2


class KeyStreamProtocol:
    """One side's OTP key stream: its outbound pad, the peer's inbound pad, the control flow.

    Args:
        policy: :class:`OTPPolicy`.

    After every input call :meth:`events_received` and :meth:`data_to_send`.
    """

    def __init__(self, policy: OTPPolicy | None = None) -> None:
        self.policy = policy or OTPPolicy()
        self.sender = PadSender()
        self.receiver = PadReceiver()
        self.state = State.RUNNING
        self.tx_no_key = 0
        self.pool_bytes: int | None = None
        self._events: list[Event] = []
        self._outbox: list[bytes] = []
        self._next_index = 0
        self._in_flight: dict[int, list[tuple[str, bytes]]] = {}
        self._requested = 0  # blocks asked of the shell, not yet delivered
        self._kme_empty = False
        self._peer_next = 0

    def __repr__(self) -> str:
        return (
            f"<KeyStreamProtocol {self.state.name} held={self.sender.available} "
            f"in_flight={sum(len(v) for v in self._in_flight.values())}>"
        )

    # --- outputs ---------------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Events since the last call."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Control messages to send to the peer, in order."""
        out, self._outbox = self._outbox, []
        return out

    def budget(self) -> Budget:
        """Consumption so far and what is left."""
        return Budget(
            sent_key_bytes=self.sender.stats.key_bytes,
            received_key_bytes=self.receiver.stats.key_bytes,
            wasted_bytes=self.sender.stats.wasted_bytes,
            held_bytes=self.sender.available,
            pool_bytes=self.pool_bytes,
            rate=self.policy.rate,
        )

    # --- inputs from the shell ----------------------------------------------------------

    def start(self) -> None:
        """Begin: ask for the first blocks.

        After calling this method: call :meth:`events_received` (a :class:`KeysWanted`).
        """
        self._refill()

    def receive_keys(self, keys: Sequence[tuple[str, bytes]]) -> None:
        """Keys from ``enc_keys`` for our outbound pad: offer them to the peer.

        Args:
            keys: ``(key_ID, key)`` pairs, in the order the KME gave them.
        """
        self._requested = 0
        self._kme_empty = False
        if self.state is not State.RUNNING or not keys:
            return  # fetched too late: the keys are dropped, never used
        block_bytes = self.policy.block_bits // 8
        for start in range(0, len(keys), MAX_BATCH):
            batch = [(k, v) for k, v in keys[start : start + MAX_BATCH] if len(v) == block_bytes]
            if len(batch) != len(keys[start : start + MAX_BATCH]):
                raise ValueError(f"enc_keys gave keys that are not {block_bytes} bytes")
            first = self._next_index
            self._next_index += len(batch)
            self._in_flight[first] = batch
            message = ControlMessage(
                MessageType.BLOCKS, first, len(batch), tuple(k for k, _ in batch)
            )
            self._outbox.append(message.serialize())
            logger.debug("> BLOCKS %d+%d", first, len(batch))

    def keys_unavailable(self, reason: str) -> None:
        """``enc_keys`` failed (pool empty, KME down): act if the pad is low."""
        self._requested = 0
        self._kme_empty = True
        self._check_low(reason)

    def receive_pool_status(self, pool_bytes: int) -> None:
        """The KME's stored key for our outbound pair (ETSI 014 Status), for the budget."""
        self.pool_bytes = max(0, pool_bytes)

    def receive_peer_keys(self, first: int, keys: Sequence[tuple[str, bytes]]) -> None:
        """Keys from ``dec_keys`` for the peer's pad, batch ``first``: hold them, ACK.

        Raises:
            ValueError: ``first`` is not the batch asked for by :class:`PeerKeysNeeded`.
        """
        if first != self._peer_next:
            raise ValueError(f"peer batch {first} is not the expected {self._peer_next}")
        if self.state is State.ENDED:
            return
        for offset, (key_id, key) in enumerate(keys):
            self.receiver.add_block(first + offset, key_id, key)
        self._peer_next = first + len(keys)
        self._outbox.append(ControlMessage(MessageType.ACK, first, len(keys)).serialize())
        logger.debug("> ACK %d+%d", first, len(keys))

    def peer_keys_failed(self, first: int, reason: str) -> None:
        """``dec_keys`` failed for batch ``first``: NACK it (the sender drops it)."""
        del reason
        nack = ControlMessage(MessageType.NACK, first, 0, code=CODE_KME_ERROR)
        self._outbox.append(nack.serialize())

    def receive_data(self, data: bytes) -> None:
        """A control message from the peer.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        try:
            message = ControlMessage.parse(data)
        except ValueError as exc:
            logger.debug("! bad control message: %s", exc)
            self._end(f"peer sent a {_CODE_TEXT[CODE_PROTOCOL]}: {exc}", CODE_PROTOCOL)
            return
        logger.debug("< %s %d+%d", message.type.name, message.first, message.count)
        if message.type is MessageType.BLOCKS:
            if message.first != self._peer_next:
                self._end("peer's pad blocks out of order", CODE_PROTOCOL)
                return
            self._events.append(PeerKeysNeeded(message.first, message.key_ids))
        elif message.type is MessageType.ACK:
            batch = self._in_flight.pop(message.first, None)
            if batch is None or message.count != len(batch):
                self._end("peer acknowledged blocks never offered", CODE_PROTOCOL)
                return
            for offset, (key_id, key) in enumerate(batch):
                self.sender.add_block(message.first + offset, key_id, key)
        elif message.type is MessageType.NACK:
            self._end(
                f"peer could not fetch our pad blocks: {_CODE_TEXT.get(message.code, '?')}",
                CODE_KME_ERROR,
            )
        elif message.type is MessageType.END and self.state is not State.ENDED:
            self.state = State.ENDED
            self._events.append(KeyStreamEnded(_CODE_TEXT.get(message.code, "ended"), True))
        elif message.type is MessageType.FALLBACK and self.state is State.RUNNING:
            self.state = State.FALLEN_BACK
            self._events.append(FellBackToHybrid(_CODE_TEXT.get(message.code, "?"), True))

    def close(self) -> None:
        """Hang up: tell the peer, forget pads."""
        if self.state is not State.ENDED:
            self._end(_CODE_TEXT[CODE_HANGUP], CODE_HANGUP, event=False)

    # --- media ---------------------------------------------------------------------------

    def protect(self, rtp: bytes) -> bytes | None:
        """Protect one outbound RTP packet, or return ``None`` (no fresh key: dropped).

        Raises:
            OTPPacketError: not RTP, or a payload too large for OTP.
        """
        if self.state is not State.RUNNING:
            return None
        packet = self.sender.protect(rtp)
        if packet is None:
            self.tx_no_key += 1
        self._refill()
        return packet

    def unprotect(self, packet: bytes) -> bytes:
        """Check and decrypt one inbound OTP packet.

        Raises:
            OTPPacketError: the packet must be dropped (``reason`` says why).
        """
        if self.state is State.ENDED:
            raise OTPPacketError("ended", "OTP packet rejected: key stream ended")
        return self.receiver.unprotect(packet)

    # --- internals -------------------------------------------------------------------------

    def _held_and_coming(self) -> int:
        block = self.policy.block_bits // 8
        flight = sum(len(b) for b in self._in_flight.values()) + self._requested
        return self.sender.available + flight * block

    def _refill(self) -> None:
        if self.state is not State.RUNNING:
            return
        if self._kme_empty:
            self._check_low(_CODE_TEXT[CODE_POOL_LOW])
            if self.state is not State.RUNNING:
                return
        if self._requested:
            return
        want = self.policy.prefetch_s * self.policy.rate - self._held_and_coming()
        if want > 0:
            block = self.policy.block_bits // 8
            number = min(MAX_BATCH, -(-int(want) // block))
            self._requested = number
            self._events.append(KeysWanted(number, self.policy.block_bits))

    def _check_low(self, reason: str) -> None:
        if self.state is not State.RUNNING:
            return
        if self._held_and_coming() >= self.policy.low_water_s * self.policy.rate:
            return
        text = f"one-time pad low ({reason})"
        if self.policy.on_exhausted == "hybrid":
            self.state = State.FALLEN_BACK
            fallback = ControlMessage(MessageType.FALLBACK, code=CODE_POOL_LOW)
            self._outbox.append(fallback.serialize())
            self._events.append(FellBackToHybrid(text))
        else:
            self._end(text, CODE_POOL_LOW)

    def _end(self, reason: str, code: int, *, event: bool = True) -> None:
        if self.state is State.ENDED:
            return
        self.state = State.ENDED
        self._outbox.append(ControlMessage(MessageType.END, code=code).serialize())
        if event:
            self._events.append(KeyStreamEnded(reason))


def exhausted_error(event: KeyStreamEnded | FellBackToHybrid) -> OTPKeyExhaustedError:
    """The error a call reports for an event that ended its OTP media."""
    who = "the peer" if event.by_peer else "this side"
    if isinstance(event, FellBackToHybrid):
        return OTPKeyExhaustedError(f"OTP media fell back to hybrid ({who}: {event.reason})")
    return OTPKeyExhaustedError(f"OTP call ended ({who}: {event.reason})")
