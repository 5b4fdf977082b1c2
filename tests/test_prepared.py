"""Peer connections prepared ahead (qcall.call.prepared): adopted by one call, never reused."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCCertificate
from OpenSSL import SSL

from qcall.call.fast_transport import _dtls_internals_pinned, _PrebuiltCertificate
from qcall.call.phone import Phone
from qcall.call.prepared import PreparedConnections, PrepareSpec, prepare
from qcall.call.session import CallState
from qcall.call.status import CallOptions
from tests.test_call_session import Lab, connect, lab  # noqa: F401  (the fixture)
from tests.utils import TIMEOUT_FACTOR as T

OPTIONS = CallOptions(rekey_interval=None)


def _ice_ufrag(sdp: str) -> str:
    match = re.search(r"a=ice-ufrag:(\S+)", sdp)
    assert match is not None
    return match.group(1)


def _fingerprint(sdp: str) -> str:
    match = re.search(r"a=fingerprint:\S+ (\S+)", sdp)
    assert match is not None
    return match.group(1)


async def _held(phone: Phone, role: str, audio: bool, *, control: bool = True) -> RTCPeerConnection:
    """The connection ``phone`` holds for ``role`` once made (waits for the keeper)."""
    assert phone.prepared is not None
    spec = PrepareSpec.for_call(role, phone.options, send_audio=audio, control=control)
    return await _ready(phone.prepared, spec)


async def _ready(pool: PreparedConnections, spec: PrepareSpec) -> RTCPeerConnection:
    for _ in range(int(200 * T)):
        held = pool._ready.get(spec)
        if held is not None:
            return held.pc
        await asyncio.sleep(0.01)
    raise AssertionError("nothing prepared")


async def test_a_prepared_connection_is_taken_once_and_only_for_its_spec() -> None:
    spec = PrepareSpec.for_call("caller", OPTIONS, send_audio=False)
    pool = PreparedConnections()
    pool.keep(spec, OPTIONS)
    held = await _ready(pool, spec)
    for other in (
        PrepareSpec.for_call("caller", OPTIONS, send_audio=True),
        PrepareSpec.for_call("caller", OPTIONS, send_audio=False, control=False),
        PrepareSpec.for_call("callee", OPTIONS, send_audio=False),
        PrepareSpec.for_call("caller", CallOptions(fast_transport=False), send_audio=False),
    ):
        assert pool.take(other) is None  # made for other options: not handed out
    taken = pool.take(spec)
    assert taken is not None and taken.pc is held
    assert taken.pc.localDescription is not None  # a caller's: made up to its offer
    assert "m=application" in taken.pc.localDescription.sdp  # with the control channel
    assert pool.take(spec) is None  # once; nothing new until keep() (the call ended)
    await asyncio.sleep(0.05)
    assert pool._ready == {}
    pool.keep(spec, OPTIONS)
    assert await _ready(pool, spec) is not held
    plain = PrepareSpec.for_call("caller", OPTIONS, send_audio=True, control=False)
    pool.keep(plain, OPTIONS)  # one per spec: both held
    plain_pc = await _ready(pool, plain)
    assert "m=application" not in plain_pc.localDescription.sdp
    assert set(pool._ready) == {spec, plain}
    await taken.close()
    await pool.close()
    assert plain_pc.connectionState == "closed" and pool._ready == {}


async def test_an_unused_prepared_connection_is_replaced_after_max_age() -> None:
    spec = PrepareSpec.for_call("callee", OPTIONS, send_audio=True)
    pool = PreparedConnections(max_age=0.2)
    pool.keep(spec, OPTIONS)
    first = await _ready(pool, spec)
    await asyncio.sleep(0.4)
    assert first.connectionState == "closed"  # its certificate and ICE credentials gone
    second = await _ready(pool, spec)
    assert second is not first
    await pool.close()
    assert second.connectionState == "closed"
    assert pool._ready == {}


async def test_callee_prepared_connection_is_gathered_and_answers_an_offer() -> None:
    caller = await prepare(PrepareSpec.for_call("caller", OPTIONS, send_audio=True), OPTIONS)
    callee = await prepare(PrepareSpec.for_call("callee", OPTIONS, send_audio=True), OPTIONS)
    assert callee.pc.iceGatheringState == "complete"  # before any description
    await callee.pc.setRemoteDescription(caller.pc.localDescription)
    await callee.pc.setLocalDescription(await callee.pc.createAnswer())
    answer = callee.pc.localDescription.sdp
    assert "a=candidate:" in answer and "a=sendrecv" in answer
    assert len(callee.pc.getTransceivers()) == 1  # the offer's audio took the prepared one
    await caller.close()
    await callee.close()


@pytest.mark.parametrize("tone", [None, 440.0], ids=["no-audio", "audio"])
async def test_calls_adopt_prepared_connections_each_used_once(
    lab: Lab,  # noqa: F811
    tone: float | None,
) -> None:
    alice = await lab.phone("alice", tone=tone)
    bob = await lab.phone("bob", tone=tone)
    audio = True  # what the phones assume before their first call
    seen: list[tuple[str, str]] = []
    pcs: list[RTCPeerConnection] = []
    for index in range(3):
        held = {
            "alice": await _held(alice, "caller", audio),
            "bob": await _held(bob, "callee", audio),
        }
        caller, callee = await connect(alice, bob)
        assert caller.status.state is CallState.ACTIVE and caller.status.sas == callee.status.sas
        for session, name in ((caller, "alice"), (callee, "bob")):
            if tone is None and index == 0:
                # Phones first assume a source; a call without one makes its own
                # connection (the prepared one is left), and the next ones fit.
                assert "pc_prepared_age" not in session.status.timings_ms
                assert session.pc is not held[name]
            else:
                assert "pc_prepared_age" in session.status.timings_ms
                assert session.pc is held[name]
            assert session.pc is not None
            pcs.append(session.pc)
            sdp = session.pc.localDescription.sdp
            seen.append((_ice_ufrag(sdp), _fingerprint(sdp)))
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 10 * T)
        audio = tone is not None
    # No connection, ICE credential or DTLS certificate served two calls.
    assert len({id(pc) for pc in pcs}) == len(pcs)
    assert len({ufrag for ufrag, _ in seen}) == len(seen)
    assert len({fingerprint for _, fingerprint in seen}) == len(seen)
    assert all(pc.connectionState == "closed" for pc in pcs)


async def test_plain_calls_adopt_prepared_connections_without_a_control_channel(
    lab: Lab,  # noqa: F811
) -> None:
    # The harness's fast-plain baseline gets the same head start as signed calls.
    plain = CallOptions(policy="plain", rekey_interval=None)
    alice = await lab.phone("alice", tone=440, options=plain)
    bob = await lab.phone("bob", tone=440, options=plain)
    held = {
        "alice": await _held(alice, "caller", True, control=False),
        "bob": await _held(bob, "callee", True, control=False),
    }
    caller, callee = await connect(alice, bob)
    for session, name in ((caller, "alice"), (callee, "bob")):
        assert session.status.policy == "plain"
        assert session.pc is held[name] and "pc_prepared_age" in session.status.timings_ms
        assert session.pc.localDescription is not None
        assert "m=application" not in session.pc.localDescription.sdp
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 10 * T)


async def test_a_call_waits_for_the_connection_being_made_for_it() -> None:
    # Just after the phone started (or the previous call ended): the call takes the
    # one being made rather than making a second one beside it.
    spec = PrepareSpec.for_call("callee", OPTIONS, send_audio=True)
    pool = PreparedConnections()
    pool.keep(spec, OPTIONS)
    assert pool.take(spec) is None  # not made yet
    pool.keep(spec, OPTIONS)  # (that take ended the keeper's wait: it holds one again)
    taken = await pool.take_soon(spec)
    assert taken is not None and taken.pc.iceGatheringState == "complete"
    assert await pool.take_soon(spec, wait=0.01) is None  # nothing being made now
    await taken.close()
    await pool.close()


@pytest.mark.parametrize("bob_tone", [440.0, None], ids=["callee-audio", "callee-no-audio"])
async def test_prepared_connections_dtls_contexts_are_built_ahead_and_used_once(
    lab: Lab,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    bob_tone: float | None,
) -> None:
    # Each side's DTLS start takes the SSL.Context built with the prepared connection:
    # none is built for the call's certificates on the set-up path. A callee without
    # a source (the harness's) has no transport until the offer: it gets it then.
    assert _dtls_internals_pinned()  # read (and cached) before the spy changes the source
    built_for: list[object] = []
    create = RTCCertificate._create_ssl_context

    def spy(self: RTCCertificate, srtp_profiles: list[Any]) -> Any:
        built_for.append(self._cert)
        return create(self, srtp_profiles)

    monkeypatch.setattr(RTCCertificate, "_create_ssl_context", spy)
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob", tone=bob_tone)
    if bob_tone is None:  # bob's phone learns it has no source from a first call
        caller, callee = await connect(alice, bob)
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 10 * T)
    held = {
        "alice": await _held(alice, "caller", True),
        "bob": await _held(bob, "callee", bob_tone is not None),
    }
    if bob_tone is None:
        assert held["bob"].getTransceivers() == []  # no DTLS transport yet
    for pc in held.values():  # built when prepared, not yet handed out
        certificate = getattr(pc, "_RTCPeerConnection__certificates")[0]  # aiortc's private
        assert isinstance(certificate, _PrebuiltCertificate)
        for transceiver in pc.getTransceivers():
            dtls_transport = transceiver.receiver.transport
            assert getattr(dtls_transport, "_RTCDtlsTransport__local_certificate") is certificate
        assert certificate.prebuilt is not None and certificate.handed_out == 0
        assert certificate._cert in built_for
    built_for.clear()
    caller, callee = await connect(alice, bob)
    assert caller.status.state is CallState.ACTIVE and caller.status.sas == callee.status.sas
    for session, name in ((caller, "alice"), (callee, "bob")):
        assert session.pc is held[name]
        assert session.pc.sctp is not None  # for mypy: the data channel's
        dtls = session.pc.sctp.transport  # bundled: the one DTLS transport
        certificate = getattr(dtls, "_RTCDtlsTransport__local_certificate")
        assert isinstance(certificate, _PrebuiltCertificate)
        assert certificate.handed_out == 1 and certificate.prebuilt is None  # used once
        assert certificate._cert not in built_for  # not rebuilt on the path
        assert dtls._ssl is not None
        own = dtls._ssl.get_certificate()
        assert own is not None  # for mypy
        assert own.to_cryptography() == certificate._cert
        assert dtls._ssl.get_context().get_verify_mode() == (
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        )
        # The certificate in the SDP (whose fingerprint the peer checks) is this one.
        fingerprint = certificate.getFingerprints()[-1].value
        assert fingerprint in session.pc.localDescription.sdp
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 10 * T)
