"""The hybrid key schedule (version 2): QKD ‖ ML-KEM ‖ DTLS exporter → SRTP keys, SAS, checks.

Pure functions and one small stateful object, :class:`KeySchedule`, modelled on
``aioquic.tls.KeySchedule``. Every derivation is labelled and every input is
framed with its length; ``docs/key-schedule.md`` is the normative description
and ``tests/vectors/key_schedule.json`` the vectors.

Epoch 0 (after the offer/answer and the DTLS handshake)::

    HS    = HKDF-Extract(salt = TH_0, IKM = F(K_qkd) ‖ F(K_kem))       handshake secret
    S_0   = HKDF-Extract(salt = HS,   IKM = F(K_dtls))                  epoch secret

with ``F(x) = u16(len(x)) ‖ x`` (RFC 5869 §2.2, SHA-384). Epoch n+1 (a rekey,
:meth:`KeySchedule.ratchet`)::

    S_n+1 = HKDF-Extract(salt = S_n, IKM = F(K_qkd_new) ‖ F(K_kem_new) ‖ F(TH_n+1))

From each epoch secret ``S_n`` and that epoch's transcript hash ``TH_n``, with
``Expand-Label`` as in RFC 8446 §7.1 but with the prefix ``"qcall2 "``::

    c2s key/salt, s2c key/salt  SRTP master keys per direction (RFC 3711 §8.2)
    caller/callee finished      key-confirmation keys → tag = HMAC(key, TH_n)

The short authentication string comes from ``HS`` and the caller's SAS nonce
``R``, committed to in the offer and revealed in the caller's first CONFIRM
(:meth:`KeySchedule.sas`), so that neither side can choose the SAS (ZRTP's hash
commitment): it does not depend on the DTLS exporter, whose last share a man in
the middle may pick. Diagnostics that tell a failed confirmation's cause apart:
``qkd check`` values keyed by the QKD key alone (and its key_IDs) and a
``transcript check`` over ``TH_n`` (:func:`transcript_check`).

A callee that cannot take a rekey (its KME is down) answers REKEY_NACK, MACed
under ``S_n`` (:func:`rekey_nack_tag`); the epoch does not change.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from qcall import pqc

__all__ = [
    "CONFIRM_TAG_LEN",
    "DTLS_EXPORTER_LABEL",
    "LABEL_PREFIX",
    "QKD_CHECK_LEN",
    "SAS_NONCE_LEN",
    "TRANSCRIPT_CHECK_LEN",
    "EpochKeys",
    "KeySchedule",
    "SRTPKeyMaterial",
    "SRTPProfile",
    "Transcript",
    "expand_label",
    "format_sas",
    "qkd_check_values",
    "rekey_nack_tag",
    "sas_commitment",
    "transcript_check",
    "transcript_hash",
]

#: Prefix of every HKDF-Expand-Label label (``docs/key-schedule.md`` §1).
LABEL_PREFIX = b"qcall2 "

#: RFC 5705 exporter label whose output the shell passes as ``K_dtls`` (RFC 5764 §4.2).
DTLS_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"

#: Length of a key-confirmation tag (HMAC-SHA-384).
CONFIRM_TAG_LEN = pqc.HASH_LEN

#: Length of a QKD check value and of a transcript check value.
QKD_CHECK_LEN = 16
TRANSCRIPT_CHECK_LEN = 16

#: Length of the caller's SAS nonce ``R`` (committed in the offer, revealed in CONFIRM).
SAS_NONCE_LEN = 32

#: Bounds on the inputs (bytes). ``K_qkd`` is empty (policy ``pqc``) or 16..1024.
MIN_QKD_KEY_LEN = 16
MAX_QKD_KEY_LEN = 1024
KEM_SECRET_LEN = 32
DTLS_EXPORTER_MIN = 32
DTLS_EXPORTER_MAX = 255

#: Domains of the hashes defined here (``docs/key-schedule.md`` §6).
SAS_COMMIT_DOMAIN = b"qcall-v2 sas commit"
SAS_DOMAIN = b"qcall-v2 sas"
QKD_CHECK_DOMAIN = b"qcall-v2 qkd check"
TRANSCRIPT_CHECK_DOMAIN = b"qcall-v2 transcript check"
REKEY_NACK_DOMAIN = b"qcall-v2 rekey nack"


class SRTPProfile(enum.Enum):
    """SRTP protection profiles (RFC 7714 §14.2, RFC 3711 / RFC 5764 §4.1.2)."""

    AEAD_AES_256_GCM = "AEAD_AES_256_GCM"
    AES128_CM_HMAC_SHA1_80 = "AES128_CM_HMAC_SHA1_80"

    @property
    def key_len(self) -> int:
        """SRTP master key length in bytes."""
        return 32 if self is SRTPProfile.AEAD_AES_256_GCM else 16

    @property
    def salt_len(self) -> int:
        """SRTP master salt length in bytes."""
        return 12 if self is SRTPProfile.AEAD_AES_256_GCM else 14


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


@dataclass(frozen=True, repr=False)
class SRTPKeyMaterial:
    """One direction's SRTP master key and master salt (secret: never printed)."""

    key: bytes
    salt: bytes

    def fingerprint(self) -> str:
        """A short SHA-256 hash of key ‖ salt, safe to log."""
        return _short_hash(self.key + self.salt)

    def __repr__(self) -> str:
        return f"<SRTPKeyMaterial {len(self.key)}+{len(self.salt)} bytes #{self.fingerprint()}>"


