"""Test helpers shared by the test modules."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiortc import MediaStreamTrack, RTCPeerConnection

    from qcall.call.media import TrackSink

#: Multiply every timeout by this on slow machines.
TIMEOUT_FACTOR = float(os.environ.get("QCALL_TESTS_TIMEOUT_FACTOR", "1"))

#: One "unit" of waiting in tests, in seconds.
MS = 0.001 * TIMEOUT_FACTOR

VECTORS = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> Any:
    """Load ``tests/vectors/NAME`` (JSON); each file names its source."""
    return json.loads((VECTORS / name).read_text())


def stop_processes(procs: Iterable[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """SIGTERM each process still running, wait ``grace`` s for it, else SIGKILL it."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def connect_peers(
    caller: RTCPeerConnection, callee: RTCPeerConnection, sink: TrackSink
) -> None:
    """Connect two in-process ``RTCPeerConnection`` s; ``sink`` takes the callee's track.

    The caller's tracks and hooks must be in place; the sink is started as soon
    as the remote track exists, before the answer (so no frame is missed).
    """
    import asyncio

    received = asyncio.Event()

    @callee.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        sink.addTrack(track)
        received.set()

    await caller.setLocalDescription(await caller.createOffer())
    await callee.setRemoteDescription(caller.localDescription)
    await received.wait()
    await sink.start()
    await callee.setLocalDescription(await callee.createAnswer())
    await caller.setRemoteDescription(callee.localDescription)
