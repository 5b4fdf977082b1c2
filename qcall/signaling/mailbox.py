"""Mailbox and prekey frames of the signaling protocol (docs/messaging.md §12).

The signaling server stores end-to-end encrypted messages for their
recipients and hands out prekey bundles. These frames are JSON text frames on
the same WebSocket as the call messages (docs/signaling.md), with their own
``type`` names (``mail_*``, ``prekeys_*``), sent only after registration.

A client request carries ``id``, an integer of its choice (0 to 2⁵³); the
server's answer to it carries the same ``id``: the matching ``*_`` answer, or
``mail_error``. Answers may come in another order than the requests. The
server also pushes ``mail`` (a new envelope for an online recipient) and
``mail_waiting`` (envelopes wait that were not pushed: fetch them).

Byte strings are standard base64; names follow :func:`qcall.identity.validate_name`.
Every class checks itself; :func:`parse_mailbox_frame` turns anything
malformed into :class:`~qcall.exceptions.SignalingProtocolError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from qcall.exceptions import SignalingProtocolError
from qcall.signaling.fields import b64, b64decode, check_int, check_name
from qcall.signaling.messages import Message

__all__ = [
    "MAILBOX_ERROR_CODES",
    "MAX_ACK_IDS",
    "MAX_FETCH",
    "MAX_MAILBOX_FRAME",
    "MAX_ONE_TIME_PREKEYS",
    "MailAck",
    "MailAcked",
    "MailBatch",
    "MailEnvelope",
    "MailError",
    "MailFetch",
    "MailFrame",
    "MailPush",
    "MailPut",
    "MailStored",
    "MailWaiting",
    "OneTimePrekey",
    "PrekeysBundle",
    "PrekeysClaim",
    "PrekeysCount",
    "PrekeysHeld",
    "PrekeysPublish",
    "is_mailbox_frame",
    "parse_mailbox_frame",
]

#: Largest mailbox frame a server reads from a registered client (a 1 MiB envelope
#: in base64 is 1.4 MB); call frames keep ``max_message_size``.
MAX_MAILBOX_FRAME = 2 * 1024 * 1024
#: Most envelopes in one ``mail_fetch`` answer (``limit``), and ids in one ``mail_ack``.
MAX_FETCH = 500
MAX_ACK_IDS = 1000
#: Most one-time prekeys in one ``prekeys_publish``.
MAX_ONE_TIME_PREKEYS = 200
_MAX_ID = 2**53
_MAX_BYTES = 1536 * 1024  # one envelope or key, decoded
_MAX_TEXT = 256

#: ``mail_error`` codes and their meaning.
MAILBOX_ERROR_CODES: dict[str, str] = {
    "bad_message": "malformed frame, unknown type, bad or missing field",
    "auth_required": "register first",
    "too_big": "the envelope is over the server's limit",
    "mailbox_full": "the recipient's mailbox holds too many messages or bytes",
    "too_many_prekeys": "the owner would hold more one-time prekeys than allowed",
    "wrong_identity": "the prekeys' identity key is not the registered one",
    "busy": "too many requests in flight on this connection",
    "store_error": "the server's store failed",
}

_TYPE_RE = re.compile(r'"type"\s*:\s*"(?:mail|prekeys_)')
_CODE_RE = re.compile(r"[a-z][a-z_]{0,31}")


def is_mailbox_frame(text: str | bytes) -> bool:
    """Whether a frame looks like a mailbox frame (``"type": "mail_…"/"prekeys_…"``).

    Cheap and conservative: a quote inside a JSON string is escaped, so the
    pattern only matches JSON structure. :func:`parse_mailbox_frame` decides.
    """
    return isinstance(text, str) and _TYPE_RE.search(text, 0, 200) is not None


# --- field checks -----------------------------------------------------------------------


def _int(name: str, value: object, low: int = 0, high: int = _MAX_ID) -> int:
    return check_int(name, value, low, high)


def _bytes(name: str, value: object, high: int = _MAX_BYTES) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = b64decode(name, value)
    else:
        raise ValueError(f"field {name!r} must be base64 text")
    if len(data) > high:
        raise ValueError(f"field {name!r} must be at most {high} bytes")
    return data




def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise ValueError(f"field {name!r} must be a string of at most {_MAX_TEXT} characters")
    return value


def _list(name: str, value: object, high: int) -> list[Any]:
    if not isinstance(value, list | tuple) or len(value) > high:
        raise ValueError(f"field {name!r} must be a list of at most {high} items")
    return list(value)




# --- frames -------------------------------------------------------------------------------

F = TypeVar("F", bound="MailFrame")


@dataclass(frozen=True)
class MailFrame(Message):
    """Base of the mailbox frames (:meth:`~Message.to_dict` and ``serialize`` as for
    every signaling message: ``None`` members left out, bytes as base64)."""

    @classmethod
    def from_dict(cls: type[F], obj: Mapping[str, Any]) -> F:
        """Build from a decoded JSON object; missing or bad members raise ValueError."""
        kwargs = {}
        for f in fields(cls):
            if f.name in obj:
                kwargs[f.name] = obj[f.name]
            elif f.default is f.default_factory:  # both MISSING: required
                raise ValueError(f"field {f.name!r} is missing")
        return cls(**kwargs)

    def __repr__(self) -> str:  # never the envelope bytes
        shown = {
            f.name: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v)
            for f in fields(self)
            if not isinstance(v := getattr(self, f.name), tuple)
        }
        return f"{type(self).__name__}({shown})"


def _to_json(obj: object) -> dict[str, Any]:
    out = {}
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        out[f.name] = b64(value) if isinstance(value, bytes) else value
    return out


def _setattr(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, repr=False)
class MailEnvelope:
    """One stored envelope: its server id, authenticated sender, receipt time (ms), bytes."""

    id: int
    sender: str
    time: int
    data: bytes

    def __post_init__(self) -> None:
        _int("id", self.id, 1)
        check_name("sender", self.sender)
        _int("time", self.time)
        _setattr(self, "data", _bytes("data", self.data))

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, value: object) -> MailEnvelope:
        if not isinstance(value, dict):
            raise ValueError("an envelope must be an object")
        return cls(value.get("id"), value.get("sender"), value.get("time"), value.get("data"))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<MailEnvelope #{self.id} from {self.sender} {len(self.data)} bytes>"


@dataclass(frozen=True, repr=False)
class OneTimePrekey:
    """A one-time prekey as published: its id and its signed bytes (§2.1)."""

    prekey_id: int
    data: bytes

    def __post_init__(self) -> None:
        _int("prekey_id", self.prekey_id, 1, 2**32 - 1)
        _setattr(self, "data", _bytes("data", self.data, 16 * 1024))

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, value: object) -> OneTimePrekey:
        if not isinstance(value, dict):
            raise ValueError("a one-time prekey must be an object")
        return cls(value.get("prekey_id"), value.get("data"))  # type: ignore[arg-type]


# client -> server


@dataclass(frozen=True, repr=False)
class PrekeysPublish(MailFrame):
    """Set our identity key and signed prekey; add one-time prekeys → ``prekeys_held``."""

    TYPE: ClassVar[str] = "prekeys_publish"
    id: int
    identity_key: bytes
    signed_prekey: bytes
    one_time_prekeys: tuple[OneTimePrekey, ...] = ()

    def __post_init__(self) -> None:
        _int("id", self.id)
        _setattr(self, "identity_key", _bytes("identity_key", self.identity_key, 4096))
        _setattr(self, "signed_prekey", _bytes("signed_prekey", self.signed_prekey, 16 * 1024))
        items = _list("one_time_prekeys", self.one_time_prekeys, MAX_ONE_TIME_PREKEYS)
        _setattr(
            self,
            "one_time_prekeys",
            tuple(p if isinstance(p, OneTimePrekey) else OneTimePrekey.from_json(p) for p in items),
        )


@dataclass(frozen=True, repr=False)
class PrekeysCount(MailFrame):
    """How many of our one-time prekeys the server holds → ``prekeys_held``."""

    TYPE: ClassVar[str] = "prekeys_count"
    id: int

    def __post_init__(self) -> None:
        _int("id", self.id)


@dataclass(frozen=True, repr=False)
class PrekeysClaim(MailFrame):
    """``owner``'s bundle, taking one of its one-time prekeys → ``prekeys_bundle``."""

    TYPE: ClassVar[str] = "prekeys_claim"
    id: int
    owner: str

    def __post_init__(self) -> None:
        _int("id", self.id)
        check_name("owner", self.owner)


