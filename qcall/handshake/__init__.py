"""Layer 2, key agreement: the hybrid QKD + ML-KEM + ML-DSA handshake and key schedule.

* :mod:`~qcall.handshake.messages`: the TLV wire format (``docs/handshake.md``).
* :mod:`~qcall.handshake.protocol`: Sans-I/O :class:`CallerHandshake` / :class:`CalleeHandshake`.
* :mod:`~qcall.handshake.keyschedule`: the key schedule (``docs/key-schedule.md``).
* :mod:`~qcall.handshake.events`, :mod:`~qcall.handshake.kem`, :mod:`~qcall.handshake.replay`.
"""

from __future__ import annotations

from qcall.handshake.callee import CalleeHandshake
from qcall.handshake.caller import CallerHandshake
from qcall.handshake.events import (
    AnswerReceived,
    Event,
    HandshakeFailed,
    KeyConfirmed,
    KeysDerived,
    OfferReceived,
    QKDKeysNeeded,
    RekeyCompleted,
    RekeyDue,
    RekeyPostponed,
)
from qcall.handshake.kem import BackendKEM, KEMDecapsulationKey, KEMScheme
from qcall.handshake.keyschedule import EpochKeys, KeySchedule, SRTPKeyMaterial, SRTPProfile
from qcall.handshake.protocol import (
    CheckPeer,
    HandshakeProtocol,
    QKDKey,
    QKDRoute,
    Role,
    State,
)
from qcall.handshake.replay import ReplayCache

__all__ = [
    "AnswerReceived",
    "BackendKEM",
    "CalleeHandshake",
    "CallerHandshake",
    "CheckPeer",
    "EpochKeys",
    "Event",
    "HandshakeFailed",
    "HandshakeProtocol",
    "KEMDecapsulationKey",
    "KEMScheme",
    "KeyConfirmed",
    "KeySchedule",
    "KeysDerived",
    "OfferReceived",
    "QKDKey",
    "QKDKeysNeeded",
    "QKDRoute",
    "RekeyCompleted",
    "RekeyDue",
    "RekeyPostponed",
    "ReplayCache",
    "Role",
    "SRTPKeyMaterial",
    "SRTPProfile",
    "State",
]
