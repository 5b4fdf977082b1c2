"""Wire formats of 1:1 messages: prekey messages and ratchet messages (``docs/messaging.md`` §7).

Frozen dataclasses with ``parse()``/``serialize()``, checked in
``__post_init__``; parsers treat input as hostile and raise only
:class:`~qcall.exceptions.MessageFormatError`, naming the field. Every message
starts with ``u8 version ‖ u8 type``::

    type 1  PrekeyMessage   the first messages of a session (set-up + a ratchet message)
    type 2  RatchetMessage  every later message
    type 3  GroupMessage    (qcall.messaging.group)
    type 4  FileChunk       (qcall.messaging.files)
    type 5  RatchetMessage  short: without the epoch's ek/ct (``compact``, §7.4)
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from qcall import pqc
from qcall.exceptions import MessageFormatError
from qcall.messaging.keyschedule import SESSION_ID_LEN
from qcall.messaging.prekeys import check_name, parse_identity_key
from qcall.messaging.wire import Reader, Writer
from qcall.qkd.etsi014 import validate_key_id, validate_sae_id

__all__ = [
    "MAX_CIPHERTEXT",
    "VERSION",
    "MessageType",
    "Mode",
    "PrekeyMessage",
    "QKDRef",
    "RatchetMessage",
    "identity_hash",
    "message_type",
    "ratchet_header",
]

#: Protocol version octet of every message.
VERSION = 1
#: Largest AEAD ciphertext of a 1:1 or group message (padded content + tag).
MAX_CIPHERTEXT = 128 * 1024
#: Largest QKD key mixed into a session, in bytes.
MAX_QKD_KEY = 1024

_KEM = pqc.KEM.ML_KEM_768
_ABSENT = b"\0\0\0\0"  # an absent QKDRef
#: version, type, session_id, epoch, generation, index, prev_generation, prev_length.
_RATCHET_FIXED = struct.Struct(f">BB{SESSION_ID_LEN}s5I")
_U32 = struct.Struct(">I")
_SHORT_QKD = _RATCHET_FIXED.size  # where a short message's generation_qkd starts
_SHORT_CT = _SHORT_QKD + len(_ABSENT)  # its var32 ciphertext, when generation_qkd is absent
_EK_LEN = _KEM.sizes.encapsulation_key
_CT_LEN = _KEM.sizes.ciphertext
_MAX_PK = max(s.sizes.public_key for s in pqc.SignatureScheme)
_MAX_SIG = max(s.sizes.signature for s in pqc.SignatureScheme)


class MessageType(enum.IntEnum):
    """The ``type`` octet."""

    PREKEY = 1
    RATCHET = 2
    GROUP = 3
    FILE_CHUNK = 4
    RATCHET_SHORT = 5


_TYPES: dict[int, MessageType] = {t.value: t for t in MessageType}


class Mode(enum.Enum):
    """How a session's root key was made, recorded and shown (never silent)."""

    HYBRID = "hybrid"  # QKD key + ML-KEM
    PQC = "pqc"  # ML-KEM only: no QKD key source was configured

    @property
    def octet(self) -> int:
        return 1 if self is Mode.HYBRID else 2

    @classmethod
    def from_octet(cls, value: int) -> Mode:
        return cls.HYBRID if value == 1 else cls.PQC


def message_type(data: bytes) -> MessageType:
    """The type of a message, after checking its version octet."""
    if len(data) < 2:
        raise MessageFormatError("message: shorter than its 2-byte header")
    if data[0] != VERSION:
        raise MessageFormatError(f"message: unsupported version {data[0]}")
    kind = _TYPES.get(data[1])  # (a dict, not MessageType(): this runs 3 times a message)
    if kind is None:
        raise MessageFormatError(f"message: unknown type {data[1]}")
    return kind


def identity_hash(public_key: bytes) -> bytes:
    """SHA-256 of an identity public key (32 bytes): how formats name an identity."""
    return hashlib.sha256(public_key).digest()


