"""Wire format of the hybrid handshake messages (``docs/handshake.md`` §3).

Every message is a canonical TLV byte string::

    message = "QCHS" ‖ u8 version ‖ u8 type ‖ field*
    field   = u8 tag ‖ u16 length (big-endian) ‖ value

Each message type has a fixed list of fields, in a fixed order, each present
exactly once (possibly empty where documented) and within hard size limits;
nothing may follow the last field. The signature, in signed messages, is the
last field: the bytes before it are what the transcript hashes.

Parsers treat their input as hostile: :func:`parse_message` raises only
:class:`~qcall.exceptions.InvalidMessageError` (naming the field) or
:class:`~qcall.exceptions.UnsupportedVersionError`.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from qcall.exceptions import InvalidMessageError, UnsupportedVersionError

__all__ = [
    "MAGIC",
    "MAX_MESSAGE_SIZE",
    "VERSION",
    "Answer",
    "Confirm",
    "Error",
    "Field",
    "Message",
    "MessageType",
    "Offer",
    "Rekey",
    "RekeyAck",
    "RekeyNack",
    "parse_message",
]

MAGIC = b"QCHS"
VERSION = 2
#: No message may be longer than this (bytes).
MAX_MESSAGE_SIZE = 65_535
_HEADER_LEN = len(MAGIC) + 2

POLICIES = ("hybrid", "pqc", "otp")
#: Policies whose offer carries QKD keys (``docs/handshake.md`` §3.2): ``otp`` is
#: ``hybrid`` for the handshake keys, plus one-time-pad media (``docs/otp.md``).
QKD_POLICIES = ("hybrid", "otp")
SRTP_PROFILES = ("AEAD_AES_256_GCM", "AES128_CM_HMAC_SHA1_80")
KEM_ALGORITHMS = {"ML-KEM-768": (1184, 1088), "ML-KEM-1024": (1568, 1568)}
SIG_ALGORITHMS = {"ML-DSA-44": (1312, 2420), "ML-DSA-65": (1952, 3309), "ML-DSA-87": (2592, 4627)}
MAX_KEY_IDS = 8

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
_ID = re.compile(r"[\x21-\x7e]{0,128}")  # KME / SAE identifiers: printable ASCII
_CODE = re.compile(r"[a-z_]{1,64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # C0 controls except \t \n \r


class MessageType(enum.IntEnum):
    """Message type octet (``docs/handshake.md`` §3.1)."""

    OFFER = 1
    ANSWER = 2
    CONFIRM = 3
    REKEY = 4
    REKEY_ACK = 5
    ERROR = 6
    REKEY_NACK = 7


@dataclass(frozen=True)
class Field:
    """Schema of one TLV field: tag, kind and size limits (bytes on the wire)."""

    tag: int
    kind: str  # bytes | text | u8 | u16 | u32 | u64 | list
    max_len: int = 0  # for bytes/text/list
    min_len: int = 0
    pattern: re.Pattern[str] | None = None  # text, or each list item
    choices: tuple[str, ...] = ()  # text, or each list item


_INT_SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
_INT_FORMATS = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}


def _encode(name: str, spec: Field, value: Any) -> bytes:
    if spec.kind in _INT_SIZES:
        raw = struct.pack(_INT_FORMATS[spec.kind], value)
    elif spec.kind == "bytes":
        raw = bytes(value)
    elif spec.kind == "text":
        raw = value.encode()
    else:  # list
        raw = ",".join(value).encode()
    if spec.kind not in _INT_SIZES and len(raw) > spec.max_len:
        raise InvalidMessageError(f"field {name!r} is too long ({len(raw)} > {spec.max_len} bytes)")
    return struct.pack(">BH", spec.tag, len(raw)) + raw


def _check_text(name: str, spec: Field, text: str) -> None:
    if spec.choices and text not in spec.choices:
        raise InvalidMessageError(f"field {name!r} has an unknown value {text[:40]!r}")
    if spec.pattern is not None and not spec.pattern.fullmatch(text):
        raise InvalidMessageError(f"field {name!r} has an invalid value")


def _decode(name: str, spec: Field, raw: bytes) -> Any:
    if spec.kind in _INT_SIZES:
        if len(raw) != _INT_SIZES[spec.kind]:
            raise InvalidMessageError(f"field {name!r} must be {_INT_SIZES[spec.kind]} bytes")
        return struct.unpack(_INT_FORMATS[spec.kind], raw)[0]
    if not spec.min_len <= len(raw) <= spec.max_len:
        raise InvalidMessageError(
            f"field {name!r} must be {spec.min_len}..{spec.max_len} bytes, got {len(raw)}"
        )
    if spec.kind == "bytes":
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessageError(f"field {name!r} is not valid UTF-8") from None
    if spec.kind == "text":
        if spec.pattern is None and _CONTROL.search(text):  # one C scan, not a Python loop
            raise InvalidMessageError(f"field {name!r} contains control characters")
        _check_text(name, spec, text)
        return text
    items = tuple(text.split(",")) if text else ()
    if len(items) > MAX_KEY_IDS:
        raise InvalidMessageError(f"field {name!r} has more than {MAX_KEY_IDS} items")
    if len(set(items)) != len(items):
        raise InvalidMessageError(f"field {name!r} has duplicate items")
    for item in items:
        _check_text(name, spec, item)
    return items


class Message:
    """Base of the handshake messages: schema-driven, canonical encoding."""

    TYPE: ClassVar[MessageType]
    SCHEMA: ClassVar[dict[str, Field]]
    SIGNED: ClassVar[bool] = False

    def _encode_fields(self, *, with_signature: bool = True) -> bytes:
        out = bytearray(MAGIC)
        out += bytes([VERSION, self.TYPE])
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "signature" and not with_signature:
                continue
            out += _encode(f.name, self.SCHEMA[f.name], getattr(self, f.name))
        return bytes(out)

    def serialize(self) -> bytes:
        """Return the wire encoding.

        Raises:
            InvalidMessageError: the message is larger than :data:`MAX_MESSAGE_SIZE`.
        """
        data = self._encode_fields()
        if len(data) > MAX_MESSAGE_SIZE:
            raise InvalidMessageError(f"message is too long ({len(data)} bytes)")
        return data

    def with_signature(self, signed_part: bytes, signature: bytes) -> bytes:
        """Append the signature field to :meth:`signed_part` output: the wire encoding."""
        data = signed_part + _encode("signature", self.SCHEMA["signature"], signature)
        if len(data) > MAX_MESSAGE_SIZE:
            raise InvalidMessageError(f"message is too long ({len(data)} bytes)")
        return data

    def signed_part(self) -> bytes:
        """The bytes covered by the transcript hash (the encoding minus the signature)."""
        return self._encode_fields(with_signature=False)

    def validate(self) -> None:
        """Check cross-field rules; raise :class:`InvalidMessageError` naming the field."""


def _text(max_len: int, **kw: Any) -> Field:
    return Field(0, "text", max_len=max_len, **kw)


def _schema(**specs: Field) -> dict[str, Field]:
    """Number the fields 1, 2, … in declaration order."""
    return {
        name: Field(i, s.kind, s.max_len, s.min_len, s.pattern, s.choices)
        for i, (name, s) in enumerate(specs.items(), start=1)
    }


_NONCE = Field(0, "bytes", max_len=32, min_len=32)
_SIGNATURE = Field(0, "bytes", max_len=4627, min_len=1)
_PUBLIC_KEY = Field(0, "bytes", max_len=2592, min_len=1)
_POLICY = _text(8, min_len=1, choices=POLICIES)
_SIG_ALG = _text(16, min_len=1, choices=tuple(SIG_ALGORITHMS))
_NAME_FIELD = _text(64, min_len=1, pattern=_NAME)
_SDP = _text(32_768)
_KEY_IDS = Field(0, "list", max_len=MAX_KEY_IDS * 37, pattern=_UUID)


def _check_signer(msg: Any) -> None:
    pk_len, sig_len = SIG_ALGORITHMS[msg.sig_alg]
    if len(msg.public_key) != pk_len:
        raise InvalidMessageError(f"field 'public_key' must be {pk_len} bytes for {msg.sig_alg}")
    if len(msg.signature) != sig_len:
        raise InvalidMessageError(f"field 'signature' must be {sig_len} bytes for {msg.sig_alg}")


@dataclass(frozen=True)
class Offer(Message):
    """The caller's offer (``docs/handshake.md`` §3.2)."""

    policy: str
    timestamp_ms: int
    nonce: bytes
    sas_commit: bytes  # commitment to the caller's SAS nonce (docs/key-schedule.md §4.2)
    sender: str
    recipient: str
    sig_alg: str
    public_key: bytes
    kem_alg: str
    kem_ek: bytes
    srtp_profiles: tuple[str, ...]
    kme_id: str
    master_sae_id: str
    slave_sae_id: str
    qkd_key_ids: tuple[str, ...]
    qkd_key_size: int
    sdp: str
    signature: bytes

    TYPE = MessageType.OFFER
    SIGNED = True
    SCHEMA = _schema(
        policy=_POLICY,
        timestamp_ms=Field(0, "u64"),
        nonce=_NONCE,
        sas_commit=Field(0, "bytes", max_len=48, min_len=48),
        sender=_NAME_FIELD,
        recipient=_NAME_FIELD,
        sig_alg=_SIG_ALG,
        public_key=_PUBLIC_KEY,
        kem_alg=_text(16, min_len=1, choices=tuple(KEM_ALGORITHMS)),
        kem_ek=Field(0, "bytes", max_len=1568, min_len=1),
        srtp_profiles=Field(0, "list", max_len=64, min_len=1, choices=SRTP_PROFILES),
        kme_id=_text(128, pattern=_ID),
        master_sae_id=_text(128, pattern=_ID),
        slave_sae_id=_text(128, pattern=_ID),
        qkd_key_ids=_KEY_IDS,
        qkd_key_size=Field(0, "u16"),
        sdp=_SDP,
        signature=_SIGNATURE,
    )

    def validate(self) -> None:
        _check_signer(self)
        ek_len = KEM_ALGORITHMS[self.kem_alg][0]
        if len(self.kem_ek) != ek_len:
            raise InvalidMessageError(f"field 'kem_ek' must be {ek_len} bytes for {self.kem_alg}")
        if self.policy in QKD_POLICIES:
            if not self.qkd_key_ids:
                raise InvalidMessageError("field 'qkd_key_ids' is empty in a hybrid offer")
            if not 16 <= self.qkd_key_size <= 1024:
                raise InvalidMessageError("field 'qkd_key_size' must be 16..1024 in hybrid")
            for name in ("kme_id", "master_sae_id", "slave_sae_id"):
                if not getattr(self, name):
                    raise InvalidMessageError(f"field {name!r} is empty in a hybrid offer")
        elif self.qkd_key_ids or self.qkd_key_size:
            raise InvalidMessageError("field 'qkd_key_ids' must be empty with policy pqc")


