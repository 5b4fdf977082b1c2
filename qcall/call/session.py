"""One encrypted call: signaling ↔ hybrid handshake ↔ aiortc ↔ QKD key source.

:class:`CallSession` is the asyncio shell around the Sans-I/O
:class:`~qcall.handshake.CallerHandshake` / :class:`~qcall.handshake.CalleeHandshake`.
It wires four things together:

* **signaling** carries the signed OFFER and ANSWER inside the SDP
  offer/answer messages (zero extra round trips), each side's bare SDP just
  ahead of them (so ICE runs while the handshake is signed and verified; the
  signed SDP must be the one applied), and the hangup;
* **the QKD key source** (ETSI GS QKD 014 or a key file): the caller fetches a
  fresh key with ``enc_keys`` before the offer, the callee fetches it by key_ID
  with ``dec_keys`` when the handshake asks (:class:`~qcall.handshake.QKDKeysNeeded`);
* **aiortc**: the hybrid SRTP hook (:mod:`qcall.call.srtp`) gives the DTLS
  exporter to the handshake and installs the hybrid keys as soon as they are
  derived (0.5-RTT); the call counts as up only once the peer has confirmed
  them (key confirmation), so a mismatch never produces silent audio;
* **an in-call control channel**: an SCTP data channel (negotiated, id 0,
  encrypted by DTLS) carries REKEY, REKEY-ACK and their CONFIRMs. It does not
  depend on the signaling server, so a signaling outage does not stop rekeying.
  The epoch-0 CONFIRM, due when DTLS completes — before the SCTP association
  (two more round trips) is up — goes through signaling instead (an ``ice``
  message, payload ``qcall-hs:`` + base64; it is MACed end to end like every
  handshake message). docs/performance.md measures what this saves.

Rekey (docs/srtp-hook.md): on :class:`~qcall.handshake.KeysDerived` for epoch
*n* the new inbound key is installed *before* our CONFIRM leaves; on
:class:`~qcall.handshake.KeyConfirmed` for *n* (the peer has installed its
inbound key) the outbound key switches. No packet is sent under a key its
receiver lacks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from qcall.call.jitter import apply_jitter_buffer_mode, get_jitter_buffer
from qcall.call.keylog import keylog_write
from qcall.call.netem import Emulation, apply_profile
from qcall.call.qkdkeys import QKDKeys
from qcall.call.srtp import HybridSRTP, SRTPKeys, SRTPProfile as HookProfile, install_srtp_hook
from qcall.call.status import CallOptions, CallState, CallStatus
from qcall.exceptions import (
    CallError,
    CallRejectedError,
    DowngradeError,
    HandshakeError,
    IdentityError,
    InvalidMessageError,
    QCallError,
    QKDError,
    SignalingError,
)
from qcall.handshake import (
    AnswerReceived,
    CalleeHandshake,
    CallerHandshake,
    HandshakeFailed,
    HandshakeProtocol,
    KeyConfirmed,
    KeysDerived,
    OfferReceived,
    QKDKeysNeeded,
    QKDRoute,
    RekeyCompleted,
    RekeyDue,
    RekeyPostponed,
    ReplayCache,
    SRTPProfile,
)
from qcall.handshake.protocol import CheckPeer, wire_code
from qcall.pqc import SigningKey
from qcall.qkd.client import KeySource
from qcall.signaling.client import SignalingClient
from qcall.signaling.messages import (
    Accept,
    Answer,
    Busy,
    Cancel,
    ErrorMessage,
    Hangup,
    ICECandidate,
    Offer,
    Reject,
)

__all__ = ["CallOptions", "CallSession", "CallState", "CallStatus"]  # re-exported

logger = logging.getLogger(__name__)

#: Label of the negotiated data channel that carries in-call handshake messages.
CONTROL_CHANNEL_LABEL = "qcall-control"
CONTROL_CHANNEL_ID = 0

#: Seconds a prepared offer may wait for the callee to pick up before it is stamped
#: and signed afresh (callees accept offer timestamps within ±60 s: docs/handshake.md).
OFFER_MAX_AGE = 20.0

#: Seconds of ringing after which the caller fetches the QKD key and signs the
#: offer even though nobody picked up yet. Until then the SDP alone is ready: a
#: callee that answers at once (auto-answer) gets it ahead of the signed offer,
#: and the caller's fetching and signing wait (again at most this long) until
#: the callee's SDP is applied, to run while ICE checks do (docs/calls.md).
RING_HEADSTART = 0.02

#: Payload prefix of a ``plain`` offer/answer (bare SDP, the harness's baseline).
PLAIN_PREFIX = "plain-sdp:"

#: Payload prefix of an in-call handshake message relayed by signaling (``ice``
#: message type): during setup, before the control channel is open.
HANDSHAKE_PREFIX = "qcall-hs:"

#: Payload prefix of an SDP sent ahead of the signed OFFER or ANSWER that carries
#: the same SDP (``ice`` message type): ICE starts while the QKD key is fetched and
#: the handshake is signed and verified (docs/calls.md, "SDP ahead of the handshake").
SDP_PREFIX = "qcall-sdp:"


class _PeerSDP:
    """The peer's SDP, sent ahead of (and not yet authenticated by) its OFFER/ANSWER."""

    def __init__(self, sdp: str) -> None:
        self.sdp = sdp


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise CallError("peer sent a payload that is not base64") from exc


