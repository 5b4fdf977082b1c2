"""What the messaging client shows and needs: events, the transport, contacts, policies.

Shared by :mod:`qcall.messaging.client` and :mod:`qcall.messaging.transfer`, and what
phase 2's CLI and call screen program against (``docs/messaging.md`` §13).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qcall.exceptions import QCallError
from qcall.messaging.content import Content, ReceiptStatus
from qcall.messaging.files import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_FILE_SIZE, FileOffer
from qcall.messaging.group import GroupChange
from qcall.messaging.messages import Mode
from qcall.messaging.ratchet import QKDPolicy, RatchetLimits

__all__ = [
    "ClientConfig",
    "Contacts",
    "Envelope",
    "Event",
    "FileReceived",
    "GroupChanged",
    "MessagePending",
    "MessageReceived",
    "MessageRejected",
    "Pinned",
    "ReceiptReceived",
    "Transport",
]

DAY = 86400.0


@dataclass(frozen=True)
class Envelope:
    """What the server delivers: its id, the authenticated sender's name, opaque bytes."""

    id: int
    sender: str
    data: bytes


class Transport(Protocol):
    """The server's mailbox and prekey directory, as the client sees it (phase 2: signaling)."""

    async def publish_prekeys(self, bundle: bytes) -> int:
        """Publish our bundle (signed prekey + new one-time prekeys); returns how many
        one-time prekeys the server now holds for us."""

    async def prekey_count(self) -> int:
        """How many of our one-time prekeys the server still holds."""

    async def claim_prekeys(self, peer: str) -> bytes | None:
        """``peer``'s bundle with at most one one-time prekey, or ``None`` (unknown)."""

    async def send(self, recipient: str, data: bytes, client_ref: bytes) -> int:
        """Store ``data`` for ``recipient``; return once the server committed it."""

    async def fetch(self, after: int = 0, limit: int = 100) -> list[Envelope]:
        """Our envelopes with an id above ``after``, oldest first."""

    async def ack(self, ids: Sequence[int]) -> None:
        """Let the server delete these envelopes."""


class Pinned(Protocol):
    """A pinned contact (:class:`qcall.contacts.Contact`)."""

    @property
    def public_key(self) -> bytes: ...


class Contacts(Protocol):
    """Pinned identities (:class:`qcall.contacts.ContactStore` is one)."""

    def check_peer(self, name: str, public_key: bytes) -> None:
        """Pin on first sight, or raise IdentityChangedError / UnknownIdentityError."""

    def get(self, name: str) -> Pinned | None:
        """The pinned contact ``name``, or ``None``."""


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageReceived:
    """A message (text or file offer) that authenticated. ``conversation`` is the peer
    or ``@group``; ``mode`` is the 1:1 session's (``hybrid``/``pqc``), shown to the user."""

    conversation: str
    sender: str
    content: Content
    mode: Mode
    envelope_id: int


@dataclass(frozen=True)
class ReceiptReceived:
    conversation: str
    sender: str
    status: ReceiptStatus
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class GroupChanged:
    """A membership change was applied (``left``: we are no longer a member)."""

    group: str
    change: GroupChange
    left: bool


@dataclass(frozen=True)
class MessageRejected:
    """An envelope that failed a check: shown as an error, never as a message."""

    sender: str
    envelope_id: int
    error: QCallError


@dataclass(frozen=True)
class MessagePending:
    """An envelope kept for later (a sender key or a QKD key is not there yet)."""

    sender: str
    envelope_id: int
    reason: str


@dataclass(frozen=True)
class FileReceived:
    """A file arrived whole, its SHA-256 checked, and was saved at ``path``."""

    conversation: str
    sender: str
    offer: FileOffer
    path: Path


Event = (
    MessageReceived
    | ReceiptReceived
    | GroupChanged
    | MessageRejected
    | MessagePending
    | FileReceived
)


@dataclass(frozen=True)
class ClientConfig:
    """Policies of one messaging client.

    Attributes:
        policy: when to mix fresh QKD keys into sessions.
        limits: skipped-key bounds of sessions.
        require_qkd: refuse to start a session without a QKD key (no ``pqc``).
        accept_pqc: accept sessions others start without a QKD key.
        one_time_prekeys: how many one-time prekeys the server should hold.
        low_water: replenish when the server holds fewer.
        signed_prekey_lifetime: seconds before the signed prekey is rotated.
        signed_prekey_retention: seconds an old signed prekey can still open set-ups.
        sae_id: our SAE ID at our KME (default: our name).
        sae_of: a peer's SAE ID (default: its name).
        max_file_size: larger files are refused before upload.
        chunk_size: plaintext bytes per file chunk.
        downloads: where received files go (default: ``files/`` beside the store).
        send_window: envelopes sent without waiting for the server's answer
            (:meth:`~qcall.messaging.client.MessagingClient.flush_outbox`; the
            server serves up to 64 requests of a connection at once).
    """

    policy: QKDPolicy = field(default_factory=QKDPolicy)
    limits: RatchetLimits = field(default_factory=RatchetLimits)
    require_qkd: bool = False
    accept_pqc: bool = True
    one_time_prekeys: int = 50
    low_water: int = 10
    signed_prekey_lifetime: float = 7 * DAY
    signed_prekey_retention: float = 35 * DAY
    sae_id: str | None = None
    sae_of: Callable[[str], str] = str
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    downloads: Path | None = None
    send_window: int = 32


class PendingError(Exception):
    """Internal to the client: keep this envelope for later (the reason in ``args[0]``)."""