@dataclass(frozen=True, repr=False)
class EpochKeys:
    """Everything derived for one epoch. Secret values never appear in ``repr``."""

    epoch: int
    profile: SRTPProfile
    transcript_hash: bytes
    caller_to_callee: SRTPKeyMaterial
    callee_to_caller: SRTPKeyMaterial
    caller_finished: bytes  # confirmation tag the caller sends
    callee_finished: bytes  # confirmation tag the callee sends
    caller_qkd_check: bytes  # b"" when no QKD key entered this epoch
    callee_qkd_check: bytes
    transcript_check: bytes  # public: tells "transcripts differ" from a key mismatch
    secret: bytes = field(default=b"")  # S_n, kept for the vectors and the ratchet

    def __repr__(self) -> str:
        return (
            f"<EpochKeys epoch={self.epoch} {self.profile.value} "
            f"c2s=#{self.caller_to_callee.fingerprint()} "
            f"s2c=#{self.callee_to_caller.fingerprint()}>"
        )


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _frame(*parts: bytes) -> bytes:
    """``F(p1) ‖ F(p2) ‖ …`` with ``F(x) = u16(len(x)) ‖ x`` (``docs/key-schedule.md`` §1)."""
    return b"".join(struct.pack(">H", len(p)) + p for p in parts)


def transcript_hash(domain: bytes, *parts: bytes) -> bytes:
    """SHA-384 of a domain-separated, length-prefixed list of byte strings.

    ``TH = SHA-384(u32(len(domain)) ‖ domain ‖ u32(len(p1)) ‖ p1 ‖ …)``, all
    lengths big-endian (``docs/key-schedule.md`` §2).
    """
    return pqc.sha384(_lp(domain), *(_lp(p) for p in parts))


class Transcript:
    """A running :func:`transcript_hash`: feed parts, read hashes without consuming.

    ``Transcript(d).add(m1).hash_with(m2) == transcript_hash(d, m1, m2)``; the
    shared prefix (the large offer) is hashed once.
    """

    __slots__ = ("_h",)

    def __init__(self, domain: bytes) -> None:
        self._h = hashlib.sha384(_lp(domain))

    def add(self, part: bytes) -> Transcript:
        """Append one length-prefixed part (returns ``self``)."""
        self._h.update(_lp(part))
        return self

    def hash_with(self, *parts: bytes) -> bytes:
        """The hash of everything added so far followed by ``parts`` (not added)."""
        h = self._h.copy()
        for part in parts:
            h.update(_lp(part))
        return h.digest()


