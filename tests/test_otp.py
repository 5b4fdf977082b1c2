"""The OTP core: one-time MAC, packet transform, key-stream manager, capacity, load simulation."""

from __future__ import annotations

import itertools
import struct
from collections import Counter

import pytest

from qcall.exceptions import OTPPacketError, QKDError
from qcall.otp.capacity import call_key_rate_bps, predict_capacity, route_capacity
from qcall.otp.keystream import (
    ControlMessage,
    FellBackToHybrid,
    KeyStreamEnded,
    KeyStreamProtocol,
    KeysWanted,
    MessageType,
    OTPPolicy,
    PeerKeysNeeded,
    packet_key_rate,
)
from qcall.otp.loadsim import LinkSupply, LoadSimulation
from qcall.otp.mac import P, forgery_bound, one_time_mac, poly_hash, verify
from qcall.otp.packet import PadReceiver, PadSender, rtp_header_length

BLOCK = 512


def rtp(seq: int, payload: bytes = b"opus-frame-of-30-bytes-xxxxxxx") -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq, 960 * seq, 0xCAFE) + payload


def block(index: int) -> bytes:
    return bytes((index * 7 + i * 13 + 1) % 256 for i in range(BLOCK))


# --- the MAC -----------------------------------------------------------------------------


def test_mac_is_a_polynomial_without_constant_term() -> None:
    assert poly_hash(0, b"anything") == 0
    assert poly_hash(1, b"\x01") == (1 << 112) + 1  # block 0x01‖0*14, then length 1
    assert poly_hash(2, b"") == 0  # empty message: only the length term, 0·r


def test_every_single_bit_flip_of_the_message_or_tag_is_rejected() -> None:
    key = bytes(range(32))
    message = b"header+locator+ciphertext"
    tag = one_time_mac(key, message)
    assert verify(key, message, tag)
    for i in range(len(message) * 8):
        flipped = bytearray(message)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not verify(key, bytes(flipped), tag)
    assert not verify(key, message + b"\0", tag)  # length is hashed: no zero-extension
    assert not verify(key, message, bytes(16))


def test_forgery_bound_is_tiny_for_voice_packets() -> None:
    assert forgery_bound(80) < 2.0**-120
    assert P == 2**127 - 1
    with pytest.raises(ValueError, match="32 bytes"):
        one_time_mac(b"short", b"")


# --- the packet transform ----------------------------------------------------------------


def test_round_trip_and_every_tampered_byte_is_rejected() -> None:
    sender, receiver = PadSender(), PadReceiver()
    sender.add_block(0, "k0", block(0))
    receiver.add_block(0, "k0", block(0))
    packet = sender.protect(rtp(1))
    assert packet is not None and len(packet) == len(rtp(1)) + 6 + 16
    assert packet[12 + 6 : -16] != rtp(1)[12:]  # payload encrypted
    reasons: Counter[str] = Counter()
    for i in range(len(packet)):
        tampered = bytearray(packet)
        tampered[i] ^= 0x40
        with pytest.raises(OTPPacketError) as info:
            receiver.unprotect(bytes(tampered))
        reasons[info.value.reason] += 1
    assert set(reasons) <= {"forged", "malformed", "unknown-block", "out-of-range"}
    assert reasons["forged"] >= len(packet) - 8
    # Nothing was consumed by the forgeries: the genuine packet still opens, once.
    assert receiver.unprotect(packet) == rtp(1)
    with pytest.raises(OTPPacketError, match="reused"):
        receiver.unprotect(packet)


def test_sender_never_hands_out_a_byte_twice_and_erases_it() -> None:
    sender, receiver = PadSender(), PadReceiver()
    for i in range(3):
        sender.add_block(i, f"k{i}", block(i))
        receiver.add_block(i, f"k{i}", block(i))
    ranges = []
    for seq in range(30):
        packet = sender.protect(rtp(seq))
        if packet is None:
            break
        hlen = rtp_header_length(packet)
        index, offset = struct.unpack_from("!IH", packet, hlen)
        ranges.append((index, offset, offset + 32 + 30))
        assert receiver.unprotect(packet) == rtp(seq)
    per_block = BLOCK // 62
    assert len(ranges) == 3 * per_block
    rest = BLOCK - per_block * 62
    assert sender.stats.wasted_bytes == 2 * rest  # block ends skipped, erased unused
    for a, b in itertools.pairwise(ranges):
        assert a[0] < b[0] or a[2] <= b[1]
    assert sender.protect(rtp(99)) is None  # no fresh key: nothing sent
    assert sender.available == rest  # the last block's tail, too short for a packet


