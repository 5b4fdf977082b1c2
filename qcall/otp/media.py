"""The aiortc shell of an OTP call: pads on the DTLS transport, blocks from the KME.

:class:`OTPMedia` sits next to the hybrid SRTP hook (:mod:`qcall.call.srtp`) on a
call's one DTLS transport:

* it replaces ``RTCDtlsTransport._send_rtp`` (installed right after the hybrid
  hook, before DTLS completes): while OTP is pending or running, every outbound
  RTP packet is sealed with fresh pad (:mod:`qcall.otp.packet`) or dropped and
  counted — **no packet leaves without fresh key, none under the hybrid keys**;
  RTCP is not sent (it would need pad too; audio does not need it);
* on :meth:`start` (after the handshake's key confirmation) it puts its own
  inbound adapter in ``_rx_srtp`` and runs the key stream
  (:mod:`qcall.otp.keystream`): ``enc_keys`` for its own pad, ``dec_keys`` for
  the peer's, control messages on the call's control channel (prefixed
  ``"QOTP"``, beside the handshake's ``"QCHS"`` messages);
* it pins the Opus encoder to a fixed, low, constant bitrate (CBR: packet
  sizes carry no information about speech);
* when the pool runs low it reports to ``on_event``: policy ``end`` ends the
  call, policy ``hybrid`` puts the hybrid hook's send and receive paths back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import pylibsrtp
from aiortc import RTCPeerConnection
from aiortc.codecs.opus import OpusEncoder
from aiortc.rtp import is_rtcp

from qcall.exceptions import OTPPacketError, QCallError, QKDError
from qcall.otp.keystream import (
    MAGIC,
    FellBackToHybrid,
    KeyStreamEnded,
    KeyStreamProtocol,
    KeysWanted,
    OTPPolicy,
    PeerKeysNeeded,
)
from qcall.qkd.client import KeySource

__all__ = ["MAGIC", "FixedRateOpusEncoder", "OTPMedia", "is_otp_message"]

logger = logging.getLogger(__name__)

#: Seconds between KME Status queries for the budget display.
STATUS_INTERVAL: Final = 2.0

#: Seconds to wait after a failed ``enc_keys`` before asking again.
RETRY_DELAY: Final = 0.5


def is_otp_message(data: bytes) -> bool:
    """Whether a control-channel message belongs to the OTP key stream."""
    return data[:4] == MAGIC


class FixedRateOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder at a fixed bitrate, constant packet size (CBR)."""

    def __init__(self, bitrate: int) -> None:
        super().__init__()
        self.codec.bit_rate = bitrate
        self.codec.options = {"application": "voip", "vbr": "off"}


