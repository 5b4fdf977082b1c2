"""What a message carries: text, a file offer, receipts, group control (``docs/messaging.md`` §8).

The plaintext of every 1:1 and group message is one :class:`Content`, padded
so that the ciphertext length reveals the size only to 64 bytes::

    Padded  := Content ‖ 0x80 ‖ 0x00 … (to a multiple of 64 bytes; ISO/IEC 7816-4)
    Content := u8 kind ‖ 16 message_id ‖ u64 sent_ms ‖ body

    kind 1 TEXT          var32 UTF-8 text (≤ MAX_TEXT_BYTES)
    kind 2 FILE          FileOffer (qcall.messaging.files)
    kind 3 RECEIPT       u8 status (1 delivered, 2 read) ‖ u16 n ‖ n × 16 message_id
    kind 4 GROUP_CHANGE  var32 signed GroupChange (qcall.messaging.group)
    kind 5 SENDER_KEY    16 group_id ‖ u32 epoch ‖ 48 state_hash ‖ 48 chain_key ‖ u32 index
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import time
from dataclasses import dataclass

from qcall.exceptions import MessageFormatError, MessageTooLargeError
from qcall.messaging.wire import Reader, Writer

__all__ = [
    "MAX_TEXT_BYTES",
    "MESSAGE_ID_LEN",
    "PAD_BLOCK",
    "Content",
    "ContentKind",
    "ReceiptStatus",
    "SenderKeyBody",
    "new_message_id",
    "pad",
    "unpad",
]

#: Largest text of one message, in UTF-8 bytes (refused before upload above).
MAX_TEXT_BYTES = 64 * 1024
#: Message identifiers: 16 random bytes, chosen by the sender.
MESSAGE_ID_LEN = 16
#: Plaintexts are padded to a multiple of this many bytes.
PAD_BLOCK = 64
#: Largest body of any content (a group change of a large group is the largest).
MAX_BODY = 100 * 1024
_MAX_RECEIPTS = 1000


class ContentKind(enum.IntEnum):
    """The ``kind`` octet."""

    TEXT = 1
    FILE = 2
    RECEIPT = 3
    GROUP_CHANGE = 4
    SENDER_KEY = 5


class ReceiptStatus(enum.IntEnum):
    """Delivered (the device stored it) or read (the user saw it)."""

    DELIVERED = 1
    READ = 2


_KINDS = frozenset(k.value for k in ContentKind)
_TEXT = bytes([ContentKind.TEXT])
_TEXT_HEAD = struct.Struct(f">B{MESSAGE_ID_LEN}sQI")  # kind, message_id, sent_ms, text length
_TEXT_AT = _TEXT_HEAD.size
_STATUSES = frozenset(s.value for s in ReceiptStatus)


def new_message_id() -> bytes:
    """A fresh message id: ``u48 milliseconds since the epoch ‖ 10 random bytes`` (§8.1).

    Ids sort by time, so the sender's store inserts them at the end of its index of sent
    messages (a random id dirtied one index page per message); the time is in the
    content's ``sent_ms`` already, next to it under the same encryption.
    """
    return (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(MESSAGE_ID_LEN - 6)


def pad(content: bytes) -> bytes:
    """``content ‖ 0x80 ‖ 0x00…`` to a multiple of :data:`PAD_BLOCK` (at least one byte added)."""
    n = len(content) + 1
    return content + b"\x80" + bytes(-n % PAD_BLOCK)


def unpad(padded: bytes) -> bytes:
    """Undo :func:`pad` (a bad padding is a format error)."""
    end = padded.rstrip(b"\0")
    if not end or end[-1] != 0x80 or len(padded) % PAD_BLOCK:
        raise MessageFormatError("message content: bad padding")
    return end[:-1]


@dataclass(frozen=True, repr=False)
class SenderKeyBody:
    """A member's sender chain for one group epoch, sent to each member over 1:1 sessions."""

    group_id: bytes
    epoch: int
    state_hash: bytes
    chain_key: bytes  # secret
    index: int

    def __post_init__(self) -> None:
        if len(self.group_id) != 16 or len(self.state_hash) != 48 or len(self.chain_key) != 48:
            raise MessageFormatError("sender key: group_id, state_hash or chain_key has a bad size")

    def serialize(self) -> bytes:
        w = Writer().raw(self.group_id).u32(self.epoch).raw(self.state_hash)
        return w.raw(self.chain_key).u32(self.index).bytes()

    @classmethod
    def read(cls, r: Reader) -> SenderKeyBody:
        return cls(
            r.raw(16, "group_id"),
            r.u32("epoch"),
            r.raw(48, "state_hash"),
            r.raw(48, "chain_key"),
            r.u32("index"),
        )

    def __repr__(self) -> str:
        return f"<SenderKeyBody {self.group_id.hex()[:8]} epoch={self.epoch} #{self.index}>"


