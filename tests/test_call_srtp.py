"""Tests for qcall.call.srtp (hybrid SRTP hook) and qcall.call.keylog (QCALL_KEYLOG).

The call tests run two RTCPeerConnections in one process over the host's own
interface addresses (aioice offers no 127.0.0.1 candidate) with synthetic
440 Hz audio in both directions, and capture the datagrams each side hands to
its ICE transport, so the keys really in use can be checked with an independent
pylibsrtp session.
"""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import logging
import os
import random
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pylibsrtp
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtpPacket, is_rtcp
from av import AudioFrame
from pylibsrtp import Policy, Session

from qcall.call.keylog import KEYLOG_ENV, keylog_write, parse_keylog
from qcall.call.srtp import (
    EXPORTER_LENGTH,
    HookState,
    HybridSRTP,
    InboundKeyring,
    OutboundSession,
    SRTPKeys,
    SRTPProfile,
    SRTPStats,
    check_aiortc_version,
    dtls_srtp_keys,
    export_exporter_secret,
    get_srtp_hook,
    install_srtp_hook,
    swap_srtp_keys,
)
from qcall.exceptions import CallError, ConfigError, InvalidKeyError
from qcall.handshake.keyschedule import SRTPKeyMaterial, SRTPProfile as KeyScheduleProfile
from tests.utils import TIMEOUT_FACTOR

T = TIMEOUT_FACTOR
SAMPLE_RATE = 48000
PTIME = 0.020
SAMPLES = int(SAMPLE_RATE * PTIME)


# --- helpers ------------------------------------------------------------------------


def derive_keys(
    secret: bytes,
    role: str,
    *,
    label: bytes = b"test",
    generation: int = 0,
    profile: SRTPProfile = SRTPProfile.AEAD_AES_256_GCM,
) -> SRTPKeys:
    """A stand-in key schedule: both sides derive the same keys from the exporter."""
    k, s = profile.key_length, profile.salt_length
    okm = hashlib.shake_256(label + generation.to_bytes(4, "big") + secret).digest(2 * (k + s))
    client = (okm[:k], okm[k : k + s])
    server = (okm[k + s : 2 * k + s], okm[2 * k + s :])
    local, remote = (client, server) if role == "client" else (server, client)
    return SRTPKeys(profile, local[0], local[1], remote[0], remote[1])


def random_keys(profile: SRTPProfile = SRTPProfile.AEAD_AES_256_GCM) -> SRTPKeys:
    k, s = profile.key_length, profile.salt_length
    return SRTPKeys(profile, os.urandom(k), os.urandom(s), os.urandom(k), os.urandom(s))


def rtp_packet(seq: int, ssrc: int = 0x1234, payload: bytes = b"\x55" * 80) -> bytes:
    return struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, seq * SAMPLES, ssrc) + payload


def sender(master: bytes, profile: SRTPProfile) -> Session:
    policy = Policy(
        key=master, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile.libsrtp_profile
    )
    return Session(policy)


def receiver(master: bytes, profile: SRTPProfile) -> Session:
    policy = Policy(
        key=master, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile.libsrtp_profile
    )
    policy.window_size = 1024
    return Session(policy)