def test_out_of_order_blocks_and_retired_blocks() -> None:
    sender = PadSender()
    with pytest.raises(ValueError, match="out of order"):
        sender.add_block(1, "k1", block(1))
    receiver = PadReceiver(retain=2)
    for i in range(4):
        receiver.add_block(i, f"k{i}", block(i))
    late = PadSender()
    for i in range(4):
        late.add_block(i, f"k{i}", block(i))
    packets: list[bytes] = []
    while (p := late.protect(rtp(len(packets)))) is not None:
        packets.append(p)
    receiver.unprotect(packets[-1])  # a packet of block 3 retires blocks 0 and 1
    assert receiver.block_indexes == [2, 3]
    with pytest.raises(OTPPacketError) as info:
        receiver.unprotect(packets[0])
    assert info.value.reason == "retired"


def test_malformed_packets_are_typed_errors() -> None:
    receiver = PadReceiver()
    for data in (b"", b"\x00" * 40, b"\x80" * 11, b"\x9f" + b"\0" * 20, rtp(1)[:12] + b"x"):
        with pytest.raises(OTPPacketError):
            receiver.unprotect(data)
    sender = PadSender()
    sender.add_block(0, "k", block(0))
    with pytest.raises(OTPPacketError, match="480"):
        sender.protect(rtp(1, bytes(481)))


# --- the key stream ------------------------------------------------------------------------


class Pair:
    """Two key streams wired back to back, with a dict standing in for the KMEs."""

    def __init__(self, policy: OTPPolicy, pool_blocks: int = 1000) -> None:
        self.sides = (KeyStreamProtocol(policy), KeyStreamProtocol(policy))
        self.pool = [pool_blocks, pool_blocks]
        self.kme: dict[str, bytes] = {}
        self.issued: list[str] = []
        self.events: list[list[object]] = [[], []]
        self.counter = 0

    def run(self) -> None:
        for _ in range(20):
            moved = False
            for side in (0, 1):
                me, peer = self.sides[side], self.sides[1 - side]
                for event in me.events_received():
                    moved = True
                    self.events[side].append(event)
                    if isinstance(event, KeysWanted):
                        if self.pool[side] < event.number:
                            me.keys_unavailable("pool empty")
                            continue
                        self.pool[side] -= event.number
                        keys = []
                        for _ in range(event.number):
                            self.counter += 1
                            key_id = f"id-{self.counter}"
                            self.kme[key_id] = block(self.counter)
                            self.issued.append(key_id)
                            keys.append((key_id, self.kme[key_id]))
                        me.receive_keys(keys)
                    elif isinstance(event, PeerKeysNeeded):
                        keys = [(k, self.kme.pop(k)) for k in event.key_ids]
                        me.receive_peer_keys(event.first, keys)
                for data in me.data_to_send():
                    moved = True
                    peer.receive_data(data)
            if not moved:
                return

    def talk(self, packets: int) -> tuple[int, int]:
        sent = ok = 0
        for seq in range(packets):
            for side in (0, 1):
                packet = self.sides[side].protect(rtp(seq))
                self.run()
                if packet is not None:
                    sent += 1
                    if self.sides[1 - side].state == 2:  # ENDED meanwhile: dropped
                        continue
                    assert self.sides[1 - side].unprotect(packet) == rtp(seq)
                    ok += 1
        return sent, ok


def test_blocks_are_agreed_before_use_and_refilled_ahead() -> None:
    pair = Pair(OTPPolicy())
    for side in pair.sides:
        side.start()
    pair.run()
    sent, ok = pair.talk(500)  # 10 s of audio each way
    assert sent == ok == 1000
    assert all(s.tx_no_key == 0 for s in pair.sides)
    assert len(pair.issued) == len(set(pair.issued))
    budget = pair.sides[0].budget()
    assert budget.sent_key_bytes == 500 * (32 + 30)
    assert budget.received_key_bytes == 500 * (32 + 30)
    assert "KiB" in budget.describe()


@pytest.mark.parametrize(
    ("policy", "event_type"), [("end", KeyStreamEnded), ("hybrid", FellBackToHybrid)]
)
def test_pool_low_ends_or_falls_back_and_says_so_before_running_dry(
    policy: str, event_type: type
) -> None:
    pair = Pair(OTPPolicy(on_exhausted=policy), pool_blocks=30)  # type: ignore[arg-type]
    for side in pair.sides:
        side.start()
    pair.run()
    pair.talk(400)
    assert any(isinstance(e, event_type) and not e.by_peer for e in pair.events[0])  # type: ignore[attr-defined]
    assert any(isinstance(e, event_type) and e.by_peer for e in pair.events[1])  # type: ignore[attr-defined]
    # The policy acted while pad was still held: not one packet went without key.
    assert pair.sides[0].tx_no_key == 0


