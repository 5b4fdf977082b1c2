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
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
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


# --- real peer connections on loopback ------------------------------------------------------


def drop_final_flight(pc: RTCPeerConnection) -> list[bytes]:
    """Drop the first datagram ``pc`` sends that starts with a change-cipher-spec record.

    That is the DTLS server's final flight (RFC 6347: CCS + Finished). Hooked below every
    wrapper, on the sockets, once ICE gathered them (as :func:`qcall.call.netem.apply_profile`).
    Returns the list the dropped datagram goes to.
    """
    dropped: list[bytes] = []
    gather = pc._RTCPeerConnection__gather  # type: ignore[attr-defined]

    async def gather_then_hook() -> None:
        await gather()
        connection = pc.getTransceivers()[0].sender.transport.transport._connection
        for protocol in connection._protocols:
            sendto = protocol.transport.sendto

            def dropping(data: bytes, addr: Any, sendto: Any = sendto) -> None:
                if data[:1] == b"\x14" and not dropped:
                    dropped.append(data)
                    return
                sendto(data, addr)

            protocol.transport.sendto = dropping

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


@contextlib.asynccontextmanager
async def _two_phones() -> AsyncIterator[tuple[Phone, Phone]]:
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
                options=CallOptions(policy="pqc", allow_pqc_only=True, rekey_interval=None),
                make_source=lambda: None,
            )
            await phone.start()
            phones.append(phone)
        yield phones[0], phones[1]
    finally:
        for phone in phones:
            await phone.close()
        await server.close()


@pytest.mark.asyncio
async def test_call_whose_final_dtls_flight_is_lost_confirms_in_a_round_trip() -> None:
    """The caller's final DTLS flight lost once: the callee's CONFIRM still comes at once.

    Before the fix the callee finished DTLS only on OpenSSL's 1 s timer, and the
    caller's key confirmation (1 s after its media) ran out: the call failed.
    """
    async with _two_phones() as (alice, bob):
        caller = alice.new_call("bob")
        dropped: list[list[bytes]] = []
        make_pc = caller._new_pc

        def new_pc(*, control: bool = True) -> RTCPeerConnection:
            pc = make_pc(control=control)
            dropped.append(drop_final_flight(pc))
            return pc

        caller._new_pc = new_pc  # type: ignore[method-assign]
        incoming = asyncio.ensure_future(bob.incoming())
        try:
            await asyncio.wait_for(caller.dial(), 10 * T)
            callee = await asyncio.wait_for(incoming, 5 * T)
        finally:
            incoming.cancel()
        assert dropped and dropped[0], "the caller's final flight was not dropped"
        timings = caller.status.timings_ms
        wait_ms = timings["confirmed"] - timings["media"]
        assert wait_ms < 300 * T, f"the callee's confirmation came {wait_ms:.0f} ms after media"
        assert caller.status.sas == callee.status.sas is not None
        await caller.hangup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(callee.wait(), 5 * T)
