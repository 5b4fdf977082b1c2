"""The one exception tree of qcall.

Every error that qcall raises on purpose is a :class:`QCallError`. Catch the
narrowest class that you can act on::

    QCallError
    ├── ConfigError                  bad CLI flag, config file, topology or path
    ├── CryptoError
    │   ├── UnsupportedAlgorithmError   OpenSSL lacks ML-KEM / ML-DSA
    │   ├── BackendUnavailableError     a requested backend (liboqs) is absent
    │   └── InvalidKeyError             malformed key bytes or key file
    ├── IdentityError
    │   ├── IdentityNotFoundError       no identity in the qcall home yet
    │   ├── UnknownIdentityError        peer not in contacts and pinning refused
    │   ├── IdentityChangedError        a pinned contact presents another key
    │   └── CertificateError            an organisation certificate cannot be trusted
    │       ├── UntrustedCertificateError  not issued by an authority you trust
    │       ├── CertificateExpiredError    outside its validity period
    │       └── CertificateRevokedError    on its authority's revocation list
    ├── HandshakeError               (``code`` goes on the wire, details do not)
    │   ├── InvalidMessageError         malformed or oversized message or field
    │   ├── UnsupportedVersionError     protocol version we do not speak
    │   ├── BadSignatureError           ML-DSA signature does not verify
    │   ├── ReplayError                 nonce seen before or timestamp out of window
    │   ├── DowngradeError              policy differs from what was offered/allowed
    │   │   └── OTPNotAllowedError      the callee does not accept one-time-pad calls
    │   ├── KeyConfirmationError        peers derived different keys
    │   ├── QKDKeyMismatchError         (a KeyConfirmationError) QKD key differs
    │   ├── TranscriptMismatchError     (a KeyConfirmationError) handshake altered in transit
    │   ├── SASCommitmentError          the caller's SAS nonce does not open its commitment
    │   ├── HandshakeStateError         input not valid in the current state
    │   └── HandshakeTimeoutError       the peer did not answer in time
    ├── QKDError
    │   ├── KMEError                    an ETSI GS QKD 014 KME answered an error
    │   │   ├── KMEBadRequestError         HTTP 400 (spec ``message`` / ``details``)
    │   │   ├── KMEUnauthorizedError       HTTP 401
    │   │   └── KMEUnavailableError        HTTP 503 (e.g. key pool empty)
    │   ├── KMEConnectionError          refused, TLS failure, timeout
    │   ├── KMEResponseError            malformed JSON, wrong key size, bad key_IDs
    │   ├── KMEStateError               a KME state file is corrupt or cannot be written
    │   ├── KeyNotFoundError            no such key_ID (or already consumed)
    │   ├── KeyExhaustedError           no key material left
    │   ├── LinkAlarmError              QBER above threshold: eavesdropper suspected
    │   ├── PostProcessingError         BB84 post-processing failed (EC, verification)
    │   │   └── ChannelAuthenticationError  a classical-channel message failed its MAC
    │   ├── RelayError                  trusted-node relay failed (names the hop)
    │   ├── CapacityError               a route cannot carry the calls offered (key economics)
    │   ├── SiteLinkError               link between two network sites: bad frame or peer
    │   └── TopologyError               bad topology file
    ├── SignalingError               (``code`` goes on the wire)
    │   ├── SignalingProtocolError      malformed frame, unknown type, missing field
    │   ├── SignalingAuthError          registration challenge failed
    │   ├── SignalingRateLimitError     too many messages
    │   ├── SignalingLimitError         a server limit: connections, names, watch list
    │   ├── PeerUnavailableError        callee offline or busy
    │   └── ClusterError                a signaling cluster's Redis is unreachable or refused
    │       └── ClusterLinkError           a direct link between instances: bad frame or peer
    ├── CallError
    │   ├── CallRejectedError           the callee declined or was busy
    │   ├── MediaError                  audio device or file problem
    │   ├── SecurityPolicyError         policy not allowed (never a silent downgrade)
    │   └── OTPError                    one-time-pad call (docs/otp.md)
    │       ├── OTPPacketError             malformed, forged, replayed or unkeyed OTP packet
    │       └── OTPKeyExhaustedError       the pad ran low: call ended or fell back, per policy
    ├── SealError                    Quantum Cloud Seal (``cause`` names the failed check)
    │   ├── SealFormatError             malformed bundle, statement, receipt or log entry
    │   ├── DocumentChangedError        the document's SHA-384 is not the sealed one
    │   ├── SealSignatureError          a statement's ML-DSA signature does not verify
    │   ├── NotInLogError               no log receipt, or the receipt is for another entry
    │   ├── LogProofError               inclusion/consistency proof or tree head invalid
    │   ├── WorkflowError               approval refused: order, replay, not an approver
    │   ├── LogError                    the transparency log refused or failed a request
    │   │   └── LogStorageError            the log database is corrupt or unwritable
    │   └── LogConsistencyError         audit alarm: fork, split view, rewritten history
    ├── ServiceError                 a local Redis/PostgreSQL/coturn would not start (tests, demos)
    └── MessagingError               (``code`` names the failure; details stay local)
        ├── MessageFormatError          malformed message, bundle, state or field
        ├── MessageTooLargeError        a message or file over the limit (refused before upload)
        ├── MessageAuthError            AEAD tag or signature check failed: tampered or forged
        ├── ReplayedMessageError        a message (or its key) was used before: replay/duplicate
        ├── UnknownSessionError         no session (or no sender key) for this message
        ├── SkippedMessagesError        too many skipped messages, or the key has expired
        ├── EpochNotOpenError           a short ratchet message came before its epoch's key
        ├── PrekeyError                 bad bundle: wrong identity, unknown or reused prekey
        ├── GroupError                  non-member sender, bad or conflicting membership change
        ├── FileTransferError           chunk out of order, truncated file, hash mismatch
        ├── MailboxFullError            the server holds too much for this recipient
        └── MessageStoreError           a message store file is corrupt or unusable (names it)

Messages are written for the person at the keyboard. They never contain key
bytes: only key IDs, fingerprints and short hashes.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "BadSignatureError",
    "CallError",
    "CallRejectedError",
    "CapacityError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateRevokedError",
    "ChannelAuthenticationError",
    "ClusterError",
    "ClusterLinkError",
    "ConfigError",
    "CryptoError",
    "DocumentChangedError",
    "DowngradeError",
    "EpochNotOpenError",
    "FileTransferError",
    "GroupError",
    "HandshakeError",
    "HandshakeStateError",
    "HandshakeTimeoutError",
    "IdentityChangedError",
    "IdentityError",
    "IdentityNotFoundError",
    "InvalidKeyError",
    "InvalidMessageError",
    "KMEBadRequestError",
    "KMEConnectionError",
    "KMEError",
    "KMEResponseError",
    "KMEStateError",
    "KMEUnauthorizedError",
    "KMEUnavailableError",
    "KeyConfirmationError",
    "KeyExhaustedError",
    "KeyNotFoundError",
    "LinkAlarmError",
    "LogConsistencyError",
    "LogError",
    "LogProofError",
    "LogStorageError",
    "MailboxFullError",
    "MediaError",
    "MessageAuthError",
    "MessageFormatError",
    "MessageStoreError",
    "MessageTooLargeError",
    "MessagingError",
    "NotInLogError",
    "OTPError",
    "OTPKeyExhaustedError",
    "OTPNotAllowedError",
    "OTPPacketError",
    "PeerUnavailableError",
    "PostProcessingError",
    "PrekeyError",
    "QCallError",
    "QKDError",
    "QKDKeyMismatchError",
    "RelayError",
    "ReplayError",
    "ReplayedMessageError",
    "SASCommitmentError",
    "SealError",
    "SealFormatError",
    "SealSignatureError",
    "SecurityPolicyError",
    "ServiceError",
    "SignalingAuthError",
    "SignalingError",
    "SignalingLimitError",
    "SignalingProtocolError",
    "SignalingRateLimitError",
    "SiteLinkError",
    "SkippedMessagesError",
    "TopologyError",
    "TranscriptMismatchError",
    "UnknownIdentityError",
    "UnknownSessionError",
    "UnsupportedAlgorithmError",
    "UnsupportedVersionError",
    "UntrustedCertificateError",
    "WorkflowError",
]


class QCallError(Exception):
    """Base class of every error qcall raises on purpose."""


class ConfigError(QCallError):
    """A command-line flag, config file, topology file or path is invalid."""


# --- cryptography -----------------------------------------------------------


class CryptoError(QCallError):
    """A cryptographic primitive or backend cannot be used."""


class UnsupportedAlgorithmError(CryptoError):
    """The installed cryptography/OpenSSL lacks an algorithm qcall needs."""


class BackendUnavailableError(CryptoError):
    """A backend that was asked for explicitly is not installed."""


class InvalidKeyError(CryptoError):
    """Key bytes or a key file are malformed (the key itself is never shown)."""


# --- identities ---------------------------------------------------------------


class IdentityError(QCallError):
    """Problem with a long-term ML-DSA identity or a contact."""


class IdentityNotFoundError(IdentityError):
    """No identity exists yet in the qcall home directory."""


class UnknownIdentityError(IdentityError):
    """A peer is not in the contacts store and may not be pinned now."""


class IdentityChangedError(IdentityError):
    """A pinned contact presented a different identity key.

    This is what a man-in-the-middle looks like. It is also what a contact who
    reinstalled looks like: compare the SAS by voice before trusting again.
    """


class CertificateError(IdentityError):
    """An organisation certificate (docs/seal.md, "Certificate profile") is not acceptable.

    ``cause`` is the short, stable name of the failed check (also used by seal verdicts).
    """

    cause: str = "certificate_invalid"


class UntrustedCertificateError(CertificateError):
    """The certificate was not issued by an authority the user trusts (or is malformed)."""

    cause = "certificate_untrusted"


class CertificateExpiredError(CertificateError):
    """The certificate was not valid at the time that matters (now, or the signing time)."""

    cause = "certificate_expired"


class CertificateRevokedError(CertificateError):
    """The certificate is on its authority's revocation list (CRL) for the time that matters."""

    cause = "certificate_revoked"


