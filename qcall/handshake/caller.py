"""The calling side of the hybrid handshake (``docs/handshake.md`` §5.2).

Sans-I/O: see :mod:`qcall.handshake.protocol` for the common machinery and the
error policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qcall import pqc
from qcall.exceptions import (
    DowngradeError,
    HandshakeStateError,
    InvalidMessageError,
    KeyConfirmationError,
    SecurityPolicyError,
    UnknownIdentityError,
)
from qcall.handshake.events import AnswerReceived, RekeyPostponed
from qcall.handshake.kem import KEMDecapsulationKey
from qcall.handshake.keyschedule import (
    SAS_NONCE_LEN,
    SRTPProfile,
    Transcript,
    rekey_nack_tag,
    sas_commitment,
)
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
    QKDKeyLike,
    QKDRoute,
    Role,
    State,
    key_fingerprint,
    random_bytes,
)

__all__ = ["CallerHandshake"]


class CallerHandshake(HandshakeProtocol):
    """The calling side: sends the offer, and later initiates rekeys.

    Args:
        peer_name: the callee's name (signed into the offer as ``recipient``).
        qkd_route: KME and SAE identifiers announced to the callee (``hybrid``).
        rekey_interval: seconds between :class:`RekeyDue` events, or None.

    The other arguments are those of :class:`HandshakeProtocol`.
    """

    role = Role.CALLER

    def __init__(
        self,
        identity: pqc.SigningKey,
        name: str,
        peer_name: str,
        *,
        check_peer: CheckPeer,
        qkd_route: QKDRoute | None = None,
        rekey_interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(identity, name, check_peer=check_peer, **kwargs)
        self.peer_name = peer_name
        self.qkd_route = qkd_route
        self.rekey_interval = rekey_interval
        self._kem_key: KEMDecapsulationKey | None = None
        self._offer: Offer | None = None

    def discard(self) -> None:
        """As :meth:`HandshakeProtocol.discard`; also drops the ML-KEM decapsulation key."""
        self._kem_key = None
        super().discard()

    def send_offer(self, sdp: str, now: float, qkd_keys: Sequence[QKDKeyLike] = ()) -> None:
        """Build, sign and queue the OFFER (``docs/handshake.md`` §3.2).

        Args:
            sdp: the local SDP offer (its DTLS fingerprint is thus signed).
            now: the current time in seconds since the Unix epoch.
            qkd_keys: keys from ETSI 014 ``enc_keys`` (§5.1); required for ``hybrid``.

        Raises:
            HandshakeStateError: the offer was already sent.
            SecurityPolicyError: ``hybrid`` without QKD keys or route, or ``pqc`` with keys.
            InvalidMessageError: a local field is out of bounds (e.g. a huge SDP).

        After calling this method: call :meth:`data_to_send`.
        """
        if self.state is not State.CALLER_START:
            raise HandshakeStateError(f"send_offer() not valid in state {self.state.name}")
        if self.policy in QKD_POLICIES and (not qkd_keys or self.qkd_route is None):
            raise SecurityPolicyError("policy hybrid needs a QKD key and a qkd_route")
        if self.policy == "pqc" and qkd_keys:
            raise SecurityPolicyError("policy pqc carries no QKD key")
        assert self.peer_name is not None
        self._now = now
        route = self.qkd_route or QKDRoute("", "", "")
        self.qkd_key_ids = tuple(k.key_id for k in qkd_keys)
        self._k_qkd = b"".join(bytes(k.key) for k in qkd_keys)
        self._qkd_key_size = len(self._k_qkd)
        self._kem_key = self.kem.generate()
        # Commit to the SAS nonce R now; it is revealed only after the answer (§4.2).
        self._sas_nonce = random_bytes(SAS_NONCE_LEN)
        offer = Offer(
            policy=self.policy,
            timestamp_ms=int(now * 1000),
            nonce=random_bytes(32),
            sas_commit=sas_commitment(self._sas_nonce),
            sender=self.name,
            recipient=self.peer_name,
            sig_alg=self.identity.algorithm.value,
            public_key=self.identity.public_bytes(),
            kem_alg=self.kem.algorithm.value,
            kem_ek=self._kem_key.public_bytes(),
            srtp_profiles=tuple(p.value for p in self.srtp_profiles),
            kme_id=route.kme_id,
            master_sae_id=route.master_sae_id,
            slave_sae_id=route.slave_sae_id,
            qkd_key_ids=self.qkd_key_ids,
            qkd_key_size=self._qkd_key_size,
            sdp=sdp,
            signature=b"",
        )
        self._offer_bytes = self._sign(offer, OFFER_CONTEXT, Transcript(TRANSCRIPT_DOMAIN))
        self._offer_transcript.add(self._offer_bytes)
        self._offer = offer
        self._send(self._offer_bytes, f"OFFER {self.policy} key_ids={','.join(self.qkd_key_ids)}")
        self.state = State.CALLER_EXPECT_ANSWER
        self._deadline = now + self.timeout

    def rekey(
        self, now: float, qkd_keys: Sequence[QKDKeyLike] = (), *, fresh_kem: bool = True
    ) -> None:
        """Start epoch n+1: ratchet fresh QKD key(s) and a fresh ML-KEM secret.

        ``fresh_kem`` (default True, every policy) runs a new ML-KEM exchange inside
        the rekey, so a compromise of the current epoch heals at the next rekey
        (≈ 0.1 ms); False makes a ``pqc`` rekey a pure hash ratchet.

        Raises:
            HandshakeStateError: not established, or a rekey is already running.
            SecurityPolicyError: ``hybrid`` without a QKD key, or ``pqc`` with one.

        After calling this method: call :meth:`data_to_send`.
        """
        if self.state is not State.ESTABLISHED or self._rekey is not None:
            raise HandshakeStateError(f"rekey() not valid now ({self.state.name})")
        if self.policy in QKD_POLICIES and not qkd_keys:
            raise SecurityPolicyError("policy hybrid needs a fresh QKD key for each rekey")
        if self.policy == "pqc" and qkd_keys:
            raise SecurityPolicyError("policy pqc carries no QKD key")
        self._now = now
        kem_key = self.kem.generate() if fresh_kem else None
        k_qkd = b"".join(bytes(k.key) for k in qkd_keys)
        message = Rekey(
            epoch=self.epoch + 1,
            qkd_key_ids=tuple(k.key_id for k in qkd_keys),
            qkd_key_size=len(k_qkd),
            kem_ek=kem_key.public_bytes() if kem_key else b"",
        ).serialize()
        self._rekey = PendingRekey(
            epoch=self.epoch + 1,
            message=message,
            key_ids=tuple(k.key_id for k in qkd_keys),
            key_size=len(k_qkd),
            k_qkd=k_qkd,
            kem_key=kem_key,
        )
        self._send(message, f"REKEY epoch={self.epoch + 1} key_ids={','.join(self._rekey.key_ids)}")
        self._deadline = now + self.timeout
        self._next_rekey = None

    def postpone_rekey(self, now: float, delay: float) -> None:
        """No fresh QKD key could be had for the due rekey: emit :class:`RekeyDue` again later.

        The current keys stay in use meanwhile. ``delay`` is in seconds.

        Raises:
            HandshakeStateError: not established, or a rekey is already running.
        """
        if self.state is not State.ESTABLISHED or self._rekey is not None:
            raise HandshakeStateError(f"postpone_rekey() not valid now ({self.state.name})")
        self._now = now
        self._next_rekey = now + max(0.0, delay)

    def _schedule_rekey(self) -> None:
        if self.rekey_interval is not None:
            self._next_rekey = self._now + self.rekey_interval

    def _dispatch(self, message: Message, data: bytes, now: float) -> None:
        if isinstance(message, Answer) and self.state is State.CALLER_EXPECT_ANSWER:
            self._receive_answer(message, data)
        elif isinstance(message, Confirm) and self.state in (
            State.EXPECT_KEY_MATERIAL,
            State.EXPECT_CONFIRM,
            State.ESTABLISHED,
        ):
            self._receive_confirm(message)
        elif isinstance(message, RekeyAck) and self._rekey is not None:
            self._receive_rekey_ack(message, data)
        elif isinstance(message, RekeyNack) and self._rekey is not None:
            self._receive_rekey_nack(message)
        else:
            raise HandshakeStateError(
                f"unexpected {type(message).__name__.upper()} in state {self.state.name}"
            )

    def _receive_answer(self, answer: Answer, data: bytes) -> None:
        assert self._offer is not None and self._kem_key is not None
        if not pqc.constant_time_eq(answer.offer_nonce, self._offer.nonce):
            raise InvalidMessageError("field 'offer_nonce' does not match our offer")
        ct_len = KEM_ALGORITHMS[self.kem.algorithm.value][1]
        if len(answer.kem_ct) != ct_len:
            raise InvalidMessageError(f"field 'kem_ct' must be {ct_len} bytes")
        if answer.sender != self.peer_name:
            raise UnknownIdentityError(
                f"the answer comes from {answer.sender!r}, not from {self.peer_name!r}"
            )
        self._verify(answer, data, ANSWER_CONTEXT, self._offer_transcript)
        # Authentic, so a policy change is the peer's choice, not a forgery: refuse it.
        if answer.policy != self.policy:
            raise DowngradeError(
                f"the answer's policy {answer.policy!r} differs from the offered {self.policy!r}"
            )
        if answer.srtp_profile not in self._offer.srtp_profiles:
            raise DowngradeError(
                f"the answer chose SRTP profile {answer.srtp_profile!r}, not offered"
            )
        # FIPS 203 §7.3: implicit rejection, a bad ciphertext gives a wrong secret.
        self._k_kem = self._kem_key.decapsulate(answer.kem_ct)
        self._kem_key = None
        self._answer_bytes = data
        self._transcript = self._offer_transcript.hash_with(data)
        self.profile = SRTPProfile(answer.srtp_profile)
        self._events.append(
            AnswerReceived(
                peer_name=answer.sender,
                peer_fingerprint=key_fingerprint(answer.public_key),
                policy=answer.policy,
                sdp=answer.sdp,
                srtp_profile=answer.srtp_profile,
            )
        )
        self.state = State.EXPECT_KEY_MATERIAL
        self._try_derive()

    def _receive_rekey_nack(self, nack: RekeyNack) -> None:
        """The callee could not get the rekey's QKD key: keep the current epoch.

        The shell gets :class:`RekeyPostponed` and retries later with a *fresh*
        key (``docs/handshake.md`` §3.7): the refused key_ID is never sent again.
        """
        rekey = self._rekey
        assert rekey is not None and self._schedule is not None
        if nack.epoch != rekey.epoch or self.epoch >= rekey.epoch:
            raise HandshakeStateError(f"REKEY_NACK for epoch {nack.epoch}, expected {rekey.epoch}")
        expected = rekey_nack_tag(self._schedule.current, rekey.message, nack.mac_part())
        if not pqc.constant_time_eq(nack.tag, expected):
            raise KeyConfirmationError(
                f"the REKEY_NACK for epoch {nack.epoch} does not verify under the current keys"
            )
        rekey.k_qkd = b""
        rekey.kem_key = None
        self._rekey = None
        self._deadline = None
        self._events.append(RekeyPostponed(epoch=nack.epoch, code=nack.code, remote=True))

    def _receive_rekey_ack(self, ack: RekeyAck, data: bytes) -> None:
        rekey = self._rekey
        assert rekey is not None
        if ack.epoch != rekey.epoch or self.epoch >= rekey.epoch:
            raise HandshakeStateError(f"REKEY_ACK for epoch {ack.epoch}, expected {rekey.epoch}")
        k_kem = b""
        if rekey.kem_key is not None:
            ct_len = KEM_ALGORITHMS[self.kem.algorithm.value][1]
            if len(ack.kem_ct) != ct_len:
                raise InvalidMessageError(f"field 'kem_ct' must be {ct_len} bytes")
            k_kem = rekey.kem_key.decapsulate(ack.kem_ct)
            rekey.kem_key = None
        elif ack.kem_ct:
            raise InvalidMessageError("field 'kem_ct' must be empty: no fresh ML-KEM was offered")
        self._derive_rekey(rekey, data, k_kem)