class ToneTrack(MediaStreamTrack):
    """A 440 Hz tone, 48 kHz mono s16, 20 ms frames paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += SAMPLES
            await asyncio.sleep(max(0.0, self._start + self._pts / SAMPLE_RATE - time.monotonic()))
        t = (np.arange(SAMPLES) + self._pts) / SAMPLE_RATE
        samples = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


@dataclass
class Side:
    pc: RTCPeerConnection
    sent: list[bytes] = field(default_factory=list)
    secrets: list[tuple[bytes, str]] = field(default_factory=list)
    rx_seqs: list[int] = field(default_factory=list)
    frames: list[AudioFrame] = field(default_factory=list)
    hook: HybridSRTP | None = None
    remote_track: asyncio.Future[Any] | None = None

    @property
    def dtls(self) -> Any:
        return self.pc.getTransceivers()[0].receiver.transport

    def srtp_sent(self) -> list[bytes]:
        return [d for d in self.sent if 127 < d[0] < 192 and not is_rtcp(d)]

    def srtcp_sent(self) -> list[bytes]:
        return [d for d in self.sent if 127 < d[0] < 192 and is_rtcp(d)]


Provider = Callable[[bytes, str], Any]


def recording(side: Side, provider: Provider) -> Provider:
    def wrapped(secret: bytes, role: str) -> Any:
        side.secrets.append((secret, role))
        return provider(secret, role)

    return wrapped


def capture(side: Side) -> None:
    """Record every datagram the side hands to its ICE transport."""
    ice = side.dtls.transport
    original = ice._send

    async def _send(data: bytes) -> None:
        side.sent.append(bytes(data))
        await original(data)

    ice._send = _send


def watch_rtp(side: Side) -> None:
    """Record the sequence number of every RTP packet delivered to the receiver."""
    rtp_receiver = side.pc.getTransceivers()[0].receiver
    original = rtp_receiver._handle_rtp_packet

    async def _handle(packet: RtpPacket, arrival_time_ms: int) -> None:
        side.rx_seqs.append(packet.sequence_number)
        await original(packet, arrival_time_ms=arrival_time_ms)

    rtp_receiver._handle_rtp_packet = _handle  # type: ignore[method-assign]  # a test's wrapper


async def call(
    provider_a: Provider | None, provider_b: Provider | None, *, timeout_a: float = 10.0
) -> tuple[Side, Side]:
    """Connect A (offerer, DTLS server) and B (answerer, DTLS client), audio both ways."""
    config = RTCConfiguration(iceServers=[])
    a, b = Side(RTCPeerConnection(config)), Side(RTCPeerConnection(config))
    loop = asyncio.get_running_loop()
    for side in (a, b):
        side.remote_track = loop.create_future()
        side.pc.on("track", side.remote_track.set_result)
    a.pc.addTrack(ToneTrack())
    capture(a)
    if provider_a is not None:
        a.hook = install_srtp_hook(a.pc, recording(a, provider_a), timeout=timeout_a)
    await a.pc.setLocalDescription(await a.pc.createOffer())
    await b.pc.setRemoteDescription(a.pc.localDescription)
    b.pc.addTrack(ToneTrack())
    capture(b)
    if provider_b is not None:
        b.hook = install_srtp_hook(b.pc, recording(b, provider_b))
    await b.pc.setLocalDescription(await b.pc.createAnswer())
    await a.pc.setRemoteDescription(b.pc.localDescription)
    for side in (a, b):
        watch_rtp(side)
    return a, b


async def close(*sides: Side) -> None:
    for side in sides:
        await side.pc.close()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * T
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def collect_frames(side: Side, count: int) -> list[AudioFrame]:
    assert side.remote_track is not None
    track = await asyncio.wait_for(side.remote_track, 5 * T)
    frames = [await asyncio.wait_for(track.recv(), 5 * T) for _ in range(count)]
    side.frames.extend(frames)
    return frames


def pts(frame: AudioFrame) -> int:
    """A decoded frame's timestamp (aiortc's decoder sets it on every frame)."""
    assert frame.pts is not None
    return frame.pts


def generations(ring: InboundKeyring) -> tuple[int, ...]:
    """``ring.generations``, unnarrowed (for mypy: ``unprotect`` may retire some)."""
    return ring.generations


def rms(frame: AudioFrame) -> float:
    return float(np.sqrt(np.mean(frame.to_ndarray().astype(np.float64) ** 2)))


def decrypt_all(packets: list[bytes], master: bytes, profile: SRTPProfile) -> int:
    """Decrypt SRTP ``packets`` with a fresh session; return how many fail."""
    session = receiver(master, profile)
    failures = 0
    for packet in packets:
        try:
            session.unprotect(packet)
        except pylibsrtp.Error:
            failures += 1
    return failures


def async_provider(delay: float, label: bytes = b"test") -> Provider:
    async def provide(secret: bytes, role: str) -> SRTPKeys:
        await asyncio.sleep(delay)
        return derive_keys(secret, role, label=label)

    return provide


# --- (1) + (2): the supplied keys are the keys on the wire; audio arrives --------------


async def test_hybrid_keys_on_the_wire_and_audio_arrives() -> None:
    # A answers at once, B only after 300 ms: A's early packets are queued by B.
    a, b = await call(lambda secret, role: derive_keys(secret, role), async_provider(0.3 * T))
    try:
        assert a.hook is not None and b.hook is not None
        await asyncio.wait_for(a.hook.wait_ready(), 5 * T)
        await asyncio.wait_for(b.hook.wait_ready(), 5 * T)
        frames_b = await collect_frames(b, 25)
        frames_a = await collect_frames(a, 25)

        # Both sides got the same RFC 5705 secret, in opposite DTLS roles: K_dtls of
        # docs/key-schedule.md, the RFC 5764 bytes of the profile DTLS negotiated.
        [(secret_a, role_a)] = a.secrets
        [(secret_b, role_b)] = b.secrets
        assert len(secret_a) == EXPORTER_LENGTH and secret_a == secret_b
        assert {role_a, role_b} == {"client", "server"}
        assert secret_a == export_exporter_secret(a.dtls) == a.hook.exporter_secret
        stock_a = dtls_srtp_keys(a.dtls)
        assert stock_a.local_key in secret_a and stock_a.remote_salt in secret_a
        label = b"EXPERIMENTAL-qcall-test"  # a private label: equal on both sides too
        private = export_exporter_secret(a.dtls, label=label, length=48)
        assert private == export_exporter_secret(b.dtls, label=label, length=48)
        assert private[:32] not in secret_a

        for side, role, secret in ((a, role_a, secret_a), (b, role_b, secret_b)):
            keys = derive_keys(secret, role)
            stock = dtls_srtp_keys(side.dtls)
            srtp = side.srtp_sent()
            assert len(srtp) >= 20
            # Every captured packet decrypts under the supplied keys ...
            assert decrypt_all(srtp, keys.local_master, keys.profile) == 0
            # ... and not one under the DTLS-SRTP keys aiortc would have used.
            assert decrypt_all(srtp, stock.local_master, stock.profile) == len(srtp)
            assert stock.local_master != keys.local_master
            assert side.hook is not None and side.hook.stats.decrypt_failures == 0

        # Audio arrived both ways, decoded and not silent.
        for frames in (frames_a, frames_b):
            assert max(rms(f) for f in frames[-10:]) > 1000
        # B held no keys for 300 ms: it sent nothing and queued what A sent, then
        # delivered it, so even A's very first packet reached B's receiver.
        assert b.hook.stats.tx_dropped_pending > 0 and b.hook.stats.rx_queued_pending > 0
        assert b.rx_seqs[0] == int.from_bytes(a.srtp_sent()[0][2:4], "big")
        # A's provider answered synchronously: not one packet was held back.
        assert a.hook.stats.tx_dropped_pending == 0
        assert a.rx_seqs[0] == int.from_bytes(b.srtp_sent()[0][2:4], "big")
        assert repr(a.hook).startswith("<HybridSRTP ACTIVE")
        assert get_srtp_hook(a.dtls) is a.hook

        # Too late to hook a connected transport; and never twice.
        with pytest.raises(CallError, match=r"too late|already"):
            install_srtp_hook(a.dtls, async_provider(0))
    finally:
        await close(a, b)


# --- (3) mismatched keys ------------------------------------------------------------


async def test_mismatched_keys_no_audio_and_failures_counted() -> None:
    a, b = await call(async_provider(0, b"alice"), async_provider(0, b"bob"))
    try:
        assert a.hook is not None and b.hook is not None
        await asyncio.wait_for(b.hook.wait_ready(), 5 * T)
        await wait_for(
            lambda: b.hook is not None and b.hook.stats.rx_auth_failures >= 10, 3, "failures"
        )
        assert b.rx_seqs == [] and a.rx_seqs == []
        assert b.hook.stats.rx_packets == 0
        assert b.hook.stats.decrypt_failures >= 10
        assert b.remote_track is not None
        track = await b.remote_track
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(track.recv(), 0.3)
    finally:
        await close(a, b)


# --- (4) rekeys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile", [SRTPProfile.AEAD_AES_256_GCM, SRTPProfile.AES128_CM_HMAC_SHA1_80]
)
async def test_many_rekeys_lose_nothing(profile: SRTPProfile) -> None:
    a, b = await call(
        lambda s, r: derive_keys(s, r, profile=profile),
        lambda s, r: derive_keys(s, r, profile=profile),
    )
    try:
        assert a.hook is not None and b.hook is not None
        await asyncio.wait_for(a.hook.wait_ready(), 5 * T)
        await asyncio.wait_for(b.hook.wait_ready(), 5 * T)
        await collect_frames(b, 5)
        start_a, start_b = len(a.rx_seqs), len(b.rx_seqs)
        secret = a.hook.exporter_secret
        rekeys = 12
        frames = asyncio.ensure_future(collect_frames(b, 70))
        for generation in range(1, rekeys + 1):
            # REKEY(g) A→B: A prepares, then B prepares and switches at once (A
            # holds the inbound key already); REKEY-ACK(g) B→A lets A switch.
            ack = asyncio.get_running_loop().create_future()
            swap = asyncio.ensure_future(
                swap_srtp_keys(
                    a.dtls,
                    derive_keys(secret, a.hook.role or "", generation=generation, profile=profile),
                    peer_ready=ack,
                    generation=generation,
                )
            )
            await asyncio.sleep(0.01)
            b_keys = derive_keys(secret, b.hook.role or "", generation=generation, profile=profile)
            assert b.hook.prepare_rekey(b_keys, generation=generation) == generation
            b.hook.activate_outbound(generation)
            await asyncio.sleep(0.03)  # the REKEY-ACK travels
            ack.set_result(None)
            assert await swap == generation
            await asyncio.sleep(0.06)
        await asyncio.wait_for(frames, 5 * T)
        await asyncio.sleep(0.1)

        for side in (a, b):
            stats = side.hook.stats  # type: ignore[union-attr]
            assert stats.decrypt_failures == 0, stats
            assert stats.rx_replay_drops == 0, stats
            assert side.hook.generation == rekeys  # type: ignore[union-attr]
            assert stats.rekeys_activated == rekeys
            # Packets arrived under every generation, and none is missing.
            assert all(stats.rx_by_generation[g] > 0 for g in range(rekeys + 1)), stats
        for side, start in ((a, start_a), (b, start_b)):
            seqs = side.rx_seqs[start:]
            assert len(seqs) > 50
            assert sorted(seqs) == list(range(seqs[0], seqs[0] + len(seqs)))
        # Decoded audio is continuous: no gap in the RTP timestamps of the frames.
        steps = {int(pts(y) - pts(x)) for x, y in zip(b.frames[5:], b.frames[6:], strict=False)}
        assert steps == {SAMPLES}
        # The final generation's keys really are the ones on the wire.
        final = derive_keys(secret, a.hook.role or "", generation=rekeys, profile=profile)
        assert decrypt_all(a.srtp_sent()[-5:], final.local_master, profile) == 0
    finally:
        await close(a, b)


# --- (5) fail closed ------------------------------------------------------------------


async def test_provider_raising_later_closes_transport_without_media() -> None:
    async def failing(secret: bytes, role: str) -> SRTPKeys:
        await asyncio.sleep(0.05)
        raise RuntimeError("KME unreachable")

    a, b = await call(failing, async_provider(0))
    try:
        assert a.hook is not None and b.hook is not None
        with pytest.raises(CallError, match="RuntimeError"):
            await asyncio.wait_for(a.hook.wait_ready(), 5 * T)
        assert a.hook.state is HookState.FAILED
        assert isinstance(a.hook.error, RuntimeError)
        await wait_for(lambda: a.dtls.state == "closed", 3, "A's transport to close")
        await asyncio.sleep(0.3)
        assert a.srtp_sent() == [] and a.srtcp_sent() == []
        assert a.rx_seqs == [] and b.rx_seqs == []
        assert a.pc.connectionState == "closed"
        with pytest.raises(CallError):
            a.hook.prepare_rekey(random_keys())
    finally:
        await close(a, b)


async def test_provider_raising_at_once_fails_transport() -> None:
    def failing(secret: bytes, role: str) -> SRTPKeys:
        raise ValueError("no QKD key")

    a, b = await call(async_provider(0), failing)
    try:
        assert b.hook is not None
        with pytest.raises(CallError, match="ValueError"):
            await asyncio.wait_for(b.hook.wait_ready(), 5 * T)
        assert b.dtls.state == "failed"
        await asyncio.sleep(0.3)
        assert b.srtp_sent() == [] and b.srtcp_sent() == []
        assert a.rx_seqs == []
    finally:
        await close(a, b)


async def test_provider_timeout_fails_closed() -> None:
    async def never(secret: bytes, role: str) -> SRTPKeys:
        await asyncio.sleep(3600)
        raise AssertionError

    a, b = await call(never, async_provider(0), timeout_a=0.2)
    try:
        assert a.hook is not None
        with pytest.raises(CallError, match=r"within 0\.2 s"):
            await asyncio.wait_for(a.hook.wait_ready(), 5 * T)
        await wait_for(lambda: a.dtls.state == "closed", 3, "A's transport to close")
        assert a.srtp_sent() == [] and b.rx_seqs == []
    finally:
        await close(a, b)


async def test_provider_returning_garbage_fails_closed() -> None:
    a, b = await call(async_provider(0), lambda secret, role: b"not keys")
    try:
        assert b.hook is not None
        with pytest.raises(CallError, match="not SRTPKeys"):
            await asyncio.wait_for(b.hook.wait_ready(), 5 * T)
        assert b.srtp_sent() == [] and a.rx_seqs == []
    finally:
        await close(a, b)


async def test_install_needs_one_bundled_transport() -> None:
    config = RTCConfiguration(iceServers=[])
    a, b = RTCPeerConnection(config), RTCPeerConnection(config)
    try:
        with pytest.raises(CallError, match="0 DTLS transports"):
            install_srtp_hook(a, async_provider(0))
        a.addTrack(ToneTrack())
        a.createDataChannel("chat")  # its own transport until BUNDLE merges them
        with pytest.raises(CallError, match="2 DTLS transports"):
            install_srtp_hook(a, async_provider(0))
        with pytest.raises(CallError, match="target"):
            install_srtp_hook(object(), async_provider(0))  # type: ignore[arg-type]
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        hook = install_srtp_hook(a, async_provider(0))
        assert hook.state is HookState.WAITING_FOR_DTLS
        with pytest.raises(CallError, match="already"):
            install_srtp_hook(a, async_provider(0))
        with pytest.raises(CallError, match="only once DTLS completes"):
            hook.exporter_secret
    finally:
        await a.close()
        await b.close()


# --- pure core: keys, profiles, keyring -------------------------------------------------


def test_srtp_keys_validate_and_hide_bytes() -> None:
    keys = random_keys()
    assert keys.local_key.hex() not in repr(keys)
    assert keys.peer_view().peer_view() == keys
    assert keys.peer_view().local_master == keys.remote_master
    with pytest.raises(InvalidKeyError, match=r"remote_salt: .* needs 12 bytes, got 14"):
        SRTPKeys(SRTPProfile.AEAD_AES_256_GCM, bytes(32), bytes(12), bytes(32), bytes(14))
    with pytest.raises(InvalidKeyError, match="local_key: must be bytes"):
        SRTPKeys(SRTPProfile.AES128_CM_HMAC_SHA1_80, "x" * 16, bytes(14), bytes(16), bytes(14))  # type: ignore[arg-type]
    assert SRTPProfile.from_name("SRTP_AES128_CM_SHA1_80") is SRTPProfile.AES128_CM_HMAC_SHA1_80

    # The key schedule's own types (qcall.handshake.keyschedule) convert directly.
    local = SRTPKeyMaterial(key=keys.local_key, salt=keys.local_salt)
    remote = SRTPKeyMaterial(key=keys.remote_key, salt=keys.remote_salt)
    assert SRTPKeys.from_material(KeyScheduleProfile.AEAD_AES_256_GCM, local, remote) == keys
    assert SRTPKeys.from_material("AEAD_AES_256_GCM", local, remote) == keys
    with pytest.raises(InvalidKeyError, match="profile"):
        SRTPKeys.from_material("NULL", local, remote)
    with pytest.raises(ValueError, match="profile"):
        SRTPProfile.from_name("SRTP_NULL")


def test_check_aiortc_version() -> None:
    check_aiortc_version()
    for version in ("1.13.0", "1.16.2"):
        check_aiortc_version(version)
    for version in ("1.12.0", "1.17.0", "2.0", "garbage"):
        with pytest.raises(CallError, match="not supported"):
            check_aiortc_version(version)


@pytest.mark.parametrize("profile", list(SRTPProfile))
def test_keyring_reordered_switch_loses_nothing(profile: SRTPProfile) -> None:
    """A sender switches keys mid-stream; reordered packets all decrypt."""
    rng = random.Random(5)
    stats = SRTPStats()
    ring = InboundKeyring(stats, grace=1.0)
    generations = [random_keys(profile) for _ in range(4)]
    ring.install(0, generations[0].local_master, profile)
    # The receiver installs generation g before the sender switches to it (while
    # the last 6 packets of g-1 are still on the way); packets then arrive
    # shuffled across the switch point.
    wire: list[tuple[int, bytes] | int] = []
    seq = 1000
    for g, keys in enumerate(generations):
        if g:
            wire.insert(len(wire) - 6, g)
        tx = sender(keys.local_master, profile)
        for _ in range(30):
            wire.append((seq, tx.protect(rtp_packet(seq))))
            seq += 1
        if g:
            window = wire[-36:]
            rng.shuffle(window)
            wire[-36:] = window
    received = 0
    for n, item in enumerate(wire):
        if isinstance(item, int):
            ring.install(item, generations[item].local_master, profile)
            continue
        plain, _ = ring.unprotect(item[1], now=n * 0.02)
        assert plain == rtp_packet(item[0])
        received += 1
    assert received == 4 * 30
    assert stats.rx_packets == received and stats.decrypt_failures == 0
    assert stats.rx_older_generation > 0
    assert ring.generations == (1, 2, 3)  # at most three kept


def test_outbound_switch_waits_out_the_sequence_wrap() -> None:
    """Without the guard, losing the last pre-wrap packets under a new key would
    leave the receiver with the wrong rollover counter for the whole generation."""
    profile = SRTPProfile.AEAD_AES_256_GCM
    tx_stats, rx_stats = SRTPStats(), SRTPStats()
    outbound, ring = OutboundSession(tx_stats), InboundKeyring(rx_stats)
    old, new = random_keys(), random_keys()
    outbound.install(0, sender(old.local_master, profile))
    ring.install(0, old.local_master, profile)
    seq = 0x10000 - 70
    for _ in range(10):
        ring.unprotect(outbound.protect(rtp_packet(seq)), now=0.0)
        seq += 1
    ring.install(1, new.local_master, profile)
    outbound.install(1, sender(new.local_master, profile))
    assert outbound.switch_pending and outbound.generation == 0
    for n in range(120):
        packet = outbound.protect(rtp_packet(seq & 0xFFFF))
        if seq < 0x10000:
            assert outbound.generation == 0  # old key up to the wrap
        if seq % 0x10000 >= 2:  # the first two packets after the wrap are lost
            plain, _ = ring.unprotect(packet, now=0.02 * n)
            assert plain == rtp_packet(seq & 0xFFFF)
        seq += 1
    assert outbound.generation == 1 and not outbound.switch_pending
    assert tx_stats.tx_switch_deferred == 61  # once at install, then 65476..65535
    assert rx_stats.decrypt_failures == 0 and rx_stats.rx_by_generation[1] == 120 - 60 - 2


def test_keyring_counts_failures_replays_and_retires() -> None:
    profile = SRTPProfile.AEAD_AES_256_GCM
    stats = SRTPStats()
    ring = InboundKeyring(stats, grace=1.0)
    old, new = random_keys(), random_keys()
    ring.install(0, old.local_master, profile)
    old_tx, new_tx = sender(old.local_master, profile), sender(new.local_master, profile)
    late = old_tx.protect(rtp_packet(1))
    ring.unprotect(old_tx.protect(rtp_packet(0)), now=0.0)
    ring.install(1, new.local_master, profile)
    with pytest.raises(CallError, match="generation"):
        ring.install(1, new.local_master, profile)
    first_new = new_tx.protect(rtp_packet(2))
    ring.unprotect(first_new, now=10.0)
    with pytest.raises(pylibsrtp.Error, match="replay"):
        ring.unprotect(first_new, now=10.1)
    assert stats.rx_replay_drops == 1
    ring.unprotect(late, now=10.5)  # late packet inside the grace window
    assert stats.rx_by_generation == {0: 2, 1: 1}
    with pytest.raises(pylibsrtp.Error, match="no installed key"):
        ring.unprotect(sender(random_keys().local_master, profile).protect(rtp_packet(3)), 10.6)
    with pytest.raises(pylibsrtp.Error, match="malformed"):
        ring.unprotect(b"\x80" * 3000, now=10.7)
    assert stats.rx_auth_failures == 1 and stats.rx_malformed == 1
    assert stats.decrypt_failures == 2
    ring.unprotect(new_tx.protect(rtp_packet(4)), now=11.5)  # grace over: 0 retired
    assert ring.generations == (1,)
    rtcp = struct.pack("!BBHI", 0x80, 201, 1, 0x1234)
    plain, generation = ring.unprotect_rtcp(new_tx.protect_rtcp(rtcp), now=11.6)
    assert (plain, generation) == (rtcp, 1)


def test_keyring_generation_cap_and_retirement_keep_a_usable_preference() -> None:
    profile = SRTPProfile.AEAD_AES_256_GCM
    stats = SRTPStats()
    ring = InboundKeyring(stats, grace=2.0)
    keys = [random_keys() for _ in range(4)]
    txs = [sender(k.local_master, profile) for k in keys]
    ring.install(0, keys[0].local_master, profile)
    ring.unprotect(txs[0].protect(rtp_packet(10)), now=0.0)
    for g in (1, 2, 3):
        ring.install(g, keys[g].local_master, profile)
    assert ring.generations == (1, 2, 3)  # the preferred generation 0 was capped away
    assert ring.unprotect(txs[1].protect(rtp_packet(11)), now=0.1)[1] == 1
    assert ring.unprotect(txs[3].protect(rtp_packet(12)), now=5.0)[1] == 3
    assert ring.generations == (1, 2, 3)  # 3 authenticated just now: grace starts
    assert ring.unprotect(txs[3].protect(rtp_packet(13)), now=7.5)[1] == 3
    assert generations(ring) == (3,)
    assert stats.decrypt_failures == 0 and stats.rx_trial_decrypts >= 2


# --- QCALL_KEYLOG -----------------------------------------------------------------------


def test_keylog_off_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv(KEYLOG_ENV, raising=False)
    assert keylog_write("call-1", bytes(48), [], random_keys()) is False
    assert list(tmp_path.iterdir()) == []


def test_keylog_writes_private_append_only_lines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.log"
    monkeypatch.setenv(KEYLOG_ENV, str(path))
    secret = os.urandom(48)
    k0, k1 = random_keys(), random_keys(SRTPProfile.AES128_CM_HMAC_SHA1_80)
    key_id = "0a1b2c3d-0000-4000-8000-000000000001"
    with caplog.at_level(logging.WARNING, logger="qcall.call.keylog"):
        assert keylog_write("call-1", secret, [key_id], k0)
        assert keylog_write("call-1", secret, [], k1, generation=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and KEYLOG_ENV in warnings[0].getMessage()
    assert k0.local_key.hex() not in caplog.text
    text = path.read_text()
    assert text.count("\n") == 2 and text.startswith("QCALL_SRTP call-1 0 AEAD_AES_256_GCM ")
    first, second = parse_keylog(text)
    assert (first.call_id, first.generation, first.key_ids) == ("call-1", 0, (key_id,))
    assert first.exporter_secret == secret and first.srtp_keys == k0
    assert second.generation == 1 and second.key_ids == () and second.srtp_keys == k1
    assert secret.hex() not in repr(first)
    with pytest.raises(CallError, match="call_id"):
        keylog_write("bad id\nQCALL_SRTP", secret, [], k0)
    with pytest.raises(CallError, match="key_ids"):
        keylog_write("call-1", secret, ["a b"], k0)


def test_keylog_refuses_shared_file(tmp_path: Any) -> None:
    path = tmp_path / "shared.log"
    path.write_text("")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="other users"):
        keylog_write("c", bytes(48), [], random_keys(), path=path)
    assert path.read_text() == ""


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("QCALL_SRTP c 0 AEAD_AES_256_GCM 00", "expected QCALL_SRTP"),
        ("QCALL_SRTP c x AEAD_AES_256_GCM 00 - " + "00" * 32 + " 00 00 00", "generation"),
        ("QCALL_SRTP c 0 NULL 00 - 00 00 00 00", "profile"),
        ("QCALL_SRTP c 0 AEAD_AES_256_GCM 0g - 00 00 00 00", "exporter_secret"),
        ("QCALL_SRTP c 0 AEAD_AES_256_GCM 00 - 00 00 00 00", "local_key"),
        ("QCALL_SRTP c 0 AEAD_AES_256_GCM 00 a,b/c 00 00 00 00", "key_ids"),
        ("QCALL_SRTP c$ 0 AEAD_AES_256_GCM 00 - 00 00 00 00", "call_id"),
    ],
)
def test_parse_keylog_rejects_hostile_lines(line: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"line 2: .*{field}"):
        parse_keylog("# comment\n" + line + "\n")
