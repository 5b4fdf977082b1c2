"""The called side of the hybrid handshake (``docs/handshake.md`` §5.3).

Sans-I/O: see :mod:`qcall.handshake.protocol` for the common machinery and the
error policy. The callee never talks to its KME: it emits ``QKDKeysNeeded``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qcall import pqc
from qcall.exceptions import (
    DowngradeError,
    HandshakeError,
    HandshakeStateError,
    IdentityError,
    InvalidKeyError,
    InvalidMessageError,
    OTPNotAllowedError,
    QCallError,
    UnknownIdentityError,
)
from qcall.handshake.events import OfferReceived, QKDKeysNeeded, RekeyPostponed
from qcall.handshake.keyschedule import SRTPProfile, Transcript, rekey_nack_tag
from qcall.handshake.messages import (
    KEM_ALGORITHMS,
    QKD_POLICIES,
    Answer,
    Confirm,
    Message,
    Offer,
    Rekey,
    RekeyAck,
    RekeyNack,
)
from qcall.handshake.protocol import (
    ANSWER_CONTEXT,
    OFFER_CONTEXT,
    TRANSCRIPT_DOMAIN,
    CheckPeer,
    HandshakeProtocol,
    PendingRekey,
    QKDRoute,
    Role,
    State,
    key_fingerprint,
    logger,
    random_bytes,
    wire_code,
)
from qcall.handshake.replay import ReplayCache

__all__ = ["CalleeHandshake"]


class CalleeHandshake(HandshakeProtocol):
    """The called side: verifies the offer, asks for QKD keys, answers.

    Args:
        replay_cache: shared by all the callee sessions of this client
            (default: a private one, ±60 s window).
        accepted_policies: policies this user accepts (default: only ``policy``,
            so a ``hybrid`` callee refuses a ``pqc`` offer with DowngradeError).
        expected_peer: the caller's name as the signaling server announced it;
            an offer signed under another ``sender`` is refused
            (UnknownIdentityError), so the name shown is the name verified.

    The other arguments are those of :class:`HandshakeProtocol`.
    """

    role = Role.CALLEE

    def __init__(
        self,
        identity: pqc.SigningKey,
        name: str,
        *,
        check_peer: CheckPeer,
        replay_cache: ReplayCache | None = None,
        accepted_policies: Sequence[str] | None = None,
        expected_peer: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(identity, name, check_peer=check_peer, **kwargs)
        self.replay_cache = replay_cache if replay_cache is not None else ReplayCache()
        self.accepted_policies = tuple(accepted_policies or (self.policy,))
        self.expected_peer = expected_peer
        self._offer: Offer | None = None
        self._kem_ct = b""
        #: The answer :meth:`prepare_answer` built, and its signed part, until signed.
        self._prepared_answer: tuple[Answer, bytes] | None = None

    def send_answer(self, sdp: str, now: float) -> None:
        """Build, sign and queue the ANSWER (``docs/handshake.md`` §3.3).

        The same as :meth:`prepare_answer` then :meth:`send_signed_answer` with our
        own signature over what it returned.

        Raises:
            HandshakeStateError: no accepted offer is waiting for an answer.

        After calling this method: call :meth:`data_to_send` and :meth:`events_received`.
        """
        digest = self.prepare_answer(sdp, now)
        self.send_signed_answer(self.identity.sign(digest, ANSWER_CONTEXT))

    def prepare_answer(self, sdp: str, now: float) -> bytes:
        """Build the ANSWER unsigned; return the bytes its signature must cover.

        For a signer outside this object (the phone's crypto worker,
        :mod:`qcall.call.crypto_worker`): it signs the returned transcript hash
        with this side's identity key and context ``ANSWER_CONTEXT``, and
        :meth:`send_signed_answer` completes the answer. Nothing is queued until
        then; calling this again replaces the prepared answer (new nonce).

        Raises:
            HandshakeStateError: no accepted offer is waiting for an answer.
        """
        if self.state is not State.CALLEE_EXPECT_ANSWER_SDP:
            raise HandshakeStateError(f"send_answer() not valid in state {self.state.name}")
        assert self._offer is not None and self.profile is not None
        self._now = now
        # The offer may have been verified while the phone rang: the handshake's time
        # runs from the answer (docs/handshake.md, "The offer while ringing").
        self._deadline = now + self.timeout
        answer = Answer(
            policy=self._offer.policy,
            timestamp_ms=int(now * 1000),
            nonce=random_bytes(32),
            offer_nonce=self._offer.nonce,
            sender=self.name,
            sig_alg=self.identity.algorithm.value,
            public_key=self.identity.public_bytes(),
            kem_ct=self._kem_ct,
            srtp_profile=self.profile.value,
            sdp=sdp,
            signature=b"",
        )
        body = answer.signed_part()
        self._prepared_answer = (answer, body)
        return self._offer_transcript.hash_with(body)

    def send_signed_answer(self, signature: bytes) -> None:
        """Queue the answer :meth:`prepare_answer` built, with ``signature`` over its hash.

        Raises:
            HandshakeStateError: no answer is prepared (or it was sent already).
            InvalidKeyError: ``signature`` is not the length of this side's
                signature scheme.

        After calling this method: call :meth:`data_to_send` and :meth:`events_received`.
        """
        prepared, self._prepared_answer = self._prepared_answer, None
        if prepared is None or self.state is not State.CALLEE_EXPECT_ANSWER_SDP:
            raise HandshakeStateError("send_signed_answer() without a prepared answer")
        answer, body = prepared
        assert self.profile is not None
        expected = self.identity.algorithm.sizes.signature
        if len(signature) != expected:
            raise InvalidKeyError(
                f"an answer signature must be {expected} bytes, got {len(signature)}"
            )
        self._answer_bytes = answer.with_signature(body, bytes(signature))
        self._transcript = self._offer_transcript.hash_with(self._answer_bytes)
        self._send(self._answer_bytes, f"ANSWER {self.policy} {self.profile.value}")
        self.state = State.EXPECT_KEY_MATERIAL
        try:
            self._try_derive()
        except (HandshakeError, IdentityError) as exc:
            self._fail(exc)

    def decline_rekey(self, error: QCallError) -> None:
        """Refuse the pending rekey for now: its QKD keys cannot be had (``dec_keys`` failed).

        Queues a REKEY_NACK carrying ``error``'s wire code, MACed under the
        current epoch (``docs/handshake.md`` §3.7), and emits
        :class:`RekeyPostponed`. The current keys stay in use; the caller retries
        later with a fresh key_ID, within its grace period. The pending rekey's
        ML-KEM secret is dropped. Unlike :meth:`fail`, the session goes on.

        Raises:
            HandshakeStateError: no rekey is waiting for QKD keys.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        if self.state is State.FAILED:
            return
        rekey = self._rekey
        if rekey is None or rekey.k_qkd is not None or self._schedule is None:
            raise HandshakeStateError("no rekey is waiting for QKD keys")
        code = wire_code(error)
        body = RekeyNack(epoch=rekey.epoch, code=code, tag=bytes(48)).mac_part()
        tag = rekey_nack_tag(self._schedule.current, rekey.message, body)
        self._send(
            RekeyNack(epoch=rekey.epoch, code=code, tag=tag).serialize(),
            f"REKEY_NACK epoch={rekey.epoch} {code}",
        )
        rekey.k_kem = b""
        self._rekey = None
        self._deadline = None
        self._events.append(RekeyPostponed(epoch=rekey.epoch, code=code, remote=False))

    def _dispatch(self, message: Message, data: bytes, now: float) -> None:
        if isinstance(message, Offer) and self.state is State.CALLEE_EXPECT_OFFER:
            self._receive_offer(message, data, now)
        elif isinstance(message, Confirm) and self.state in (
            State.CALLEE_EXPECT_ANSWER_SDP,
            State.EXPECT_KEY_MATERIAL,
            State.EXPECT_CONFIRM,
            State.ESTABLISHED,
        ):
            if self.state is State.CALLEE_EXPECT_ANSWER_SDP:
                raise HandshakeStateError("CONFIRM before our answer")
            self._receive_confirm(message)
        elif isinstance(message, Rekey) and self.state is State.ESTABLISHED:
            self._receive_rekey(message, data, now)
        else:
            raise HandshakeStateError(
                f"unexpected {type(message).__name__.upper()} in state {self.state.name}"
            )

    def _receive_offer(self, offer: Offer, data: bytes, now: float) -> None:
        if offer.recipient != self.name:
            raise InvalidMessageError(
                f"field 'recipient' is {offer.recipient!r}, but this is {self.name!r}"
            )
        if self.expected_peer is not None and offer.sender != self.expected_peer:
            raise UnknownIdentityError(
                f"the offer comes from {offer.sender!r}, not from {self.expected_peer!r}"
            )
        if offer.policy == "otp" and "otp" not in self.accepted_policies:
            raise OTPNotAllowedError(f"{self.name} does not accept one-time-pad calls")
        if offer.policy not in self.accepted_policies:
            raise DowngradeError(
                f"the offer's policy {offer.policy!r} is not accepted "
                f"(accepted: {', '.join(self.accepted_policies)})"
            )
        if offer.kem_alg != self.kem.algorithm.value:
            raise InvalidMessageError(f"field 'kem_alg' {offer.kem_alg!r} is not supported")
        ours = [p.value for p in self.srtp_profiles]
        common = [p for p in offer.srtp_profiles if p in ours]
        if not common:
            raise InvalidMessageError("field 'srtp_profiles' has no profile in common with us")
        timestamp = offer.timestamp_ms / 1000
        self.replay_cache.check(offer.nonce, timestamp, now)
        self._verify(offer, data, OFFER_CONTEXT, Transcript(TRANSCRIPT_DOMAIN))
        # Remember the nonce only once the offer is authenticated (no cache poisoning).
        self.replay_cache.add(offer.nonce, timestamp, now)
        try:
            self._k_kem, self._kem_ct = self.kem.encapsulate(offer.kem_ek)
        except (InvalidKeyError, ValueError):
            raise InvalidMessageError("field 'kem_ek' is not a valid ML-KEM key") from None
        self._offer = offer
        self._sas_commit = offer.sas_commit
        self._offer_bytes = data
        self._offer_transcript.add(data)
        self.policy = offer.policy
        self.profile = SRTPProfile(common[0])
        self.qkd_key_ids = offer.qkd_key_ids
        self._qkd_key_size = offer.qkd_key_size
        self.qkd_route = QKDRoute(offer.kme_id, offer.master_sae_id, offer.slave_sae_id)
        self._k_qkd = None if offer.policy in QKD_POLICIES else b""
        self._events.append(
            OfferReceived(
                peer_name=offer.sender,
                peer_fingerprint=key_fingerprint(offer.public_key),
                policy=offer.policy,
                sdp=offer.sdp,
                srtp_profiles=offer.srtp_profiles,
                qkd_key_ids=offer.qkd_key_ids,
            )
        )
        if offer.policy in QKD_POLICIES:
            self._events.append(self._qkd_keys_needed(0, offer.qkd_key_ids, offer.qkd_key_size))
        self.state = State.CALLEE_EXPECT_ANSWER_SDP
        self._deadline = now + self.timeout

    def _qkd_keys_needed(self, epoch: int, key_ids: tuple[str, ...], size: int) -> QKDKeysNeeded:
        assert self.qkd_route is not None
        if self.debug:
            logger.debug("= epoch %d needs QKD keys %s", epoch, ",".join(key_ids))
        return QKDKeysNeeded(
            epoch=epoch,
            key_ids=key_ids,
            key_size=size,
            kme_id=self.qkd_route.kme_id,
            master_sae_id=self.qkd_route.master_sae_id,
            slave_sae_id=self.qkd_route.slave_sae_id,
        )

    def _receive_rekey(self, message: Rekey, data: bytes, now: float) -> None:
        if self._rekey is not None or message.epoch != self.epoch + 1:
            raise HandshakeStateError(f"REKEY for epoch {message.epoch}, expected {self.epoch + 1}")
        if self.policy in QKD_POLICIES and not message.qkd_key_ids:
            raise DowngradeError("a rekey under policy hybrid must bring a fresh QKD key")
        if self.policy == "pqc" and message.qkd_key_ids:
            raise DowngradeError("a rekey under policy pqc cannot carry QKD keys")
        rekey = PendingRekey(
            epoch=message.epoch,
            message=data,
            key_ids=message.qkd_key_ids,
            key_size=message.qkd_key_size,
            k_qkd=None if message.qkd_key_ids else b"",
        )
        if message.kem_ek:
            ek_len = KEM_ALGORITHMS[self.kem.algorithm.value][0]
            if len(message.kem_ek) != ek_len:
                raise InvalidMessageError(f"field 'kem_ek' must be {ek_len} bytes")
            try:
                rekey.k_kem, rekey.kem_ct = self.kem.encapsulate(message.kem_ek)
            except (InvalidKeyError, ValueError):
                raise InvalidMessageError("field 'kem_ek' is not a valid ML-KEM key") from None
        self._rekey = rekey
        self._deadline = now + self.timeout
        if message.qkd_key_ids:
            self._events.append(
                self._qkd_keys_needed(message.epoch, message.qkd_key_ids, message.qkd_key_size)
            )
        else:
            self._callee_finish_rekey()

    def _callee_finish_rekey(self) -> None:
        rekey = self._rekey
        assert rekey is not None
        ack = RekeyAck(epoch=rekey.epoch, kem_ct=rekey.kem_ct).serialize()
        self._send(ack, f"REKEY_ACK epoch={rekey.epoch}")
        k_kem, rekey.k_kem = rekey.k_kem, b""
        self._derive_rekey(rekey, ack, k_kem)