@dataclass(frozen=True, repr=False)
class MailPut(MailFrame):
    """Store ``data`` for ``to`` → ``mail_stored`` once committed.

    ``ref`` (≤ 32 bytes) makes a resend idempotent: the same ``(sender, to, ref)``
    gets the same envelope id.
    """

    TYPE: ClassVar[str] = "mail_put"
    id: int
    to: str
    data: bytes
    ref: bytes | None = None

    def __post_init__(self) -> None:
        _int("id", self.id)
        check_name("to", self.to)
        _setattr(self, "data", _bytes("data", self.data))
        if self.ref is not None:
            _setattr(self, "ref", _bytes("ref", self.ref, 32))


@dataclass(frozen=True, repr=False)
class MailFetch(MailFrame):
    """Our envelopes with an id above ``after``, oldest first → ``mail_batch``."""

    TYPE: ClassVar[str] = "mail_fetch"
    id: int
    after: int = 0
    limit: int = 100

    def __post_init__(self) -> None:
        _int("id", self.id)
        _int("after", self.after)
        _int("limit", self.limit, 1, MAX_FETCH)


@dataclass(frozen=True, repr=False)
class MailAck(MailFrame):
    """Delete these envelopes of ours → ``mail_acked``."""

    TYPE: ClassVar[str] = "mail_ack"
    id: int
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        _int("id", self.id)
        items = _list("ids", self.ids, MAX_ACK_IDS)
        _setattr(self, "ids", tuple(_int("ids", i, 1) for i in items))


