"""Sans-I/O hybrid handshake: ML-DSA-signed offer/answer, ML-KEM, QKD key IDs.

:class:`CallerHandshake` and :class:`CalleeHandshake` are pure state machines in
the style of ``websockets.protocol.Protocol`` and ``aioquic``'s connection:
no sockets, no asyncio, no clock, no KME. ``docs/handshake.md`` specifies the
messages and the flow::

    caller                                          callee
    send_offer(sdp, now, qkd_keys) ─── OFFER ──────▶ receive_data → OfferReceived,
                                                       QKDKeysNeeded → receive_qkd_keys
    receive_data → AnswerReceived ◀── ANSWER ──────── send_answer(sdp, now)
    receive_dtls_exporter → KeysDerived              receive_dtls_exporter → KeysDerived
                              ◀──── CONFIRM ────▶
    KeyConfirmed                                     KeyConfirmed
    rekey(now, qkd_keys) ───── REKEY ──────────────▶ QKDKeysNeeded → receive_qkd_keys
    KeysDerived ◀──────────── REKEY_ACK, CONFIRM ──── KeysDerived
    RekeyCompleted ─────────── CONFIRM ────────────▶ RekeyCompleted
    RekeyPostponed ◀────────── REKEY_NACK ─────────── decline_rekey (KME down, §3.7)

Error policy: anything caused by the peer's input (or reported by the shell
through :meth:`HandshakeProtocol.fail`) never raises; it ends the session with
a :class:`~qcall.handshake.events.HandshakeFailed` event and queues an ERROR
message carrying only the error ``code``. Misuse of the API by the local shell
(an input that is not valid in the current state, a missing QKD key for policy
``hybrid``) raises :class:`~qcall.exceptions.HandshakeStateError`,
:class:`~qcall.exceptions.SecurityPolicyError` or
:class:`~qcall.exceptions.InvalidKeyError` immediately.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from qcall import pqc
from qcall.exceptions import (
    BadSignatureError,
    HandshakeError,
    HandshakeStateError,
    HandshakeTimeoutError,
    IdentityError,
    InvalidKeyError,
    InvalidMessageError,
    KeyConfirmationError,
    QCallError,
    QKDError,
    QKDKeyMismatchError,
    SASCommitmentError,
    SecurityPolicyError,
    TranscriptMismatchError,
)
from qcall.handshake.events import (
    Event,
    HandshakeFailed,
    KeyConfirmed,
    KeysDerived,
    RekeyCompleted,
    RekeyDue,
)
from qcall.handshake.kem import BackendKEM, KEMDecapsulationKey, KEMScheme
from qcall.handshake.keyschedule import (
    DTLS_EXPORTER_MAX,
    DTLS_EXPORTER_MIN,
    EpochKeys,
    KeySchedule,
    SRTPProfile,
    Transcript,
    sas_commitment,
    transcript_hash,
)
from qcall.handshake.messages import (
    POLICIES,
    QKD_POLICIES,
    Answer,
    Confirm,
    Error,
    Message,
    Offer,
    parse_message,
)
from qcall.identity import fingerprint as identity_fingerprint

__all__ = [
    "ANSWER_CONTEXT",
    "OFFER_CONTEXT",
    "REKEY_DOMAIN",
    "TRANSCRIPT_DOMAIN",
    "CheckPeer",
    "HandshakeProtocol",
    "PendingRekey",
    "QKDKey",
    "QKDKeyLike",
    "QKDRoute",
    "Role",
    "State",
    "key_fingerprint",
    "random_bytes",
    "wire_code",
]

#: Domain of the handshake transcript hash (``docs/handshake.md`` §4.1).
TRANSCRIPT_DOMAIN = b"qcall-v2 transcript"
#: Domain of the rekey transcript hash.
REKEY_DOMAIN = b"qcall-v2 rekey transcript"
#: ML-DSA context strings (FIPS 204 §5.2, ``ctx``).
OFFER_CONTEXT = b"qcall-v2 offer"
ANSWER_CONTEXT = b"qcall-v2 answer"

#: ``check_peer(name, public_key)`` raises UnknownIdentityError / IdentityChangedError.
CheckPeer = Callable[[str, bytes], None]

logger = logging.getLogger("qcall.handshake")


class Role(enum.IntEnum):
    """Which end of the call this protocol object is (also the CONFIRM ``role`` octet)."""

    CALLER = 1
    CALLEE = 2


class State(enum.IntEnum):
    """Handshake states (``docs/handshake.md`` §5.1)."""

    CALLER_START = 1
    CALLER_EXPECT_ANSWER = 2
    CALLEE_EXPECT_OFFER = 3
    CALLEE_EXPECT_ANSWER_SDP = 4
    EXPECT_KEY_MATERIAL = 5
    EXPECT_CONFIRM = 6
    ESTABLISHED = 7
    FAILED = 8


class QKDKeyLike(Protocol):
    """Anything with an ETSI GS QKD 014 ``key_ID`` and the key bytes."""

    @property
    def key_id(self) -> str: ...

    @property
    def key(self) -> bytes: ...


@dataclass(frozen=True, repr=False)
class QKDKey:
    """An ETSI GS QKD 014 key (§6.3 ``Key container``): ``key_ID`` and raw bytes."""

    key_id: str
    key: bytes

    def __repr__(self) -> str:
        return f"<QKDKey {self.key_id} {len(self.key)} bytes>"


@dataclass(frozen=True)
class QKDRoute:
    """Where the callee's shell fetches the keys: KME and SAE identifiers (ETSI 014 §5)."""

    kme_id: str
    master_sae_id: str
    slave_sae_id: str


