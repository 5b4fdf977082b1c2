"""Peer connections prepared ahead (qcall.call.prepared): adopted by one call, never reused."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiortc import RTCPeerConnection

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


async def _held(phone: Phone, role: str) -> RTCPeerConnection:
    """The connection ``phone`` holds for ``role`` once made (waits for the keeper)."""
    assert phone.prepared is not None
    for _ in range(int(200 * T)):
        held = phone.prepared._ready.get(role)
        if held is not None:
            return held.pc
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {role} connection prepared")


async def test_a_prepared_connection_is_taken_once_and_only_for_its_spec() -> None:
    spec = PrepareSpec.for_call("caller", OPTIONS, send_audio=False)
    pool = PreparedConnections()
    pool.keep(spec, OPTIONS)
    for _ in range(int(200 * T)):
        if pool._ready:
            break
        await asyncio.sleep(0.01)
    other = PrepareSpec.for_call("caller", OPTIONS, send_audio=True)
    held = pool._ready["caller"].pc
    assert pool.take(other) is None  # made for other options: closed, not handed out
    await asyncio.sleep(0.05)
    assert held.connectionState == "closed"
    assert pool.take(spec) is None  # nothing left until keep() again
    pool.keep(spec, OPTIONS)
    for _ in range(int(200 * T)):
        if pool._ready:
            break
        await asyncio.sleep(0.01)
    taken = pool.take(spec)
    assert taken is not None and taken.pc is not held
    assert taken.pc.localDescription is not None  # a caller's: made up to its offer
    assert pool.take(spec) is None  # once
    await taken.close()
    await pool.close()


async def test_an_unused_prepared_connection_is_replaced_after_max_age() -> None:
    spec = PrepareSpec.for_call("callee", OPTIONS, send_audio=True)
    pool = PreparedConnections(max_age=0.2)
    pool.keep(spec, OPTIONS)
    await asyncio.sleep(0.15 * T)
    first = pool._ready["callee"].pc
    await asyncio.sleep(0.4)
    assert first.connectionState == "closed"  # its certificate and ICE credentials gone
    second = pool._ready["callee"].pc
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
    seen: list[tuple[str, str]] = []
    pcs: list[RTCPeerConnection] = []
    for index in range(3):
        held = {"alice": await _held(alice, "caller"), "bob": await _held(bob, "callee")}
        caller, callee = await connect(alice, bob)
        assert caller.status.state is CallState.ACTIVE and caller.status.sas == callee.status.sas
        for session, name in ((caller, "alice"), (callee, "bob")):
            if tone is None and index == 0:
                # Phones first assume a source; a call without one makes its own
                # connection (the prepared one is closed), and the next ones fit.
                assert "pc_prepared_age" not in session.status.timings_ms
                assert held[name].connectionState == "closed"
            else:
                assert "pc_prepared_age" in session.status.timings_ms
                assert session.pc is held[name]
            assert session.pc is not None
            pcs.append(session.pc)
            sdp = session.pc.localDescription.sdp
            seen.append((_ice_ufrag(sdp), _fingerprint(sdp)))
        await caller.hangup()
        await asyncio.wait_for(callee.wait(), 10 * T)
    # No connection, ICE credential or DTLS certificate served two calls.
    assert len({id(pc) for pc in pcs}) == len(pcs)
    assert len({ufrag for ufrag, _ in seen}) == len(seen)
    assert len({fingerprint for _, fingerprint in seen}) == len(seen)
    assert all(pc.connectionState == "closed" for pc in pcs)
