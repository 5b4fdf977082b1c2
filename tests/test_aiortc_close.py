"""qcall.call.aiortc_compat.close_peer_connection: aiortc 1.16's close() race, pinned.

aiortc's connection task can resume while ``RTCPeerConnection.close()`` awaits the
DTLS shutdown, see the DTLS transport still connected and start the audio receiver,
whose non-daemon decoder thread then keeps the process from exiting (``qcall
listen`` did not stop on SIGTERM after a call failed during its DTLS handshake).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
from aiortc import RTCDtlsParameters, RTCPeerConnection

from qcall.call.aiortc_compat import close_peer_connection


def _decoders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith("-decoder") and t.is_alive()]


async def _close_during_connect(close: Callable[[RTCPeerConnection], Awaitable[None]]) -> int:
    """Close the answerer just as its DTLS handshake ends; return its decoder threads left."""
    before = set(_decoders())
    a, b = RTCPeerConnection(), RTCPeerConnection()
    a.addTransceiver("audio")
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    dtls = b.getTransceivers()[0].receiver.transport
    handshake = dtls.start
    closing: list[asyncio.Future[None]] = []

    # the call fails as DTLS completes
    async def start(remoteParameters: RTCDtlsParameters) -> None:  # noqa: N803 (aiortc's name)
        await handshake(remoteParameters)
        closing.append(asyncio.ensure_future(close(b)))
        await asyncio.sleep(0)  # close() stops the transceivers, then awaits the DTLS stop

    dtls.start = start  # type: ignore[method-assign]
    try:
        await a.setRemoteDescription(b.localDescription)
        for _ in range(500):
            if closing:
                break
            await asyncio.sleep(0.01)
        assert closing, "the DTLS handshake did not complete"
        await closing[0]
        await asyncio.sleep(0.05)
        left = [t for t in _decoders() if t not in before]
    finally:
        await a.close()
        for transceiver in b.getTransceivers():  # whatever happened: end the test's threads
            await transceiver.receiver.stop()
    return len(left)


@pytest.mark.asyncio
async def test_plain_close_leaves_a_decoder_thread_running() -> None:
    """The pinned behaviour: if this fails, aiortc fixed the race and the shim can go."""
    assert await _close_during_connect(lambda pc: pc.close()) == 1


@pytest.mark.asyncio
async def test_close_peer_connection_stops_what_started_while_closing() -> None:
    assert await _close_during_connect(close_peer_connection) == 0


@pytest.mark.asyncio
async def test_close_peer_connection_is_idempotent_on_an_unused_connection() -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio")
    await close_peer_connection(pc)
    await close_peer_connection(pc)
    assert pc.connectionState == "closed"