# --- handshake -------------------------------------------------------------------


class HandshakeError(QCallError):
    """The hybrid handshake failed.

    ``code`` is the short, stable string sent to the peer; the message with
    the details stays local.
    """

    code: str = "handshake_failed"


class InvalidMessageError(HandshakeError):
    """A handshake message or one of its fields is malformed or oversized."""

    code = "invalid_message"


class UnsupportedVersionError(HandshakeError):
    """The peer speaks a protocol version this build does not."""

    code = "unsupported_version"


class BadSignatureError(HandshakeError):
    """An ML-DSA signature over the transcript does not verify."""

    code = "bad_signature"


class ReplayError(HandshakeError):
    """An offer was replayed: nonce already seen or timestamp outside the window."""

    code = "replay"


class DowngradeError(HandshakeError):
    """The security policy differs from what was offered or what is allowed."""

    code = "downgrade"


class OTPNotAllowedError(DowngradeError):
    """The offer asks for a one-time-pad call and the callee does not accept one (docs/otp.md)."""

    code = "otp_not_allowed"


class KeyConfirmationError(HandshakeError):
    """Key confirmation failed: the two parties derived different keys."""

    code = "key_confirmation_failed"


class QKDKeyMismatchError(KeyConfirmationError):
    """Key confirmation failed and the QKD key is the likely culprit."""

    code = "qkd_key_mismatch"


