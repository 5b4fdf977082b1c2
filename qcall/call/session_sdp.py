"""Offer and answer in a call: the peer connection, its SDP, and the SDP ahead.

:class:`Negotiation` is the layer of :class:`~qcall.call.session.CallSession`
that owns the :class:`~aiortc.RTCPeerConnection` and its offer/answer (the
layers and how they fit: :mod:`qcall.call.session`).

* **Signaling** carries the signed OFFER and ANSWER inside the SDP
  offer/answer messages (zero extra round trips), each side's bare SDP just
  ahead of them (an ``ice`` message, payload ``qcall-sdp:`` + SDP), so ICE runs
  while the handshake is signed and verified. Nothing secret depends on an SDP
  until the handshake verified it, and the signed SDP must be the one applied:
  each side checks it (:meth:`Negotiation._start_callee`,
  :meth:`Negotiation._answer_received`).
* **The caller** makes its peer connection and SDP while the callee's phone
  rings (:meth:`Negotiation._prepare_offer`); the QKD key
  (:mod:`qcall.call.qkdkeys`) and the offer's signature follow after
  :data:`RING_HEADSTART` of ringing, or, when the callee picks up at once, once
  the callee's SDP is applied, so that they run while ICE checks do. An offer
  that waited too long for the pick-up is stamped and signed afresh
  (:meth:`Negotiation._rebuild_offer`).
* **The callee** makes its peer connection on the SDP that came ahead of the
  signed offer (or on the verified offer's) and sends its own SDP ahead
  (:meth:`Negotiation._prepare_answer_sdp`), then verifies, signs and answers.
* **plain** (the harness's baseline) is bare SDP offer/answer: no handshake,
  no control channel, and only between two peers that both asked for it.

docs/calls.md ("SDP ahead of the handshake") has the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from qcall.call.aiortc_compat import close_peer_connection
from qcall.call.crypto_worker import send_answer
from qcall.call.jitter import apply_jitter_buffer_mode
from qcall.call.media import UnityGainTrack
from qcall.call.netem import apply_profile
from qcall.call.opus import install_opus_encoder
from qcall.call.prepared import PreparedConnection, PrepareSpec, new_peer_connection
from qcall.call.session_core import b64, unb64
from qcall.call.session_pump import HandshakePump
from qcall.call.status import CallState, IcePath
from qcall.exceptions import CallError, DowngradeError, InvalidMessageError, SignalingError
from qcall.handshake import (
    AnswerReceived,
    CalleeHandshake,
    CallerHandshake,
    OfferReceived,
    QKDKeysNeeded,
    QKDRoute,
    SRTPProfile,
)
from qcall.signaling.messages import Answer
from qcall.signaling.state import EARLY_OFFER_SENT

__all__ = ["PLAIN_PREFIX", "RING_HEADSTART", "SDP_PREFIX", "Negotiation"]

logger = logging.getLogger("qcall.call.session")  # one logger for the whole session

#: Seconds of ringing after which the caller fetches the QKD key and signs the
#: offer even though nobody picked up yet. Until then the SDP alone is ready: a
#: callee that answers at once (auto-answer) gets it ahead of the signed offer,
#: and the caller's fetching and signing wait (again at most this long) until
#: the callee's SDP is applied, to run while ICE checks do (docs/calls.md).
RING_HEADSTART = 0.02

#: Payload prefix of a ``plain`` offer/answer (bare SDP, the harness's baseline).
PLAIN_PREFIX = "plain-sdp:"

#: Payload prefix of an SDP sent ahead of the signed OFFER or ANSWER that carries
#: the same SDP (``ice`` message type): ICE starts while the QKD key is fetched and
#: the handshake is signed and verified (docs/calls.md, "SDP ahead of the handshake").
SDP_PREFIX = "qcall-sdp:"
#: Seconds a failed media connection waits for the peer's signed message when it
#: is still to come: DTLS starts on the SDP sent ahead, so a fingerprint swapped
#: there fails DTLS first, and the signed message then names the real cause.
SIGNED_GRACE = 1.0


class Negotiation(HandshakePump):
    """The peer connection and the offer/answer of one call, with each SDP sent ahead."""

    async def _new_pc(self, *, control: bool = True) -> RTCPeerConnection:
        """The call's peer connection (:attr:`pc`): the control channel, handlers, audio."""
        # Audio and the control channel share one ICE and DTLS transport from the
        # start (max-bundle): the channel is made after the audio transceiver (here
        # for the caller, after the offer is applied for the callee: see
        # _open_control_channel_bundled), so it never gathers candidates of its own
        # (docs/performance.md, "round 5 (loopback)"). The SRTP hook is installed on the
        # one DTLS transport once the remote description is set.
        self._ice_transport_policy()  # refuses relay without TURN
        spec = PrepareSpec.for_call(
            self.role, self.options, self.source is not None, control=control
        )
        prepared = await self._take_prepared(spec)
        if self._ended.done():  # hung up while it waited for the connection being made
            if prepared is not None:
                await prepared.close()
            raise self._ended.exception() or CallError("the call ended during setup")
        if prepared is not None:  # made ahead for one call: this one (qcall.call.prepared)
            pc = prepared.pc
        else:  # made now, exactly as a prepared one is made
            pc = new_peer_connection(spec, self.options)
        if self.options.network is not None:  # user-space netem (latency harness)
            seed = 2 * self.options.network_seed + (self.role == "callee")
            self.emulation = apply_profile(pc, self.options.network, seed)
        if prepared is not None and prepared.channel is not None:
            self._attach_channel(prepared.channel)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._remote_track = track
                self._deliver_track()

        @pc.on("iceconnectionstatechange")
        def on_ice_state() -> None:
            if pc.iceConnectionState in ("connected", "completed"):
                self.status.timings_ms.setdefault("ice_connected", self._elapsed_ms())
                self.note_ice_path()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                self._connected_at = time.monotonic()
                self._connected.set()
            elif pc.connectionState == "failed":
                await self._media_failed()
            elif pc.connectionState == "closed" and self.status.state is CallState.ACTIVE:
                # The peer closed DTLS (close_notify): its hangup, even when the
                # signaling server lost the call (restart; docs/faults.md).
                logger.info("= call %s: %s closed the media connection", self.call_id, self.peer)
                self._finish(None)

        if self.source is not None:
            track = UnityGainTrack(self.source)  # no −3 dB in Opus's upmix
            if prepared is not None and prepared.audio is not None:
                prepared.audio.sender.replaceTrack(track)  # made sendrecv, without a track
            else:
                pc.addTrack(track)
            install_opus_encoder(pc)  # 10 ms packets from a microphone (docs/audio.md)
        elif self.role == "caller" and prepared is None:
            pc.addTransceiver("audio", direction="recvonly")
        apply_jitter_buffer_mode(pc, self.options.jitter_buffer)  # docs/jitter-buffer.md
        if control and self.role == "caller":  # after the audio transceiver: bundled on it
            self._open_control_channel_bundled(pc)
        self.pc = pc
        return pc

    async def _take_prepared(self, spec: PrepareSpec) -> PreparedConnection | None:
        """The phone's connection prepared for a call like this one, if any (used once)."""
        if self.prepared is None:
            return None
        prepared = await self.prepared.take_soon(spec)
        if prepared is not None:
            self.status.timings_ms["pc_prepared_age"] = round(
                (time.monotonic() - prepared.made_at) * 1000, 1
            )
        return prepared

    def _open_control_channel_bundled(self, pc: RTCPeerConnection) -> None:
        """The control channel on the audio's transport (max-bundle), gathering nothing.

        Only once the peer connection has its audio transceiver: the caller's is
        made with it, the callee's by its ``setRemoteDescription`` of the offer
        when it sends no audio. (aiortc 1.16 with max-bundle and a data channel made
        *before* any transceiver gives the channel a transport of its own, which
        never connects.)
        """
        if self._channel is None and pc.getTransceivers():
            self._open_control_channel(pc)

    def _ice_transport_policy(self) -> RTCIceTransportPolicy:
        """The W3C policy of ``options.ice_policy``; ``relay`` needs a TURN server.

        Raises:
            CallError: ``relay`` without any ``turn:``/``turns:`` server (aioice
                would gather no candidate and the call would hang).
        """
        policy = self.options.ice_policy
        if policy == "all":
            return RTCIceTransportPolicy.ALL
        if policy != "relay":
            raise CallError(f"ICE policy must be all or relay, not {policy!r}")
        for server in self.options.ice_servers:
            urls: Any = server.get("urls", "")
            if any(url.startswith(("turn:", "turns:")) for url in _url_list(urls)):
                return RTCIceTransportPolicy.RELAY
        raise CallError(
            "ICE policy relay needs a TURN server: give [[ice_servers]] with a turn: URL "
            "in the config, or use a signaling server that issues TURN credentials "
            "(--turn-url, docs/two-machines.md)"
        )

    def note_ice_path(self) -> None:
        """Put the selected ICE candidate pair in ``status.ice`` (once ICE has one).

        aiortc has no public API for it (``RTCIceTransport`` has no
        ``getSelectedCandidatePair``): the nominated pair of component 1 is read
        from aioice's ``Connection`` (aioice 0.13, as :mod:`qcall.call.fast_transport`).
        """
        if self.pc is None:
            return
        try:
            ice = self.pc.getTransceivers()[0].sender.transport.transport
            pair = ice._connection._nominated.get(1)
        except (AttributeError, IndexError):
            return
        if pair is None:
            return
        local, remote = pair.local_candidate, pair.remote_candidate
        self.status.ice = IcePath(
            local_candidate_type=str(local.type),
            remote_candidate_type=str(remote.type),
            local_address=f"{local.host}:{local.port}",
            remote_address=f"{remote.host}:{remote.port}",
            policy=self.options.ice_policy,
        )

    # --- caller ---------------------------------------------------------------------------

    async def _prepare_offer(
        self,
        fetched: tuple[list[Any], str] | None = None,
        pc: RTCPeerConnection | None = None,
    ) -> tuple[str, float]:
        """Build the offer payload (and the peer connection, unless ``pc``); return it and when.

        The SDP first: it rides the invite (``early_offer``), or else goes ahead
        of the signed offer once the callee picks up. Then the QKD key (unless
        ``fetched`` already) and the signature: once the invite left, or in the
        earlier flow once picked up or after :data:`RING_HEADSTART`.
        """
        if self.options.policy == "plain":
            self._offer_inputs = ([], "plain")
            self.status.policy = "plain"
            self.status.notice = "plain DTLS-SRTP baseline: no QKD, no ML-KEM (harness only)"
            pc = await self._new_pc(control=False)
            if pc.localDescription is None:  # (a prepared connection has its offer)
                await pc.setLocalDescription(await pc.createOffer())
            return PLAIN_PREFIX + pc.localDescription.sdp, time.monotonic()
        early = self.options.early_offer  # our SDP rides the invite: it goes first
        key: asyncio.Future[tuple[list[Any], str]] | None = None
        if fetched is None and self.options.policy == "hybrid" and not early:
            if self.qkd.fetch_early():  # earlier flow, a slow KME: at once
                key = asyncio.ensure_future(self.qkd.fetch_initial_key())
        try:
            if pc is None:
                pc = await self._new_pc()
                if pc.localDescription is None:  # (a prepared connection has its offer)
                    await pc.setLocalDescription(await pc.createOffer())
            if early and not self._sdp_ready.done():
                self._sdp_ready.set_result(pc.localDescription.sdp)
                await self._invite_sent.wait()  # it rides the invite: that leaves first
            elif not self._sdp_ready.done():
                self._sdp_ready.set_result(pc.localDescription.sdp)
                # The SDP first. Picked up at once: the key (from a fast KME) and
                # the signature wait for the callee's SDP, made while ICE checks run.
                for step in (self._picked_up, self._ice_started):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(step.wait(), RING_HEADSTART)
                    if not self._picked_up.is_set():
                        break
            self._mark("offer_key_wait")
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
        if self.options.otp is not None and policy == "hybrid":
            # Stated in the signed offer (docs/handshake.md §3.2): a callee that does
            # not accept one-time-pad calls refuses at once with otp_not_allowed.
            policy = "otp"
        hs = CallerHandshake(
            self.signing_key,
            self.name,
            self.peer,
            check_peer=self.check_peer,
            policy=policy,
            qkd_route=QKDRoute(self.qkd_kme_id, self.own_sae, self.peer_sae)
            if policy in ("hybrid", "otp")
            else None,
            rekey_interval=self.options.rekey_interval,
            srtp_profiles=self._profiles(),
            kem=self.qkd.kem_pool,  # pre-made ML-KEM pairs, each used once (or made now)
        )
        self.hs = hs
        self._mark("offer_key")
        with self._computing():
            hs.send_offer(pc.localDescription.sdp, self.clock(), qkd_keys)
        self._mark("offer_signed")
        return b64(b"".join(hs.data_to_send())), time.monotonic()

    async def _rebuild_offer(self) -> tuple[str, float]:
        """The offer waited too long for the callee: a new one, freshly stamped and signed.

        It never left, so it keeps its QKD key. Its SDP too when that rode the
        invite (the callee's peer connection is made on it); else a new one.
        """
        self.hs = None
        if self.options.early_offer:
            return await self._prepare_offer(self._offer_inputs, pc=self.pc)
        if self.pc is not None:
            pc, self.pc = self.pc, None
            await close_peer_connection(pc)
        return await self._prepare_offer(self._offer_inputs)

    async def _apply_accept_sdp(self, payload: str) -> None:
        """Caller: the callee's SDP from its ``accept`` (its signed answer follows)."""
        await self._set_answer_sdp(self._accept_sdp(payload))

    def _accept_sdp(self, payload: str) -> str:
        """Caller: the SDP of the callee's ``accept``.

        Raises:
            DowngradeError: a plain SDP answered our signed call.
            InvalidMessageError: the accept carries no SDP.
        """
        if payload.startswith(PLAIN_PREFIX):
            raise DowngradeError(f"{self.peer} answered a signed call with a plain SDP")
        if not payload.startswith(SDP_PREFIX):
            raise InvalidMessageError(f"{self.peer}'s accept carries no SDP (qcall-sdp:)")
        return payload[len(SDP_PREFIX) :]

    async def _answer_sdp_ahead(self, other: asyncio.Future[Any]) -> None:
        """Caller: apply the callee's SDP sent ahead (ICE starts) unless ``other`` is first.

        ``other``: our signed offer being finished, or the signed answer arriving.
        """
        either: set[asyncio.Future[Any]] = {self._answer_sdp, other, self._ended}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self._answer_sdp.done() and self.hook is None:
            await self._set_answer_sdp(self._answer_sdp.result().sdp)

    async def _send_offer(self, payload: str, *, accept_sdp: str | None = None) -> None:
        """Send the prepared offer (``offer`` message), wait for the answer, act on it.

        ``accept_sdp``: the callee's SDP from its ``accept`` (checked by
        :meth:`_accept_sdp`), applied once the offer left.
        """
        await self._offer_out(payload)
        await self._await_answer(accept_sdp)

    async def _offer_out(self, payload: str, *, ringing: bool = False) -> None:
        """Caller: send the signed offer (after the accept, or while ``ringing``)."""
        qkd_keys, _ = self._offer_inputs
        self.note_keys([k.key_id for k in qkd_keys])
        # (Tagged while ringing: a callee that asked for a fresh one skips it.)
        reason = EARLY_OFFER_SENT if ringing else None
        await self.signaling.send_offer(self.call_id, payload, reason=reason)
        self._mark("offer_sent")
        self.status.timings_ms.setdefault("sdp_sent", self.status.timings_ms["offer_sent"])

    async def _await_answer(self, accept_sdp: str | None) -> None:
        """Caller, our signed offer sent: apply ``accept_sdp``, wait for the answer, act on it."""
        policy = self._offer_inputs[1]
        if accept_sdp is not None:
            await self._set_answer_sdp(accept_sdp)  # ICE starts
        answered = asyncio.ensure_future(
            self._wait_message(Answer, self.options.setup_timeout, "answer")
        )
        if policy != "plain":  # the callee's SDP ahead: ICE checks start while it signs
            await self._answer_sdp_ahead(answered)
        await self._on_answer((await answered).payload)

    async def _media_failed(self) -> None:
        """ICE or DTLS failed: end the call, naming the signed message's finding if any.

        With DTLS on the SDP sent ahead (docs/calls.md), a server that swapped the
        peer's fingerprint there makes DTLS fail before the signed offer or answer
        arrives; that message then shows the tampering ("differs from the SDP sent
        ahead"). So while it is still to come, the failure waits for it (at most
        :data:`SIGNED_GRACE`): either it ends the call with that error, or the
        transport's error stands. No key exists either way."""
        if self.options.policy != "plain" and not self._ended.done():
            pending = self._held is not None if self.role == "caller" else self.hs is None
            if pending:
                await asyncio.wait({self._ended}, timeout=SIGNED_GRACE)
        self._finish(CallError("the media connection failed (ICE/DTLS)"))

    async def _on_answer(self, payload: str) -> None:
        """Caller: act on the callee's answer (from an ``answer`` or from the ``accept``)."""
        policy = self._offer_inputs[1]
        if policy == "plain":
            if not payload.startswith(PLAIN_PREFIX):
                raise DowngradeError(f"{self.peer} answered a plain offer with a handshake")
            assert self.pc is not None
            await self.pc.setRemoteDescription(
                RTCSessionDescription(payload[len(PLAIN_PREFIX) :], "answer")
            )
            self._mark("answer_received")
            return
        if payload.startswith(PLAIN_PREFIX):
            raise DowngradeError(f"{self.peer} answered a signed offer with a plain SDP")
        hs = self.hs
        assert hs is not None
        with self._computing():
            hs.receive_data(unb64(payload), self.clock())
        await self.apply_events()
        self._release_held()
        self._start_timer()
        if hs.error is None:
            self._exporter_due()
        if self.qkd.status_due:  # once the call is up: not during ICE and DTLS
            self.qkd.check_status_after_setup()

    async def _answer_received(self, event: AnswerReceived) -> None:
        self._peer_identified(event.peer_fingerprint)
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

    # --- callee ---------------------------------------------------------------------------

    async def _accept_early(self, payload: str) -> bool:
        """Callee: accept with the answer to the invite's payload (docs/calls.md).

        The caller's SDP (``qcall-sdp:``): our peer connection is made on it and
        our SDP rides the ``accept``; the signed offer is still to come (returns
        False). A ``plain`` SDP offer: our bare answer rides it (True; refused
        unless we are ``plain`` too). Anything else: a bare ``accept`` (False).
        """
        if payload.startswith(PLAIN_PREFIX):
            await self._start_plain_callee(payload[len(PLAIN_PREFIX) :], in_accept=True)
            return True
        if payload.startswith(SDP_PREFIX) and self.options.policy != "plain":
            await self._prepare_answer_sdp(payload[len(SDP_PREFIX) :], in_accept=True)
        else:
            await self.signaling.accept(self.call_id)
            self._mark("accepted")
        return False

    def _verify_offer(self, offer: bytes) -> tuple[OfferReceived, list[QKDKeysNeeded]]:
        """Callee: verify the signed offer (a new handshake); its event and key requests.

        Run at once when the offer comes while the phone rings
        (:meth:`~qcall.call.session.CallSession.handle_signaling`), else once picked up.
        """
        accepted = ["hybrid", "pqc"] if self.options.allow_pqc_only else [self.options.policy]
        if self.options.otp is not None:
            accepted.append("otp")  # `qcall listen --otp`: one-time-pad calls are welcome
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
        self._mark("offer_received")
        with self._computing():
            hs.receive_data(offer, self.clock())
        self._mark("offer_verified")
        offer_event = None
        needed: list[QKDKeysNeeded] = []
        for event in self._drain():
            if isinstance(event, OfferReceived):
                offer_event = event
            elif isinstance(event, QKDKeysNeeded):
                needed.append(event)
        if offer_event is None:
            raise self._failure("the offer was refused")
        self.status.policy = "hybrid" if offer_event.policy == "otp" else offer_event.policy
        self._peer_identified(offer_event.peer_fingerprint)
        if offer_event.policy == "pqc":
            self.status.notice = "pqc only (no QKD key), as allowed"
        return offer_event, needed

    async def _start_callee(
        self,
        offer: bytes,
        verified: tuple[OfferReceived, list[QKDKeysNeeded]] | None = None,
    ) -> None:
        """Callee: verify the signed offer (unless ``verified`` while ringing), make our
        SDP (unless made), sign and answer."""
        self.status.state = CallState.CONNECTING
        offer_event, needed = verified or self._verify_offer(offer)
        hs = self.hs
        assert isinstance(hs, CalleeHandshake)
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
        self._mark("answer_sdp_ready")
        # ICE checks and DTLS records that came in while we verified: answered before
        # we sign (≈ 1 ms of ML-DSA that holds the event loop and the GIL) — unless
        # the crypto worker signs, which should start at once, the loop then free.
        if self.signer is None or not self.signer.ready:
            await asyncio.sleep(0)
            if hs.error is not None:
                raise hs.error
        # Signed in the phone's crypto worker when it runs (the loop keeps serving
        # ICE and DTLS meanwhile), else here: qcall.call.crypto_worker.
        sdp = self.pc.localDescription.sdp
        await send_answer(hs, sdp, self.clock(), self.signer, self._computing)
        await self._send_answer(b64(b"".join(hs.data_to_send())), in_accept=False)
        for event in needed:  # dec_keys during ICE/DTLS: the key is needed only after DTLS,
            self._spawn(self.qkd.fetch_keys_by_id(event))  # and the answer goes out sooner
        await self.apply_events()
        self._start_timer()
        self._exporter_due()

    async def _send_answer(self, payload: str, *, in_accept: bool) -> None:
        if in_accept:
            await self.signaling.accept(self.call_id, payload)
            self._mark("accepted")
        else:
            await self.signaling.send_answer(self.call_id, payload)
        self._mark("answer_sent")

    async def _prepare_answer_sdp(self, sdp: str, *, in_accept: bool = False) -> None:
        """Callee: the peer connection for the offer's SDP; our SDP goes ahead.

        ``in_accept``: the caller's SDP came in the invite, ours rides the ``accept``.

        Run on the SDP sent ahead of the signed offer (or on the verified offer's).
        The caller starts ICE on our SDP while we verify, fetch the QKD key and
        sign; nothing secret depends on either SDP until the handshake verified
        both (each side checks that the signed SDP is the one it applied).
        """
        self._peer_sdp = sdp
        pc = await self._new_pc()
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        self._install_hook(pc)  # before any await: DTLS has not started yet
        self._open_control_channel_bundled(pc)
        await pc.setLocalDescription(await pc.createAnswer())
        if in_accept:
            await self.signaling.accept(self.call_id, SDP_PREFIX + pc.localDescription.sdp)
            self._mark("accepted")
            self._mark("sdp_sent")
        else:
            await self._send_sdp_ahead(pc.localDescription.sdp)

    async def _start_plain_callee(self, sdp: str, *, in_accept: bool = False) -> None:
        if self.options.policy != "plain":
            raise DowngradeError(
                f"{self.peer} offered an unprotected plain DTLS-SRTP call (no QKD, no "
                "ML-KEM, no signed identity): refused"
            )
        self.status.state = CallState.CONNECTING
        self.status.policy = "plain"
        self.status.notice = "plain DTLS-SRTP baseline: no QKD, no ML-KEM (harness only)"
        pc = await self._new_pc(control=False)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self._send_answer(PLAIN_PREFIX + pc.localDescription.sdp, in_accept=in_accept)

    # --- both -----------------------------------------------------------------------------

    async def _send_sdp_ahead(self, sdp: str) -> None:
        """Send our SDP ahead of the signed message; if signaling is down, the latter says."""
        try:
            await self.signaling.send_ice(self.call_id, SDP_PREFIX + sdp)
        except SignalingError as exc:
            logger.debug("! SDP not sent ahead: %s", exc)
            return
        self._mark("sdp_sent")

    def _profiles(self) -> tuple[SRTPProfile, ...]:
        first = self.options.srtp_profile
        return (first, *[p for p in SRTPProfile if p is not first])


def _url_list(urls: Any) -> list[str]:
    """An ``RTCIceServer.urls`` value (one URL or a list) as a list of strings."""
    if isinstance(urls, str):
        return [urls]
    return [url for url in urls if isinstance(url, str)] if isinstance(urls, list) else []
