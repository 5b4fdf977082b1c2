"""qcall.call.fast_transport: the pinned aiortc/aioice internals, the Sans-I/O timers, real
peer connections on loopback with DTLS flights dropped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aioice.ice import Connection
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate
from OpenSSL import SSL

from qcall.call.fast_transport import (
    DTLS_MIN_RTO,
    INITIAL_RTO,
    SCTP_MIN_RTO,
    FlightTimer,
    RttEstimator,
    _PrebuiltCertificate,
    changed_internals,
    check_pinned_versions,
    install_fast_transport,
    prebuild_dtls_contexts,
)
from qcall.exceptions import CallError

# --- the pin ---------------------------------------------------------------------------


def test_pinned_internals_unchanged() -> None:
    """Fails when aiortc or aioice change any function the compat module relies on."""
    assert changed_internals() == []
    check_pinned_versions()


def test_other_versions_refused() -> None:
    with pytest.raises(CallError, match=r"aiortc 1\.17\.0 .*fast_transport=False"):
        check_pinned_versions(aiortc_version="1.17.0")
    with pytest.raises(CallError, match=r"aioice 0\.14\.1 .*>=0\.13,<0\.14"):
        check_pinned_versions(aioice_version="0.14.1")


# --- the DTLS context made ahead -------------------------------------------------------


async def test_prebuilt_dtls_context_is_aiortcs_and_handed_out_once() -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    (dtls,) = {t.receiver.transport for t in pc.getTransceivers()}
    original = getattr(dtls, "_RTCDtlsTransport__local_certificate")
    fingerprints = dtls.getLocalParameters().fingerprints
    assert prebuild_dtls_contexts(pc) == 1
    assert prebuild_dtls_contexts(pc) == 0  # once per peer connection
    certificate = getattr(dtls, "_RTCDtlsTransport__local_certificate")
    assert isinstance(certificate, _PrebuiltCertificate) and isinstance(certificate, RTCCertificate)
    # Same key and certificate: the SDP's fingerprints (checked by the peer) unchanged.
    assert certificate._cert is original._cert and certificate._key is original._key
    assert dtls.getLocalParameters().fingerprints == fingerprints
    prebuilt = certificate.prebuilt
    assert prebuilt is not None and prebuilt.get_verify_mode() == (
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    )
    assert certificate._create_ssl_context([SRTP_PROFILES[-1]]) is not prebuilt  # other profiles
    certificate.prebuilt = prebuilt  # (put back for the rest of the test)
    assert certificate._create_ssl_context(dtls._srtp_profiles) is prebuilt
    again = certificate._create_ssl_context(dtls._srtp_profiles)
    assert again is not prebuilt and certificate.handed_out == 1  # never twice
    connection = SSL.Connection(prebuilt)
    own = connection.get_certificate()
    assert own is not None  # for mypy
    assert own.to_cryptography() == original._cert
    await pc.close()


async def test_a_transport_made_later_takes_the_prebuilt_context() -> None:
    # A callee prepared without audio: its transport comes with the caller's offer.
    caller, callee = RTCPeerConnection(), RTCPeerConnection()
    caller.addTransceiver("audio")
    await caller.setLocalDescription(await caller.createOffer())
    fingerprint = getattr(callee, "_RTCPeerConnection__certificates")[0].getFingerprints()
    assert prebuild_dtls_contexts(callee) == 1  # no transport yet
    certificate = getattr(callee, "_RTCPeerConnection__certificates")[0]
    assert isinstance(certificate, _PrebuiltCertificate) and certificate.prebuilt is not None
    await callee.setRemoteDescription(caller.localDescription)
    (dtls,) = {t.receiver.transport for t in callee.getTransceivers()}
    assert getattr(dtls, "_RTCDtlsTransport__local_certificate") is certificate
    assert dtls.getLocalParameters().fingerprints == fingerprint
    prebuilt = certificate.prebuilt
    assert certificate._create_ssl_context(dtls._srtp_profiles) is prebuilt  # what start does
    assert certificate.prebuilt is None and certificate.handed_out == 1
    await caller.close()
    await callee.close()


async def test_prebuild_leaves_unpinned_or_started_transports_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qcall.call import fast_transport

    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    (dtls,) = {t.receiver.transport for t in pc.getTransceivers()}
    original = getattr(dtls, "_RTCDtlsTransport__local_certificate")
    monkeypatch.setattr(fast_transport, "_dtls_internals_pinned", lambda: False)
    assert prebuild_dtls_contexts(pc) == 0
    monkeypatch.undo()
    monkeypatch.setattr(type(dtls), "state", property(lambda self: "connecting"))
    assert prebuild_dtls_contexts(pc) == 0
    assert getattr(dtls, "_RTCDtlsTransport__local_certificate") is original
    monkeypatch.undo()
    await pc.close()


# --- Sans-I/O cores ----------------------------------------------------------------------


def test_rtt_estimator_follows_rfc6298() -> None:
    rtt = RttEstimator()
    assert rtt.rto() == INITIAL_RTO
    rtt.sample(0.1)
    assert rtt.srtt == pytest.approx(0.1) and rtt.rto() == pytest.approx(0.3)
    rtt.sample(0.1)
    assert rtt.rttvar == pytest.approx(0.0375) and rtt.rto() == pytest.approx(0.25)
    rtt.sample(0.0)
    assert rtt.rto() >= 0.03  # floor
    assert RttEstimator(srtt=5.0).rto() == 1.0  # ceiling


def test_flight_timer_resends_and_backs_off() -> None:
    timer = FlightTimer(RttEstimator())
    timer.sent(b"\x16hello", now=0.0)
    timer.sent(b"\x16second", now=0.001)
    assert timer.deadline() == pytest.approx(0.001 + DTLS_MIN_RTO)
    assert timer.poll(0.02) == []
    assert timer.poll(0.06) == [b"\x16hello", b"\x16second"]
    assert timer.deadline() == pytest.approx(0.06 + 2 * DTLS_MIN_RTO)
    assert timer.poll(0.161) == [b"\x16hello", b"\x16second"]
    assert timer.deadline() == pytest.approx(0.161 + 4 * DTLS_MIN_RTO)
    # the peer's flight ends the timer; after resends, no RTT sample (Karn)
    assert timer.received(b"\x16reply", now=0.2) == []
    assert timer.deadline() is None and timer.rtt.samples == 0
    timer.sent(b"\x16next", now=0.2)  # a new flight replaces the old one
    assert timer.flight == [b"\x16next"]
    assert timer.received(b"\x16reply2", now=0.21) == []
    assert timer.rtt.samples == 1 and timer.rtt.srtt == pytest.approx(0.01)


def test_flight_timer_gives_up_after_max_resends() -> None:
    timer = FlightTimer(RttEstimator(), max_resends=2)
    timer.sent(b"\x16x", now=0.0)
    assert timer.poll(1.0) and timer.poll(2.0)
    assert timer.poll(3.0) == [] and timer.deadline() is None


def test_final_flight_resent_when_the_peer_retransmits() -> None:
    timer = FlightTimer(RttEstimator())
    timer.received(b"\x16client flight", now=0.0)
    timer.sent(b"\x14ccs+finished", now=0.001)
    timer.handshake_done()
    assert timer.deadline() is None  # no timer on a final flight
    assert timer.received(b"\x17application data", now=0.01) == []
    assert timer.received(b"\x16client flight again", now=0.06) == [b"\x14ccs+finished"]
    assert timer.received(b"\x16and again", now=0.061) == []  # at most once per RTO/2
    assert timer.received(b"\x16later", now=0.2) == [b"\x14ccs+finished"]


def test_a_duplicate_from_the_peer_resends_ours_and_keeps_the_timer() -> None:
    timer = FlightTimer(RttEstimator())
    timer.received(b"\x16client hello", now=0.0)
    timer.sent(b"\x16server hello", now=0.001)
    due = timer.deadline()
    # the client resent its hello: it lacks ours; the timer keeps running
    assert timer.received(b"\x16client hello", now=0.04) == [b"\x16server hello"]
    assert timer.deadline() == due


# --- real peer connections on loopback --------------------------------------------------


async def _connect(
    fast: bool, drop: tuple[str, int] | None = None, drop_stun: bool = False
) -> tuple[float, dict[str, Any]]:
    """Connect two peer connections; optionally drop the n-th DTLS datagram of one side.

    The offerer ``a`` is the DTLS server (aiortc answers ``a=setup:active``).
    Returns the time (s) until both are connected, and counters.
    """
    a, b = RTCPeerConnection(), RTCPeerConnection()
    counters: dict[str, Any] = {"checks": 0}
    if fast:
        install_fast_transport(a)
        install_fast_transport(b)
    a.addTransceiver("audio")
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    sides = {"server": a, "client": b}
    if drop_stun:
        drop = ("server", 0)  # the offerer: the controlling side, which nominates
    if drop is not None:  # below every wrapper: the sockets (like qcall.call.netem)
        ice = sides[drop[0]].getTransceivers()[0].sender.transport.transport._connection
        seen, lost = [0], set()
        for protocol in ice._protocols:
            sendto = protocol.transport.sendto

            def dropping_sendto(data: bytes, addr: Any, sendto: Any = sendto) -> None:
                if drop_stun and data[:2] == b"\x00\x01":  # a Binding request
                    if addr not in lost:  # the first check of every pair
                        lost.add(addr)
                        counters["dropped"] = data[:2]
                        return
                elif not drop_stun and 19 < data[0] < 64:
                    seen[0] += 1
                    if seen[0] == drop[1]:
                        counters["dropped"] = data[:1]
                        return
                sendto(data, addr)

            # The test's lossy wrapper (aiortc only ever sends bytes through it).
            protocol.transport.sendto = dropping_sendto  # type: ignore[method-assign, assignment]
    connection: Connection = a.getTransceivers()[0].sender.transport.transport._connection
    periodic = connection._check_periodic

    def counting() -> bool:
        counters["checks"] += 1
        return periodic()

    connection._check_periodic = counting  # type: ignore[method-assign]
    connected = asyncio.Event()

    def on_state() -> None:  # both sides: a lost final flight leaves only the client waiting
        if a.connectionState == b.connectionState == "connected":
            connected.set()

    a.add_listener("connectionstatechange", on_state)
    b.add_listener("connectionstatechange", on_state)

    started = time.monotonic()
    await a.setRemoteDescription(b.localDescription)
    try:
        await asyncio.wait_for(connected.wait(), 10)
        elapsed = time.monotonic() - started
    finally:
        await a.close()
        await b.close()
    return elapsed, counters


@pytest.mark.asyncio
async def test_ice_completes_without_waiting_for_the_pacing_tick() -> None:
    """Stock aioice looks at the check list only after a 20 ms sleep; fast_connect at once."""
    elapsed, counters = await _connect(fast=False)
    assert counters["checks"] >= 2 and elapsed >= 0.02  # the pinned stock behaviour
    _elapsed, counters = await _connect(fast=True)
    assert counters["checks"] == 1  # one check started, the result taken before the next tick


@pytest.mark.asyncio
@pytest.mark.parametrize("side,nth", [("client", 1), ("server", 1), ("client", 2), ("server", 2)])
async def test_lost_dtls_flight_costs_an_rto_not_a_second(side: str, nth: int) -> None:
    """Every DTLS 1.2 flight dropped once: resent after ~50 ms (OpenSSL alone: 1 s)."""
    elapsed, counters = await _connect(fast=True, drop=(side, nth))
    assert counters["dropped"] in (b"\x16", b"\x14")
    assert elapsed < 0.7, f"set-up took {elapsed:.3f} s"


@pytest.mark.asyncio
async def test_lost_connectivity_check_resent_by_rtt() -> None:
    """The controlling side's first check on every pair lost: resent after 100 ms, not 500."""
    elapsed, counters = await _connect(fast=True, drop_stun=True)
    assert counters["dropped"] == b"\x00\x01"
    assert elapsed < 0.4, f"set-up took {elapsed:.3f} s"


