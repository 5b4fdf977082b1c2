"""The handshake's shell in a call: its events, outbox, control channel, timer and SRTP keys.

:class:`HandshakePump` is the layer of :class:`~qcall.call.session.CallSession`
that drives the Sans-I/O :class:`~qcall.handshake.CallerHandshake` /
:class:`~qcall.handshake.CalleeHandshake` (the layers and how they fit:
:mod:`qcall.call.session`). After every input to the handshake, a layer calls
:meth:`HandshakePump.apply_events`: it acts on the handshake's events, sends what
it queued (:meth:`HandshakePump._pump`) and wakes the timer loop, which calls
``handle_timer`` when the handshake's timer (rekey, retries) is due.

* **aiortc**: the hybrid SRTP hook (:mod:`qcall.call.srtp`) gives the DTLS
  exporter to the handshake and installs the hybrid keys as soon as they are
  derived (0.5-RTT); the call counts as up only once the peer has confirmed
  them (key confirmation), so a mismatch never produces silent audio.
* **An in-call control channel**: an SCTP data channel (negotiated, id 0,
  encrypted by DTLS) carries REKEY, REKEY-ACK and their CONFIRMs. It does not
  depend on the signaling server, so a signaling outage does not stop rekeying.
  The epoch-0 CONFIRM, due when DTLS completes — before the SCTP association
  (two more round trips) is up — goes through signaling instead (an ``ice``
  message, payload ``qcall-hs:`` + base64; it is MACed end to end like every
  handshake message). docs/performance.md measures what this saves.
* **QKD keys** the handshake asks for (:class:`~qcall.handshake.QKDKeysNeeded`,
  :class:`~qcall.handshake.RekeyDue`) are fetched by :class:`~qcall.call.qkdkeys.QKDKeys`
  as tasks of the call.

Rekey (docs/srtp-hook.md): on :class:`~qcall.handshake.KeysDerived` for epoch
*n* the new inbound key is installed *before* our CONFIRM leaves; on
:class:`~qcall.handshake.KeyConfirmed` for *n* (the peer has installed its
inbound key) the outbound key switches. No packet is sent under a key its
receiver lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from aiortc import RTCDataChannel, RTCPeerConnection

from qcall.call.keylog import keylog_write
from qcall.call.prepared import (  # the control channel: also importable from here
    CONTROL_CHANNEL_ID as CONTROL_CHANNEL_ID,
    CONTROL_CHANNEL_LABEL as CONTROL_CHANNEL_LABEL,
)
from qcall.call.qkdkeys import QKDKeys
from qcall.call.session_core import SessionCore, b64
from qcall.call.srtp import SRTPKeys, SRTPProfile as HookProfile, install_srtp_hook
from qcall.call.status import CallState
from qcall.exceptions import CallError, QCallError, SignalingError
from qcall.handshake import (
    AnswerReceived,
    HandshakeFailed,
    KeyConfirmed,
    KeysDerived,
    OfferReceived,
    QKDKeysNeeded,
    RekeyCompleted,
    RekeyDue,
    RekeyPostponed,
    SRTPProfile,
)
from qcall.otp.keystream import FellBackToHybrid, KeyStreamEnded, exhausted_error
from qcall.otp.media import OTPMedia, is_otp_message

__all__ = ["CONTROL_CHANNEL_ID", "CONTROL_CHANNEL_LABEL", "HANDSHAKE_PREFIX", "HandshakePump"]

logger = logging.getLogger("qcall.call.session")  # one logger for the whole session


#: Payload prefix of an in-call handshake message relayed by signaling (``ice``
#: message type): during setup, before the control channel is open.
HANDSHAKE_PREFIX = "qcall-hs:"

#: In-call handshake messages a caller keeps while the answer is not processed yet.
MAX_HELD = 8


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


class HandshakePump(SessionCore):
    """The handshake's events, outbox, control channel, timer and SRTP hook, for one call."""

    @functools.cached_property
    def qkd(self) -> QKDKeys:
        """QKD key fetching for this call (:mod:`qcall.call.qkdkeys`), made on first use."""
        return QKDKeys(self)

    # --- the handshake's events -----------------------------------------------------------

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
        """Caller: act on the verified ANSWER (its SDP).

        Implemented by :class:`~qcall.call.session_sdp.Negotiation`, the layer
        that owns the peer connection's SDP.
        """
        raise NotImplementedError

    def _apply(self, event: Any) -> None:
        """Act on one handshake event that needs no waiting."""
        if isinstance(event, OfferReceived):
            self._peer_identified(event.peer_fingerprint)
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
            self._start_otp()
            # The SAS users compare: fixed once the caller's committed nonce is
            # revealed and checked, i.e. at the epoch-0 confirmation on both sides.
            self.status.sas = event.sas
            self._mark("confirmed")
            if not self._confirmed0.done():
                self._confirmed0.set_result(None)
            return
        assert self.hook is not None
        self.hook.activate_outbound(event.epoch)

    # --- one-time-pad media (docs/otp.md) --------------------------------------------------

    def _attach_otp(self, pc: RTCPeerConnection) -> None:
        """OTP calls: seal media with pad, right after the hybrid hook (before DTLS)."""
        if self.options.otp is None or self.otp is not None:
            return
        if self.key_source is None:
            raise CallError("a one-time-pad call needs a QKD key source")
        self.otp = OTPMedia(
            pc, self.key_source, self.peer_sae, self.options.otp, self._send_otp, self._otp_event
        )

    def _start_otp(self) -> None:
        if self.otp is not None:
            self.status.policy = "otp"
            self.otp.start()

    def _send_otp(self, data: bytes) -> None:
        self._outbox.append(data)
        self._flush_outbox()

    def _otp_event(self, event: KeyStreamEnded | FellBackToHybrid) -> None:
        error = exhausted_error(event)
        if isinstance(event, FellBackToHybrid):
            self.status.policy = "hybrid"
            self.status.notice = str(error)
            logger.warning("! %s", error)
        elif not (event.by_peer and event.reason == "call ended"):  # a hangup is not an error
            self.end_with_error(error, "otp-exhausted")

    # --- outbox and control channel -------------------------------------------------------

    def _open_control_channel(self, pc: RTCPeerConnection) -> None:
        """Create the control channel on ``pc`` (before its offer or answer is made)."""
        channel = pc.createDataChannel(
            CONTROL_CHANNEL_LABEL, negotiated=True, id=CONTROL_CHANNEL_ID, ordered=True
        )
        self._attach_channel(channel)

    def _attach_channel(self, channel: RTCDataChannel) -> None:
        """Make ``channel`` (ours, or a prepared connection's) this call's control channel."""
        self._channel = channel
        channel.on("open", self._flush_outbox)
        channel.on("message", self._on_control_message)

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
                await self.signaling.send_ice(self.call_id, HANDSHAKE_PREFIX + b64(data))
            except SignalingError:  # signaling lost meanwhile: the control channel
                self._outbox[:0] = messages[index:]  # takes them when it opens,
                channel = self._channel  # or now if it opened while this one was sent
                if channel is not None and channel.readyState == "open":
                    self._flush_outbox()
                return

    def _on_control_message(self, message: bytes | str) -> None:
        if self._held is not None and isinstance(message, bytes):
            # Caller, the answer not yet processed: the callee's CONFIRM can overtake
            # it (its DTLS done before our offer came): kept, in order, until then.
            if len(self._held) >= MAX_HELD:
                self._finish(CallError(f"{self.peer} sent handshake messages before its answer"))
                return
            self._held.append(message)
            return
        if self.hs is None or not isinstance(message, bytes):
            self._finish(CallError(f"{self.peer} sent a malformed control message"))
            return
        if is_otp_message(message):
            if self.otp is None or not self.otp.started:
                self._finish(CallError(f"{self.peer} sent one-time-pad messages unasked"))
            else:
                self.otp.receive_control(message)
            return
        self.hs.receive_data(message, self.clock())
        self._spawn(self.apply_events())

    def _release_held(self) -> None:
        """Caller: the answer is processed; feed the handshake what came after it."""
        held, self._held = self._held, None
        for message in held or []:
            self._on_control_message(message)

    # --- the handshake's timer ------------------------------------------------------------

    def timer_changed(self) -> None:
        """The handshake's timer moved: wake the timer loop."""
        self._timer_changed.set()

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

    # --- the SRTP hook: K_dtls in, hybrid keys out ----------------------------------------

    def _install_hook(self, pc: RTCPeerConnection) -> None:
        timeout = self.options.setup_timeout
        self.hook = install_srtp_hook(pc, self._provide_keys, timeout=timeout)
        self._attach_otp(pc)

    def _provide_keys(self, exporter: bytes, role: str) -> SRTPKeys | asyncio.Future[SRTPKeys]:
        """The SRTP hook's key provider: feed K_dtls, return the epoch-0 keys.

        Media is keyed at once, one round trip before the peer's CONFIRM arrives
        (like TLS 1.3 0.5-RTT data): the keys come from the signed transcript,
        ML-KEM, QKD and the DTLS exporter, so no one else can read that media,
        and if the peer derived different keys its packets fail SRTP
        authentication — nothing plays. Key confirmation still gates the call:
        without a matching CONFIRM in time (at least ``confirm_timeout``, more on
        a slow path: :func:`~qcall.call.session.confirm_timeout`) it ends with a
        clear error (:meth:`~qcall.call.session.CallSession._wait_active`), never as
        silent audio.

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
