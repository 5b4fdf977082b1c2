"""What a call is configured to do (:class:`CallOptions`) and what it did (:class:`CallStatus`)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qcall.handshake import SRTPProfile

if TYPE_CHECKING:
    from qcall.call.netem import NetworkProfile
    from qcall.otp.keystream import OTPPolicy

__all__ = ["ICE_POLICIES", "POLICIES", "CallOptions", "CallState", "CallStatus", "IcePath"]

#: Security policies. ``plain`` (stock DTLS-SRTP, no QKD, no ML-KEM) exists only as
#: the latency harness's baseline: no CLI flag selects it, and a peer that is not
#: itself in ``plain`` mode refuses such an offer (never a silent downgrade).
POLICIES = ("hybrid", "pqc", "plain")

#: ICE transport policies (W3C ``RTCIceTransportPolicy``): ``all`` candidates, or
#: ``relay`` (TURN-relayed candidates only: media never goes to a peer directly).
ICE_POLICIES = ("all", "relay")


class CallState(enum.IntEnum):
    """Where a call is."""

    NEW = 0
    RINGING = 1
    CONNECTING = 2
    CONFIRMING = 3
    ACTIVE = 4
    ENDED = 5
    FAILED = 6


@dataclass
class CallOptions:
    """How a user wants calls placed and answered.

    Attributes:
        policy: ``hybrid`` (QKD + ML-KEM + DTLS) or ``pqc`` (ML-KEM + DTLS).
        allow_pqc_only: accept ``pqc`` — when QKD is unavailable (caller) or
            when offered (callee). Never silent: the status shows the policy.
        rekey_interval: seconds between rekeys (caller drives), or ``None``.
        fresh_kem_on_rekey: run a fresh ML-KEM exchange in every rekey (default, every
            policy: post-compromise security for ≈ 0.1 ms a rekey); False makes a
            ``pqc`` call's rekeys a pure hash ratchet.
        srtp_profile: preferred SRTP profile.
        sae_id: this user's SAE ID at its KME (default: the user name).
        confirm_timeout: seconds allowed for key confirmation after our media
            started, at least: on a slow path the wait grows with the path's
            round trip (:func:`qcall.call.session.confirm_timeout`).
        key_grace: when no fresh QKD key can be had for a rekey (KME down, pool
            empty), the call keeps its current keys this many seconds, says so in
            :attr:`CallStatus.notice`, and then ends cleanly (docs/calls.md).
        rekey_retry: seconds between attempts to get a fresh key meanwhile.
        ring_timeout: seconds the caller waits for the callee to pick up.
        network: user-space network emulation on this side's outgoing media
            datagrams (:mod:`qcall.call.netem`; the latency harness), or ``None``.
        network_seed: seed of that emulation (caller ``2n``, callee ``2n + 1``).
        jitter_buffer: ``adaptive`` (:mod:`qcall.call.jitter`) or ``stock``
            (aiortc's fixed 4-frame prefetch, the harness's baseline).
        ice_servers: STUN/TURN servers for hosts behind NAT, as W3C
            ``RTCIceServer`` dictionaries (``urls``, optional ``username`` and
            ``credential``); empty: host candidates only (docs/two-machines.md).
        ice_policy: ``all`` or ``relay`` (:data:`ICE_POLICIES`): with ``relay``
            this side gathers and uses only TURN-relayed candidates, so its media
            reaches the peer through the TURN server only and the peer never
            learns its addresses; a call without a TURN server then fails clearly.
        otp: make (or accept) a one-time-pad call (docs/otp.md): the media is
            sealed with QKD pad used once under this :class:`~qcall.otp.keystream.OTPPolicy`;
            ``None``: an ordinary call.
        fast_transport: fast ICE/DTLS set-up (:mod:`qcall.call.fast_transport`:
            checks and completion without waiting for aioice's pacing tick,
            retransmissions sized by the path's RTT); False: stock aiortc timing
            (the harness's ``plain`` baseline).
        early_offer: the signed offer rides the invite and the signed answer the
            accept (docs/calls.md, "The offer in the invite"): ICE starts one
            signaling round trip after the invite. False: the earlier flow (offer
            and answer after the accept), as qcall before it; either side copes
            with a peer of the other kind.
    """

    policy: str = "hybrid"
    allow_pqc_only: bool = False
    rekey_interval: float | None = 30.0
    fresh_kem_on_rekey: bool = True
    srtp_profile: SRTPProfile = SRTPProfile.AEAD_AES_256_GCM
    sae_id: str | None = None
    confirm_timeout: float = 1.0
    key_grace: float = 120.0
    rekey_retry: float = 2.0
    ring_timeout: float = 60.0
    setup_timeout: float = 20.0
    network: NetworkProfile | None = None
    network_seed: int = 0
    jitter_buffer: str = "adaptive"
    ice_servers: list[dict[str, str]] = field(default_factory=list)
    ice_policy: str = "all"
    otp: OTPPolicy | None = None
    fast_transport: bool = True
    early_offer: bool = True


@dataclass(frozen=True)
class IcePath:
    """The candidate pair ICE selected for the media (RFC 8445 §8.1.1, the nominated pair).

    Attributes:
        local_candidate_type: ``host``, ``srflx``, ``prflx`` or ``relay``
            (RFC 8445 §5.1.1.1; ``relay``: this side sends through its TURN
            allocation, RFC 8656).
        remote_candidate_type: the same for the peer's candidate (``relay``:
            the peer's TURN allocation receives what this side sends).
        local_address: ``IP:PORT`` of the local candidate (for ``relay``, the
            address the TURN server relays from).
        remote_address: ``IP:PORT`` this side sends to.
        policy: the ICE transport policy this side used (:data:`ICE_POLICIES`).
    """

    local_candidate_type: str
    remote_candidate_type: str
    local_address: str
    remote_address: str
    policy: str = "all"

    @property
    def relayed(self) -> bool:
        """True when the media goes through a TURN server (either side's candidate)."""
        return "relay" in (self.local_candidate_type, self.remote_candidate_type)

    def describe(self) -> str:
        """One line for the status: ``relay 10.0.0.1:49152 → relay 10.0.0.1:49153 (TURN)``."""
        via = ", through TURN" if self.relayed else ", direct"
        return (
            f"{self.local_candidate_type} {self.local_address} → {self.remote_candidate_type} "
            f"{self.remote_address}{via} (ICE policy {self.policy})"
        )


@dataclass
class CallStatus:
    """What the live status line and the report show (no key bytes)."""

    call_id: str
    role: str
    peer: str
    state: CallState = CallState.NEW
    policy: str = ""
    notice: str = ""
    kem: str = "ML-KEM-768"
    signature: str = "ML-DSA-65"
    srtp_profile: str = ""
    sas: str | None = None
    peer_fingerprint: str = ""
    #: How the peer's identity was trusted (``ContactStore.peer_trust``):
    #: ``"organisation: <who>"``, ``"verified"`` (SAS compared), ``"unverified"``
    #: (pinned on first use), or ``""`` when not known.
    peer_trust: str = ""
    qkd_key_ids: list[str] = field(default_factory=list)
    all_key_ids: list[str] = field(default_factory=list)
    epoch: int = 0
    rekeys: int = 0
    rekey_failures: int = 0
    decrypt_failures: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)
    rtt_ms: float | None = None
    jitter_ms: float | None = None
    packets_lost: int | None = None
    #: The adaptive jitter buffer (docs/jitter-buffer.md): current playout delay
    #: beyond the fastest recent packet, frames concealed, packets too late to play.
    playout_delay_ms: float | None = None
    frames_concealed: int | None = None
    packets_late: int | None = None
    #: One-time-pad calls: key used and budget left (docs/otp.md), else empty.
    otp_budget: str = ""
    #: Sound devices (docs/audio.md): capture blocks the microphone dropped because
    #: the call fell behind, and times the speaker ran dry and played silence.
    mic_dropped_blocks: int | None = None
    speaker_underruns: int | None = None
    #: The selected ICE candidate pair (``None`` until ICE connected): in the report
    #: as ``ice.local_candidate_type`` &c. (docs/calls.md, "The call report").
    ice: IcePath | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["state"] = self.state.name
        out["ice"] = None if self.ice is None else asdict(self.ice)
        return out