@pytest.mark.asyncio
@pytest.mark.parametrize("fast", [False, True])
async def test_sctp_rto_follows_the_path(fast: bool) -> None:
    """The control channel's SCTP: RTO from the path (≥ 0.2 s), not RFC 4960's ≥ 1 s."""
    a, b = RTCPeerConnection(), RTCPeerConnection()
    if fast:
        install_fast_transport(a)
        install_fast_transport(b)
    channel = a.createDataChannel("control")
    opened, got = asyncio.Event(), asyncio.Event()
    channel.add_listener("open", opened.set)
    b.add_listener("datachannel", lambda ch: ch.add_listener("message", lambda _m: got.set()))
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    try:
        await asyncio.wait_for(opened.wait(), 10)
        channel.send("rekey")
        await asyncio.wait_for(got.wait(), 10)
        sctp = a.sctp
        assert sctp is not None and sctp._srtt is not None  # measured on loopback
        if fast:
            assert sctp._rto == pytest.approx(SCTP_MIN_RTO)
        else:
            assert sctp._rto >= 1.0
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_stock_dtls_waits_a_second_for_a_lost_final_flight() -> None:
    """The baseline the fast transport fixes: OpenSSL's first DTLS timer is 1 s."""
    elapsed, _ = await _connect(fast=False, drop=("server", 2))
    assert elapsed >= 0.9