@dataclass(frozen=True)
class QKDRef:
    """Where a QKD key comes from: the SAE that asked ``enc_keys``, the key_ID, the size.

    The receiver asks its KME for ``dec_keys`` with ``key_id`` on behalf of
    master SAE ``sae_id`` (ETSI GS QKD 014 §5.3). Encoding::

        QKDRef := var8 sae_id ‖ var8 key_id ‖ u16 size      (absent: 00 00 00 00)
    """

    sae_id: str
    key_id: str
    size: int

    def __post_init__(self) -> None:
        try:
            validate_sae_id(self.sae_id, "field 'sae_id'")
            validate_key_id(self.key_id, "field 'key_id'", canonical=False)
        except ValueError as exc:
            raise MessageFormatError(f"QKD reference: {exc}") from None
        if not 1 <= self.size <= MAX_QKD_KEY:
            raise MessageFormatError(f"QKD reference: field 'size' must be 1..{MAX_QKD_KEY}")

    def serialize(self) -> bytes:
        w = Writer().var8(self.sae_id.encode("ascii")).var8(self.key_id.encode("ascii"))
        return w.u16(self.size).bytes()

    @staticmethod
    def encode(ref: QKDRef | None) -> bytes:
        """The encoding of ``ref``, or of an absent reference."""
        return ref.serialize() if ref is not None else b"\0\0\0\0"

    @classmethod
    def read(cls, r: Reader, field: str) -> QKDRef | None:
        if r.skip(_ABSENT):  # the common case: no reference
            return None
        sae = r.var8(field + ".sae_id")
        key_id = r.var8(field + ".key_id")
        size = r.u16(field + ".size")
        if not sae and not key_id and not size:
            return None
        try:
            return cls(sae.decode("ascii"), key_id.decode("ascii"), size)
        except UnicodeDecodeError:
            raise r.error(field, "is not ASCII") from None
        except MessageFormatError as exc:
            raise MessageFormatError(f"{r.what}: {field}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.key_id} ({self.size} bytes from {self.sae_id})"


def ratchet_header(
    session_id: bytes,
    epoch: int,
    generation: int,
    index: int,
    prev_generation: int,
    prev_length: int,
    generation_qkd: QKDRef | None,
    full: tuple[bytes, bytes, QKDRef | None] | None,
) -> bytes:
    """The header (AEAD associated data) of a ratchet message: short (type 5) if ``full``
    is ``None``, else full (type 2) with ``(ratchet_key, kem_ciphertext, epoch_qkd)``."""
    kind = MessageType.RATCHET_SHORT if full is None else MessageType.RATCHET
    fixed = _RATCHET_FIXED.pack(
        VERSION, kind, session_id, epoch, generation, index, prev_generation, prev_length
    )
    if full is None:
        return fixed + QKDRef.encode(generation_qkd)
    ek, ct, epoch_qkd = full
    w = Writer().raw(fixed).var16(ek).var16(ct).raw(QKDRef.encode(epoch_qkd))
    return w.raw(QKDRef.encode(generation_qkd)).bytes()


@dataclass(frozen=True)
class RatchetMessage:
    """One message of an established session (``docs/messaging.md`` §7.2, §7.4).

    The header (everything before ``ciphertext``) is the AEAD's associated data.
    A ``compact`` message (type 5) leaves out the epoch's ``ratchet_key``,
    ``kem_ciphertext`` and ``epoch_qkd`` (empty here): it opens only in an epoch the
    receiver has already opened from a full message (type 2).
    """

    session_id: bytes
    epoch: int
    generation: int
    index: int
    prev_generation: int
    prev_length: int
    ratchet_key: bytes  # the sender's ML-KEM-768 ek for this epoch
    kem_ciphertext: bytes  # encapsulation to the receiver's last ek (b"" in epoch 1)
    epoch_qkd: QKDRef | None
    generation_qkd: QKDRef | None
    ciphertext: bytes
    compact: bool = False

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_LEN:
            raise MessageFormatError("ratchet message: field 'session_id' must be 16 bytes")
        if self.epoch < 1:
            raise MessageFormatError("ratchet message: field 'epoch' must be at least 1")
        if self.compact:
            if self.ratchet_key or self.kem_ciphertext or self.epoch_qkd is not None:
                raise MessageFormatError(
                    "short ratchet message: it carries no ratchet_key, kem_ciphertext "
                    "or epoch_qkd"
                )
        elif len(self.ratchet_key) != _EK_LEN:
            raise MessageFormatError(
                f"ratchet message: field 'ratchet_key' must be {_EK_LEN} bytes"
            )
        elif len(self.kem_ciphertext) != (0 if self.epoch == 1 else _CT_LEN):
            raise MessageFormatError(
                "ratchet message: field 'kem_ciphertext' must be empty in epoch 1 and "
                f"{_CT_LEN} bytes after"
            )
        if (self.generation_qkd is None) != (self.generation == 0):
            raise MessageFormatError(
                "ratchet message: field 'generation_qkd' must be present iff generation > 0"
            )
        if self.epoch == 1 and self.epoch_qkd is not None:
            raise MessageFormatError("ratchet message: epoch 1 takes its QKD key at set-up")
        if not pqc.AEAD_TAG_LEN <= len(self.ciphertext) <= MAX_CIPHERTEXT:
            raise MessageFormatError(
                "ratchet message: field 'ciphertext' must be "
                f"{pqc.AEAD_TAG_LEN}..{MAX_CIPHERTEXT} bytes"
            )

    def header(self) -> bytes:
        """The authenticated header: the AEAD associated data.

        Computed once per object (a parsed message keeps the bytes it was parsed from:
        the encoding is canonical, so they are the same bytes).
        """
        cached: bytes | None = self.__dict__.get("_header")
        if cached is not None:
            return cached
        numbers = (self.epoch, self.generation, self.index, self.prev_generation)
        header = ratchet_header(
            self.session_id, *numbers, self.prev_length, self.generation_qkd,
            None if self.compact else (self.ratchet_key, self.kem_ciphertext, self.epoch_qkd),
        )  # fmt: skip
        object.__setattr__(self, "_header", header)  # a cache, not a field (frozen)
        return header

    def serialize(self) -> bytes:
        return self.encode(self.header(), self.ciphertext)

    @staticmethod
    def encode(header: bytes, ciphertext: bytes) -> bytes:
        """``header ‖ var32 ciphertext``: the wire bytes of a message with this header."""
        return header + _U32.pack(len(ciphertext)) + ciphertext

    @classmethod
    def parse(cls, data: bytes) -> RatchetMessage:
        """Parse one ratchet message, full or short (hostile input: only
        MessageFormatError escapes)."""
        kind = message_type(data)
        if kind is not MessageType.RATCHET and kind is not MessageType.RATCHET_SHORT:
            raise MessageFormatError("ratchet message: wrong type octet")
        compact = kind is MessageType.RATCHET_SHORT
        if compact and data[_SHORT_QKD:_SHORT_CT] == _ABSENT and len(data) >= _SHORT_CT + 4:
            # The common short message (no generation_qkd), in one step: the same checks
            # and result as the general path below, which handles everything else.
            (n,) = _U32.unpack_from(data, _SHORT_CT)
            if n <= MAX_CIPHERTEXT and len(data) == _SHORT_CT + 4 + n:
                _, _, sid, n_, g, i, pg, pl = _RATCHET_FIXED.unpack_from(data)
                ct = bytes(data[_SHORT_CT + 4 :])
                header = bytes(data[:_SHORT_CT])
                if n_ >= 1 and g == 0 and n >= pqc.AEAD_TAG_LEN:
                    # What __post_init__ checks and this layout does not already ensure
                    # (a 16-byte session_id, no ek/ct/epoch_qkd, n <= MAX_CIPHERTEXT), so
                    # the object is built without the frozen dataclass's __init__ (same
                    # fields; otherwise the constructor below raises its error).
                    out = object.__new__(cls)
                    out.__dict__.update(
                        session_id=sid, epoch=n_, generation=g, index=i, prev_generation=pg,
                        prev_length=pl, ratchet_key=b"", kem_ciphertext=b"", epoch_qkd=None,
                        generation_qkd=None, ciphertext=ct, compact=True, _header=header,
                    )  # fmt: skip
                    return out
                out = cls(sid, n_, g, i, pg, pl, b"", b"", None, None, ct, compact=True)
                object.__setattr__(out, "_header", header)
                return out
        r = Reader(data, "short ratchet message" if compact else "ratchet message")
        _, _, sid, *numbers = r.unpack(_RATCHET_FIXED, "session_id…prev_length")
        ek = ct = b""
        epoch_qkd = None
        if not compact:
            ek, ct = r.var16("ratchet_key", _EK_LEN), r.var16("kem_ciphertext", _CT_LEN)
            epoch_qkd = QKDRef.read(r, "epoch_qkd")
        out = cls(
            session_id=sid,
            epoch=numbers[0],
            generation=numbers[1],
            index=numbers[2],
            prev_generation=numbers[3],
            prev_length=numbers[4],
            ratchet_key=ek,
            kem_ciphertext=ct,
            epoch_qkd=epoch_qkd,
            generation_qkd=QKDRef.read(r, "generation_qkd"),
            ciphertext=r.var32("ciphertext", MAX_CIPHERTEXT),
            compact=compact,
        )
        r.end()
        object.__setattr__(out, "_header", bytes(data[: len(data) - 4 - len(out.ciphertext)]))
        return out

    @property
    def chain(self) -> tuple[int, int]:
        return self.epoch, self.generation

    def __repr__(self) -> str:
        return (
            f"<RatchetMessage{' short' if self.compact else ''} {self.session_id.hex()[:8]} "
            f"epoch={self.epoch} "
            f"gen={self.generation} #{self.index} {len(self.ciphertext)} bytes>"
        )


@dataclass(frozen=True)
class PrekeyMessage:
    """The set-up header of a session, wrapping its sender's next ratchet message.

    The initiator sends every message as a prekey message until the responder's
    first reply arrives (``docs/messaging.md`` §3, §7.1).
    """

    sender: str
    recipient: str
    sender_identity: bytes
    recipient_identity_hash: bytes
    mode: Mode
    signed_prekey_id: int
    signed_prekey_ciphertext: bytes
    one_time_prekey_id: int  # 0: none was available
    one_time_prekey_ciphertext: bytes
    qkd: QKDRef | None
    time_ms: int
    signature: bytes
    inner: bytes  # the serialized RatchetMessage

    def __post_init__(self) -> None:
        check_name(self.sender, "prekey message: field 'sender'")
        check_name(self.recipient, "prekey message: field 'recipient'")
        parse_identity_key(self.sender_identity, "prekey message: field 'sender_identity'")
        if len(self.recipient_identity_hash) != 32:
            raise MessageFormatError(
                "prekey message: field 'recipient_identity_hash' must be 32 bytes"
            )
        if self.signed_prekey_id < 1 or len(self.signed_prekey_ciphertext) != _CT_LEN:
            raise MessageFormatError("prekey message: bad signed prekey id or ciphertext")
        want = 0 if self.one_time_prekey_id == 0 else _CT_LEN
        if len(self.one_time_prekey_ciphertext) != want:
            raise MessageFormatError(
                "prekey message: field 'one_time_prekey_ciphertext' must be empty iff "
                "one_time_prekey_id is 0"
            )
        if (self.qkd is not None) != (self.mode is Mode.HYBRID):
            raise MessageFormatError(
                "prekey message: mode 'hybrid' needs a QKD reference, mode 'pqc' none"
            )

    def signed_part(self) -> bytes:
        """Everything the signature covers (the encoding up to ``signature``)."""
        w = Writer().u8(VERSION).u8(MessageType.PREKEY)
        w.text8(self.sender).text8(self.recipient).var16(self.sender_identity)
        w.raw(self.recipient_identity_hash).u8(self.mode.octet)
        w.u32(self.signed_prekey_id).var16(self.signed_prekey_ciphertext)
        w.u32(self.one_time_prekey_id).var16(self.one_time_prekey_ciphertext)
        w.raw(QKDRef.encode(self.qkd)).u64(self.time_ms)
        return w.bytes()

    def serialize(self) -> bytes:
        return self.signed_part() + Writer().var16(self.signature).var32(self.inner).bytes()

    @classmethod
    def parse(cls, data: bytes) -> PrekeyMessage:
        """Parse one prekey message (hostile input: only MessageFormatError escapes)."""
        if message_type(data) is not MessageType.PREKEY:
            raise MessageFormatError("prekey message: wrong type octet")
        r = Reader(data, "prekey message")
        r.raw(2, "version")
        sender = r.text8("sender")
        recipient = r.text8("recipient")
        sender_identity = r.var16("sender_identity", _MAX_PK)
        recipient_hash = r.raw(32, "recipient_identity_hash")
        mode = Mode.from_octet(r.choice("mode", [1, 2]))
        spk_id = r.u32("signed_prekey_id")
        spk_ct = r.var16("signed_prekey_ciphertext", _CT_LEN)
        opk_id = r.u32("one_time_prekey_id")
        opk_ct = r.var16("one_time_prekey_ciphertext", _CT_LEN)
        qkd = QKDRef.read(r, "qkd")
        time_ms = r.u64("time_ms")
        signature = r.var16("signature", _MAX_SIG)
        inner = r.var32("inner", MAX_CIPHERTEXT + 4096)
        r.end()
        return cls(
            sender,
            recipient,
            sender_identity,
            recipient_hash,
            mode,
            spk_id,
            spk_ct,
            opk_id,
            opk_ct,
            qkd,
            time_ms,
            signature,
            inner,
        )

    def __repr__(self) -> str:
        return (
            f"<PrekeyMessage {self.sender}→{self.recipient} {self.mode.value} "
            f"spk=#{self.signed_prekey_id} otpk=#{self.one_time_prekey_id}>"
        )
