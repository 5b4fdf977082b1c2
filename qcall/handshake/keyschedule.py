"""The hybrid key schedule: QKD ‖ ML-KEM ‖ DTLS exporter → SRTP keys, SAS, confirmation.

Pure functions and one small stateful object, :class:`KeySchedule`, modelled on
``aioquic.tls.KeySchedule``. Every derivation is labelled; ``docs/key-schedule.md``
is the normative description and ``tests/vectors/key_schedule.json`` the vectors.

Epoch 0 (after the offer/answer and the DTLS handshake)::

    IKM_0 = K_qkd ‖ K_kem ‖ K_dtls                   (ETSI TS 103 744 §8.2 concatenation)
    S_0   = HKDF-Extract(salt = TH_0, IKM_0)          (RFC 5869 §2.2, SHA-384)

Epoch n+1 (a rekey, :meth:`KeySchedule.ratchet`)::

    S_n+1 = HKDF-Extract(salt = S_n, IKM = K_qkd_new ‖ K_kem_new)

From each epoch secret ``S_n`` and that epoch's transcript hash ``TH_n``, with
``Expand-Label`` as in RFC 8446 §7.1 but with the prefix ``"qcall1 "``::

    c2s key/salt, s2c key/salt  SRTP master keys per direction (RFC 3711 §8.2)
    caller/callee finished      key-confirmation keys → tag = HMAC(key, TH_n)
    sas                         short authentication string (6 digits)

and, when a QKD key entered the epoch, ``Q_n = HKDF-Extract(TH_n, K_qkd_n)``
gives the ``qkd check`` values that tell a QKD mismatch from any other.

A callee that cannot take a rekey (its KME is down) answers REKEY_NACK, MACed
under ``S_n`` (:func:`rekey_nack_tag`); the epoch does not change.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from qcall import pqc

__all__ = [
    "CONFIRM_TAG_LEN",
    "DTLS_EXPORTER_LABEL",
    "LABEL_PREFIX",
    "QKD_CHECK_LEN",
    "EpochKeys",
    "KeySchedule",
    "SRTPKeyMaterial",
    "SRTPProfile",
    "Transcript",
    "expand_label",
    "format_sas",
    "rekey_nack_tag",
    "transcript_hash",
]

#: Prefix of every HKDF-Expand-Label label (``docs/key-schedule.md`` §3).
LABEL_PREFIX = b"qcall1 "

#: RFC 5705 exporter label whose output the shell passes as ``K_dtls`` (RFC 5764 §4.2).
DTLS_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"

#: Length of a key-confirmation tag (HMAC-SHA-384).
CONFIRM_TAG_LEN = pqc.HASH_LEN

#: Length of a QKD check value.
QKD_CHECK_LEN = 16

#: Bounds on the inputs (bytes).
MAX_QKD_KEY_LEN = 1024
KEM_SECRET_LEN = 32
DTLS_EXPORTER_MIN = 32
DTLS_EXPORTER_MAX = 255


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
    sas: str
    secret: bytes = field(default=b"")  # S_n, kept for the vectors and the ratchet

    def __repr__(self) -> str:
        return (
            f"<EpochKeys epoch={self.epoch} {self.profile.value} "
            f"c2s=#{self.caller_to_callee.fingerprint()} "
            f"s2c=#{self.callee_to_caller.fingerprint()} sas={self.sas}>"
        )


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


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
    """HKDF-Expand-Label (RFC 8446 §7.1) with SHA-384 and the ``"qcall1 "`` prefix.

    ``info = u16(length) ‖ u8(len(L)) ‖ L ‖ u8(len(context)) ‖ context`` where
    ``L = "qcall1 " ‖ label``.
    """
    return pqc.hkdf_expand(secret, _label_info(label, context, length), length)


def format_sas(value: bytes) -> str:
    """Six decimal digits, ``"123 456"``: big-endian ``value`` modulo 10⁶."""
    n = int.from_bytes(value, "big") % 1_000_000
    digits = f"{n:06d}"
    return f"{digits[:3]} {digits[3:]}"


def _derive_epoch(
    epoch: int, profile: SRTPProfile, secret: bytes, th: bytes, k_qkd: bytes
) -> EpochKeys:
    s = _Expander(secret)

    def material(direction: bytes) -> SRTPKeyMaterial:
        return SRTPKeyMaterial(
            key=s.label(direction + b" srtp key", th, profile.key_len),
            salt=s.label(direction + b" srtp salt", th, profile.salt_len),
        )

    caller_fk = s.label(b"caller finished", b"", pqc.HASH_LEN)
    callee_fk = s.label(b"callee finished", b"", pqc.HASH_LEN)
    if k_qkd:
        q = _Expander(pqc.hkdf_extract(th, k_qkd))
        caller_q = q.label(b"qkd check caller", th, QKD_CHECK_LEN)
        callee_q = q.label(b"qkd check callee", th, QKD_CHECK_LEN)
    else:
        caller_q = callee_q = b""
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
        sas=format_sas(s.label(b"sas", th, 8)),
        secret=secret,
    )


#: Domain of the hash a REKEY_NACK tag covers (``docs/handshake.md`` §3.7).
REKEY_NACK_DOMAIN = b"qcall-v1 rekey nack"


def rekey_nack_tag(keys: EpochKeys, rekey: bytes, nack: bytes) -> bytes:
    """The tag of a REKEY_NACK sent during epoch ``keys.epoch`` (``docs/key-schedule.md`` §5).

    ``tag = HMAC-SHA-384(Expand-Label(S_n, "rekey nack", "", 48),
    TH("qcall-v1 rekey nack", TH_n, REKEY, NACK⁻))`` where ``NACK⁻`` is the
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


