"""File transfers for the messaging client: upload, download, resume (``docs/messaging.md`` §8).

The sender checks the size limit first (nothing is uploaded for a file over it),
hashes the file, records the transfer, sends the :class:`FileOffer` inside a normal
message, then uploads the chunks (:mod:`qcall.messaging.files`), recording after each
one the next chunk to send: :meth:`FileTransfers.resume_uploads` continues from there
after a crash or a broken connection (each chunk's ``client_ref`` makes a repeated
upload idempotent at the server).

The receiver records the offer, writes chunks in order into ``NAME.part`` in its
downloads directory (fsynced before the progress is committed), resumes from the
last committed chunk (re-hashing the partial file, cutting anything written after
it), checks the SHA-256 at the end and renames the file into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qcall.exceptions import FileTransferError, MessageFormatError
from qcall.messaging.api import Envelope, Event, FileReceived, PendingError
from qcall.messaging.content import Content, ContentKind, new_message_id
from qcall.messaging.files import (
    FileChunk,
    FileDecryptor,
    FileEncryptor,
    FileOffer,
    check_file_size,
)
from qcall.messaging.store import Transfer

if TYPE_CHECKING:
    from qcall.messaging.client import MessagingClient

__all__ = ["FileTransfers", "Progress"]

logger = logging.getLogger(__name__)

#: ``progress(chunks done, chunks in all)``.
Progress = Callable[[int, int], None]

_BLOCK = 1 << 20


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.digest()


class FileTransfers:
    """The file transfers of one :class:`~qcall.messaging.client.MessagingClient`."""

    def __init__(self, client: MessagingClient) -> None:
        self.client = client
        self._receiving: dict[bytes, FileDecryptor] = {}

    @property
    def downloads(self) -> Path:
        return self.client.config.downloads or self.client.store.path.parent / "files"

    # --- sending ---------------------------------------------------------------------------

    async def send(
        self,
        to: str,
        path: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        media_type: str = "application/octet-stream",
    ) -> FileOffer:
        """Send a file to a peer or ``@group``.

        Raises:
            MessageTooLargeError: the file is over ``max_file_size`` (nothing sent).
            FileTransferError: the file cannot be read, or changed while sent.
        """
        client = self.client
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FileTransferError(f"cannot read {path}: {exc.strerror}") from None
        check_file_size(size, path.name, client.config.max_file_size)
        offer = FileOffer.new(
            path.name,
            size,
            _sha256(path),
            chunk_size=client.config.chunk_size,
            media_type=media_type,
        )
        now = client.clock()
        transfer = Transfer(
            offer.file_id, to, client.me.name, True, offer.serialize(), 0, str(path.resolve())
        )
        with client.store.transaction():
            client.store.save_transfer(transfer, now)
        content = Content(
            ContentKind.FILE, new_message_id(), int(now * 1000), body=offer.serialize()
        )
        await client.send_content(to, content)
        await self.upload(offer.file_id, progress)
        return offer

    async def resume_uploads(self, progress: Progress | None = None) -> int:
        """Finish every upload a crash or a broken connection interrupted."""
        ids = self.client.store.transfers(outgoing=True)
        for file_id in ids:
            await self.upload(file_id, progress)
        return len(ids)

    async def upload(self, file_id: bytes, progress: Progress | None = None) -> None:
        """Send the chunks of a recorded upload from its next chunk on."""
        client = self.client
        transfer = client.store.transfer(file_id)
        if transfer is None:
            return
        offer = FileOffer.parse(transfer.offer)
        to = transfer.conversation
        if to.startswith("@"):
            state = client.store.group_by_name(to[1:])
            recipients = (
                [m.name for m in state.members if m.name != client.me.name] if state else []
            )
        else:
            recipients = [to]
        encryptor = FileEncryptor(offer)
        path = Path(transfer.path)
        for i in range(transfer.next_chunk, offer.chunks):
            wire = encryptor.chunk(i, _read(path, i * offer.chunk_size, offer.chunk_length(i)))
            for name in recipients:  # transport errors propagate: resume_uploads goes on
                ref = hashlib.sha256(name.encode() + b"\0" + file_id + i.to_bytes(4, "big"))
                await client.transport.send(name, wire, ref.digest()[:16])
            with client.store.transaction():
                client.store.save_transfer(_at(transfer, i + 1), client.clock())
            if progress is not None:
                progress(i + 1, offer.chunks)
        with client.store.transaction():
            client.store.delete_transfer(file_id)
        logger.info("= sent %r (%d bytes) to %s", offer.name, offer.size, to)

    # --- receiving ---------------------------------------------------------------------------

    def offer_received(self, conversation: str, sender: str, content: Content, now: float) -> None:
        """Record an incoming offer (inside the transaction that stores its message)."""
        offer = FileOffer.parse(content.body)
        self.downloads.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.downloads / offer.name
        n = 1
        while target.exists() or target.with_name(target.name + ".part").exists():
            target = self.downloads / f"{Path(offer.name).stem} ({n}){Path(offer.name).suffix}"
            n += 1
        transfer = Transfer(
            offer.file_id, conversation, sender, False, offer.serialize(), 0, str(target)
        )
        self.client.store.save_transfer(transfer, now)
        target.with_name(target.name + ".part").touch(mode=0o600)

    def chunk_received(self, envelope: Envelope) -> list[Event]:
        """Check, write and record one chunk; the last one completes the file."""
        client = self.client
        try:
            file_id = FileChunk.parse(envelope.data).file_id
        except MessageFormatError as exc:
            raise FileTransferError(str(exc)) from None
        transfer = client.store.transfer(file_id)
        if transfer is None or transfer.outgoing:
            raise PendingError("a file chunk whose offer has not arrived")
        if envelope.sender != transfer.peer:
            raise FileTransferError(f"{envelope.sender} sent a chunk of {transfer.peer}'s file")
        offer = FileOffer.parse(transfer.offer)
        target = Path(transfer.path)
        part = target.with_name(target.name + ".part")
        decryptor = self._receiving.get(file_id)
        if decryptor is None or decryptor.next_index != transfer.next_chunk:
            decryptor = self._resume(offer, transfer.next_chunk, part)
        try:
            data = decryptor.receive(envelope.data)
        except FileTransferError:
            if decryptor.next_index != transfer.next_chunk:  # the last chunk: bad hash
                self._abandon(file_id, part)
            raise
        index = decryptor.next_index - 1
        with part.open("r+b") as f:
            f.seek(index * offer.chunk_size)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        now = client.clock()
        events: list[Event] = []
        with client.store.transaction():
            if decryptor.complete:
                client.store.delete_transfer(file_id)
                os.replace(part, target)
                self._receiving.pop(file_id, None)
                events.append(FileReceived(transfer.conversation, transfer.peer, offer, target))
                logger.info(
                    "= received %r (%d bytes) from %s", offer.name, offer.size, transfer.peer
                )
            else:
                client.store.save_transfer(_at(transfer, decryptor.next_index), now)
                self._receiving[file_id] = decryptor
            client.store.mark_processed(envelope.id, now)
        return events

    def _resume(self, offer: FileOffer, next_chunk: int, part: Path) -> FileDecryptor:
        """A decryptor at ``next_chunk``: re-hash the partial file, drop what follows."""
        good = next_chunk * offer.chunk_size
        digest = hashlib.sha256()
        try:
            with part.open("r+b") as f:
                f.truncate(good)
                remaining = good
                while remaining:
                    block = f.read(min(_BLOCK, remaining))
                    if not block:
                        raise FileTransferError(f"{part} is shorter than the chunks received")
                    digest.update(block)
                    remaining -= len(block)
        except OSError as exc:
            raise FileTransferError(f"cannot resume {part}: {exc.strerror}") from None
        return FileDecryptor(offer, next_chunk, digest)

    def _abandon(self, file_id: bytes, part: Path) -> None:
        self._receiving.pop(file_id, None)
        with self.client.store.transaction():
            self.client.store.delete_transfer(file_id)
        part.unlink(missing_ok=True)


def _read(path: Path, offset: int, length: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise FileTransferError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) != length:
        raise FileTransferError(f"{path} changed while it was being sent")
    return data


def _at(transfer: Transfer, next_chunk: int) -> Transfer:
    return Transfer(
        transfer.file_id,
        transfer.conversation,
        transfer.peer,
        transfer.outgoing,
        transfer.offer,
        next_chunk,
        transfer.path,
    )
