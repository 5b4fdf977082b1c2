"""One encrypted call: signaling ↔ hybrid handshake ↔ aiortc ↔ QKD key source.

:class:`CallSession` is the asyncio shell around the Sans-I/O
:class:`~qcall.handshake.CallerHandshake` / :class:`~qcall.handshake.CalleeHandshake`.
It wires four things together:

* **signaling** carries the signed OFFER and ANSWER inside the SDP
  offer/answer messages (zero extra round trips), each side's bare SDP just
  ahead of them (so ICE runs while the handshake is signed and verified; the
  signed SDP must be the one applied), and the hangup
  (:mod:`qcall.call.session_sdp`);
* **the QKD key source** (ETSI GS QKD 014 or a key file): the caller fetches a
  fresh key with ``enc_keys`` for its offer, the callee fetches it by key_ID
  with ``dec_keys`` when the handshake asks (:class:`~qcall.handshake.QKDKeysNeeded`;
  :mod:`qcall.call.qkdkeys`);
* **aiortc**: the hybrid SRTP hook (:mod:`qcall.call.srtp`) gives the DTLS
  exporter to the handshake and installs the hybrid keys as soon as they are
  derived (0.5-RTT); the call counts as up only once the peer has confirmed
  them (key confirmation), so a mismatch never produces silent audio
  (:mod:`qcall.call.session_pump`; :meth:`CallSession._wait_active` here);
* **an in-call control channel**: an SCTP data channel, encrypted by DTLS,
  carries the rekey messages independently of the signaling server; the
  epoch-0 CONFIRM goes through signaling, which is up sooner
  (:mod:`qcall.call.session_pump`).

How the parts fit: :class:`CallSession` is built in layers, one module each so
that each stays small. Each layer is the base class of the next and calls only
the layers below it, save for one hook (the caller's verified ANSWER, which the
pump hands to the negotiation):

1. :class:`~qcall.call.session_core.SessionCore` — the call's state (one
   ``__init__``), its tasks and timings, waiting for the peer against the
   call's end and a timeout, and every way a call ends;
2. :class:`~qcall.call.session_pump.HandshakePump` — the handshake's shell:
   its events, the outbox and the control channel, its timer loop, and the
   SRTP hook's key provider (K_dtls in, hybrid keys out);
3. :class:`~qcall.call.session_sdp.Negotiation` — the peer connection and the
   offer/answer, each SDP sent ahead of its signed message;
4. :class:`CallSession` (this module) — the public API (:meth:`~CallSession.dial`,
   :meth:`~CallSession.answer`, :meth:`~CallSession.handle_signaling`,
   :meth:`~CallSession.hangup`, …) and a call's life from ringing to active.

Beside them, :class:`~qcall.call.qkdkeys.QKDKeys` (the ``qkd`` attribute)
fetches the QKD keys. All of them log to the ``qcall.call.session`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from qcall.call.jitter import get_jitter_buffer
from qcall.call.session_core import PeerSDP, hangup_reason, unb64
from qcall.call.session_pump import (  # the constants: also importable from here
    CONTROL_CHANNEL_ID as CONTROL_CHANNEL_ID,
    CONTROL_CHANNEL_LABEL as CONTROL_CHANNEL_LABEL,
    HANDSHAKE_PREFIX as HANDSHAKE_PREFIX,
)
from qcall.call.session_sdp import (
    PLAIN_PREFIX as PLAIN_PREFIX,
    RING_HEADSTART as RING_HEADSTART,
    SDP_PREFIX as SDP_PREFIX,
    Negotiation,
)
from qcall.call.status import CallOptions, CallState, CallStatus
from qcall.exceptions import (
    CallError,
    CallRejectedError,
    InvalidMessageError,
    QCallError,
    SignalingError,
)
from qcall.signaling.messages import (
    EARLY_OFFER,
    Accept,
    Busy,
    Cancel,
    ErrorMessage,
    Hangup,
    ICECandidate,
    Offer,
    Reject,
)
from qcall.signaling.state import EARLY_OFFER_EXPIRED, EARLY_OFFER_SENT

__all__ = [
    "CONFIRM_TIMEOUT_MAX",
    "CONFIRM_TIMEOUT_ROUND_TRIPS",
    "CallOptions",  # re-exported
    "CallSession",
    "CallState",  # re-exported
    "CallStatus",  # re-exported
    "confirm_timeout",
]

logger = logging.getLogger(__name__)

#: Key confirmation may take this many round trips of the media path after our media
#: started (at least ``CallOptions.confirm_timeout``, at most
#: :data:`CONFIRM_TIMEOUT_MAX`): the peer finishes DTLS half a round trip after us,
#: and each loss of our final flight costs it about a round trip more (its
#: retransmission timer, or our SCTP INIT that tells it the flight is missing);
#: then its CONFIRM crosses signaling.
CONFIRM_TIMEOUT_ROUND_TRIPS = 8.0
#: Ceiling (s) of that wait, whatever the path (``options.confirm_timeout`` is the floor).
CONFIRM_TIMEOUT_MAX = 10.0


def confirm_timeout(floor: float, round_trip: float | None) -> float:
    """Seconds allowed for the peer's epoch-0 CONFIRM after our media started.

    :data:`CONFIRM_TIMEOUT_ROUND_TRIPS` × ``round_trip`` (s, the media path's round
    trip or a bound above it), at least ``floor`` (``CallOptions.confirm_timeout``)
    and at most :data:`CONFIRM_TIMEOUT_MAX` (but never below ``floor``); ``floor``
    alone when the round trip is unknown. docs/calls.md, "Key confirmation".
    """
    if round_trip is None:
        return floor
    return max(floor, min(CONFIRM_TIMEOUT_MAX, CONFIRM_TIMEOUT_ROUND_TRIPS * round_trip))


#: Seconds a prepared offer may wait for the callee to pick up before it is stamped
#: and signed afresh (callees accept offer timestamps within ±60 s: docs/handshake.md).
OFFER_MAX_AGE = 20.0


#: What a peer's hangup reason (a handshake wire code, docs/handshake.md §3.6) means for
#: this side: the peer's screen shows its exact cause, this one what to do about it.
_REASONS = {
    "identity_rejected": (
        "{peer}'s phone refused our identity key: it has another key pinned for us (after "
        "a new identity, {peer} checks its fingerprint and runs `qcall contacts forget`)"
    ),
    "otp_not_allowed": (
        "{peer} does not accept one-time-pad calls: {peer} must listen with `qcall listen "
        "--otp end|hybrid`, or call without --otp"
    ),
    "qkd_unavailable": (
        "{peer}'s side could not use the QKD keys: both KMEs must share keys (the same "
        "`qcall network`, or one KME), each side's SAE ID must be right (--sae), and both "
        "KMEs must be up; {peer}'s screen shows the exact cause"
    ),
}


def _fresh_offer(offer: asyncio.Future[tuple[str, float]]) -> str | None:
    """The signed offer's payload if it is made and at most :data:`OFFER_MAX_AGE` old."""
    if not offer.done() or offer.cancelled() or offer.exception() is not None:
        return None
    payload, built_at = offer.result()
    return payload if time.monotonic() - built_at <= OFFER_MAX_AGE else None


