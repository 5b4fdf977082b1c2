"""Many OTP calls on one QKD link, in virtual time, through real KMEs (docs/otp.md §6).

Used by ``scripts/otp_capacity.py`` and the tests. Everything here is what runs in
a real call except the network and the clock: each call is two
:class:`~qcall.otp.keystream.KeyStreamProtocol` s exchanging control messages
and sealed media packets with a one-way delay, and fetching their pad blocks
from two :class:`~qcall.qkd.kme.KME` objects (ETSI GS QKD 014 ``enc_keys`` /
``dec_keys``: a key is delivered once to each side, then erased). A link
deposits secret key at ``rate_bps`` (with a relative spread per second, the
model fidelity's fluctuation) into a relay buffer of bounded size, from which
the KMEs' pair pools are supplied on demand, the way the trusted-node relay
tops them up.

A packet is *dropped* when its sender holds no fresh key at its send time
(``KeyStreamProtocol.protect`` returns ``None``). A call is *refused* when it
cannot get its first pad blocks, and *ended* when its pad ran low under policy
``end``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from qcall.exceptions import OTPPacketError, QKDError
from qcall.otp.capacity import opus_payload_bytes
from qcall.otp.keystream import (
    FellBackToHybrid,
    KeyStreamEnded,
    KeyStreamProtocol,
    KeysWanted,
    OTPPolicy,
    PeerKeysNeeded,
)
from qcall.qkd.etsi014 import KeyRequest
from qcall.qkd.kme import KME
from qcall.typing import KeyId, SAEId

__all__ = ["CallRecord", "LinkSupply", "LoadSimulation"]

TICK = 0.02  # one Opus frame


@dataclass
class LinkSupply:
    """Secret key of one link: ``rate_bps`` on average, kept in a bounded relay buffer."""

    rate_bps: float
    buffer_s: float = 1.0
    spread: float = 0.0
    seed: int = 0
    bits: float = 0.0
    deposited: float = 0.0
    _last: float = 0.0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def advance(self, now: float) -> None:
        """Deposit the key produced since the last call (one-second granularity of spread)."""
        while self._last + 1.0 <= now:
            self._deposit(1.0)
        if now > self._last:
            self._deposit(now - self._last)

    def _deposit(self, dt: float) -> None:
        factor = max(0.0, 1.0 + self.spread * self._rng.gauss(0.0, 1.0)) if self.spread else 1.0
        add = self.rate_bps * dt * factor
        self.deposited += add
        self.bits = min(self.bits + add, self.rate_bps * self.buffer_s)
        self._last += dt

    def take(self, bits: int) -> bool:
        """Take ``bits`` if held."""
        if self.bits < bits:
            return False
        self.bits -= bits
        return True


@dataclass
class CallRecord:
    """One simulated call's outcome."""

    index: int
    started: float
    sent: int = 0
    dropped: int = 0
    received: int = 0
    rejected: int = 0
    refused: bool = False
    ended_at: float | None = None
    end_reason: str | None = None
    sides: tuple[KeyStreamProtocol, KeyStreamProtocol] | None = field(default=None, repr=False)
    media_started: list[bool] = field(default_factory=lambda: [False, False])


