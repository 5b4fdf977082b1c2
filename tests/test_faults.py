"""Faults during a call (docs/faults.md): each one a real call through real servers.

* the callee's KME goes down mid-call: REKEY_NACK, both keep their keys for the
  grace period, rekeys resume when it comes back — or the call ends cleanly;
* the caller's key pool runs dry (HTTP 503): the same grace period, then refilled;
* the signaling server restarts mid-call: media and rekeys go on (they use the
  call's own DTLS/SCTP path), both phones re-register by themselves, and a hangup
  still reaches the peer (DTLS close_notify, since the new server lost the call);
* 10 % loss and ±30 ms jitter on the media path: rekeys still complete.

The lab is the one of tests/test_call_session.py (signaling server, two mTLS
KMEs sharing relayed keys, in-process phones), with servers that can be stopped
and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qcall.call.netem import NetworkProfile
from qcall.call.session import CallOptions, CallSession, CallState
from qcall.exceptions import QCallError
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import create_pki, server_ssl_context
from qcall.qkd.server import KMEServer
from qcall.typing import SAEId
from signaling.server import SignalingServer
from tests.test_call_session import Lab, connect
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow


@dataclass
class FaultLab(Lab):
    kmes: dict[str, KME] = field(default_factory=dict)
    servers: dict[str, KMEServer] = field(default_factory=dict)
    signaling: SignalingServer | None = None

    async def stop_kme(self, sae: str) -> None:
        await self.servers[sae].close()

    async def start_kme(self, sae: str) -> None:
        """Start the KME again on the same port, with the same (in-memory) pools."""
        old = self.servers[sae]
        server = KMEServer(old.kme, "127.0.0.1", old.port, old.ssl_context)
        await server.start()
        self.servers[sae] = server

    async def restart_signaling(self, down: float = 0.3) -> None:
        """Stop the signaling server (clients see 1001), then a fresh one on the same port."""
        assert self.signaling is not None
        port = self.signaling.port
        await self.signaling.close()
        await asyncio.sleep(down)
        self.signaling = SignalingServer()
        await self.signaling.start("127.0.0.1", port)

    def supply(self, count: int) -> None:
        """The relay delivers ``count`` more keys for alice → bob to both KMEs."""
        keys = random_keys(count)
        self.kmes["alice"].supply("alice", "bob", keys, role="master", peer_kme_id="x")
        self.kmes["bob"].supply("alice", "bob", keys, role="slave", peer_kme_id="x")

    def stored(self) -> tuple[int, int]:
        """Keys left for alice → bob at alice's KME (enc side) and at bob's (dec side)."""
        return (
            self.kmes["alice"].stored_key_count("alice", "bob"),
            self.kmes["bob"].stored_key_count("alice", "bob"),
        )


async def _lab(tmp_path: Path, keys: int) -> AsyncIterator[FaultLab]:
    pki = create_pki(tmp_path / "pki", ["KME-Beijing", "KME-Hefei"], ["alice", "bob"])
    kmes = {"alice": KME("KME-Beijing"), "bob": KME("KME-Hefei")}
    signaling = SignalingServer()
    await signaling.start("127.0.0.1", 0)
    lab = FaultLab(tmp_path, f"ws://127.0.0.1:{signaling.port}", {}, pki)
    lab.kmes, lab.signaling = kmes, signaling
    lab.supply(keys)
    back = random_keys(8)
    kmes["bob"].supply("bob", "alice", back, role="master", peer_kme_id="x")
    kmes["alice"].supply("bob", "alice", back, role="slave", peer_kme_id="x")
    try:
        for sae, kme in kmes.items():
            node = pki.kmes[kme.kme_id]
            ctx = server_ssl_context(node.cert, node.key, pki.ca_cert)
            server = KMEServer(kme, "127.0.0.1", 0, ctx)
            await server.start()
            lab.servers[sae] = server
            lab.kme_urls[sae] = server.url
        yield lab
    finally:
        for phone in lab.phones:
            await phone.close()
        for recorder in lab.recorders:
            await recorder.stop()
        for server in lab.servers.values():
            await server.close()
        if lab.signaling is not None:
            await lab.signaling.close()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[FaultLab]:
    async for lab in _lab(tmp_path, 64):
        yield lab


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout * T
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def active(*sessions: CallSession) -> bool:
    return all(s.status.state is CallState.ACTIVE for s in sessions)


async def decrypt_failures(*sessions: CallSession) -> list[int]:
    out = []
    for session in sessions:
        assert session.hook is not None
        out.append(session.hook.stats.decrypt_failures)
    return out


# --- the KME goes down, the pool runs dry ------------------------------------------------


async def test_callee_kme_down_mid_call_keeps_keys_then_rekeys_resume(lab: FaultLab) -> None:
    options = CallOptions(rekey_interval=0.3, key_grace=30.0, rekey_retry=0.2)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=True, options=options)
    caller, callee = await connect(alice, bob)
    await until(lambda: caller.status.rekeys >= 1, 5, "a first rekey")

    await lab.stop_kme("bob")  # Hefei's KME goes down
    await until(lambda: callee.status.rekey_failures >= 3, 10, "declined rekeys")
    epoch = caller.status.epoch
    frames = len(lab.recorders[0].arrivals)
    await asyncio.sleep(0.5)
    assert active(caller, callee)  # both keep the current keys...
    assert caller.status.epoch == callee.status.epoch == epoch
    notice = callee.status.notice
    assert "postponed" in notice and "keeping the current keys" in notice
    assert "bob's KME could not deliver the key (qkd_unavailable)" in caller.status.notice
    assert len(lab.recorders[0].arrivals) > frames + 10  # ... and the audio goes on

    await lab.start_kme("bob")  # back: the next retry brings a fresh key
    await until(lambda: callee.status.epoch >= epoch + 2, 10, "rekeys after the KME is back")
    assert caller.status.notice == callee.status.notice == "fresh QKD keys again"
    assert await decrypt_failures(caller, callee) == [0, 0]
    used = caller.status.all_key_ids
    assert len(set(used)) == len(used)  # every completed epoch had its own key
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)

    # Keys: each refused attempt consumed one key at alice's KME (enc_keys) and left
    # its twin undelivered at bob's — never used by anyone, never sent again. (alice's
    # KME also issued the keys her reservoir holds for her next call: docs/qkd-keys.md.)
    at_alice, at_bob = lab.stored()
    refused = callee.status.rekey_failures
    held = alice.reservoir.core.total() if alice.reservoir is not None else 0
    assert (64 - at_alice - held) - (64 - at_bob) in (refused, refused + 1)  # +1: in flight
    for key_id in used:
        assert key_id not in lab.kmes["bob"]._pools[(SAEId("alice"), SAEId("bob"))].dec


async def test_callee_kme_down_beyond_grace_ends_both_sides_cleanly(lab: FaultLab) -> None:
    options = CallOptions(rekey_interval=0.3, key_grace=1.0, rekey_retry=0.2)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", options=options)
    caller, callee = await connect(alice, bob)
    await lab.stop_kme("bob")
    started = time.monotonic()
    for session in (caller, callee):
        with pytest.raises(QCallError, match=r"grace period|qkd_unavailable"):
            await asyncio.wait_for(session.wait(), 8 * T)
    assert 1.0 - 0.3 <= time.monotonic() - started < 6 * T
    assert caller.status.state is callee.status.state is CallState.FAILED


async def test_pool_exhausted_keeps_keys_then_refill_resumes(tmp_path: Path) -> None:
    async for lab in _lab(tmp_path, 3):  # three keys: the call and two rekeys
        options = CallOptions(rekey_interval=0.3, key_grace=30.0, rekey_retry=0.2)
        alice = await lab.phone("alice", tone=440, options=options)
        bob = await lab.phone("bob", options=options)
        caller, callee = await connect(alice, bob)
        await until(lambda: caller.status.rekey_failures >= 2, 10, "503 from the empty pool")
        assert lab.stored() == (0, 0)
        assert active(caller, callee) and caller.status.epoch == 2
        assert "not enough keys" in caller.status.notice  # the KME's 503 message
        lab.supply(4)  # the relay catches up
        await until(lambda: callee.status.epoch >= 4, 10, "rekeys after the refill")
        assert await decrypt_failures(caller, callee) == [0, 0]
        await caller.hangup()


# --- the signaling server restarts ----------------------------------------------------------


async def test_signaling_restart_mid_call(lab: FaultLab) -> None:
    options = CallOptions(rekey_interval=0.3)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=True, options=options)
    caller, callee = await connect(alice, bob)
    recorder = lab.recorders[0]

    await lab.restart_signaling()
    frames, rekeys = len(recorder.arrivals), caller.status.rekeys
    await until(
        lambda: alice.signaling.registrations == bob.signaling.registrations == 2,
        10,
        "both phones to register again",
    )
    assert alice.signaling.connected and bob.signaling.connected
    await asyncio.sleep(0.5)
    assert active(caller, callee)
    assert len(recorder.arrivals) > frames + 10  # media never stopped
    assert caller.status.rekeys > rekeys  # rekeys ride the call's SCTP channel
    assert await decrypt_failures(caller, callee) == [0, 0]

    # The new server knows nothing of the call: alice's hangup reaches bob through
    # the media path (DTLS close_notify).
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    assert callee.status.state is CallState.ENDED

    # And the phones can place a new call through the new server.
    assert "bob" in alice.signaling.online and "alice" in bob.signaling.online
    bob.on_track = None  # the recorder took the first call's track
    caller, callee = await connect(alice, bob)
    assert active(caller, callee)
    await caller.hangup()


# --- loss and jitter ----------------------------------------------------------------------


async def test_rekeys_survive_loss_and_jitter(lab: FaultLab) -> None:
    network = NetworkProfile("faults", delay_ms=40.0, jitter_ms=30.0, loss=0.10)
    options = CallOptions(rekey_interval=0.5, network=network, setup_timeout=30.0)
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", record=True, options=options)
    caller, callee = await connect(alice, bob)
    recorder = lab.recorders[0]
    start_frames = len(recorder.arrivals)
    # SCTP retransmits a lost rekey message after its RTO (>= 1 s): allow for a few.
    await until(lambda: callee.status.rekeys >= 3, 15, "three rekeys under loss")
    # The caller counts a rekey when the callee's CONFIRM is back: that CONFIRM, too,
    # may be lost and wait for SCTP's retransmission (>= 1 s, backing off).
    await until(lambda: caller.status.rekeys >= 3, 10, "the caller sees three rekeys")
    assert active(caller, callee)
    assert await decrypt_failures(caller, callee) == [0, 0]
    # SRTP: every packet that survived the emulated loss decrypted, in every epoch.
    assert caller.hook is not None and callee.hook is not None
    sent, got = caller.hook.stats.tx_packets, callee.hook.stats.rx_packets
    assert got >= 0.75 * sent  # 10 % loss (binomial; 0.75 is > 3 sigma away)
    # Media under >= 4 key epochs (the caller switches once the callee's CONFIRM,
    # itself subject to the loss and SCTP's >= 1 s RTO, has come back).
    callee_stats = callee.hook.stats
    await until(lambda: len(callee_stats.rx_by_generation) >= 4, 10, "media under 4 epochs")
    # Audio keeps arriving: no silence longer than a second at the application.
    times = [a.arrival_time for a in recorder.arrivals[start_frames:]]
    assert len(times) > 20
    assert max(b - a for a, b in itertools.pairwise(times)) < 1.0
    emulation = caller.emulation
    assert emulation is not None and emulation.stats.dropped > 0  # the loss was real
    with contextlib.suppress(QCallError):
        await caller.hangup()
