"""Events the handshake protocol emits (past tense, frozen; ``docs/handshake.md`` §5).

Drain them with :meth:`HandshakeProtocol.events_received` after every input.
None of them holds key bytes in its ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcall.exceptions import QCallError
from qcall.handshake.keyschedule import SRTPKeyMaterial, SRTPProfile

__all__ = [
    "AnswerReceived",
    "Event",
    "HandshakeFailed",
    "KeyConfirmed",
    "KeysDerived",
    "OfferReceived",
    "QKDKeysNeeded",
    "RekeyCompleted",
    "RekeyDue",
    "RekeyPostponed",
]


@dataclass(frozen=True)
class QKDKeysNeeded:
    """The callee needs QKD keys: call ETSI GS QKD 014 ``dec_keys`` (§5.2) with these.

    Answer with :meth:`HandshakeProtocol.receive_qkd_keys` (or ``fail``).
    """

    epoch: int
    key_ids: tuple[str, ...]
    key_size: int  # total bytes expected
    kme_id: str
    master_sae_id: str
    slave_sae_id: str


@dataclass(frozen=True)
class OfferReceived:
    """A valid, signed, fresh offer from an accepted identity (callee side)."""

    peer_name: str
    peer_fingerprint: str  # qcall.identity.fingerprint of the peer's ML-DSA public key
    policy: str
    sdp: str
    srtp_profiles: tuple[str, ...]
    qkd_key_ids: tuple[str, ...]


@dataclass(frozen=True)
class AnswerReceived:
    """A valid, signed answer (caller side)."""

    peer_name: str
    peer_fingerprint: str
    policy: str
    sdp: str
    srtp_profile: str


@dataclass(frozen=True)
class KeysDerived:
    """New SRTP keys for ``epoch``: install ``remote_keys`` for receiving now.

    Switch sending to ``local_keys`` on :class:`KeyConfirmed` for the same epoch.
    """

    epoch: int
    profile: SRTPProfile
    local_keys: SRTPKeyMaterial  # protects what this side sends
    remote_keys: SRTPKeyMaterial  # unprotects what the peer sends
    qkd_key_ids: tuple[str, ...]
    kem_fresh: bool  # an ML-KEM secret entered this epoch


@dataclass(frozen=True)
class KeyConfirmed:
    """The peer proved it derived the same keys for ``epoch``.

    ``sas`` is the call's short authentication string (the same in every epoch):
    it is known only once epoch 0 is confirmed, when the caller's SAS nonce has
    been revealed and checked against its commitment.
    """

    epoch: int
    sas: str


@dataclass(frozen=True)
class RekeyDue:
    """The rekey timer fired (caller): fetch a fresh QKD key, then call ``rekey``."""

    epoch: int  # the epoch the rekey will create


@dataclass(frozen=True)
class RekeyCompleted:
    """Epoch ``epoch`` is confirmed by both sides; the previous one may be dropped."""

    epoch: int
    qkd_key_ids: tuple[str, ...]


@dataclass(frozen=True)
class RekeyPostponed:
    """The rekey to ``epoch`` did not happen; the current keys stay in use.

    ``remote``: the callee refused it with REKEY_NACK (``code`` says why) — the
    caller's shell retries later, within its grace period. Not remote: this
    callee refused it (it called :meth:`CalleeHandshake.decline_rekey`).
    """

    epoch: int
    code: str
    remote: bool


@dataclass(frozen=True)
class HandshakeFailed:
    """The session failed; it accepts no further input.

    ``remote`` is true when the peer reported the failure (its code only).
    """

    error: QCallError
    remote: bool = False


Event = (
    QKDKeysNeeded
    | OfferReceived
    | AnswerReceived
    | KeysDerived
    | KeyConfirmed
    | RekeyDue
    | RekeyCompleted
    | RekeyPostponed
    | HandshakeFailed
)
