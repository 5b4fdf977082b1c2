"""Issue 16 on lossy paths: a lost DTLS final flight costs a round trip, not OpenSSL's second.

The failure this guards against (docs/performance.md, "Failed calls on lossy"): the
DTLS server (the caller) completes its handshake, sends its final flight and, at
once, the first SCTP packet of the control channel (an INIT, a DTLS application-data
record). When the final flight is lost and the INIT arrives, the client used to take
the INIT for the server's next flight and stop its retransmission timer, so only
OpenSSL's own 1 s timer recovered — after the caller's key confirmation timer had
expired. Here the final flight is dropped on purpose, on real peer connections and
in a real call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from qcall.call.fast_transport import (
    DTLS_MIN_RTO,
    FlightTimer,
    RttEstimator,
    install_fast_transport,
)
from qcall.call.netem import NetworkProfile
from qcall.call.phone import Phone
from qcall.call.session import (
    CONFIRM_TIMEOUT_MAX,
    CONFIRM_TIMEOUT_ROUND_TRIPS,
    CallOptions,
    CallSession,
    confirm_timeout,
)
from qcall.identity import Identity
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR as T

# --- the Sans-I/O core --------------------------------------------------------------------


def test_application_data_during_the_handshake_resends_our_flight() -> None:
    """The peer is done (its app data came) but we lack its final flight: ours goes again."""
    timer = FlightTimer(RttEstimator())
    timer.received(b"\x16server hello", now=0.0)
    timer.sent(b"\x16client finished", now=0.001)
    due = timer.deadline()
    assert due is not None
    # an SCTP INIT from the server (DTLS application data): not its next flight
    assert timer.received(b"\x17init", now=0.03) == [b"\x16client finished"]
    assert timer.deadline() == due  # the timer keeps running
    assert timer.received(b"\x17init again", now=0.031) == []  # at most once per RTO/2
    assert timer.received(b"\x17later", now=0.03 + DTLS_MIN_RTO) == [b"\x16client finished"]
    assert timer.rtt.samples == 0  # no RTT sample from a datagram that is no reply
    # an alert is not the peer's next flight either, and makes us resend nothing
    assert timer.received(b"\x15alert", now=0.2) == [] and timer.deadline() == due
    # the server's final flight (change cipher spec first) ends the timer
    assert timer.received(b"\x14ccs+finished", now=0.21) == []
    assert timer.deadline() is None


def test_a_flight_is_resent_after_two_round_trips() -> None:
    """After ICE's samples the first DTLS resend comes at 2 × srtt (WebRTC), not ≈ 3 × RTT."""
    rtt = RttEstimator()
    rtt.sample(0.06)  # one connectivity check on the lossy profile's ≈ 60 ms path
    assert rtt.rto() == pytest.approx(0.18)  # RFC 6298 after one sample: 3 × RTT
    timer = FlightTimer(rtt)
    timer.sent(b"\x16client hello", now=0.0)
    assert timer.deadline() == pytest.approx(0.12)
    assert timer.poll(0.12) == [b"\x16client hello"]
    assert timer.deadline() == pytest.approx(0.12 + 0.24)  # then doubling
    fast = RttEstimator()
    fast.sample(0.001)  # loopback: never below the DTLS floor
    assert FlightTimer(fast).rtt.flight_rto() == DTLS_MIN_RTO


# --- real peer connections on loopback ------------------------------------------------------


def drop_final_flight(pc: RTCPeerConnection, burst: float = 0.0) -> list[bytes]:
    """Drop the first datagram ``pc`` sends that starts with change cipher spec.

    That is the DTLS server's final flight (RFC 6347: CCS + Finished). With ``burst``,
    every datagram ``pc`` sends in the ``burst`` seconds after it is lost too (a burst
    loss: a Wi-Fi hand-over). Hooked on the sockets once ICE gathered them, in front of
    any network emulation (as :func:`qcall.call.netem.apply_profile`). Returns the list
    the dropped datagrams go to.
    """
    dropped: list[bytes] = []
    since: list[float] = []
    gather = pc._RTCPeerConnection__gather  # type: ignore[attr-defined]

    def lost(data: bytes) -> bool:
        if not since and data[:1] == b"\x14":
            since.append(time.monotonic())
        return bool(since) and (not dropped or time.monotonic() - since[0] < burst)

    def hook() -> None:
        connection = pc.getTransceivers()[0].sender.transport.transport._connection
        for protocol in connection._protocols:
            sendto = protocol.transport.sendto

            def dropping(data: bytes, addr: Any, sendto: Any = sendto) -> None:
                if lost(data):
                    dropped.append(data)
                    return
                sendto(data, addr)

            # The test's lossy wrapper (aiortc only ever sends bytes through it).
            protocol.transport.sendto = dropping  # type: ignore[method-assign, assignment]

    async def gather_then_hook() -> None:
        await gather()
        hook()

    if pc.iceGatheringState == "complete":  # a prepared connection (qcall.call.prepared)
        hook()
    else:
        pc._RTCPeerConnection__gather = gather_then_hook  # type: ignore[attr-defined]
    return dropped