@dataclass
class PendingRekey:
    """State of a rekey in progress (internal to the caller/callee classes)."""

    epoch: int  # the epoch being created
    message: bytes  # REKEY as sent/received
    key_ids: tuple[str, ...]
    key_size: int
    k_qkd: bytes | None  # None while the callee waits for dec_keys
    kem_key: KEMDecapsulationKey | None = None  # caller, fresh ML-KEM
    k_kem: bytes = b""  # callee, from encapsulation
    kem_ct: bytes = b""


def key_fingerprint(public_key: bytes) -> str:
    """The fingerprint of an ML-DSA public key, in the one form used everywhere.

    :func:`qcall.identity.fingerprint`: base32 of SHA-256, 13 groups of 4, as
    ``qcall identity show``, ``qcall contacts`` and the call report show it.
    """
    return identity_fingerprint(public_key)


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


_REMOTE_ERRORS: dict[str, type[HandshakeError]] = {}


def _remote_error_class(code: str) -> type[HandshakeError]:
    if not _REMOTE_ERRORS:
        todo: list[type[HandshakeError]] = [HandshakeError]
        while todo:
            cls = todo.pop()
            _REMOTE_ERRORS.setdefault(cls.code, cls)
            todo.extend(cls.__subclasses__())
    return _REMOTE_ERRORS.get(code, HandshakeError)


def wire_code(error: QCallError) -> str:
    """The short code sent to the peer for ``error`` (``docs/handshake.md`` §3.6)."""
    if isinstance(error, HandshakeError):
        return error.code
    if isinstance(error, IdentityError):
        return "identity_rejected"
    if isinstance(error, QKDError):
        return "qkd_unavailable"
    return "handshake_failed"


