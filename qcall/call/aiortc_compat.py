"""The one check that an installed aiortc (or aioice) is a version whose internals qcall hooks into.

:mod:`qcall.call.srtp` (the DTLS transport's SRTP set-up), :mod:`qcall.call.jitter`
(the audio receiver's jitter buffer) and :mod:`qcall.call.fast_transport` (ICE, DTLS
and SCTP timers) replace private aiortc/aioice methods on single instances; each was
read against a range of releases and refuses others.

:func:`close_peer_connection` works around a race in aiortc 1.16's
``RTCPeerConnection.close()`` (see its docstring); every qcall peer connection is
closed through it.
"""

from __future__ import annotations

from typing import Any

import aiortc
from aiortc import RTCPeerConnection

from qcall.exceptions import CallError

__all__ = [
    "GATHER_SUPPORTED",
    "close_peer_connection",
    "gather_now",
    "require_aiortc",
    "require_version",
]

Version = tuple[int, int]


def require_aiortc(
    supported: tuple[Version, Version], what: str, hint: str, version: str | None = None
) -> None:
    """Raise unless aiortc's ``major.minor`` is in ``[low, high)``.

    Args:
        supported: ``(lowest, first unsupported)`` as ``(major, minor)`` pairs.
        what: the qcall component that depends on it (for the message).
        hint: what the user can do instead.
        version: the version to check; defaults to ``aiortc.__version__``.

    Raises:
        CallError: the version is outside the range or unreadable.
    """
    version = aiortc.__version__ if version is None else version
    require_version("aiortc", version, supported, what, hint)


def require_version(
    package: str, version: str, supported: tuple[Version, Version], what: str, hint: str
) -> None:
    """Raise unless ``version`` (of ``package``) has its ``major.minor`` in ``[low, high)``.

    Raises:
        CallError: the version is outside the range or unreadable.
    """
    try:
        parsed = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        parsed = ()
    low, high = supported
    if len(parsed) != 2 or not low <= parsed < high:
        raise CallError(
            f"{package} {version} is not supported by qcall's {what} (needs >="
            f"{low[0]}.{low[1]},<{high[0]}.{high[1]}); {hint}"
        )


async def close_peer_connection(pc: RTCPeerConnection) -> None:
    """Close ``pc``, and stop any receiver or sender that started while it closed.

    aiortc 1.16's ``close()`` stops the transceivers first and then awaits the
    transports' shutdown (the DTLS close_notify). A connection task that was waiting
    for the DTLS handshake can resume in that window, see the DTLS transport still
    ``connected`` and start the receiver: the receiver's non-daemon decoder thread
    then waits forever and the process cannot exit (``qcall listen`` hung on SIGTERM
    after a call failed during its DTLS handshake). Stopping each receiver and sender
    again once ``close()`` returned ends what started in the window; both calls are
    no-ops otherwise. ``tests/test_aiortc_close.py`` shows the race on the pinned
    version.
    """
    await pc.close()
    for transceiver in pc.getTransceivers():
        await transceiver.receiver.stop()
        await transceiver.sender.stop()


#: aiortc releases whose ``RTCPeerConnection.__gather`` (gather every ICE transport's
#: candidates; ``setLocalDescription`` calls it, and each gatherer gathers once) was read.
GATHER_SUPPORTED = ((1, 16), (1, 17))


async def gather_now(pc: Any) -> None:
    """Gather the ICE candidates of every transport ``pc`` has, before any description.

    ``setLocalDescription`` then finds them gathered (an ``RTCIceGatherer`` gathers
    once: :mod:`qcall.call.prepared` prepares an answering connection this way).

    Raises:
        CallError: an aiortc release this was not checked on.
    """
    require_aiortc(GATHER_SUPPORTED, "prepared connections", "use aiortc 1.16")
    await pc._RTCPeerConnection__gather()