class LoadSimulation:
    """OTP calls between two sites over one link's key, in virtual time.

    Args:
        supply: the link's key supply.
        policy: every call's :class:`OTPPolicy`.
        delay: one-way network delay of control and media packets (seconds).
        on_key_used: called with ``(key_id, block_bytes)`` for every pad block
            used, to check uniqueness.
    """

    def __init__(
        self,
        supply: LinkSupply,
        policy: OTPPolicy | None = None,
        *,
        delay: float = 0.01,
        on_key_used: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.supply = supply
        self.policy = policy or OTPPolicy()
        self.delay = delay
        self.now = 0.0
        self.calls: list[CallRecord] = []
        bits = self.policy.block_bits
        self.kmes = (KME("KME-A", key_size=bits), KME("KME-B", key_size=bits))
        self._rng = random.Random(supply.seed + 1)
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._on_key_used = on_key_used
        self._payload = bytes(opus_payload_bytes(self.policy.bitrate))

    # --- scheduling ------------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def run_until(self, until: float) -> None:
        """Advance virtual time to ``until``, running every due action in order."""
        while self._queue and self._queue[0][0] <= until:
            when, _, action = heapq.heappop(self._queue)
            self.now = when
            self.supply.advance(when)
            action()
        self.now = until
        self.supply.advance(until)

    # --- calls -------------------------------------------------------------------------

    def add_call(self) -> CallRecord:
        """Start one call now (both sides ask for their first pad blocks)."""
        index = len(self.calls)
        names = (f"a{index}", f"b{index}")
        for kme, name in zip(self.kmes, names, strict=True):
            kme.add_sae(name)
        for master, slave in (names, names[::-1]):
            for kme in self.kmes:
                role = "master" if kme.is_attached(master) else "slave"
                kme.add_pair(master, slave, role, peer_kme_id="peer")
        record = CallRecord(index, self.now)
        sides = (KeyStreamProtocol(self.policy), KeyStreamProtocol(self.policy))
        record.sides = sides
        self.calls.append(record)
        for side in (0, 1):
            sides[side].start()
            self._pump(record, side)
        self._at(self.now + TICK, functools.partial(self._tick, record))
        return record

    def _tick(self, record: CallRecord) -> None:
        if record.ended_at is not None:
            return
        assert record.sides is not None
        for side in (0, 1):
            proto = record.sides[side]
            seq = record.sent % 65536
            rtp = struct.pack("!BBHII", 0x80, 111, seq, 960 * seq, side) + self._payload
            packet = proto.protect(rtp)
            if packet is None:
                # Before its first block is agreed a side is still setting up (the
                # call layer starts media then); afterwards a packet without key is lost.
                if record.media_started[side]:
                    record.dropped += 1
            else:
                record.media_started[side] = True
                record.sent += 1
                peer = record.sides[1 - side]
                self._at(
                    self.now + self.delay, functools.partial(self._deliver, record, peer, packet)
                )
            self._pump(record, side)
        self._at(self.now + TICK, functools.partial(self._tick, record))

    def _deliver(self, record: CallRecord, proto: KeyStreamProtocol, packet: bytes) -> None:
        try:
            proto.unprotect(packet)
            record.received += 1
        except OTPPacketError:
            record.rejected += 1

    def _pump(self, record: CallRecord, side: int) -> None:
        """Act on one side's events and carry its control messages to the peer."""
        assert record.sides is not None
        proto = record.sides[side]
        for event in proto.events_received():
            if isinstance(event, KeysWanted):
                self._enc_keys(record, side, event.number)
            elif isinstance(event, PeerKeysNeeded):
                self._dec_keys(record, side, event)
            elif isinstance(event, KeyStreamEnded | FellBackToHybrid):
                self._end(record, event.reason)
        for data in proto.data_to_send():
            self._at(
                self.now + self.delay, functools.partial(self._control, record, 1 - side, data)
            )

    def _control(self, record: CallRecord, side: int, data: bytes) -> None:
        assert record.sides is not None
        record.sides[side].receive_data(data)
        self._pump(record, side)

    def _names(self, record: CallRecord, side: int) -> tuple[str, str]:
        a, b = f"a{record.index}", f"b{record.index}"
        return (a, b) if side == 0 else (b, a)

    def _enc_keys(self, record: CallRecord, side: int, number: int) -> None:
        assert record.sides is not None
        master, slave = self._names(record, side)
        size = self.policy.block_bits // 8
        if not self.supply.take(number * size * 8):
            if record.sent == 0 and not record.received:
                record.refused = True
            record.sides[side].keys_unavailable("link key buffer empty")
            self._pump(record, side)
            return
        keys = [
            (str(uuid.UUID(int=self._rng.getrandbits(128))), self._rng.randbytes(size))
            for _ in range(number)
        ]
        kme_m, kme_s = (self.kmes[side], self.kmes[1 - side])
        kme_m.supply(master, slave, keys, role="master", peer_kme_id="peer", now=self.now)
        kme_s.supply(master, slave, keys, role="slave", peer_kme_id="peer", now=self.now)
        container = kme_m.enc_keys(SAEId(master), slave, KeyRequest(number, size * 8), now=self.now)
        got = [(k.key_id, k.key) for k in container.keys]
        if self._on_key_used is not None:
            for key_id, key in got:
                self._on_key_used(key_id, key)
        record.sides[side].receive_keys(got)
        self._pump(record, side)

    def _dec_keys(self, record: CallRecord, side: int, event: PeerKeysNeeded) -> None:
        assert record.sides is not None
        peer_master, me = self._names(record, 1 - side)
        try:
            ids = [KeyId(k) for k in event.key_ids]
            container = self.kmes[side].dec_keys(SAEId(me), peer_master, ids, self.now)
        except QKDError as exc:
            record.sides[side].peer_keys_failed(event.first, str(exc))
        else:
            keys = [(k.key_id, k.key) for k in container.keys]
            record.sides[side].receive_peer_keys(event.first, keys)
        self._pump(record, side)

    def _end(self, record: CallRecord, reason: str) -> None:
        if record.ended_at is None:
            record.ended_at = self.now
            record.end_reason = reason

    # --- measurements --------------------------------------------------------------------

    def active(self) -> list[CallRecord]:
        """Calls still running."""
        return [c for c in self.calls if c.ended_at is None]

    def ramp(self, interval: float, max_calls: int) -> int:
        """Add a call every ``interval`` s until one is refused or ends; return calls held."""
        if not self.calls:  # let the relay buffer fill first
            self.run_until(self.now + self.supply.buffer_s)
        for _ in range(max_calls):
            held = len(self.active())
            self.add_call()
            self.run_until(self.now + interval)
            if any(c.ended_at is not None or c.refused for c in self.calls):
                return held
        return len(self.active())
