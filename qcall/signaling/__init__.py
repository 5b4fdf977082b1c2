"""Signaling: ML-DSA registration, presence and call set-up relay (application layer).

* :mod:`qcall.signaling.messages`: the wire messages (JSON), shared by both ends;
* :mod:`qcall.signaling.protocol`: the server's Sans-I/O state machine, with its
  limits in :mod:`qcall.signaling.config` and its pinned names in
  :mod:`qcall.signaling.pins`;
* :mod:`qcall.signaling.client`: :class:`SignalingClient`, the asyncio client with
  automatic reconnection.

The server shell is the top-level :mod:`signaling` package; the protocol is
specified in ``docs/signaling.md``.
"""

from __future__ import annotations

from qcall.signaling.messages import (
    Accept,
    Answer,
    Busy,
    CallMessage,
    Cancel,
    Challenge,
    ErrorMessage,
    Hangup,
    ICECandidate,
    Invite,
    Offer,
    OnlinePeer,
    Presence,
    Register,
    Registered,
    Reject,
    Ringing,
)
from qcall.signaling.protocol import ServerConfig, SignalingProtocol

__all__ = [
    "Accept",
    "Answer",
    "Busy",
    "CallMessage",
    "Cancel",
    "Challenge",
    "ErrorMessage",
    "Hangup",
    "ICECandidate",
    "Invite",
    "Offer",
    "OnlinePeer",
    "Presence",
    "Register",
    "Registered",
    "Reject",
    "Ringing",
    "ServerConfig",
    "SignalingProtocol",
]