class TranscriptMismatchError(KeyConfirmationError):
    """The two sides hashed different offer/answer (or rekey) messages.

    Their QKD keys may well be equal: a man in the middle (on the signaling path,
    or the signaling server itself) altered the signed handshake, for instance by
    substituting its own identity at first contact. Suspect the signaling path,
    not the KMEs.
    """

    code = "transcript_mismatch"


class SASCommitmentError(HandshakeError):
    """The caller's revealed SAS nonce does not match the commitment in its offer."""

    code = "sas_commitment"


class HandshakeStateError(HandshakeError):
    """An input arrived that is not valid in the handshake's current state."""

    code = "unexpected_message"


class HandshakeTimeoutError(HandshakeError):
    """The peer did not complete the handshake in time."""

    code = "timeout"


# --- quantum key distribution ------------------------------------------------------


class QKDError(QCallError):
    """Quantum key material could not be obtained or used."""


class KMEError(QKDError):
    """An ETSI GS QKD 014 key management entity answered with an error.

    Attributes:
        status: the HTTP status code.
        message: the ``message`` field of the spec's Error object, if any.
        details: the ``details`` list of the Error object, if any.
    """

    def __init__(
        self,
        text: str,
        *,
        status: int | None = None,
        message: str | None = None,
        details: list[object] | None = None,
    ) -> None:
        super().__init__(text)
        self.status = status
        self.message = message
        self.details = details or []


