"""The qcall signaling server (``python -m signaling`` or ``qcall-signaling``).

A thin websockets shell (:mod:`signaling.server`) around the Sans-I/O protocol
in :mod:`qcall.signaling`; the wire protocol is specified in ``docs/signaling.md``.
"""

from __future__ import annotations

from signaling.server import SignalingServer

__all__ = ["SignalingServer"]