@dataclass(frozen=True)
class Answer(Message):
    """The callee's answer (``docs/handshake.md`` §3.3)."""

    policy: str
    timestamp_ms: int
    nonce: bytes
    offer_nonce: bytes
    sender: str
    sig_alg: str
    public_key: bytes
    kem_ct: bytes
    srtp_profile: str
    sdp: str
    signature: bytes

    TYPE = MessageType.ANSWER
    SIGNED = True
    SCHEMA = _schema(
        policy=_POLICY,
        timestamp_ms=Field(0, "u64"),
        nonce=_NONCE,
        offer_nonce=_NONCE,
        sender=_NAME_FIELD,
        sig_alg=_SIG_ALG,
        public_key=_PUBLIC_KEY,
        kem_ct=Field(0, "bytes", max_len=1568, min_len=1),
        srtp_profile=_text(32, min_len=1, choices=SRTP_PROFILES),
        sdp=_SDP,
        signature=_SIGNATURE,
    )

    def validate(self) -> None:
        _check_signer(self)


@dataclass(frozen=True)
class Confirm(Message):
    """Key confirmation for one epoch (``docs/handshake.md`` §3.4)."""

    epoch: int
    role: int  # 1 caller, 2 callee
    tag: bytes
    qkd_check: bytes
    transcript_check: bytes
    sas_reveal: bytes  # the caller's SAS nonce, in its epoch-0 CONFIRM only

    TYPE = MessageType.CONFIRM
    SCHEMA = _schema(
        epoch=Field(0, "u32"),
        role=Field(0, "u8"),
        tag=Field(0, "bytes", max_len=48, min_len=48),
        qkd_check=Field(0, "bytes", max_len=16),
        transcript_check=Field(0, "bytes", max_len=16, min_len=16),
        sas_reveal=Field(0, "bytes", max_len=32),
    )

    def validate(self) -> None:
        if self.role not in (1, 2):
            raise InvalidMessageError("field 'role' must be 1 (caller) or 2 (callee)")
        if len(self.qkd_check) not in (0, 16):
            raise InvalidMessageError("field 'qkd_check' must be 0 or 16 bytes")
        reveal = 32 if (self.role, self.epoch) == (1, 0) else 0
        if len(self.sas_reveal) != reveal:
            raise InvalidMessageError(
                f"field 'sas_reveal' must be {reveal} bytes in a "
                f"{'caller' if self.role == 1 else 'callee'} CONFIRM for epoch {self.epoch}"
            )