class KMEBadRequestError(KMEError):
    """HTTP 400 from a KME: the request was wrong (see ``message``/``details``)."""


class KMEUnauthorizedError(KMEError):
    """HTTP 401 from a KME: our SAE certificate is not accepted."""


class KMEUnavailableError(KMEError):
    """HTTP 503 from a KME: it cannot serve now (for example, no key left)."""


class KMEConnectionError(QKDError):
    """The KME could not be reached: refused, TLS failure or timeout."""


class KMEResponseError(QKDError):
    """A KME answer broke the spec: malformed JSON, wrong size, bad key_IDs."""


class KMEStateError(QKDError):
    """A KME's durable state file is corrupt, or cannot be read or written."""


class KeyNotFoundError(QKDError):
    """No key with this key_ID exists (or it was already consumed)."""


class KeyExhaustedError(QKDError):
    """No key material is left in a pool, key file or link."""


class LinkAlarmError(QKDError):
    """A QKD link measured a QBER above its abort threshold (eavesdropper?)."""

    def __init__(self, text: str, *, link: str | None = None, qber: float | None = None):
        super().__init__(text)
        self.link = link
        self.qber = qber


class PostProcessingError(QKDError):
    """BB84 post-processing failed (error correction or verification)."""


class ChannelAuthenticationError(PostProcessingError):
    """A message on a link's authenticated classical channel failed verification."""


class RelayError(QKDError):
    """A trusted-node relay could not deliver a key; ``hop`` names the failed link."""

    def __init__(self, text: str, *, hop: str | None = None) -> None:
        super().__init__(text)
        self.hop = hop


class CapacityError(QKDError):
    """A route cannot carry the calls offered, or an admission was misused
    (:mod:`qcall.qkd.capacity`)."""


class SiteLinkError(QKDError):
    """The TCP link between two network sites failed: a malformed frame, a peer
    with another topology or split, or a lost connection (:mod:`qcall.qkd.site`)."""


class TopologyError(QKDError, ConfigError):
    """A topology file is invalid."""


# --- signaling ----------------------------------------------------------------------


class SignalingError(QCallError):
    """Signaling failed. ``code`` is the documented wire error code."""

    code: str = "error"


class SignalingProtocolError(SignalingError):
    """A malformed frame, unknown message type or missing field."""

    code = "bad_message"


class SignalingAuthError(SignalingError):
    """Registration failed or a request needs registration first."""

    code = "auth_failed"


class SignalingRateLimitError(SignalingError):
    """Too many messages on one connection."""

    code = "rate_limited"


class SignalingLimitError(SignalingError):
    """A limit of the signaling server was reached (docs/signaling.md, "Limits").

    ``code`` names it: ``server_full``, ``too_many_connections``, ``too_many_names``,
    ``too_many_identities`` or ``too_many_watched``.
    """

    code = "server_full"


class PeerUnavailableError(SignalingError):
    """The callee is offline or busy."""

    code = "unavailable"


class ClusterError(SignalingError):
    """A signaling instance cannot reach its cluster's Redis, or Redis refused a step."""

    code = "cluster_error"


class ClusterLinkError(ClusterError):
    """A direct link between two signaling instances failed: a bad frame, a failed
    authentication (wrong cluster secret), or a peer that is not the one expected."""

    code = "cluster_link_error"


# --- calls ----------------------------------------------------------------------------


class CallError(QCallError):
    """A call could not be placed or ended abnormally."""


class CallRejectedError(CallError):
    """The callee declined the call or was busy."""


class MediaError(CallError):
    """An audio device or file could not be used."""


class SecurityPolicyError(CallError):
    """The call would need a policy the user did not allow."""


class OTPError(CallError):
    """A one-time-pad call failed (docs/otp.md)."""