class HandshakeProtocol:
    """Common machinery of both ends. Use :class:`CallerHandshake` or :class:`CalleeHandshake`.

    Args:
        identity: this user's long-term ML-DSA signing key (FIPS 204).
        name: this user's name, as the peer's contacts know it.
        check_peer: ``(name, public_key) -> None``; raises
            :class:`~qcall.exceptions.UnknownIdentityError` or
            :class:`~qcall.exceptions.IdentityChangedError` (for example
            ``ContactStore.check_peer``). Called only after the signature verified.
        policy: ``"hybrid"`` (QKD + ML-KEM + DTLS), ``"pqc"`` (ML-KEM + DTLS) or
            ``"otp"`` (as hybrid, and the media is sealed with a one-time pad, docs/otp.md).
        backend: verifies ML-DSA signatures (default :func:`qcall.pqc.get_backend`).
        kem: the ML-KEM implementation (default ML-KEM-768 from ``backend``).
        srtp_profiles: acceptable SRTP profiles, most preferred first.
        timeout: seconds allowed for the handshake, and for each rekey.
    """

    role: ClassVar[Role]

    def __init__(
        self,
        identity: pqc.SigningKey,
        name: str,
        *,
        check_peer: CheckPeer,
        policy: str = "hybrid",
        backend: pqc.Backend | None = None,
        kem: KEMScheme | None = None,
        srtp_profiles: Sequence[SRTPProfile] = (
            SRTPProfile.AEAD_AES_256_GCM,
            SRTPProfile.AES128_CM_HMAC_SHA1_80,
        ),
        timeout: float = 30.0,
    ) -> None:
        if policy not in POLICIES:
            raise SecurityPolicyError(f"unknown security policy {policy!r}: use hybrid, pqc or otp")
        if not srtp_profiles:
            raise ValueError("srtp_profiles must not be empty")
        self.identity = identity
        self.name = name
        self.check_peer = check_peer
        self.policy = policy
        self.backend = backend or pqc.get_backend()
        self.kem: KEMScheme = kem or BackendKEM(backend=self.backend)
        self.srtp_profiles = tuple(srtp_profiles)
        self.timeout = timeout
        self.debug = logger.isEnabledFor(logging.DEBUG)

        self.state = State.CALLER_START if self.role is Role.CALLER else State.CALLEE_EXPECT_OFFER
        self.peer_name: str | None = None
        self.peer_public_key: bytes | None = None
        self.profile: SRTPProfile | None = None
        self.qkd_route: QKDRoute | None = None
        self.qkd_key_ids: tuple[str, ...] = ()
        self.error: QCallError | None = None

        self._events: list[Event] = []
        self._output: list[bytes] = []
        self._deadline: float | None = None
        self._next_rekey: float | None = None
        self._now = 0.0

        self._offer_bytes = b""
        self._offer_transcript = Transcript(TRANSCRIPT_DOMAIN)  # + the offer, once known
        self._answer_bytes = b""
        self._transcript: bytes | None = None  # TH_0 once the answer exists
        self._qkd_key_size = 0
        self._k_qkd: bytes | None = None
        self._k_kem: bytes | None = None
        self._k_dtls: bytes | None = None
        self._schedule: KeySchedule | None = None
        self._confirmed_epoch = -1
        self._peer_confirm: Confirm | None = None
        self._rekey: PendingRekey | None = None
        self._sas: str | None = None
        self._sas_nonce: bytes | None = None  # caller: R, revealed in its epoch-0 CONFIRM
        self._sas_commit = b""  # callee: the offer's commitment to R

    # --- outputs -------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Return the events produced since the last call, and forget them."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Return the messages to deliver to the peer, in order, and forget them."""
        output, self._output = self._output, []
        return output

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (same clock as ``now``), or None."""
        timers = [t for t in (self._deadline, self._next_rekey) if t is not None]
        return min(timers) if timers else None

    @property
    def epoch(self) -> int:
        """The current key epoch (-1 before keys are derived)."""
        return self._schedule.epoch if self._schedule else -1

    @property
    def sas(self) -> str | None:
        """The call's short authentication string (read it out by voice).

        None until epoch 0 is confirmed on the callee's side (the caller's SAS
        nonce arrives with its CONFIRM) and until the keys are derived on the
        caller's.
        """
        return self._sas

    # --- inputs --------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed one message received from the peer.

        Never raises for bad input: a failure becomes a ``HandshakeFailed`` event.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        self._now = now
        if self.state is State.FAILED:
            if self.debug:
                logger.debug("! ignoring %d bytes after failure", len(data))
            return
        try:
            message = parse_message(data)
            if self.debug:
                logger.debug("< %s (%d bytes)", type(message).__name__.upper(), len(data))
            if isinstance(message, Error):
                error = _remote_error_class(message.code)(
                    f"the peer reported an error: {message.code}"
                )
                error.code = message.code  # e.g. identity_rejected, qkd_unavailable
                self._fail(error, notify=False, remote=True)
                return
            self._dispatch(message, bytes(data), now)
        except (HandshakeError, IdentityError) as exc:
            self._fail(exc)

    def receive_qkd_keys(self, keys: Iterable[QKDKeyLike]) -> None:
        """Deliver the keys asked for by :class:`QKDKeysNeeded` (ETSI 014 ``dec_keys``).

        A key set that does not match the request (IDs or sizes) fails the session.

        Raises:
            HandshakeStateError: no QKD keys were requested.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        if self.state is State.FAILED:
            return
        pending_rekey = self._rekey is not None and self._rekey.k_qkd is None
        if not pending_rekey and not (
            self.role is Role.CALLEE
            and self.policy in QKD_POLICIES
            and self._k_qkd is None
            and self.state in (State.CALLEE_EXPECT_ANSWER_SDP, State.EXPECT_KEY_MATERIAL)
        ):
            raise HandshakeStateError("no QKD keys were requested")
        if self._rekey is not None:
            key_ids, size = self._rekey.key_ids, self._rekey.key_size
        else:
            key_ids, size = self.qkd_key_ids, self._qkd_key_size
        try:
            material = self._join_keys(keys, key_ids, size)
        except QKDKeyMismatchError as exc:
            self._fail(exc)
            return
        if self.debug:
            logger.debug("= QKD keys %s received (%d bytes)", ",".join(key_ids), len(material))
        try:
            if self._rekey is not None:
                self._rekey.k_qkd = material
                self._callee_finish_rekey()
            else:
                self._k_qkd = material
                self._try_derive()
        except (HandshakeError, IdentityError) as exc:
            self._fail(exc)

    def receive_dtls_exporter(self, secret: bytes) -> None:
        """Deliver ``K_dtls``: RFC 5705 exporter output, label ``EXTRACTOR-dtls_srtp``.

        The expected length is 2·(key+salt) of the DTLS SRTP profile (aiortc:
        88 bytes for AEAD_AES_256_GCM, 60 for AES128_CM_HMAC_SHA1_80); anything
        from 32 to 255 bytes is accepted.

        Raises:
            HandshakeStateError: the answer has not been sent/received yet.
            InvalidKeyError: the secret has a length outside 32..255.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        if self.state is State.FAILED:
            return
        if self.state is not State.EXPECT_KEY_MATERIAL or self._k_dtls is not None:
            raise HandshakeStateError(f"DTLS exporter not expected in state {self.state.name}")
        if not DTLS_EXPORTER_MIN <= len(secret) <= DTLS_EXPORTER_MAX:
            raise InvalidKeyError(
                f"DTLS exporter must be {DTLS_EXPORTER_MIN}..{DTLS_EXPORTER_MAX} bytes, "
                f"got {len(secret)}"
            )
        self._k_dtls = bytes(secret)
        try:
            self._try_derive()
        except (HandshakeError, IdentityError) as exc:
            self._fail(exc)

    def handle_timer(self, now: float) -> None:
        """Call at (or after) :meth:`get_timer`: times out, or emits :class:`RekeyDue`.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        self._now = now
        if self.state is State.FAILED:
            return
        if self._deadline is not None and now >= self._deadline:
            what = "rekey" if self._rekey else f"handshake ({self.state.name})"
            self._fail(HandshakeTimeoutError(f"{what} did not complete within {self.timeout:g} s"))
        elif self._next_rekey is not None and now >= self._next_rekey and self._rekey is None:
            self._next_rekey = None
            self._events.append(RekeyDue(epoch=self.epoch + 1))

    def fail(self, error: QCallError) -> None:
        """End the session because of a local problem (e.g. the KME refused ``dec_keys``).

        The peer receives the error's code only.

        After calling this method: call :meth:`events_received` and :meth:`data_to_send`.
        """
        if self.state is not State.FAILED:
            self._fail(error)

    def discard(self) -> None:
        """Drop the secrets of a handshake that goes no further, without telling the peer.

        For a call declined or ended before it was set up (an offer verified while
        the phone rang: its ML-KEM shared secret). Nothing is sent or emitted;
        the state becomes ``FAILED``.
        """
        if self.state is not State.FAILED:
            self.state = State.FAILED
            self.error = self.error or HandshakeError("discarded before the call was set up")
            self._deadline = self._next_rekey = None
            self._k_qkd = self._k_kem = self._k_dtls = None
            self._schedule = None
            self._rekey = None

    # --- internals -------------------------------------------------------------

    def _dispatch(self, message: Message, data: bytes, now: float) -> None:
        raise NotImplementedError

    def _fail(self, error: QCallError, *, notify: bool = True, remote: bool = False) -> None:
        logger.info("! handshake failed%s: %s", " (remote)" if remote else "", error)
        self.state = State.FAILED
        self.error = error
        self._deadline = self._next_rekey = None
        self._k_qkd = self._k_kem = self._k_dtls = None
        self._schedule = None
        self._rekey = None
        self._events.append(HandshakeFailed(error=error, remote=remote))
        if notify:
            self._send(Error(code=wire_code(error)).serialize(), "ERROR")

    def _send(self, data: bytes, what: str) -> None:
        if self.debug:
            logger.debug("> %s (%d bytes)", what, len(data))
        self._output.append(data)

    @staticmethod
    def _join_keys(keys: Iterable[QKDKeyLike], key_ids: tuple[str, ...], size: int) -> bytes:
        by_id = {k.key_id.lower(): bytes(k.key) for k in keys}
        wanted = [k.lower() for k in key_ids]
        if set(by_id) != set(wanted):
            raise QKDKeyMismatchError(
                f"got QKD keys {sorted(by_id)}, but the peer announced {sorted(wanted)}"
            )
        material = b"".join(by_id[k] for k in wanted)
        if len(material) != size:
            raise QKDKeyMismatchError(
                f"QKD keys {','.join(key_ids)} total {len(material)} bytes, "
                f"but the peer announced {size}"
            )
        return material

    def _verify(
        self, message: Offer | Answer, data: bytes, context: bytes, transcript: Transcript
    ) -> None:
        """Check the ML-DSA signature (FIPS 204 §5.3) over the running transcript hash.

        Then, and only then, ask ``check_peer`` about the (authenticated) identity.
        """
        body = data[: len(data) - 3 - len(message.signature)]
        running = transcript.hash_with(body)
        algorithm = pqc.SignatureScheme(message.sig_alg)
        try:
            ok = self.backend.verify(
                algorithm, message.public_key, message.signature, running, context
            )
        except InvalidKeyError:
            raise InvalidMessageError("field 'public_key' is not a valid ML-DSA key") from None
        if not ok:
            raise BadSignatureError(
                f"the {type(message).__name__.lower()} signature of {message.sender!r} "
                f"(key {key_fingerprint(message.public_key)}) does not verify"
            )
        self.check_peer(message.sender, message.public_key)
        self.peer_name = message.sender
        self.peer_public_key = message.public_key

    def _sign(self, message: Offer | Answer, context: bytes, transcript: Transcript) -> bytes:
        body = message.signed_part()
        signature = self.identity.sign(transcript.hash_with(body), context)
        return message.with_signature(body, signature)

    def _try_derive(self) -> None:
        if (
            self._schedule is not None
            or self._transcript is None
            or self._k_qkd is None
            or self._k_kem is None
            or self._k_dtls is None
            or self.profile is None
        ):
            return
        self._schedule = KeySchedule(
            self.profile,
            self._transcript,
            self._k_qkd,
            self._k_kem,
            self._k_dtls,
            qkd_key_ids=self.qkd_key_ids,
        )
        self._k_qkd = self._k_kem = self._k_dtls = None  # drop our references
        keys = self._schedule.current
        if self._sas_nonce is not None:  # the caller knows R: its SAS is fixed now
            self._sas = self._schedule.sas(self._sas_nonce)
        self._keys_derived(keys, self.qkd_key_ids, kem_fresh=True)
        self.state = State.EXPECT_CONFIRM
        if self._peer_confirm is not None:
            confirm, self._peer_confirm = self._peer_confirm, None
            self._check_confirm(confirm)

    def _keys_derived(self, keys: EpochKeys, key_ids: tuple[str, ...], kem_fresh: bool) -> None:
        caller = self.role is Role.CALLER
        local = keys.caller_to_callee if caller else keys.callee_to_caller
        remote = keys.callee_to_caller if caller else keys.caller_to_callee
        if self.debug:
            logger.debug(
                "= epoch %d keys derived: %s send=#%s receive=#%s",
                keys.epoch,
                keys.profile.value,
                local.fingerprint(),
                remote.fingerprint(),
            )
        self._events.append(
            KeysDerived(
                epoch=keys.epoch,
                profile=keys.profile,
                local_keys=local,
                remote_keys=remote,
                qkd_key_ids=key_ids,
                kem_fresh=kem_fresh,
            )
        )
        confirm = Confirm(
            epoch=keys.epoch,
            role=self.role,
            tag=keys.caller_finished if caller else keys.callee_finished,
            qkd_check=keys.caller_qkd_check if caller else keys.callee_qkd_check,
            transcript_check=keys.transcript_check,
            # The caller opens its SAS commitment only now: the answer is in, so the
            # callee's contribution was fixed before it could know R (§4.2).
            sas_reveal=self._sas_nonce if caller and keys.epoch == 0 and self._sas_nonce else b"",
        )
        self._send(confirm.serialize(), f"CONFIRM epoch={keys.epoch}")

    def _receive_confirm(self, message: Confirm) -> None:
        if message.role == self.role:
            raise InvalidMessageError("field 'role' is our own role (reflected confirmation)")
        expecting = self._rekey.epoch if self._rekey else 0
        if message.epoch != expecting or self._confirmed_epoch >= expecting:
            raise HandshakeStateError(
                f"unexpected confirmation for epoch {message.epoch} (expecting {expecting})"
            )
        if self._schedule is None or self._schedule.epoch < expecting:
            if self._peer_confirm is not None:
                raise HandshakeStateError("duplicate confirmation")
            self._peer_confirm = message  # we derive later (exporter/QKD keys pending)
            return
        self._check_confirm(message)

    def _check_confirm(self, message: Confirm) -> None:
        assert self._schedule is not None
        keys = self._schedule.current
        caller = self.role is Role.CALLER
        tag = keys.callee_finished if caller else keys.caller_finished
        if not pqc.constant_time_eq(message.tag, tag):
            raise self._diagnose(message, keys)
        if keys.epoch == 0 and not caller:
            # The caller's SAS nonce must open the commitment signed in its offer.
            if not pqc.constant_time_eq(sas_commitment(message.sas_reveal), self._sas_commit):
                raise SASCommitmentError(
                    "the caller's SAS nonce does not match the commitment in its offer"
                )
            self._sas = self._schedule.sas(message.sas_reveal)
        assert self._sas is not None
        self._confirmed_epoch = keys.epoch
        self._events.append(KeyConfirmed(epoch=keys.epoch, sas=self._sas))
        self._deadline = None
        if self._rekey is not None:
            if self.debug:
                logger.debug("= epoch %d confirmed (rekey complete)", keys.epoch)
            self._events.append(RekeyCompleted(epoch=keys.epoch, qkd_key_ids=self._rekey.key_ids))
            self._rekey = None
        else:
            if self.debug:
                logger.debug("= epoch 0 confirmed, SAS %s", self._sas)
            self.state = State.ESTABLISHED
        self._schedule_rekey()

    def _diagnose(self, message: Confirm, keys: EpochKeys) -> KeyConfirmationError:
        """Why the peer's confirmation tag differs (``docs/handshake.md`` §5.4).

        Transcripts first: if the two sides hashed different messages, the
        handshake was altered in transit, whatever the keys. Then the QKD key,
        then everything else. The check values are unauthenticated hints for
        people and operators: the call fails in every case.
        """
        caller = self.role is Role.CALLER
        ids = ",".join(self._rekey.key_ids if self._rekey else self.qkd_key_ids)
        if not pqc.constant_time_eq(message.transcript_check, keys.transcript_check):
            return TranscriptMismatchError(
                f"key confirmation failed for epoch {keys.epoch}: the two sides signed "
                "different handshake messages, so they were altered in transit (a man in "
                "the middle on the signaling path); the QKD keys are not the cause"
            )
        qkd_check = keys.callee_qkd_check if caller else keys.caller_qkd_check
        if qkd_check and not pqc.constant_time_eq(message.qkd_check, qkd_check):
            return QKDKeyMismatchError(
                f"key confirmation failed for epoch {keys.epoch}: the QKD key "
                f"{ids} differs between the two KMEs"
            )
        return KeyConfirmationError(
            f"key confirmation failed for epoch {keys.epoch}: the peers derived "
            "different keys (ML-KEM ciphertext or DTLS exporter differs)"
        )

    def _schedule_rekey(self) -> None:
        """Caller: arm the rekey timer (the callee never initiates rekeys)."""

    def _callee_finish_rekey(self) -> None:
        raise HandshakeStateError("only the callee answers a rekey")

    def _derive_rekey(self, rekey: PendingRekey, ack: bytes, k_kem: bytes) -> None:
        assert self._schedule is not None and rekey.k_qkd is not None
        th = transcript_hash(
            REKEY_DOMAIN, self._schedule.current.transcript_hash, rekey.message, ack
        )
        keys = self._schedule.ratchet(th, rekey.k_qkd, k_kem, qkd_key_ids=rekey.key_ids)
        rekey.k_qkd = b""
        self._keys_derived(keys, rekey.key_ids, kem_fresh=bool(k_kem))
        if self._peer_confirm is not None:
            confirm, self._peer_confirm = self._peer_confirm, None
            self._check_confirm(confirm)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} ↔ {self.peer_name or '?'} "
            f"{self.policy} {self.state.name} epoch={self.epoch}>"
        )


def random_bytes(n: int) -> bytes:
    return secrets.token_bytes(n)