class _Expander:
    """RFC 5869 §2.3 HKDF-Expand with SHA-384 and one precomputed HMAC key.

    Equivalent to :func:`qcall.pqc.hkdf_expand` (checked by the tests) but keys
    HMAC once per secret: a whole epoch costs a few µs instead of tens.
    """

    __slots__ = ("_mac",)

    def __init__(self, prk: bytes) -> None:
        self._mac = hmac.new(prk, digestmod=hashlib.sha384)

    def expand(self, info: bytes, length: int) -> bytes:
        if not 0 < length <= 255 * pqc.HASH_LEN:
            raise ValueError(f"HKDF-Expand length must be 1..{255 * pqc.HASH_LEN}")
        out, block, i = b"", b"", 1
        while len(out) < length:
            mac = self._mac.copy()
            mac.update(block + info + bytes([i]))
            block = mac.digest()
            out += block
            i += 1
        return out[:length]

    def label(self, label: bytes, context: bytes, length: int) -> bytes:
        return self.expand(_label_info(label, context, length), length)


def _label_info(label: bytes, context: bytes, length: int) -> bytes:
    full = LABEL_PREFIX + label
    if len(full) > 255 or len(context) > 255:
        raise ValueError("HKDF label or context longer than 255 bytes")
    return struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context