# server -> client


@dataclass(frozen=True, repr=False)
class _Count(MailFrame):
    """An answer that is a number."""

    id: int
    count: int

    def __post_init__(self) -> None:
        _int("id", self.id)
        _int("count", self.count)


@dataclass(frozen=True, repr=False)
class PrekeysHeld(_Count):
    """Answer to ``prekeys_publish`` and ``prekeys_count``: one-time prekeys held."""

    TYPE: ClassVar[str] = "prekeys_held"


@dataclass(frozen=True, repr=False)
class PrekeysBundle(MailFrame):
    """Answer to ``prekeys_claim``; no ``identity_key``: ``owner`` published nothing."""

    TYPE: ClassVar[str] = "prekeys_bundle"
    id: int
    owner: str
    identity_key: bytes | None = None
    signed_prekey: bytes | None = None
    one_time_prekey: bytes | None = None

    def __post_init__(self) -> None:
        _int("id", self.id)
        check_name("owner", self.owner)
        for name in ("identity_key", "signed_prekey", "one_time_prekey"):
            value = getattr(self, name)
            if value is not None:
                _setattr(self, name, _bytes(name, value, 16 * 1024))
        if (self.identity_key is None) != (self.signed_prekey is None):
            raise ValueError("fields 'identity_key' and 'signed_prekey' go together")


@dataclass(frozen=True, repr=False)
class MailStored(MailFrame):
    """Answer to ``mail_put``: the envelope is committed (survives a crash)."""

    TYPE: ClassVar[str] = "mail_stored"
    id: int
    envelope_id: int

    def __post_init__(self) -> None:
        _int("id", self.id)
        _int("envelope_id", self.envelope_id, 1)