def test_hostile_control_messages_end_the_stream_cleanly() -> None:
    for data in (
        b"",
        b"QOTP\x02" + bytes(6),
        b"QCHS" + bytes([1, 1, 0, 0, 0, 0, 0]),
        b"QOTP" + bytes([1, 9, 0, 0, 0, 0, 0]),
        b"QOTP" + bytes([1, 1, 0, 0, 0, 0, 2, 5]),
    ):
        proto = KeyStreamProtocol()
        proto.receive_data(data)
        (event,) = proto.events_received()
        assert isinstance(event, KeyStreamEnded) and "malformed" in event.reason
        assert ControlMessage.parse(proto.data_to_send()[0]).type is MessageType.END
    proto = KeyStreamProtocol()
    proto.receive_data(ControlMessage(MessageType.ACK, 5, 1).serialize())  # never offered
    assert isinstance(proto.events_received()[0], KeyStreamEnded)


def test_policy_checks_itself() -> None:
    with pytest.raises(ValueError):
        OTPPolicy(on_exhausted="silent")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        OTPPolicy(bitrate=1000)
    assert packet_key_rate(12_000) == 50 * 32 + 1500


# --- capacity and the load simulation -------------------------------------------------------


def test_capacity_prediction() -> None:
    per_call = call_key_rate_bps()
    assert per_call == pytest.approx(2 * 50 * (512 / 8) * 8)  # 8 packets of 62 B per block
    assert predict_capacity(11 * per_call + 1) == 11
    assert route_capacity([1e6, 11 * per_call, 5e6]) == 11
    assert route_capacity([]) == 0


def test_parallel_calls_never_share_a_key_byte_and_drop_nothing_under_capacity() -> None:
    seen: dict[str, bytes] = {}

    def used(key_id: str, key: bytes) -> None:
        assert key_id not in seen
        seen[key_id] = key

    rate = 4 * call_key_rate_bps() * 1.05
    sim = LoadSimulation(LinkSupply(rate, buffer_s=1.0), on_key_used=used)
    sim.run_until(1.0)
    for _ in range(4):  # callers dial a few seconds apart
        sim.add_call()
        sim.run_until(sim.now + 3.0)
    sim.run_until(21.0)
    assert all(c.dropped == 0 and c.rejected == 0 and c.ended_at is None for c in sim.calls)
    assert all(c.received >= c.sent - 4 for c in sim.calls)
    assert len(set(seen.values())) == len(seen)  # no two blocks alike either
    held = sim.ramp(10.0, 8)
    assert held in (4, 5)


def test_a_restarted_key_stream_gets_fresh_blocks_from_the_kme() -> None:
    """Kill a call's key streams mid-call, start new ones on the same KMEs: no block reused."""
    from qcall.qkd.etsi014 import KeyRequest
    from qcall.qkd.kme import KME, random_keys
    from qcall.typing import KeyId, SAEId

    kme_a, kme_b = KME("KME-A", key_size=4096), KME("KME-B", key_size=4096)
    keys = random_keys(40, 4096)
    kme_a.supply("alice", "bob", keys, role="master", peer_kme_id="KME-B")
    kme_b.supply("alice", "bob", keys, role="slave", peer_kme_id="KME-A")
    seen: list[bytes] = []
    for _ in range(2):
        sender, receiver = KeyStreamProtocol(), KeyStreamProtocol()
        sender.start()
        (wanted,) = sender.events_received()
        assert isinstance(wanted, KeysWanted)
        got = kme_a.enc_keys(SAEId("alice"), "bob", KeyRequest(wanted.number, 4096)).keys
        sender.receive_keys([(k.key_id, k.key) for k in got])
        for data in sender.data_to_send():
            receiver.receive_data(data)
        (needed,) = receiver.events_received()
        assert isinstance(needed, PeerKeysNeeded)
        ids = [KeyId(k) for k in needed.key_ids]
        fetched = kme_b.dec_keys(SAEId("bob"), "alice", ids).keys
        receiver.receive_peer_keys(needed.first, [(k.key_id, k.key) for k in fetched])
        for data in receiver.data_to_send():
            sender.receive_data(data)
        for seq in range(20):
            packet = sender.protect(rtp(seq))
            assert packet is not None and receiver.unprotect(packet) == rtp(seq)
        seen += [k.key for k in got]
        # "crash": both protocol objects are dropped without a goodbye
    assert len(seen) == len(set(seen)) == 2 * 19
    assert isinstance(needed, PeerKeysNeeded)  # for mypy: the last call's
    with pytest.raises(QKDError):  # the first call's blocks are gone from the KME
        kme_b.dec_keys(SAEId("bob"), "alice", [KeyId(k) for k in needed.key_ids])