class KeySchedule:
    """The hybrid key schedule of one call (``docs/key-schedule.md``).

    Args:
        profile: SRTP profile negotiated in the answer.
        transcript_hash: ``TH_0``, the hash of the signed offer and answer.
        k_qkd: the QKD key(s), concatenated in key_ID order; ``b""`` for policy ``pqc``.
        k_kem: the 32-byte ML-KEM shared secret (FIPS 203 §7.2/7.3).
        k_dtls: RFC 5705 exporter output, label ``EXTRACTOR-dtls_srtp``,
            32..255 bytes (aiortc computes 2·(key+salt) of the DTLS profile).

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
    ) -> None:
        _check("transcript_hash", transcript_hash, pqc.HASH_LEN, pqc.HASH_LEN)
        _check("k_qkd", k_qkd, 0, MAX_QKD_KEY_LEN)
        _check("k_kem", k_kem, KEM_SECRET_LEN, KEM_SECRET_LEN)
        _check("k_dtls", k_dtls, DTLS_EXPORTER_MIN, DTLS_EXPORTER_MAX)
        self.profile = profile
        secret = pqc.hkdf_extract(bytes(transcript_hash), bytes(k_qkd + k_kem + k_dtls))
        self.current = _derive_epoch(0, profile, secret, bytes(transcript_hash), bytes(k_qkd))

    @property
    def epoch(self) -> int:
        """The current epoch number (0 after the handshake)."""
        return self.current.epoch

    def ratchet(self, transcript_hash: bytes, k_qkd: bytes = b"", k_kem: bytes = b"") -> EpochKeys:
        """Move to the next epoch, mixing in a fresh QKD key and/or ML-KEM secret.

        ``S_n+1 = HKDF-Extract(salt = S_n, IKM = K_qkd_new ‖ K_kem_new)``. The
        previous epoch secret is dropped (best effort: Python cannot wipe bytes).

        Args:
            transcript_hash: ``TH_n+1`` over ``TH_n`` and the rekey messages.
            k_qkd: fresh QKD key bytes, or ``b""``.
            k_kem: fresh 32-byte ML-KEM shared secret, or ``b""``.

        Returns:
            The new epoch's keys (also stored as :attr:`current`).
        """
        _check("transcript_hash", transcript_hash, pqc.HASH_LEN, pqc.HASH_LEN)
        _check("k_qkd", k_qkd, 0, MAX_QKD_KEY_LEN)
        if len(k_kem) not in (0, KEM_SECRET_LEN):
            raise ValueError(f"k_kem must be 0 or {KEM_SECRET_LEN} bytes, got {len(k_kem)}")
        secret = pqc.hkdf_extract(self.current.secret, bytes(k_qkd + k_kem))
        self.current = _derive_epoch(
            self.current.epoch + 1, self.profile, secret, bytes(transcript_hash), bytes(k_qkd)
        )
        return self.current

    def __repr__(self) -> str:
        return f"<KeySchedule epoch={self.epoch} {self.profile.value}>"