class OTPMedia:
    """One side's OTP media on a call's DTLS transport.

    Args:
        pc: the call's peer connection (one BUNDLEd DTLS transport).
        key_source: this user's KME client.
        peer_sae: the peer's SAE ID (slave of our pad, master of theirs).
        policy: the :class:`~qcall.otp.keystream.OTPPolicy`.
        send_control: sends one control message to the peer (the control channel).
        on_event: called with :class:`KeyStreamEnded` / :class:`FellBackToHybrid`.
    """

    def __init__(
        self,
        pc: RTCPeerConnection,
        key_source: KeySource,
        peer_sae: str,
        policy: OTPPolicy,
        send_control: Callable[[bytes], None],
        on_event: Callable[[KeyStreamEnded | FellBackToHybrid], None],
    ) -> None:
        self.pc = pc
        self.key_source = key_source
        self.peer_sae = peer_sae
        self.policy = policy
        self.protocol = KeyStreamProtocol(policy)
        self._send_control = send_control
        self._on_event = on_event
        self.transport: Any = pc.getTransceivers()[0].sender.transport
        self._hook_send = self.transport._send_rtp
        self._hook_rx: Any = None
        self._wanted: asyncio.Queue[KeysWanted] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = False
        self.fallen_back = False
        self.first_packet: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rtcp_dropped = 0
        self.tx_pending = 0
        self.tx_oversize = 0
        self.transport._send_rtp = self._send_rtp  # type: ignore[method-assign]
        encoder_attr = "_RTCRtpSender__encoder"  # aiortc makes one lazily if unset
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                sender = transceiver.sender
                setattr(sender, encoder_attr, FixedRateOpusEncoder(policy.bitrate))

    def __repr__(self) -> str:
        return f"<OTPMedia {self.protocol!r} fallen_back={self.fallen_back}>"

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the key stream (after key confirmation: the control channel is trusted)."""
        if self.started:
            return
        self.started = True
        self._hook_rx = self.transport._rx_srtp
        self.transport._rx_srtp = _InboundOTP(self)
        self._spawn(self._fetch_loop())
        self._spawn(self._status_loop())
        self.protocol.start()
        self._pump()

    def close(self) -> None:
        """Stop: tell the peer, forget the pads, stop the tasks."""
        self.protocol.close()
        with contextlib.suppress(QCallError):
            self._flush()
        for task in self._tasks:
            task.cancel()

    def receive_control(self, data: bytes) -> None:
        """A ``"QOTP"`` message from the control channel."""
        self.protocol.receive_data(data)
        self._pump()

    def describe(self) -> str:
        """The budget line for the call display."""
        text = self.protocol.budget().describe()
        dropped = self.protocol.tx_no_key
        return f"{text}, {dropped} packets without key" if dropped else text

    # --- the key stream ----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pump(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, KeysWanted):
                self._wanted.put_nowait(event)
            elif isinstance(event, PeerKeysNeeded):
                self._spawn(self._dec_keys(event))
            else:
                self._end(event)
        self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            self._send_control(data)

    async def _fetch_loop(self) -> None:
        while True:
            wanted = await self._wanted.get()
            try:
                keys = await self.key_source.get_keys(
                    self.peer_sae, wanted.number, wanted.size_bits, application="otp"
                )
            except QKDError as exc:
                logger.info("! OTP enc_keys failed: %s", exc)
                self.protocol.keys_unavailable(str(exc))
                self._pump()
                await asyncio.sleep(RETRY_DELAY)
                continue
            logger.debug("= OTP pad blocks %s", [k.key_id for k in keys])
            self.protocol.receive_keys([(k.key_id, k.key) for k in keys])
            self._pump()

    async def _dec_keys(self, event: PeerKeysNeeded) -> None:
        try:
            keys = await self.key_source.get_keys_by_id(
                self.peer_sae, event.key_ids, application="otp"
            )
        except QKDError as exc:
            logger.info("! OTP dec_keys failed: %s", exc)
            self.protocol.peer_keys_failed(event.first, str(exc))
        else:
            self.protocol.receive_peer_keys(event.first, [(k.key_id, k.key) for k in keys])
        self._pump()

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(QKDError):
                status = await self.key_source.status(self.peer_sae)
                self.protocol.receive_pool_status(status.stored_key_count * status.key_size // 8)
            await asyncio.sleep(STATUS_INTERVAL)

    def _end(self, event: KeyStreamEnded | FellBackToHybrid) -> None:
        if isinstance(event, FellBackToHybrid):
            self.fallen_back = True
            self.transport._send_rtp = self._hook_send
            if self._hook_rx is not None:
                self.transport._rx_srtp = self._hook_rx
        self._on_event(event)

    # --- the media path ----------------------------------------------------------------------

    async def _send_rtp(self, data: bytes) -> None:
        """Replacement of ``RTCDtlsTransport._send_rtp``: fresh pad or nothing."""
        if self.fallen_back:
            await self._hook_send(data)
            return
        if self.transport.state != "connected":
            return
        if is_rtcp(data):
            self.rtcp_dropped += 1
            return
        if not self.protocol.sender.stats.blocks:  # OTP not started yet: media waits
            self.tx_pending += 1
            return
        try:
            packet = self.protocol.protect(data)
        except OTPPacketError:
            self.tx_oversize += 1
            return
        self._pump()
        if packet is not None:
            await self.transport.transport._send(packet)

    def _unprotect(self, data: bytes) -> bytes:
        try:
            plain = self.protocol.unprotect(data)
        except OTPPacketError as exc:
            raise pylibsrtp.Error(str(exc)) from None
        if not self.first_packet.done():
            self.first_packet.set_result(None)
        return plain


class _InboundOTP:
    """What aiortc sees as ``_rx_srtp`` during an OTP call."""

    def __init__(self, media: OTPMedia) -> None:
        self._media = media

    def unprotect(self, data: bytes) -> bytes:
        return self._media._unprotect(data)

    def unprotect_rtcp(self, data: bytes) -> bytes:
        del data
        raise pylibsrtp.Error("RTCP is not used in OTP calls")