def explain_reason(reason: str, peer: str) -> str:
    """``" (…)"`` saying what a peer's hangup ``reason`` means, or ``""``."""
    text = _REASONS.get(reason)
    return f" ({text.format(peer=peer)})" if text else ""


class CallSession(Negotiation):
    """One call between this user and ``peer``; create it with :meth:`dial` or :meth:`answer`.

    Args:
        signaling: a registered :class:`SignalingClient`; the owner routes this
            call's events to :meth:`handle_signaling`.
        signing_key: this user's ML-DSA identity key.
        name: this user's registered name.
        check_peer: the contacts hook (``ContactStore.check_peer``).
        peer_trust: how the peer was trusted, for display (``ContactStore.peer_trust``);
            shown in ``status.peer_trust``.
        key_source: where QKD keys come from, or ``None`` (then only ``pqc``).
        options: :class:`CallOptions`.
        source: the audio track to send.
        on_track: called with the remote audio track when it arrives.
        clock: wall-clock seconds (the handshake signs timestamps).
    """

    def __repr__(self) -> str:
        return f"<CallSession {self.call_id} {self.role} {self.peer} {self.status.state.name}>"

    # --- public API ------------------------------------------------------------------

    @property
    def ended(self) -> asyncio.Future[None]:
        """Resolves when the call ends; carries the error if it failed."""
        return self._ended

    def handle_signaling(self, message: Any) -> None:
        """Feed a signaling message of this call (routed by the owner)."""
        if isinstance(message, ErrorMessage):
            self._finish(message.exception())
            return
        if isinstance(message, Hangup | Cancel | Reject | Busy):
            reason = message.reason or message.TYPE
            if self.status.state < CallState.ACTIVE and isinstance(message, Reject | Busy):
                self._finish(CallRejectedError(f"{self.peer} declined the call ({reason})"))
            elif message.reason and message.reason not in ("hangup", "bye", "normal"):
                why = explain_reason(message.reason, self.peer)
                self._finish(CallError(f"{self.peer} ended the call: {message.reason}{why}"))
            else:
                self._finish(None)
            return
        if isinstance(message, ICECandidate):
            if message.payload.startswith(SDP_PREFIX):
                sdp = PeerSDP(message.payload[len(SDP_PREFIX) :])
                if self.role == "callee":
                    self._inbox.put_nowait(sdp)
                elif not self._answer_sdp.done():  # the first one only
                    self._answer_sdp.set_result(sdp)
            elif message.payload.startswith(HANDSHAKE_PREFIX):  # epoch-0 CONFIRM (setup)
                try:
                    data = unb64(message.payload[len(HANDSHAKE_PREFIX) :])
                except CallError as exc:
                    self._finish(exc)
                    return
                self._on_control_message(data)
            return  # no trickle ICE: aiortc gathers every candidate before the offer
        if isinstance(message, Offer) and self._before_pickup(message):
            if self.auto_answer:  # verified right after our accept (answer())
                self._pending_offer = (message, time.monotonic())
            else:
                self._verify_ringing(message)
            return
        self._inbox.put_nowait(message)

    def _before_pickup(self, message: Offer) -> bool:
        """Callee: whether ``message`` is the signed offer, come before the pick-up."""
        return (
            self.role == "callee"
            and not self._answering
            and self.hs is None
            and self._pending_offer is None
            and not self._ended.done()
            and self.options.early_offer
            and self.options.policy != "plain"
            and not message.payload.startswith(PLAIN_PREFIX)
        )

    def _verify_ringing(self, message: Offer) -> None:
        """Callee: verify the caller's signed offer while the phone rings (docs/calls.md).

        Its SDP must be the one the invite carried (our peer connection is made on
        that one at the pick-up): else the call is refused at once, before any
        accept. A call declined or cancelled meanwhile drops the verified offer's
        secret (:meth:`_finish`).
        """
        arrived = time.monotonic()
        try:
            verified = self._verify_offer(unb64(message.payload))
            invite = self._invite_offer
            if invite is not None and invite[0].startswith(SDP_PREFIX):
                if verified[0].sdp != invite[0][len(SDP_PREFIX) :]:
                    raise InvalidMessageError(
                        f"the SDP in {self.peer}'s signed offer differs from the SDP in its "
                        "invite: call refused"
                    )
        except QCallError as exc:
            self.refused = exc
            if not self._ended.done():  # (a refused offer ended the call already)
                self.end_with_error(exc, hangup_reason(exc))
            return
        self._ringing_offer = (*verified, arrived)

    def offered(self, payload: str, arrived: float | None = None) -> None:
        """Callee: the caller's SDP the invite carried (docs/calls.md, "SDP in the invite").

        Kept for :meth:`answer`; nothing is made or fetched before the pick-up.
        ``arrived``: when the invite came (``time.monotonic()``; default now).
        """
        self._invite_offer = (payload, time.monotonic() if arrived is None else arrived)

    async def dial(self) -> None:
        """Caller: our SDP in the invite; the callee's in its accept; then the signed offer.

        The peer connection and its SDP are made first and ride the invite. The
        QKD key and the signed offer (ML-KEM key, ML-DSA signature) follow, once
        the invite left, while the callee's phone rings. A callee that picks up
        puts its own SDP in the ``accept``: ICE starts one signaling round trip
        after the invite, and the signed offer and answer cross while ICE and
        DTLS run (each side checks
        that the signed SDP is the one it applied). A callee that does not (older
        qcall, or it rang longer than :data:`OFFER_MAX_AGE`) accepts bare and
        sends its SDP ahead of its answer, as in the earlier flow. An offer older
        than :data:`OFFER_MAX_AGE` at the pick-up is stamped and signed afresh
        over the same SDP and QKD key (neither was used). With
        ``options.early_offer`` off: the earlier flow (:meth:`_dial_then_offer`).

        Raises:
            CallRejectedError: the callee declined or was busy.
            SecurityPolicyError: QKD unavailable and ``pqc`` not allowed.
            CallError, HandshakeError, QKDError: the call failed (message says why).
        """
        if not self.options.early_offer:
            await self._dial_then_offer()
            return
        self.status.state = CallState.RINGING
        offer: asyncio.Future[tuple[str, float]] | None = None
        early: asyncio.Future[None] | None = None
        try:
            offer = asyncio.ensure_future(self._prepare_offer())
            if self.options.policy == "plain":
                invite_payload = (await offer)[0]  # the bare SDP offer (PLAIN_PREFIX)
            else:
                either: set[asyncio.Future[Any]] = {self._sdp_ready, offer}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not self._sdp_ready.done():  # the offer failed first
                    await offer
                invite_payload = SDP_PREFIX + self._sdp_ready.result()
            await self.signaling.invite(self.peer, self.call_id, invite_payload)
            self._mark("sdp_sent")
            self._invite_sent.set()  # the key and the signature may start
            features: frozenset[str] = getattr(self.signaling, "server_features", frozenset())
            if self.options.policy != "plain" and EARLY_OFFER in features:
                early = asyncio.ensure_future(self._send_early_offer(offer))
            accept = await self._accepted(offer)
            if early is not None:
                await self._after_early_offer(accept, early)
            elif self.options.policy == "plain":
                if accept.payload is not None:  # the answer came with the pick-up
                    await self._on_answer(accept.payload)
                else:
                    await self._send_offer(invite_payload)
            else:
                ready = _fresh_offer(offer)
                if accept.payload is not None and ready is not None:
                    # The signed offer leaves before the callee's SDP is applied (≈ 1 ms):
                    # the callee's verification and signature take longer than DTLS.
                    sdp = self._accept_sdp(accept.payload)  # refused before the offer leaves
                    await self._send_offer(ready, accept_sdp=sdp)
                else:
                    if accept.payload is not None:
                        await self._apply_accept_sdp(accept.payload)  # ICE starts
                    await self._send_ready_offer(offer)
            await self._wait_active()
        except BaseException as exc:
            if early is not None and not early.done():
                early.cancel()
            await self._dial_failed(offer, exc)
            raise

    async def _send_early_offer(self, offer: asyncio.Future[tuple[str, float]]) -> None:
        """Caller: the signed offer leaves as soon as it is signed, while the callee rings
        (the server offers ``early_offer``: docs/signaling.md, "The offer while ringing")."""
        payload, _ = await asyncio.shield(offer)
        await self._offer_out(payload, ringing=True)

    async def _after_early_offer(self, accept: Accept, early: asyncio.Future[None]) -> None:
        """Caller, the signed offer sent while ringing: the callee's answer follows its accept.

        Unless the accept says the offer is too old (the callee's phone rang longer than
        :data:`OFFER_MAX_AGE`, or the server held it that long for an older callee):
        then one stamped and signed afresh follows, over the same SDP and QKD key.
        """
        sdp = self._accept_sdp(accept.payload) if accept.payload is not None else None
        if sdp is not None and not early.done():  # the key or signature is late: ICE first
            await self._set_answer_sdp(sdp)
            sdp = None
        await early  # (its failure ends the call)
        if accept.reason == EARLY_OFFER_EXPIRED:
            payload, _ = await self._rebuild_offer()
            await self._send_offer(payload, accept_sdp=sdp)
        else:
            await self._await_answer(sdp)

    async def _dial_failed(self, offer: asyncio.Future[Any] | None, exc: BaseException) -> None:
        if offer is not None and not offer.done():
            offer.cancel()
        await self._abort(exc)

    async def _send_ready_offer(self, offer: asyncio.Future[tuple[str, float]]) -> None:
        """Caller: send the signed offer once made (stamped afresh after long ringing)."""
        payload, built_at = await offer
        if time.monotonic() - built_at > OFFER_MAX_AGE:  # rang long: stamp it afresh
            payload, built_at = await self._rebuild_offer()
        await self._send_offer(payload)

    async def _accepted(self, offer: asyncio.Future[Any]) -> Accept:
        """Caller: wait for the pick-up; the offer's failure (e.g. no QKD key) ends the call."""
        accepted = asyncio.ensure_future(
            self._wait_message(Accept, self.options.ring_timeout, "answer")
        )
        pending: set[asyncio.Future[Any]] = {accepted, offer}
        try:
            while not accepted.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if offer in done and offer.exception() is not None:
                    raise offer.exception()  # type: ignore[misc]
        finally:
            accepted.cancel()
        accept: Accept = accepted.result()
        self._picked_up.set()
        self._mark("accepted")
        self.status.state = CallState.CONNECTING
        return accept

    async def _dial_then_offer(self) -> None:
        """Caller, the earlier flow: invite; build the offer while it rings; offer on accept.

        The offer (SDP, ML-KEM key, QKD key_IDs, ML-DSA signature) is built while
        the callee's phone rings, so it leaves the moment the call is accepted.
        If the callee picks up before it is ready, its SDP goes first (ICE
        starts) and the signed offer follows.
        """
        self.status.state = CallState.RINGING
        offer: asyncio.Future[tuple[str, float]] | None = None
        try:
            await self.signaling.invite(self.peer, self.call_id)
            offer = asyncio.ensure_future(self._prepare_offer())
            await self._accepted(offer)
            if not offer.done() and self.options.policy != "plain":
                # Picked up before the key came or the signature was made: the SDP
                # goes ahead, so ICE checks run meanwhile.
                either: set[asyncio.Future[Any]] = {self._sdp_ready, offer}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if self._sdp_ready.done():  # (else the offer failed: raised below)
                    await self._send_sdp_ahead(self._sdp_ready.result())
                    await self._answer_sdp_ahead(offer)
            await self._send_ready_offer(offer)
            await self._wait_active()
        except BaseException as exc:
            await self._dial_failed(offer, exc)
            raise

    async def answer(self) -> None:
        """Callee: accept the call, verify the offer, fetch the QKD key, answer.

        When the invite carried the caller's SDP (:meth:`offered`) at most
        :data:`OFFER_MAX_AGE` ago, our peer connection is made on it and our SDP
        rides the ``accept`` (a ``plain`` offer: our bare answer); the signed
        offer follows, and our signed answer over the same SDP. Otherwise (no
        SDP, too old, ``options.early_offer`` off) the ``accept`` goes bare, as
        in the earlier flow. A signed offer that came while the phone rang was
        verified then (:meth:`_verify_ringing`): our signed answer follows the
        ``accept`` at once; one older than :data:`OFFER_MAX_AGE` is dropped and
        the ``accept`` asks for a fresh one (reason ``early offer expired``).

        Raises:
            HandshakeError, QKDError, CallError: the call failed (message says why).
        """
        self.status.state = CallState.RINGING
        self._answering = True
        try:
            early, self._invite_offer = self._invite_offer, None
            verified, self._ringing_offer = self._ringing_offer, None
            pending, self._pending_offer = self._pending_offer, None
            fresh = early is not None and time.monotonic() - early[1] <= OFFER_MAX_AGE
            came = verified[2] if verified else pending[1] if pending else None
            expired = came is not None and time.monotonic() - came > OFFER_MAX_AGE
            if expired or (early is not None and not fresh and self.options.early_offer):
                # Rang long: a freshly stamped offer follows the accept (one signed while
                # we rang, if the caller sent it and it comes now, is skipped).
                verified = pending = None
                expired = True
                await self._accept_expired()
            elif early is not None and fresh and self.options.early_offer:
                if await self._accept_early(early[0]):  # our SDP (or plain answer) in it
                    await self._wait_active()
                    return
            else:
                await self.signaling.accept(self.call_id)  # the earlier flow
                self._mark("accepted")
            if verified is not None or pending is not None:  # it came while ringing:
                offer_bytes = unb64(pending[0].payload) if pending else b""  # checked now,
                await self._start_callee(offer_bytes, verified[:2] if verified else None)
                await self._wait_active()  # or then: our answer follows the accept at once
                return
            offer = await self._wait_message(
                (Offer, PeerSDP), self.options.setup_timeout, "offer"
            )
            while expired and isinstance(offer, Offer) and offer.reason == EARLY_OFFER_SENT:
                offer = await self._wait_message(
                    (Offer, PeerSDP), self.options.setup_timeout, "offer"
                )
            if isinstance(offer, PeerSDP):  # the SDP ahead of the signed offer
                if self.options.policy != "plain":
                    await self._prepare_answer_sdp(offer.sdp)
                offer = await self._wait_message(Offer, self.options.setup_timeout, "offer")
            if offer.payload.startswith(PLAIN_PREFIX):
                await self._start_plain_callee(offer.payload[len(PLAIN_PREFIX) :])
            else:
                await self._start_callee(unb64(offer.payload))
            await self._wait_active()
        except BaseException as exc:
            await self._abort(exc)
            raise

    async def _accept_expired(self) -> None:
        """Callee: the offer verified while ringing is too old: drop it, ask for a fresh one."""
        if self.hs is not None:
            self.hs.discard()
            self.hs = None
        await self.signaling.accept(self.call_id, reason=EARLY_OFFER_EXPIRED)
        self._mark("accepted")

    async def hangup(self, reason: str = "hangup") -> None:
        """End the call (idempotent)."""
        if not self._ended.done():
            with contextlib.suppress(SignalingError):
                await self.signaling.hangup(self.call_id, reason)
            self._finish(None)
        await self._close()

    async def wait(self) -> None:
        """Wait for the end of the call; raise its error if it failed."""
        try:
            await asyncio.shield(self._ended)
        finally:
            await self._close()

    async def refresh_stats(self) -> None:
        """Update RTT, jitter and loss in :attr:`status` from RTCP (RFC 3550 §6.4).

        Also the selected ICE candidate pair (``status.ice``), should it change.
        """
        if self.pc is None:
            return
        self.note_ice_path()
        try:
            report = await self.pc.getStats()
        except Exception:  # aiortc raises on closed transports
            return
        for stats in report.values():
            kind = type(stats).__name__
            if kind == "RTCRemoteInboundRtpStreamStats":
                rtt = getattr(stats, "roundTripTime", None)
                if rtt is not None:
                    self.status.rtt_ms = round(float(rtt) * 1000, 1)
                lost = getattr(stats, "packetsLost", None)
                if lost is not None:
                    self.status.packets_lost = int(lost)
            elif kind == "RTCInboundRtpStreamStats":
                jitter = getattr(stats, "jitter", None)
                if jitter is not None:
                    # aiortc reports interarrival jitter in RTP timestamp units (48 kHz).
                    self.status.jitter_ms = round(float(jitter) / 48.0, 1)
        if self.hook is not None:
            self.status.decrypt_failures = self.hook.stats.decrypt_failures
        if self.otp is not None:
            self.status.otp_budget = self.otp.describe()
        receivers = [t.receiver for t in self.pc.getTransceivers() if t.kind == "audio"]
        buffer = get_jitter_buffer(receivers[0]) if receivers else None
        if buffer is not None:
            playout = buffer.stats
            self.status.playout_delay_ms = round(playout.delay * 1000, 1)
            self.status.frames_concealed = playout.concealed
            self.status.packets_late = playout.late
        dropped = getattr(self.source, "dropped_blocks", None)
        if isinstance(dropped, int):
            self.status.mic_dropped_blocks = dropped
        underruns = getattr(self.sink, "underruns", None)
        if isinstance(underruns, int):
            self.status.speaker_underruns = underruns

    # --- until the call is up -------------------------------------------------------------

    async def _wait_active(self) -> None:
        """Wait until media flows, then (hybrid, pqc) until the peer confirmed the keys."""
        ready: asyncio.Future[Any]
        if self.hook is not None:
            ready = asyncio.ensure_future(self.hook.wait_ready())
        else:  # plain baseline: media flows once DTLS is connected
            ready = asyncio.ensure_future(self._connected.wait())
        await self._until(ready, self.options.setup_timeout, "call setup")
        # The instant media was enabled, not when this coroutine got to run again.
        enabled = self.hook.active_at if self.hook is not None else self._connected_at
        self._mark("media", at=enabled)
        if self.hook is not None:
            waited = confirm_timeout(self.options.confirm_timeout, self._dtls_round_trip())
            await self._until(asyncio.shield(self._confirmed0), waited, "key confirmation")
        self.status.state = CallState.ACTIVE
        logger.info(
            "= call %s active: %s, SAS %s", self.call_id, self.status.policy, self.status.sas
        )

    def _dtls_round_trip(self) -> float | None:
        """A bound (s) above the media path's round trip: our DTLS handshake's duration.

        From ICE connected to DTLS done is at least one round trip on either side
        (the server waits for the client's second flight after sending its own,
        the client for the server's two flights), plus whatever losses cost. On
        long paths the fast transport's RTT estimator may have no sample (every
        first check retransmitted, Karn's rule); this bound always exists.
        """
        timings = self.status.timings_ms
        if "ice_connected" not in timings or "dtls_done" not in timings:
            return None
        return max(0.0, timings["dtls_done"] - timings["ice_connected"]) / 1000