@dataclass(frozen=True)
class Rekey(Message):
    """The caller's request to ratchet into a new epoch (``docs/handshake.md`` §3.5)."""

    epoch: int
    qkd_key_ids: tuple[str, ...]
    qkd_key_size: int
    kem_ek: bytes  # b"" when no fresh ML-KEM exchange

    TYPE = MessageType.REKEY
    SCHEMA = _schema(
        epoch=Field(0, "u32"),
        qkd_key_ids=_KEY_IDS,
        qkd_key_size=Field(0, "u16"),
        kem_ek=Field(0, "bytes", max_len=1568),
    )

    def validate(self) -> None:
        if self.epoch < 1:
            raise InvalidMessageError("field 'epoch' must be at least 1")
        if bool(self.qkd_key_ids) != bool(self.qkd_key_size):
            raise InvalidMessageError("field 'qkd_key_size' does not match 'qkd_key_ids'")
        if self.qkd_key_ids and not 16 <= self.qkd_key_size <= 1024:
            raise InvalidMessageError("field 'qkd_key_size' must be 16..1024")


@dataclass(frozen=True)
class RekeyAck(Message):
    """The callee's reply to :class:`Rekey` (``docs/handshake.md`` §3.5)."""

    epoch: int
    kem_ct: bytes  # b"" when the rekey carried no encapsulation key

    TYPE = MessageType.REKEY_ACK
    SCHEMA = _schema(epoch=Field(0, "u32"), kem_ct=Field(0, "bytes", max_len=1568))


