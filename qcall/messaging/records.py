"""The records the client store hands out (:mod:`qcall.messaging.store`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HistoryEntry", "OutboxEntry", "Transfer"]


@dataclass(frozen=True)
class HistoryEntry:
    """One message in the local history (the body is the decrypted content bytes)."""

    id: int
    message_id: bytes
    outgoing: bool
    at_ms: int
    status: int
    body: bytes

    def __repr__(self) -> str:
        return f"<HistoryEntry #{self.id} {'out' if self.outgoing else 'in'} status={self.status}>"


@dataclass(frozen=True)
class OutboxEntry:
    """A message encrypted and committed, not yet acknowledged by the server."""

    id: int
    recipient: str
    envelope: bytes
    at_ms: int


@dataclass(frozen=True, repr=False)
class Transfer:
    """A file being sent or received (``offer`` holds the file key: secret)."""

    file_id: bytes
    conversation: str  # the peer, or "@group"
    peer: str  # who sends the chunks (us for an upload)
    outgoing: bool
    offer: bytes  # the FileOffer encoding
    next_chunk: int
    path: str

    def __repr__(self) -> str:
        way = "up" if self.outgoing else "down"
        return f"<Transfer {self.file_id.hex()[:8]} {way} next={self.next_chunk}>"