async def _connect_with_channel() -> dict[str, float]:
    """Two fast-transport peer connections with audio and a negotiated data channel.

    The offerer ``a`` is the DTLS server; its final flight is dropped once. Returns
    when each side's DTLS connected (seconds from the start).
    """
    a, b = RTCPeerConnection(), RTCPeerConnection()
    install_fast_transport(a)
    install_fast_transport(b)
    for pc in (a, b):  # as qcall's control channel: SCTP starts as soon as DTLS is up
        pc.createDataChannel("qcall-control", negotiated=True, id=0)
    a.addTransceiver("audio")
    dropped = drop_final_flight(a)
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    started = time.monotonic()
    done: dict[str, float] = {}
    both = asyncio.Event()

    def watch(name: str, pc: RTCPeerConnection) -> None:
        def on_state() -> None:
            if pc.connectionState == "connected":
                done.setdefault(name, time.monotonic() - started)
                if len(done) == 2:
                    both.set()

        pc.add_listener("connectionstatechange", on_state)

    watch("server", a)
    watch("client", b)
    await a.setRemoteDescription(b.localDescription)
    try:
        await asyncio.wait_for(both.wait(), 10 * T)
    finally:
        await a.close()
        await b.close()
    assert dropped, "the server's final flight was not dropped"
    return done


@pytest.mark.asyncio
async def test_lost_final_flight_with_a_data_channel_costs_a_round_trip() -> None:
    """The server's SCTP INIT arrives without its final flight: the client recovers at once.

    Before the fix the client waited for OpenSSL's 1 s timer (measured: ≈ 1.0 s).
    """
    done = await _connect_with_channel()
    lag = done["client"] - done["server"]
    assert lag < 0.3 * T, f"the client connected {lag:.3f} s after the server"


# --- a call --------------------------------------------------------------------------------


def test_confirm_timeout_follows_the_path() -> None:
    assert confirm_timeout(1.0, None) == 1.0  # no round trip known
    assert confirm_timeout(1.0, 0.1) == 1.0  # loopback, lossy: the floor
    assert confirm_timeout(1.0, 0.4) == pytest.approx(0.4 * CONFIRM_TIMEOUT_ROUND_TRIPS)
    assert confirm_timeout(1.0, 5.0) == CONFIRM_TIMEOUT_MAX
    assert confirm_timeout(20.0, 5.0) == 20.0  # never below what the user asked


@contextlib.asynccontextmanager
async def _two_phones(
    network: NetworkProfile | None = None,
) -> AsyncIterator[tuple[Phone, Phone]]:
    """alice and bob on a signaling server on loopback, ``pqc`` (no KME needed)."""
    server = SignalingServer()
    await server.start("127.0.0.1", 0)
    phones: list[Phone] = []
    try:
        for name in ("alice", "bob"):
            identity = Identity.generate(name)
            phone = Phone(
                f"ws://127.0.0.1:{server.port}",
                identity.signing_key,
                name,
                check_peer=lambda _name, _key: None,
                key_source=None,
                options=CallOptions(
                    policy="pqc", allow_pqc_only=True, rekey_interval=None, network=network
                ),
                make_source=lambda: None,
            )
            await phone.start()
            phones.append(phone)
        yield phones[0], phones[1]
    finally:
        for phone in phones:
            await phone.close()
        await server.close()


async def _call_losing_final_flight(
    alice: Phone, bob: Phone, burst: float = 0.0
) -> tuple[CallSession, CallSession]:
    """alice calls bob; her final DTLS flight is lost (and all she sends for ``burst`` s)."""
    caller = alice.new_call("bob")
    dropped: list[list[bytes]] = []
    make_pc = caller._new_pc

    async def new_pc(*, control: bool = True) -> RTCPeerConnection:
        pc = await make_pc(control=control)
        dropped.append(drop_final_flight(pc, burst))
        return pc

    caller._new_pc = new_pc  # type: ignore[method-assign]
    incoming = asyncio.ensure_future(bob.incoming())
    try:
        await asyncio.wait_for(caller.dial(), 10 * T)
        callee = await asyncio.wait_for(incoming, 5 * T)
    finally:
        incoming.cancel()
    assert dropped and dropped[0], "the caller's final flight was not dropped"
    return caller, callee


async def _hang_up(caller: CallSession, callee: CallSession) -> None:
    await caller.hangup()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(callee.wait(), 5 * T)


@pytest.mark.asyncio
async def test_call_whose_final_dtls_flight_is_lost_confirms_in_a_round_trip() -> None:
    """The caller's final DTLS flight lost once: the callee's CONFIRM still comes at once.

    Before the fix the callee finished DTLS only on OpenSSL's 1 s timer, and the
    caller's key confirmation (1 s after its media) ran out: the call failed.
    """
    async with _two_phones() as (alice, bob):
        caller, callee = await _call_losing_final_flight(alice, bob)
        timings = caller.status.timings_ms
        wait_ms = timings["confirmed"] - timings["media"]
        assert wait_ms < 300 * T, f"the callee's confirmation came {wait_ms:.0f} ms after media"
        assert caller.status.sas == callee.status.sas is not None
        await _hang_up(caller, callee)


@pytest.mark.asyncio
async def test_key_confirmation_waits_longer_on_a_slow_path() -> None:
    """150 ms one way, and 1 s of burst loss from the caller's final DTLS flight on.

    The callee finishes DTLS over a second after the caller: a fixed 1 s confirmation
    timeout failed that call; one sized to the path's round trip lets it through.
    """
    slow = NetworkProfile("slow", delay_ms=150.0)
    async with _two_phones(slow) as (alice, bob):
        caller, callee = await _call_losing_final_flight(alice, bob, burst=1.0)
        timings = caller.status.timings_ms
        assert timings["confirmed"] - timings["media"] > 1000  # longer than the old 1 s
        assert caller.status.sas == callee.status.sas is not None
        await _hang_up(caller, callee)