class OTPPacketError(OTPError):
    """An OTP media packet or control message is malformed, forged, replayed or unkeyed.

    Attributes:
        reason: a short code (``malformed``, ``forged``, ``replayed``, ``unknown-block``…).
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"OTP packet rejected: {reason}")
        self.reason = reason


class OTPKeyExhaustedError(OTPError):
    """The one-time pad ran low: the call ended (or fell back to hybrid), as its policy says."""


# --- Quantum Cloud Seal -------------------------------------------------------------------


class SealError(QCallError):
    """A seal, an approval or the transparency log failed a check.

    ``cause`` is the short, stable name of the failed check, printed by
    ``qcall seal verify`` and carried in its ``--json`` output.
    """

    cause: str = "seal_invalid"


class SealFormatError(SealError):
    """A seal bundle, signed statement, log receipt or log entry is malformed."""

    cause = "bundle_malformed"


class DocumentChangedError(SealError):
    """The document's SHA-384 differs from the one that was sealed."""

    cause = "document_changed"


class SealSignatureError(SealError):
    """A statement's ML-DSA signature does not verify under its signer's certificate."""

    cause = "signature_invalid"


class NotInLogError(SealError):
    """A statement has no transparency-log receipt, or the receipt is for another entry."""

    cause = "not_in_log"


class LogProofError(SealError):
    """An inclusion or consistency proof, or a signed tree head, does not verify."""

    cause = "log_proof_invalid"


class WorkflowError(SealError):
    """An approval or rejection breaks the workflow: out of order, replayed, not an
    approver, for another workflow, or after the workflow closed."""

    cause = "approval_invalid"


class LogError(SealError):
    """The transparency log refused a request or could not be reached.

    Attributes:
        status: the HTTP status of the log's answer, if any.
    """

    cause = "log_error"

    def __init__(self, text: str, *, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status


class LogStorageError(LogError):
    """The log's database is corrupt, of an unknown schema, or cannot be written."""

    cause = "log_storage"


class LogConsistencyError(SealError):
    """Audit alarm: the log forked, showed two heads of one size, rewrote its history,
    or holds an entry its signer never made."""

    cause = "log_inconsistent"


# --- messaging ("Quantum Secret", docs/messaging.md) ------------------------------------


class MessagingError(QCallError):
    """A message, prekey bundle, group change or file could not be accepted or sent.

    ``code`` is a short, stable string (shown in ``--json`` output and logs);
    the message with the details stays local and never holds key bytes.
    """

    code: str = "messaging_error"


class MessageFormatError(MessagingError):
    """A message, prekey bundle, stored state or one of its fields is malformed."""

    code = "bad_format"


class MessageTooLargeError(MessagingError):
    """A message or file exceeds the configured limit; refused before upload."""

    code = "too_large"


class MessageAuthError(MessagingError):
    """Authentication failed: a tampered ciphertext or header, or a forged signature."""

    code = "auth_failed"


class ReplayedMessageError(MessagingError):
    """The message (or its message key) was already used: a replay or a duplicate."""

    code = "replay"


class UnknownSessionError(MessagingError):
    """No session (or, in a group, no sender key) matches this message."""

    code = "unknown_session"


class SkippedMessagesError(MessagingError):
    """Too many messages skipped at once, or the skipped message key has expired."""

    code = "too_many_skipped"


class EpochNotOpenError(MessagingError):
    """A short ratchet message (``docs/messaging.md`` §7.4) of an epoch not opened yet:
    the message that carries the epoch's ratchet key has not arrived. Kept for later."""

    code = "epoch_not_open"


class PrekeyError(MessagingError):
    """A prekey bundle or prekey message is unacceptable.

    Signed by another identity than the one named, an unknown or expired prekey,
    or a one-time prekey used a second time.
    """

    code = "bad_prekey"


class GroupError(MessagingError):
    """A group message or membership change is unacceptable (non-member, bad signature,
    wrong epoch, conflicting change)."""

    code = "group_rejected"


class FileTransferError(MessagingError):
    """A file transfer failed: a chunk out of order or forged, truncation, hash mismatch."""

    code = "file_rejected"


class MailboxFullError(MessagingError):
    """The server stores too many messages or bytes for this recipient already."""

    code = "mailbox_full"


class MessageStoreError(MessagingError):
    """A message store (client or server) is corrupt, locked or cannot be written.

    The message names the file.
    """

    code = "store_error"


# --- local services -------------------------------------------------------------------


class ServiceError(QCallError):
    """A local server (Redis, PostgreSQL, coturn) for tests or demos would not start.

    The message names the program and ends with its log's last lines.
    """