@dataclass(frozen=True, repr=False)
class Content:
    """One message's content.

    Attributes:
        kind: what it is.
        message_id: the sender's id for it (receipts name it).
        sent_ms: the sender's clock, milliseconds since the epoch.
        text: TEXT only.
        body: the encoded FILE offer or GROUP_CHANGE (parsed by their modules).
        status: RECEIPT only.
        receipts: RECEIPT only: the message ids acknowledged.
        sender_key: SENDER_KEY only.
    """

    kind: ContentKind
    message_id: bytes
    sent_ms: int
    text: str = ""
    body: bytes = b""
    status: ReceiptStatus | None = None
    receipts: tuple[bytes, ...] = ()
    sender_key: SenderKeyBody | None = None

    def __post_init__(self) -> None:
        if len(self.message_id) != MESSAGE_ID_LEN:
            raise MessageFormatError("message content: field 'message_id' must be 16 bytes")
        if self.kind is ContentKind.TEXT and len(self.text) * 4 > MAX_TEXT_BYTES:
            # (a character is at most 4 bytes of UTF-8: shorter texts need no count)
            size = len(self.text.encode("utf-8", "surrogatepass"))
            if size > MAX_TEXT_BYTES:
                raise MessageTooLargeError(
                    f"message of {size} bytes is over the limit of {MAX_TEXT_BYTES} bytes"
                )
        if len(self.body) > MAX_BODY:
            raise MessageTooLargeError(f"message body over {MAX_BODY} bytes")
        if len(self.receipts) > _MAX_RECEIPTS:
            raise MessageFormatError(f"a receipt names at most {_MAX_RECEIPTS} messages")

    @classmethod
    def text_message(cls, text: str, now: float) -> Content:
        """A new text message (raises :class:`MessageTooLargeError` over the limit)."""
        if len(text) * 4 > MAX_TEXT_BYTES:  # __post_init__ checks the size
            return cls(ContentKind.TEXT, new_message_id(), int(now * 1000), text=text)
        return _text_content(cls, new_message_id(), int(now * 1000), text)

    def serialize(self) -> bytes:
        if self.kind is ContentKind.TEXT:  # the common case, in one step (same bytes)
            text = self.text.encode("utf-8")
            return _TEXT_HEAD.pack(self.kind, self.message_id, self.sent_ms, len(text)) + text
        w = Writer().u8(self.kind).raw(self.message_id).u64(self.sent_ms)
        if self.kind in (ContentKind.FILE, ContentKind.GROUP_CHANGE):
            w.var32(self.body)
        elif self.kind is ContentKind.RECEIPT:
            assert self.status is not None
            w.u8(self.status).u16(len(self.receipts))
            for message_id in self.receipts:
                w.raw(message_id)
        else:
            assert self.sender_key is not None
            w.raw(self.sender_key.serialize())
        return w.bytes()

    def padded(self) -> bytes:
        return pad(self.serialize())

    @classmethod
    def parse(cls, padded: bytes) -> Content:
        """Parse a padded plaintext (hostile input: typed errors only)."""
        return cls.decode(unpad(padded))

    @classmethod
    def decode(cls, data: bytes) -> Content:
        """Parse an unpadded content (as the history keeps it)."""
        if data[:1] == _TEXT and len(data) >= _TEXT_AT:  # the common case, in one step
            _, message_id, sent_ms, n = _TEXT_HEAD.unpack_from(data)
            if n <= MAX_TEXT_BYTES and len(data) == _TEXT_AT + n:
                with contextlib.suppress(UnicodeDecodeError):  # (the general path says so)
                    text = data[_TEXT_AT:].decode("utf-8")
                    # Nothing for __post_init__ to refuse: a 16-byte id, a text of n <=
                    # MAX_TEXT_BYTES bytes, no body or receipts; so no frozen __init__.
                    return _text_content(cls, message_id, sent_ms, text)
        r = Reader(data, "message content")
        kind = ContentKind(r.choice("kind", _KINDS))
        message_id = r.raw(MESSAGE_ID_LEN, "message_id")
        sent_ms = r.u64("sent_ms")
        out: Content
        if kind is ContentKind.TEXT:
            text = r.text(r.var32("text", MAX_TEXT_BYTES), "text")
            out = cls(kind, message_id, sent_ms, text=text)
        elif kind in (ContentKind.FILE, ContentKind.GROUP_CHANGE):
            out = cls(kind, message_id, sent_ms, body=r.var32("body", MAX_BODY))
        elif kind is ContentKind.RECEIPT:
            status = ReceiptStatus(r.choice("status", _STATUSES))
            count = r.u16("count")
            if count > _MAX_RECEIPTS:
                raise r.error("count", f"exceeds {_MAX_RECEIPTS}")
            ids = tuple(r.raw(MESSAGE_ID_LEN, "receipts") for _ in range(count))
            out = cls(kind, message_id, sent_ms, status=status, receipts=ids)
        else:
            out = cls(kind, message_id, sent_ms, sender_key=SenderKeyBody.read(r))
        r.end()
        return out

    def __repr__(self) -> str:
        return f"<Content {self.kind.name} {self.message_id.hex()[:8]}>"


def _text_content(cls: type[Content], message_id: bytes, sent_ms: int, text: str) -> Content:
    """``cls(TEXT, message_id, sent_ms, text=text)`` for arguments its checks accept:
    a 16-byte ``message_id`` and a text of at most ``MAX_TEXT_BYTES // 4`` characters
    or ``MAX_TEXT_BYTES`` UTF-8 bytes. The same object, without the frozen dataclass's
    ``__init__`` (a text of every message goes through here twice)."""
    out = object.__new__(cls)
    out.__dict__.update(
        kind=ContentKind.TEXT, message_id=message_id, sent_ms=sent_ms, text=text, body=b"",
        status=None, receipts=(), sender_key=None,
    )  # fmt: skip
    return out