def expand_label(secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) with SHA-384 and the ``"qcall2 "`` prefix.

    ``info = u16(length) ‖ u8(len(L)) ‖ L ‖ u8(len(context)) ‖ context`` where
    ``L = "qcall2 " ‖ label``.
    """
    return pqc.hkdf_expand(secret, _label_info(label, context, length), length)


def format_sas(value: bytes) -> str:
    """Six decimal digits, ``"123 456"``: big-endian ``value`` modulo 10⁶."""
    n = int.from_bytes(value, "big") % 1_000_000
    digits = f"{n:06d}"
    return f"{digits[:3]} {digits[3:]}"


def sas_commitment(sas_nonce: bytes) -> bytes:
    """The caller's commitment to its SAS nonce, sent in the offer (48 bytes).

    ``C = TH("qcall-v2 sas commit", R)`` (``docs/key-schedule.md`` §4.2).
    """
    _check("sas_nonce", sas_nonce, SAS_NONCE_LEN, SAS_NONCE_LEN)
    return transcript_hash(SAS_COMMIT_DOMAIN, bytes(sas_nonce))


def transcript_check(th: bytes) -> bytes:
    """First 16 bytes of ``TH("qcall-v2 transcript check", TH_n)``: public, sent in CONFIRM.

    Equal on both sides iff they hashed the same transcript: a confirmation that
    fails with equal transcript checks is a key mismatch, otherwise the offer,
    answer or rekey messages were altered in transit.
    """
    return transcript_hash(TRANSCRIPT_CHECK_DOMAIN, th)[:TRANSCRIPT_CHECK_LEN]


def qkd_check_values(k_qkd: bytes, key_ids: Sequence[str]) -> tuple[bytes, bytes]:
    """The caller's and the callee's QKD check values (``docs/key-schedule.md`` §4.3).

    ``Q = HKDF-Extract(TH("qcall-v2 qkd check", id_1, …, id_k), K_qkd)``, then
    ``Expand-Label(Q, "qkd check caller"/"qkd check callee", "", 16)``: they depend
    on the QKD key and its key_IDs only (lowercase ASCII), not on the transcript,
    so they differ exactly when the two KMEs delivered different keys.
    Both are ``b""`` when ``k_qkd`` is empty.
    """
    if not k_qkd:
        return b"", b""
    salt = transcript_hash(QKD_CHECK_DOMAIN, *(k.lower().encode() for k in key_ids))
    q = _Expander(pqc.hkdf_extract(salt, bytes(k_qkd)))
    return (
        q.label(b"qkd check caller", b"", QKD_CHECK_LEN),
        q.label(b"qkd check callee", b"", QKD_CHECK_LEN),
    )


def _derive_epoch(
    epoch: int,
    profile: SRTPProfile,
    secret: bytes,
    th: bytes,
    k_qkd: bytes,
    key_ids: Sequence[str],
) -> EpochKeys:
    s = _Expander(secret)

    def material(direction: bytes) -> SRTPKeyMaterial:
        return SRTPKeyMaterial(
            key=s.label(direction + b" srtp key", th, profile.key_len),
            salt=s.label(direction + b" srtp salt", th, profile.salt_len),
        )

    caller_fk = s.label(b"caller finished", b"", pqc.HASH_LEN)
    callee_fk = s.label(b"callee finished", b"", pqc.HASH_LEN)
    caller_q, callee_q = qkd_check_values(k_qkd, key_ids)
    return EpochKeys(
        epoch=epoch,
        profile=profile,
        transcript_hash=th,
        caller_to_callee=material(b"c2s"),
        callee_to_caller=material(b"s2c"),
        caller_finished=pqc.hmac_sha384(caller_fk, th),
        callee_finished=pqc.hmac_sha384(callee_fk, th),
        caller_qkd_check=caller_q,
        callee_qkd_check=callee_q,
        transcript_check=transcript_check(th),
        secret=secret,
    )


def rekey_nack_tag(keys: EpochKeys, rekey: bytes, nack: bytes) -> bytes:
    """The tag of a REKEY_NACK sent during epoch ``keys.epoch`` (``docs/key-schedule.md`` §4).

    ``tag = HMAC-SHA-384(Expand-Label(S_n, "rekey nack", "", 48),
    TH("qcall-v2 rekey nack", TH_n, REKEY, NACK⁻))`` where ``NACK⁻`` is the
    REKEY_NACK without its ``tag`` field: it proves the sender holds the current
    epoch secret and binds the refusal to the one REKEY it refuses.

    Args:
        keys: the current epoch (its ``secret`` and ``transcript_hash``).
        rekey: the refused REKEY message, as received.
        nack: the REKEY_NACK encoding without its ``tag`` field.
    """
    mac_key = _Expander(keys.secret).label(b"rekey nack", b"", pqc.HASH_LEN)
    return pqc.hmac_sha384(
        mac_key, transcript_hash(REKEY_NACK_DOMAIN, keys.transcript_hash, rekey, nack)
    )


def _check(name: str, value: bytes, lo: int, hi: int) -> None:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{name} must be bytes")
    if not lo <= len(value) <= hi:
        raise ValueError(f"{name} must be {lo}..{hi} bytes, got {len(value)}")


def _check_qkd(k_qkd: bytes) -> None:
    """``K_qkd`` is empty (no QKD key in this epoch) or 16..1024 bytes (§2)."""
    _check("k_qkd", k_qkd, 0, MAX_QKD_KEY_LEN)
    if 0 < len(k_qkd) < MIN_QKD_KEY_LEN:
        raise ValueError(
            f"k_qkd must be empty or {MIN_QKD_KEY_LEN}..{MAX_QKD_KEY_LEN} bytes, got {len(k_qkd)}"
        )


class KeySchedule:
    """The hybrid key schedule of one call (``docs/key-schedule.md``, version 2).

    Args:
        profile: SRTP profile negotiated in the answer.
        transcript_hash: ``TH_0``, the hash of the signed offer and answer.
        k_qkd: the QKD key(s), concatenated in key_ID order; ``b""`` for policy ``pqc``.
        k_kem: the 32-byte ML-KEM shared secret (FIPS 203 §7.2/7.3).
        k_dtls: RFC 5705 exporter output, label ``EXTRACTOR-dtls_srtp``,
            32..255 bytes (aiortc computes 2·(key+salt) of the DTLS profile).
        qkd_key_ids: the key_IDs of ``k_qkd``, in order (they key the QKD check values).

    Raises:
        ValueError: an input has a length outside its documented range.
    """

    def __init__(
        self,
        profile: SRTPProfile,
        transcript_hash: bytes,
        k_qkd: bytes,
        k_kem: bytes,
        k_dtls: bytes,
        qkd_key_ids: Sequence[str] = (),
    ) -> None:
        _check("transcript_hash", transcript_hash, pqc.HASH_LEN, pqc.HASH_LEN)
        _check_qkd(k_qkd)
        _check("k_kem", k_kem, KEM_SECRET_LEN, KEM_SECRET_LEN)
        _check("k_dtls", k_dtls, DTLS_EXPORTER_MIN, DTLS_EXPORTER_MAX)
        self.profile = profile
        th = bytes(transcript_hash)
        self._th0 = th
        # HS binds the transcript, the QKD key and the ML-KEM secret; the SAS comes
        # from it, never from K_dtls (docs/key-schedule.md §4.2).
        self._handshake_secret: bytes | None = pqc.hkdf_extract(
            th, _frame(bytes(k_qkd), bytes(k_kem))
        )
        secret = pqc.hkdf_extract(self._handshake_secret, _frame(bytes(k_dtls)))
        self._sas: str | None = None
        self._sas_nonce_hash = b""
        self.current = _derive_epoch(0, profile, secret, th, bytes(k_qkd), qkd_key_ids)

    @property
    def epoch(self) -> int:
        """The current epoch number (0 after the handshake)."""
        return self.current.epoch

    @property
    def handshake_secret(self) -> bytes | None:
        """``HS`` until the SAS is computed (for the vectors), then None."""
        return self._handshake_secret

    def sas(self, sas_nonce: bytes) -> str:
        """The short authentication string of the call (``docs/key-schedule.md`` §4.2).

        ``Expand-Label(HS, "sas", TH("qcall-v2 sas", TH_0, R), 8)`` as six digits,
        where ``R`` is the caller's SAS nonce (the opening of the offer's
        ``sas_commit``). Computed once; ``HS`` is dropped afterwards.

        Raises:
            ValueError: ``sas_nonce`` is not 32 bytes, or differs from the nonce the
                SAS was already computed with.
        """
        _check("sas_nonce", sas_nonce, SAS_NONCE_LEN, SAS_NONCE_LEN)
        if self._sas is None:
            assert self._handshake_secret is not None
            context = transcript_hash(SAS_DOMAIN, self._th0, bytes(sas_nonce))
            self._sas = format_sas(_Expander(self._handshake_secret).label(b"sas", context, 8))
            self._sas_nonce_hash = hashlib.sha256(sas_nonce).digest()
            self._handshake_secret = None  # drop our reference
        elif hashlib.sha256(sas_nonce).digest() != self._sas_nonce_hash:
            raise ValueError("the SAS was already computed with another nonce")
        return self._sas

    def ratchet(
        self,
        transcript_hash: bytes,
        k_qkd: bytes = b"",
        k_kem: bytes = b"",
        qkd_key_ids: Sequence[str] = (),
    ) -> EpochKeys:
        """Move to the next epoch, mixing in a fresh QKD key and/or ML-KEM secret.

        ``S_n+1 = HKDF-Extract(salt = S_n, IKM = F(K_qkd_new) ‖ F(K_kem_new) ‖
        F(TH_n+1))``: each input framed with its length, and the rekey transcript
        bound into the chain. The previous epoch secret is dropped (best effort:
        Python cannot wipe bytes).

        Args:
            transcript_hash: ``TH_n+1`` over ``TH_n`` and the rekey messages.
            k_qkd: fresh QKD key bytes (16..1024), or ``b""``.
            k_kem: fresh 32-byte ML-KEM shared secret, or ``b""``.
            qkd_key_ids: the key_IDs of ``k_qkd``, in order.

        Returns:
            The new epoch's keys (also stored as :attr:`current`).
        """
        _check("transcript_hash", transcript_hash, pqc.HASH_LEN, pqc.HASH_LEN)
        _check_qkd(k_qkd)
        if len(k_kem) not in (0, KEM_SECRET_LEN):
            raise ValueError(f"k_kem must be 0 or {KEM_SECRET_LEN} bytes, got {len(k_kem)}")
        th = bytes(transcript_hash)
        secret = pqc.hkdf_extract(self.current.secret, _frame(bytes(k_qkd), bytes(k_kem), th))
        self.current = _derive_epoch(
            self.current.epoch + 1, self.profile, secret, th, bytes(k_qkd), qkd_key_ids
        )
        return self.current

    def __repr__(self) -> str:
        return f"<KeySchedule epoch={self.epoch} {self.profile.value}>"