@dataclass(frozen=True)
class RekeyNack(Message):
    """The callee cannot take the rekey now (its KME is down or has no key): retry later.

    ``tag`` is an HMAC under the *current* epoch's secret over the refused REKEY
    and this message (``docs/handshake.md`` §3.7): only the peer can send it, and
    all it can do is postpone a rekey, within the caller's grace period.
    """

    epoch: int  # the epoch the refused REKEY would have created
    code: str  # why, as a wire code (``qkd_unavailable``)
    tag: bytes

    TYPE = MessageType.REKEY_NACK
    SCHEMA = _schema(
        epoch=Field(0, "u32"),
        code=_text(64, min_len=1, pattern=_CODE),
        tag=Field(0, "bytes", max_len=48, min_len=48),
    )

    def validate(self) -> None:
        if self.epoch < 1:
            raise InvalidMessageError("field 'epoch' must be at least 1")

    def mac_part(self) -> bytes:
        """The bytes the ``tag`` covers: the encoding without the ``tag`` field."""
        data = self.serialize()
        return data[: len(data) - 3 - len(self.tag)]


@dataclass(frozen=True)
class Error(Message):
    """A failure notice: only a short code, never details (``docs/handshake.md`` §3.6)."""

    code: str

    TYPE = MessageType.ERROR
    SCHEMA = _schema(code=_text(64, min_len=1, pattern=_CODE))


_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Offer, Answer, Confirm, Rekey, RekeyAck, Error, RekeyNack)
}
for _cls in _CLASSES.values():  # the encoder walks dataclass fields, the parser the schema
    assert [f.name for f in fields(_cls)] == list(_cls.SCHEMA), _cls  # type: ignore[arg-type]


def parse_message(data: bytes) -> Message:
    """Parse one handshake message.

    Args:
        data: the bytes received (hostile input).

    Returns:
        An :class:`Offer`, :class:`Answer`, :class:`Confirm`, :class:`Rekey`,
        :class:`RekeyAck`, :class:`Error` or :class:`RekeyNack`.

    Raises:
        InvalidMessageError: malformed, oversized, or a field is invalid (named).
        UnsupportedVersionError: the version octet is not :data:`VERSION`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidMessageError(f"message must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_MESSAGE_SIZE:
        raise InvalidMessageError(f"message is too long ({len(data)} bytes)")
    if len(data) < _HEADER_LEN or data[: len(MAGIC)] != MAGIC:
        raise InvalidMessageError("not a qcall handshake message (bad magic)")
    if data[4] != VERSION:
        raise UnsupportedVersionError(
            f"handshake version {data[4]} is not supported (want {VERSION})"
        )
    try:
        cls = _CLASSES[MessageType(data[5])]
    except ValueError:
        raise InvalidMessageError(f"unknown message type {data[5]}") from None
    values: dict[str, Any] = {}
    pos = _HEADER_LEN
    for name, spec in cls.SCHEMA.items():
        if pos + 3 > len(data):
            raise InvalidMessageError(f"field {name!r} is missing (message truncated)")
        tag, length = struct.unpack_from(">BH", data, pos)
        if tag != spec.tag:
            raise InvalidMessageError(f"expected field {name!r} (tag {spec.tag}), got tag {tag}")
        pos += 3
        if pos + length > len(data):
            raise InvalidMessageError(f"field {name!r} is truncated")
        values[name] = _decode(name, spec, data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise InvalidMessageError(f"{len(data) - pos} trailing bytes after the last field")
    message = cls(**values)
    message.validate()
    return message