# --- DTLS on a tentative pair (issue 16, round 4) -----------------------------------------


async def _setup_over_a_slow_path(
    early_dtls: bool, one_way: float, callee_early: bool | None = None
) -> float:
    """Caller's set-up (s) from applying the callee's SDP to DTLS connected on both sides.

    The callee's SDP reaches the caller ``one_way`` after the callee applied it (its
    first check travels as long), like the ``accept`` of the SDP-in-invite exchange.
    """
    from qcall.call.netem import NetworkProfile, apply_profile

    profile = NetworkProfile("slow", delay_ms=one_way * 1000)
    a, b = RTCPeerConnection(), RTCPeerConnection()
    install_fast_transport(a, early_dtls=early_dtls)
    install_fast_transport(b, early_dtls=early_dtls if callee_early is None else callee_early)
    apply_profile(a, profile, 0)
    apply_profile(b, profile, 1)
    a.addTransceiver("audio")
    connected = asyncio.Event()

    def on_state() -> None:
        if a.connectionState == b.connectionState == "connected":
            connected.set()

    a.add_listener("connectionstatechange", on_state)
    b.add_listener("connectionstatechange", on_state)
    try:
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await asyncio.sleep(one_way)
        started = time.monotonic()
        await a.setRemoteDescription(b.localDescription)
        await asyncio.wait_for(connected.wait(), 10)
        return time.monotonic() - started
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_dtls_starts_on_the_callees_first_check_not_after_ice() -> None:
    """The ClientHello follows the callee's first check; the caller answers it at once.

    Caller's DTLS done ≈ 1 RTT after the callee's SDP (waiting for ICE: ≈ 2 RTT, its own
    check's round trip first); the callee's ≈ 0.5 RTT later in both cases.
    """
    one_way = 0.03
    waited = await _setup_over_a_slow_path(early_dtls=False, one_way=one_way)
    early = await _setup_over_a_slow_path(early_dtls=True, one_way=one_way)
    assert waited >= 5 * one_way, f"stock order took {waited:.3f} s"
    assert early < 4.3 * one_way, f"early DTLS took {early:.3f} s (waiting for ICE: {waited:.3f})"


@pytest.mark.asyncio
@pytest.mark.parametrize("caller_early", [True, False])
async def test_early_dtls_on_one_side_only_still_connects(caller_early: bool) -> None:
    """A peer that waits for ICE (an older qcall, stock aioice) still connects."""
    elapsed = await _setup_over_a_slow_path(caller_early, 0.01, callee_early=not caller_early)
    assert elapsed < 0.5