def _hook_profile(profile: SRTPProfile) -> HookProfile:
    return HookProfile[profile.name]


def _srtp_keys(event: KeysDerived) -> SRTPKeys:
    return SRTPKeys(
        profile=_hook_profile(event.profile),
        local_key=event.local_keys.key,
        local_salt=event.local_keys.salt,
        remote_key=event.remote_keys.key,
        remote_salt=event.remote_keys.salt,
    )


class CallSession:
    """One call between this user and ``peer``; create it with :meth:`dial` or :meth:`answer`.

    Args:
        signaling: a registered :class:`SignalingClient`; the owner routes this
            call's events to :meth:`handle_signaling`.
        signing_key: this user's ML-DSA identity key.
        name: this user's registered name.
        check_peer: the contacts hook (``ContactStore.check_peer``).
        key_source: where QKD keys come from, or ``None`` (then only ``pqc``).
        options: :class:`CallOptions`.
        source: the audio track to send.
        on_track: called with the remote audio track when it arrives.
        clock: wall-clock seconds (the handshake signs timestamps).
    """

    def __init__(
        self,
        *,
        signaling: SignalingClient,
        signing_key: SigningKey,
        name: str,
        call_id: str,
        peer: str,
        role: str,
        check_peer: CheckPeer,
        key_source: KeySource | None,
        options: CallOptions,
        source: MediaStreamTrack | None,
        on_track: Callable[[MediaStreamTrack], None] | None = None,
        replay_cache: ReplayCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signaling = signaling
        self.signing_key = signing_key
        self.name = name
        self.call_id = call_id
        self.peer = peer
        self.role = role
        self.check_peer = check_peer
        self.key_source = key_source
        self.options = options
        self.source = source
        self.on_track = on_track
        self.clock = clock
        self.replay_cache = replay_cache
        self.status = CallStatus(call_id=call_id, role=role, peer=peer)
        self.pc: RTCPeerConnection | None = None
        self.hook: HybridSRTP | None = None
        self.hs: HandshakeProtocol | None = None
        self._channel: RTCDataChannel | None = None
        self._outbox: list[bytes] = []
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._keys0: asyncio.Future[SRTPKeys] = asyncio.get_running_loop().create_future()
        self._confirmed0: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer_changed = asyncio.Event()
        self._t0 = time.monotonic()
        self._exporter: bytes = b""
        self.qkd_kme_id = ""
        self._connected = asyncio.Event()
        self._connected_at: float | None = None
        self.qkd = QKDKeys(self)
        self._offer_inputs: tuple[list[Any], str] = ([], options.policy)
        self._pending_rekey_keys: dict[int, SRTPKeys] = {}
        self._peer_sdp = ""  # the peer's SDP applied to our peer connection
        self._sdp_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._exporter_wanted = False  # the handshake is ready for K_dtls
        self._picked_up = asyncio.Event()  # caller: the callee accepted
        self._ice_started = asyncio.Event()  # the peer's SDP is applied
        self._answer_sdp: asyncio.Future[_PeerSDP] = asyncio.get_running_loop().create_future()
        self._remote_track: MediaStreamTrack | None = None  # until the peer is verified
        self.emulation: Emulation | None = None

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
                self._finish(CallError(f"{self.peer} ended the call: {message.reason}"))
            else:
                self._finish(None)
            return
        if isinstance(message, ICECandidate):
            if message.payload.startswith(SDP_PREFIX):
                sdp = _PeerSDP(message.payload[len(SDP_PREFIX) :])
                if self.role == "callee":
                    self._inbox.put_nowait(sdp)
                elif not self._answer_sdp.done():  # the first one only
                    self._answer_sdp.set_result(sdp)
            elif message.payload.startswith(HANDSHAKE_PREFIX):  # epoch-0 CONFIRM (setup)
                try:
                    data = _unb64(message.payload[len(HANDSHAKE_PREFIX) :])
                except CallError as exc:
                    self._finish(exc)
                    return
                self._on_control_message(data)
            return  # no trickle ICE: aiortc gathers every candidate before the offer
        self._inbox.put_nowait(message)

    async def dial(self) -> None:
        """Caller: invite; meanwhile fetch a QKD key and build the signed offer; then offer.

        The offer (SDP, ML-KEM key, QKD key_IDs, ML-DSA signature) is built while
        the callee's phone rings, so it leaves the moment the call is accepted.
        If the callee picks up before it is ready, its SDP goes first (ICE
        starts) and the signed offer follows.

        Raises:
            CallRejectedError: the callee declined or was busy.
            SecurityPolicyError: QKD unavailable and ``pqc`` not allowed.
            CallError, HandshakeError, QKDError: the call failed (message says why).
        """
        self.status.state = CallState.RINGING
        offer: asyncio.Future[tuple[str, float]] | None = None
        try:
            await self.signaling.invite(self.peer, self.call_id)
            offer = asyncio.ensure_future(self._prepare_offer())
            accepted = asyncio.ensure_future(
                self._wait_message(Accept, self.options.ring_timeout, "answer")
            )
            pending: set[asyncio.Future[Any]] = {accepted, offer}
            try:
                while not accepted.done():
                    done, pending = await asyncio.wait(
                        pending, return_when=asyncio.FIRST_COMPLETED
                    )
                    if offer in done and offer.exception() is not None:
                        raise offer.exception()  # type: ignore[misc]  # e.g. no QKD, no call
            finally:
                accepted.cancel()
            accepted.result()
            self._picked_up.set()
            self._mark("accepted")
            self.status.state = CallState.CONNECTING
            if not offer.done() and self.options.policy != "plain":
                # Picked up before the key came or the signature was made: the SDP
                # goes ahead, so ICE checks run meanwhile.
                either: set[asyncio.Future[Any]] = {self._sdp_ready, offer}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if self._sdp_ready.done():  # (else the offer failed: raised below)
                    await self._send_sdp_ahead(self._sdp_ready.result())
                    await self._answer_sdp_ahead(offer)
            payload, built_at = await offer
            if time.monotonic() - built_at > OFFER_MAX_AGE:  # rang long: stamp it afresh
                payload, built_at = await self._rebuild_offer()
            await self._send_offer(payload)
            await self._wait_active()
        except BaseException as exc:
            if offer is not None and not offer.done():
                offer.cancel()
            await self._abort(exc)
            raise

    async def answer(self) -> None:
        """Callee: accept the call, verify the offer, fetch the QKD key, answer.

        Raises:
            HandshakeError, QKDError, CallError: the call failed (message says why).
        """
        self.status.state = CallState.RINGING
        try:
            await self.signaling.accept(self.call_id)
            self._mark("accepted")
            offer = await self._wait_message(
                (Offer, _PeerSDP), self.options.setup_timeout, "offer"
            )
            if isinstance(offer, _PeerSDP):  # the SDP ahead of the signed offer
                if self.options.policy != "plain":
                    await self._prepare_answer_sdp(offer.sdp)
                offer = await self._wait_message(Offer, self.options.setup_timeout, "offer")
            if offer.payload.startswith(PLAIN_PREFIX):
                await self._start_plain_callee(offer.payload[len(PLAIN_PREFIX) :])
            else:
                await self._start_callee(_unb64(offer.payload))
            await self._wait_active()
        except BaseException as exc:
            await self._abort(exc)
            raise

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
        """Update RTT, jitter and loss in :attr:`status` from RTCP (RFC 3550 §6.4)."""
        if self.pc is None:
            return
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
        receivers = [t.receiver for t in self.pc.getTransceivers() if t.kind == "audio"]
        buffer = get_jitter_buffer(receivers[0]) if receivers else None
        if buffer is not None:
            playout = buffer.stats
            self.status.playout_delay_ms = round(playout.delay * 1000, 1)
            self.status.frames_concealed = playout.concealed
            self.status.packets_late = playout.late

    # --- setup ---------------------------------------------------------------------------

    @property
    def peer_sae(self) -> str:
        return self.peer  # SAE IDs default to user names (docs/calls.md)

    @property
    def own_sae(self) -> str:
        return self.options.sae_id or self.name

    def _new_pc(self, *, control: bool = True) -> RTCPeerConnection:
        # Audio and the control channel end up BUNDLEd on one DTLS transport once
        # the remote description is set; the SRTP hook is installed then. (aiortc
        # 1.16 with max-bundle and a negotiated data channel never connects.)
        ice = [RTCIceServer(**server) for server in self.options.ice_servers]  # STUN/TURN
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice))
        if self.options.network is not None:  # user-space netem (latency harness)
            seed = 2 * self.options.network_seed + (self.role == "callee")
            self.emulation = apply_profile(pc, self.options.network, seed)
        if control:
            channel = pc.createDataChannel(
                CONTROL_CHANNEL_LABEL, negotiated=True, id=CONTROL_CHANNEL_ID, ordered=True
            )
            self._channel = channel
            channel.on("open", self._flush_outbox)
            channel.on("message", self._on_control_message)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._remote_track = track
                self._deliver_track()

        @pc.on("iceconnectionstatechange")
        def on_ice_state() -> None:
            if pc.iceConnectionState in ("connected", "completed"):
                self.status.timings_ms.setdefault("ice_connected", self._elapsed_ms())

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                self._connected_at = time.monotonic()
                self._connected.set()
            elif pc.connectionState == "failed":
                self._finish(CallError("the media connection failed (ICE/DTLS)"))
            elif pc.connectionState == "closed" and self.status.state is CallState.ACTIVE:
                # The peer closed DTLS (close_notify): its hangup, even when the
                # signaling server lost the call (restart; docs/faults.md).
                logger.info("= call %s: %s closed the media connection", self.call_id, self.peer)
                self._finish(None)

        if self.source is not None:
            pc.addTrack(self.source)
        elif self.role == "caller":
            pc.addTransceiver("audio", direction="recvonly")
        apply_jitter_buffer_mode(pc, self.options.jitter_buffer)  # docs/jitter-buffer.md
        self.pc = pc
        return pc

    async def _prepare_offer(
        self, fetched: tuple[list[Any], str] | None = None
    ) -> tuple[str, float]:
        """Build the offer payload (and the peer connection); return it and when.

        The SDP first: it is what the call waits for once the callee picks up
        (it goes ahead of the signed offer). Then, once picked up or after
        :data:`RING_HEADSTART`, the QKD key (unless ``fetched`` already) and the
        signature.
        """
        if self.options.policy == "plain":
            self._offer_inputs = ([], "plain")
            self.status.policy = "plain"
            self.status.notice = "plain DTLS-SRTP baseline: no QKD, no ML-KEM (harness only)"
            pc = self._new_pc(control=False)
            await pc.setLocalDescription(await pc.createOffer())
            return PLAIN_PREFIX + pc.localDescription.sdp, time.monotonic()
        key: asyncio.Future[tuple[list[Any], str]] | None = None
        if fetched is None and self.options.policy == "hybrid" and self.qkd.fetch_early():
            key = asyncio.ensure_future(self.qkd.fetch_initial_key())  # a slow KME: at once
        try:
            pc = self._new_pc()
            await pc.setLocalDescription(await pc.createOffer())
            if not self._sdp_ready.done():
                self._sdp_ready.set_result(pc.localDescription.sdp)
                # The SDP first. Picked up at once: the key (from a fast KME) and
                # the signature wait for the callee's SDP, made while ICE checks run.
                for step in (self._picked_up, self._ice_started):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(step.wait(), RING_HEADSTART)
                    if not self._picked_up.is_set():
                        break
            qkd_keys, policy = fetched or ([], self.options.policy)
            if key is not None:
                qkd_keys, policy = await key
            elif fetched is None and policy == "hybrid":
                qkd_keys, policy = await self.qkd.fetch_initial_key()
        finally:
            if key is not None and not key.done():
                key.cancel()
        self._offer_inputs = (qkd_keys, policy)
        self.status.policy = policy
        hs = CallerHandshake(
            self.signing_key,
            self.name,
            self.peer,
            check_peer=self.check_peer,
            policy=policy,
            qkd_route=QKDRoute(self.qkd_kme_id, self.own_sae, self.peer_sae)
            if policy == "hybrid"
            else None,
            rekey_interval=self.options.rekey_interval,
            srtp_profiles=self._profiles(),
        )
        self.hs = hs
        with self._computing():
            hs.send_offer(pc.localDescription.sdp, self.clock(), qkd_keys)
        return _b64(b"".join(hs.data_to_send())), time.monotonic()

    async def _rebuild_offer(self) -> tuple[str, float]:
        """The offer waited too long for the callee: a new one, freshly stamped and signed."""
        if self.pc is not None:
            pc, self.pc = self.pc, None
            await pc.close()
        self.hs = None
        return await self._prepare_offer(self._offer_inputs)

    async def _answer_sdp_ahead(self, other: asyncio.Future[Any]) -> None:
        """Caller: apply the callee's SDP sent ahead (ICE starts) unless ``other`` is first.

        ``other``: our signed offer being finished, or the signed answer arriving.
        """
        either: set[asyncio.Future[Any]] = {self._answer_sdp, other, self._ended}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self._answer_sdp.done() and self.hook is None:
            await self._set_answer_sdp(self._answer_sdp.result().sdp)

    async def _send_offer(self, payload: str) -> None:
        """Send the prepared offer, wait for the answer, act on it."""
        qkd_keys, policy = self._offer_inputs
        self.note_keys([k.key_id for k in qkd_keys])
        await self.signaling.send_offer(self.call_id, payload)
        self._mark("offer_sent")
        self.status.timings_ms.setdefault("sdp_sent", self.status.timings_ms["offer_sent"])
        answered = asyncio.ensure_future(
            self._wait_message(Answer, self.options.setup_timeout, "answer")
        )
        if policy != "plain":  # the callee's SDP ahead: ICE checks start while it signs
            await self._answer_sdp_ahead(answered)
        answer = await answered
        if policy == "plain":
            if not answer.payload.startswith(PLAIN_PREFIX):
                raise DowngradeError(f"{self.peer} answered a plain offer with a handshake")
            assert self.pc is not None
            await self.pc.setRemoteDescription(
                RTCSessionDescription(answer.payload[len(PLAIN_PREFIX) :], "answer")
            )
            self._mark("answer_received")
            return
        hs = self.hs
        assert hs is not None
        with self._computing():
            hs.receive_data(_unb64(answer.payload), self.clock())
        await self.apply_events()
        self._start_timer()
        if hs.error is None:
            self._exporter_due()
        if self.qkd.status_due:  # now that both sides wait for ICE checks
            self._spawn(self.qkd.check_status())

    async def _start_callee(self, offer: bytes) -> None:
        self.status.state = CallState.CONNECTING
        accepted = ["hybrid", "pqc"] if self.options.allow_pqc_only else [self.options.policy]
        hs = CalleeHandshake(
            self.signing_key,
            self.name,
            check_peer=self.check_peer,
            policy=self.options.policy,
            accepted_policies=accepted,
            replay_cache=self.replay_cache,
            expected_peer=self.peer,  # the name shown is the name the offer proves
            srtp_profiles=self._profiles(),
        )
        self.hs = hs
        with self._computing():
            hs.receive_data(offer, self.clock())
        offer_event = None
        needed: list[QKDKeysNeeded] = []
        for event in self._drain():
            if isinstance(event, OfferReceived):
                offer_event = event
            elif isinstance(event, QKDKeysNeeded):
                needed.append(event)
        if offer_event is None:
            raise self._failure("the offer was refused")
        self.status.policy = offer_event.policy
        self.status.peer_fingerprint = offer_event.peer_fingerprint
        if offer_event.policy != "hybrid":
            self.status.notice = "pqc only (no QKD key), as allowed"
        if self.pc is None:
            await self._prepare_answer_sdp(offer_event.sdp)
        elif offer_event.sdp != self._peer_sdp:
            # ICE (and soon DTLS) runs on the SDP that came ahead: it must be the signed one.
            raise InvalidMessageError(
                f"the SDP in {self.peer}'s signed offer differs from the SDP sent ahead of it"
            )
        if hs.error is not None:  # failed meanwhile
            raise hs.error
        assert self.pc is not None
        with self._computing():
            hs.send_answer(self.pc.localDescription.sdp, self.clock())
        await self.signaling.send_answer(self.call_id, _b64(b"".join(hs.data_to_send())))
        self._mark("answer_sent")
        for event in needed:  # dec_keys during ICE/DTLS: the key is needed only after DTLS,
            self._spawn(self.qkd.fetch_keys_by_id(event))  # and the answer goes out sooner
        await self.apply_events()
        self._start_timer()
        self._exporter_due()

    async def _prepare_answer_sdp(self, sdp: str) -> None:
        """Callee: the peer connection for the offer's SDP; our SDP goes ahead.

        Run on the SDP sent ahead of the signed offer (or on the verified offer's).
        The caller starts ICE on our SDP while we verify, fetch the QKD key and
        sign; nothing secret depends on either SDP until the handshake verified
        both (each side checks that the signed SDP is the one it applied).
        """
        self._peer_sdp = sdp
        pc = self._new_pc()
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        self._install_hook(pc)  # before any await: DTLS has not started yet
        await pc.setLocalDescription(await pc.createAnswer())
        await self._send_sdp_ahead(pc.localDescription.sdp)

    async def _send_sdp_ahead(self, sdp: str) -> None:
        """Send our SDP ahead of the signed message; if signaling is down, the latter says."""
        try:
            await self.signaling.send_ice(self.call_id, SDP_PREFIX + sdp)
        except SignalingError as exc:
            logger.debug("! SDP not sent ahead: %s", exc)
            return
        self._mark("sdp_sent")

    async def _start_plain_callee(self, sdp: str) -> None:
        if self.options.policy != "plain":
            raise DowngradeError(
                f"{self.peer} offered an unprotected plain DTLS-SRTP call (no QKD, no "
                "ML-KEM, no signed identity): refused"
            )
        self.status.state = CallState.CONNECTING
        self.status.policy = "plain"
        self.status.notice = "plain DTLS-SRTP baseline: no QKD, no ML-KEM (harness only)"
        pc = self._new_pc(control=False)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.signaling.send_answer(self.call_id, PLAIN_PREFIX + pc.localDescription.sdp)
        self._mark("answer_sent")

    def _profiles(self) -> tuple[SRTPProfile, ...]:
        first = self.options.srtp_profile
        return (first, *[p for p in SRTPProfile if p is not first])

    def _install_hook(self, pc: RTCPeerConnection) -> None:
        timeout = self.options.setup_timeout
        self.hook = install_srtp_hook(pc, self._provide_keys, timeout=timeout)

    def _provide_keys(self, exporter: bytes, role: str) -> SRTPKeys | asyncio.Future[SRTPKeys]:
        """The SRTP hook's key provider: feed K_dtls, return the epoch-0 keys.

        Media is keyed at once, one round trip before the peer's CONFIRM arrives
        (like TLS 1.3 0.5-RTT data): the keys come from the signed transcript,
        ML-KEM, QKD and the DTLS exporter, so no one else can read that media,
        and if the peer derived different keys its packets fail SRTP
        authentication — nothing plays. Key confirmation still gates the call:
        without a matching CONFIRM within ``confirm_timeout`` it ends with a
        clear error (:meth:`_wait_active`), never as silent audio.

        Synchronous when the handshake and the QKD key are already here (the
        usual case: both complete during ICE): the keys are installed inside
        aiortc's DTLS completion, before its post-handshake work (SCTP, the
        encoder) runs. Otherwise the hook awaits the returned future, and
        :meth:`_exporter_due` hands K_dtls over once the handshake is ready.
        """
        del role
        self._mark("dtls_done")
        self.status.state = CallState.CONFIRMING
        self._exporter = exporter
        if self._exporter_wanted:
            self._feed_exporter()
        if self._keys0.done() and self._keys0.exception() is None:
            return self._keys0.result()
        return self._keys0

    def _exporter_due(self) -> None:
        """The handshake verified the peer (and sent ours): it takes K_dtls from now on."""
        self._exporter_wanted = True
        self._deliver_track()
        if self._exporter:  # DTLS finished first (e.g. a slow KME)
            self._feed_exporter()

    def _deliver_track(self) -> None:
        """Hand the remote audio track to the owner once the peer is authenticated.

        The track exists as soon as an SDP is applied, which may be the SDP sent
        ahead of the signed message: no sink is opened for a call that is then
        refused.
        """
        track = self._remote_track
        if track is None or self.on_track is None:
            return
        if self._exporter_wanted or self.status.policy == "plain":
            self._remote_track = None
            self.on_track(track)

    def _feed_exporter(self) -> None:
        assert self.hs is not None
        with self._computing():
            self.hs.receive_dtls_exporter(self._exporter)
        for event in self._drain():
            self._apply(event)  # no AnswerReceived after the answer: nothing to await
        self._pump()

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
            await self._until(
                asyncio.shield(self._confirmed0), self.options.confirm_timeout, "key confirmation"
            )
        self.status.state = CallState.ACTIVE
        logger.info(
            "= call %s active: %s, SAS %s", self.call_id, self.status.policy, self.status.sas
        )

    async def _until(self, waited: asyncio.Future[Any], timeout: float, what: str) -> None:
        """Wait for ``waited``; raise the call's error if it ends first, or on timeout."""
        try:
            done, _ = await asyncio.wait(
                {waited, self._ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waited.cancel()
        if self._ended.done():
            exc = self._ended.exception()
            raise exc or CallError("the call ended during setup")
        if not done:
            error = (
                HandshakeError(f"key confirmation did not arrive within {timeout:g} s")
                if what == "key confirmation"
                else CallError(f"{what} timed out after {timeout:g} s")
            )
            self._finish(error)
            raise error

    async def _wait_message(
        self, kind: type | tuple[type, ...], timeout: float, what: str
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallError(f"no {what} from {self.peer} within {timeout:g} s")
            getter = asyncio.ensure_future(self._inbox.get())
            try:
                done, _ = await asyncio.wait(
                    {getter, self._ended}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:
                getter.cancel()  # or it would take the next message
                raise
            if getter not in done:
                getter.cancel()
                if self._ended.done():
                    raise self._ended.exception() or CallError("the call ended")
                continue
            message = getter.result()
            if isinstance(message, kind):
                return message
            logger.debug("! ignoring %s while waiting for %s", type(message).__name__, what)

    # --- the handshake pump ---------------------------------------------------------------

    def _drain(self) -> list[Any]:
        """Events of the handshake since the last call; failures end the call."""
        assert self.hs is not None
        events = self.hs.events_received()
        for event in events:
            if isinstance(event, HandshakeFailed):
                self._fail_handshake(event)
        return events

    async def apply_events(self) -> None:
        """Act on every pending handshake event, then send what it queued."""
        assert self.hs is not None
        for event in self._drain():
            if isinstance(event, AnswerReceived):
                await self._answer_received(event)
            else:
                self._apply(event)
        self._pump()

    async def _answer_received(self, event: AnswerReceived) -> None:
        self.status.peer_fingerprint = event.peer_fingerprint
        if self.hook is None:  # not already applied ahead of verification
            await self._set_answer_sdp(event.sdp)
        elif event.sdp != self._peer_sdp:
            # ICE (and soon DTLS) runs on the SDP applied ahead: it must be the signed one.
            raise InvalidMessageError(
                f"the SDP in {self.peer}'s signed answer differs from the SDP sent ahead of it"
            )

    async def _set_answer_sdp(self, sdp: str) -> None:
        assert self.pc is not None
        self._peer_sdp = sdp
        self._ice_started.set()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        # aiortc schedules ICE/DTLS at the very end of setRemoteDescription:
        # hooking now, before any await, is before DTLS can complete.
        self._install_hook(self.pc)
        self._mark("answer_received")

    def _apply(self, event: Any) -> None:
        """Act on one handshake event that needs no waiting."""
        if isinstance(event, OfferReceived):
            self.status.peer_fingerprint = event.peer_fingerprint
        elif isinstance(event, QKDKeysNeeded):
            self._spawn(self.qkd.fetch_keys_by_id(event))
        elif isinstance(event, KeysDerived):
            self._keys_derived(event)
        elif isinstance(event, KeyConfirmed):
            self._key_confirmed(event)
        elif isinstance(event, RekeyDue):
            self._spawn(self.qkd.rekey(event.epoch))
        elif isinstance(event, RekeyPostponed):
            self.qkd.rekey_postponed(event)
        elif isinstance(event, RekeyCompleted):
            self.qkd.rekey_completed()
            self.status.rekeys += 1
            self.status.epoch = event.epoch
            self.note_keys(list(event.qkd_key_ids))
            logger.info("= rekey %d complete (key_IDs %s)", event.epoch, event.qkd_key_ids)

    def _pump(self) -> None:
        """Send queued in-call handshake messages over the control channel."""
        assert self.hs is not None
        self._outbox.extend(self.hs.data_to_send())
        self._flush_outbox()
        self._timer_changed.set()

    def _flush_outbox(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            signaling_up = self.signaling.connected
            if self._outbox and self.status.state < CallState.ACTIVE and signaling_up:
                # Setup (the epoch-0 CONFIRM): the SCTP association would cost two
                # more round trips after DTLS; the signaling path is already up.
                messages, self._outbox = self._outbox, []
                self._spawn(self._send_via_signaling(messages))
            return
        while self._outbox:
            channel.send(self._outbox.pop(0))

    async def _send_via_signaling(self, messages: list[bytes]) -> None:
        for index, data in enumerate(messages):
            try:
                await self.signaling.send_ice(self.call_id, HANDSHAKE_PREFIX + _b64(data))
            except SignalingError:  # signaling lost meanwhile: the control channel
                self._outbox[:0] = messages[index:]  # takes them when it opens
                return

    def _on_control_message(self, message: bytes | str) -> None:
        if self.hs is None or not isinstance(message, bytes):
            self._finish(CallError(f"{self.peer} sent a malformed control message"))
            return
        self.hs.receive_data(message, self.clock())
        self._spawn(self.apply_events())

    def _keys_derived(self, event: KeysDerived) -> None:
        keys = _srtp_keys(event)
        self.status.srtp_profile = event.profile.value
        with contextlib.suppress(QCallError):
            keylog_write(
                self.call_id, self._exporter, event.qkd_key_ids, keys, generation=event.epoch
            )
        if event.epoch == 0:
            if not self._keys0.done():
                self._keys0.set_result(keys)
            return
        assert self.hook is not None
        # Install the new inbound key before our CONFIRM leaves (the pump follows).
        self.hook.prepare_rekey(keys, generation=event.epoch)

    def _key_confirmed(self, event: KeyConfirmed) -> None:
        if event.epoch == 0:
            # The SAS users compare: fixed once the caller's committed nonce is
            # revealed and checked, i.e. at the epoch-0 confirmation on both sides.
            self.status.sas = event.sas
            self._mark("confirmed")
            if not self._confirmed0.done():
                self._confirmed0.set_result(None)
            return
        assert self.hook is not None
        self.hook.activate_outbound(event.epoch)

    def timer_changed(self) -> None:
        """The handshake's timer moved: wake the timer loop."""
        self._timer_changed.set()

    def end_with_error(self, error: QCallError, reason: str) -> None:
        """End the call with ``error``, telling the peer ``reason``."""
        self._finish(error)
        self._spawn(self._send_hangup(reason))

    def _start_timer(self) -> None:
        self._spawn(self._timer_loop())

    async def _timer_loop(self) -> None:
        while self.hs is not None and not self._ended.done():
            self._timer_changed.clear()
            when = self.hs.get_timer()
            delay = None if when is None else max(0.0, when - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_changed.wait(), delay)
                continue
            self.hs.handle_timer(self.clock())
            await self.apply_events()

    # --- endings --------------------------------------------------------------------------

    def _failure(self, default: str) -> QCallError:
        if self.hs is not None and self.hs.error is not None:
            return self.hs.error
        return CallError(default)

    def _fail_handshake(self, event: HandshakeFailed) -> None:
        error = event.error
        if event.remote:
            error = type(error)(f"{self.peer} refused the call: {error}")
        self._finish(error)
        self._spawn(self._send_hangup(wire_code(error)))

    async def _send_hangup(self, reason: str) -> None:
        with contextlib.suppress(SignalingError):
            await self.signaling.hangup(self.call_id, reason)

    def _finish(self, error: BaseException | None) -> None:
        if self._ended.done():
            return
        if error is None:
            self.status.state = CallState.ENDED
            self._ended.set_result(None)
        else:
            self.status.state = CallState.FAILED
            self.status.error = str(error)
            logger.warning("! call %s failed: %s", self.call_id, error)
            self._ended.set_exception(error)
            self._ended.exception()  # mark retrieved: the owner may never await it
        for future in (self._keys0, self._confirmed0):
            if not future.done():
                future.set_exception(error or CallError("the call ended"))
                future.exception()

    async def _abort(self, exc: BaseException) -> None:
        if isinstance(exc, QCallError):
            self._finish(exc)
            reason = getattr(exc, "code", None)
            if not isinstance(reason, str):  # identity and QKD errors: their handshake code
                reason = wire_code(exc) if isinstance(exc, IdentityError | QKDError) else "error"
            await self._send_hangup(reason)
        else:
            self._finish(CallError(f"call aborted ({type(exc).__name__})"))
        await self._close()

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.pc is not None:
            pc, self.pc = self.pc, None
            if self.hook is not None:
                self.status.decrypt_failures = self.hook.stats.decrypt_failures
            await pc.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.debug("! call task failed: %r", exc)
            self._finish(exc if isinstance(exc, QCallError) else CallError(str(exc)))

    def _mark(self, what: str, at: float | None = None) -> None:
        """Record milestone ``what``: now, or at the ``time.monotonic()`` reading ``at``."""
        when = time.monotonic() if at is None else at
        self.status.timings_ms[what] = round((when - self._t0) * 1000, 2)

    def _elapsed_ms(self) -> float:
        return round((time.monotonic() - self._t0) * 1000, 2)

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        """Add the CPU time of a handshake step (ML-KEM, ML-DSA, HKDF) to ``compute``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = (time.perf_counter() - started) * 1000
            timings = self.status.timings_ms
            timings["compute"] = round(timings.get("compute", 0.0) + spent, 3)

    def note_keys(self, key_ids: list[str]) -> None:
        if key_ids:
            self.status.qkd_key_ids = key_ids
            self.status.all_key_ids.extend(key_ids)