@dataclass(frozen=True, repr=False)
class MailBatch(MailFrame):
    """Answer to ``mail_fetch``: envelopes in id order (cut after 1 MiB, at least one)."""

    TYPE: ClassVar[str] = "mail_batch"
    id: int
    envelopes: tuple[MailEnvelope, ...] = ()

    def __post_init__(self) -> None:
        _int("id", self.id)
        items = _list("envelopes", self.envelopes, MAX_FETCH)
        _setattr(
            self,
            "envelopes",
            tuple(e if isinstance(e, MailEnvelope) else MailEnvelope.from_json(e) for e in items),
        )


@dataclass(frozen=True, repr=False)
class MailAcked(_Count):
    """Answer to ``mail_ack``: how many of the ids existed (and are deleted now)."""

    TYPE: ClassVar[str] = "mail_acked"


@dataclass(frozen=True, repr=False)
class MailPush(MailFrame):
    """Pushed: a new envelope for us (still stored until we acknowledge it)."""

    TYPE: ClassVar[str] = "mail"
    envelope: MailEnvelope

    def __post_init__(self) -> None:
        if not isinstance(self.envelope, MailEnvelope):
            _setattr(self, "envelope", MailEnvelope.from_json(self.envelope))

    def __repr__(self) -> str:
        return f"MailPush({self.envelope!r})"


@dataclass(frozen=True, repr=False)
class MailWaiting(MailFrame):
    """Pushed: envelopes wait that were not pushed (our outbox was full): fetch them."""

    TYPE: ClassVar[str] = "mail_waiting"


@dataclass(frozen=True, repr=False)
class MailError(MailFrame):
    """A request failed (``code`` in :data:`MAILBOX_ERROR_CODES`); nothing was stored."""

    TYPE: ClassVar[str] = "mail_error"
    code: str
    message: str = ""
    id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE_RE.fullmatch(self.code):
            raise ValueError("field 'code' must be 1-32 of a-z _")
        _text("message", self.message)
        if self.id is not None:
            _int("id", self.id)


_CLIENT = (PrekeysPublish, PrekeysCount, PrekeysClaim, MailPut, MailFetch, MailAck)
_SERVER = (
    PrekeysHeld, PrekeysBundle, MailStored, MailBatch, MailAcked, MailPush, MailWaiting, MailError,
)  # fmt: skip
CLIENT_FRAMES: dict[str, type[MailFrame]] = {cls.TYPE: cls for cls in _CLIENT}
SERVER_FRAMES: dict[str, type[MailFrame]] = {cls.TYPE: cls for cls in _SERVER}


def parse_mailbox_frame(text: str | bytes, *, server: bool) -> MailFrame:
    """Parse a mailbox frame: one a client sent (``server=True``: we are the server),
    or one the server sent.

    Raises:
        SignalingProtocolError: malformed JSON, an unknown type, a bad or missing
            field (named).
    """
    if not isinstance(text, str):
        raise SignalingProtocolError("binary frames are not supported: send JSON text")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise SignalingProtocolError("frame is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise SignalingProtocolError("frame must be a JSON object with a string 'type'")
    table = CLIENT_FRAMES if server else SERVER_FRAMES
    cls = table.get(obj["type"])
    if cls is None:
        raise SignalingProtocolError(f"unknown mailbox frame type {obj['type'][:32]!r}")
    try:
        return cls.from_dict(obj)
    except (ValueError, TypeError) as exc:
        raise SignalingProtocolError(f"invalid {cls.TYPE!r} frame: {exc}") from None


def request_id(text: str) -> int | None:
    """The ``id`` of a malformed request, if one can be read (for its ``mail_error``)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if type(value) is int and 0 <= value <= _MAX_ID else None
