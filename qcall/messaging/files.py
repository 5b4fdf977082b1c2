"""Files: a random key per file, chunked AES-256-GCM, resume (``docs/messaging.md`` §8.2).

The sender picks a 32-byte file key ``FK`` and a 16-byte ``file_id``, hashes the
file (SHA-256), and sends a :class:`FileOffer` — name, size, hash, key, chunk
size — inside a normal (end-to-end encrypted) message. The chunks travel on
their own, each a :class:`FileChunk` sealed like the STREAM construction
(Hoang et al., CRYPTO 2015): the chunk index and a final-chunk flag are in the
nonce and in the associated data, so chunks cannot be reordered, dropped at
the end (truncation) or moved to another file::

    K_file  = Expand-Label(FK, "file key",   file_id, 32)
    P_file  = Expand-Label(FK, "file nonce", file_id, 7)
    nonce_i = P_file ‖ u32(i) ‖ u8(final)
    FileChunk := u8 version ‖ u8 type=4 ‖ 16 file_id ‖ u32 i ‖ u8 final ‖ var32 ciphertext
    AD_i    = the FileChunk up to its ciphertext

A receiver takes chunks in order and can resume at :attr:`FileDecryptor.next_index`
after a broken connection; the whole file's SHA-256 is checked at the end.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

from qcall import pqc
from qcall.exceptions import FileTransferError, MessageFormatError, MessageTooLargeError
from qcall.messaging.keyschedule import expand_label
from qcall.messaging.messages import VERSION, MessageType, message_type
from qcall.messaging.wire import Reader, Writer

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_FILE_SIZE",
    "FileChunk",
    "FileDecryptor",
    "FileEncryptor",
    "FileOffer",
    "check_file_size",
]

#: Default largest file, in bytes (configurable: ``max_file_size``).
DEFAULT_MAX_FILE_SIZE = 1 << 30
#: Default plaintext bytes per chunk.
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
FILE_ID_LEN = 16
FILE_KEY_LEN = 32
_MAX_NAME = 255


def check_file_size(size: int, name: str, limit: int = DEFAULT_MAX_FILE_SIZE) -> None:
    """Refuse a file over ``limit`` bytes before anything is uploaded."""
    if size > limit:
        raise MessageTooLargeError(
            f"{name} is {size} bytes, over the file size limit of {limit} bytes"
        )


@dataclass(frozen=True, repr=False)
class FileOffer:
    """What the receiver needs to fetch, decrypt and check a file (the key is secret)."""

    file_id: bytes
    name: str
    size: int
    sha256: bytes
    key: bytes
    chunk_size: int = DEFAULT_CHUNK_SIZE
    media_type: str = "application/octet-stream"

    def __post_init__(self) -> None:
        if len(self.file_id) != FILE_ID_LEN or len(self.key) != FILE_KEY_LEN:
            raise MessageFormatError("file offer: file_id or key has a bad size")
        if len(self.sha256) != 32:
            raise MessageFormatError("file offer: field 'sha256' must be 32 bytes")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise MessageFormatError(
                f"file offer: chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        if not self.name or "/" in self.name or "\0" in self.name or self.name in (".", ".."):
            raise MessageFormatError("file offer: field 'name' must be a plain file name")
        if len(self.name.encode("utf-8", "surrogatepass")) > _MAX_NAME or self.size < 0:
            raise MessageFormatError("file offer: name too long or negative size")

    @classmethod
    def new(
        cls,
        name: str,
        size: int,
        sha256: bytes,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        media_type: str = "application/octet-stream",
    ) -> FileOffer:
        """An offer with a fresh random file id and key."""
        return cls(
            secrets.token_bytes(FILE_ID_LEN),
            name,
            size,
            sha256,
            secrets.token_bytes(FILE_KEY_LEN),
            chunk_size,
            media_type,
        )

    @property
    def chunks(self) -> int:
        """Number of chunks (an empty file is one empty final chunk)."""
        return max(1, math.ceil(self.size / self.chunk_size))

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def serialize(self) -> bytes:
        w = Writer().raw(self.file_id).text16(self.name).u64(self.size).raw(self.sha256)
        return w.raw(self.key).u32(self.chunk_size).text8(self.media_type).bytes()

    @classmethod
    def parse(cls, data: bytes) -> FileOffer:
        r = Reader(data, "file offer")
        out = cls(
            r.raw(FILE_ID_LEN, "file_id"),
            r.text16("name", _MAX_NAME),
            r.u64("size"),
            r.raw(32, "sha256"),
            r.raw(FILE_KEY_LEN, "key"),
            r.u32("chunk_size"),
            r.text8("media_type"),
        )
        r.end()
        return out

    def __repr__(self) -> str:
        return f"<FileOffer {self.name!r} {self.size} bytes {self.file_id.hex()[:8]}>"


@dataclass(frozen=True)
class FileChunk:
    """One encrypted chunk of a file."""

    file_id: bytes
    index: int
    final: bool
    ciphertext: bytes

    def header(self) -> bytes:
        w = Writer().u8(VERSION).u8(MessageType.FILE_CHUNK).raw(self.file_id)
        return w.u32(self.index).u8(1 if self.final else 0).bytes()

    def serialize(self) -> bytes:
        return self.header() + Writer().var32(self.ciphertext).bytes()

    @classmethod
    def parse(cls, data: bytes) -> FileChunk:
        if message_type(data) is not MessageType.FILE_CHUNK:
            raise MessageFormatError("file chunk: wrong type octet")
        r = Reader(data, "file chunk")
        r.raw(2, "version")
        out = cls(
            r.raw(FILE_ID_LEN, "file_id"),
            r.u32("index"),
            r.flag("final"),
            r.var32("ciphertext", MAX_CHUNK_SIZE + pqc.AEAD_TAG_LEN),
        )
        r.end()
        return out


class _FileCipher:
    def __init__(self, offer: FileOffer) -> None:
        self.offer = offer
        self._aead = pqc.AES256GCM(expand_label(offer.key, b"file key", offer.file_id, 32))
        self._prefix = expand_label(offer.key, b"file nonce", offer.file_id, 7)

    def _nonce(self, index: int, final: bool) -> bytes:
        return self._prefix + index.to_bytes(4, "big") + (b"\1" if final else b"\0")


class FileEncryptor(_FileCipher):
    """Seals the chunks of one file (any order: a resumed upload starts anywhere)."""

    def chunk(self, index: int, data: bytes) -> bytes:
        """The wire bytes of chunk ``index`` (``data`` must be exactly that chunk)."""
        if not 0 <= index < self.offer.chunks or len(data) != self.offer.chunk_length(index):
            raise ValueError(f"chunk {index} of {self.offer.name!r}: wrong index or length")
        final = index == self.offer.chunks - 1
        chunk = FileChunk(self.offer.file_id, index, final, b"")
        sealed = self._aead.seal(self._nonce(index, final), data, chunk.header())
        return FileChunk(self.offer.file_id, index, final, sealed).serialize()


class FileDecryptor(_FileCipher):
    """Opens a file's chunks in order, hashing as it goes.

    Args:
        offer: the offer received in a message.
        next_index: the first chunk still missing (resume).
        hasher: SHA-256 of the chunks before ``next_index`` (re-hash the partial
            file on resume); a new one when starting.
    """

    def __init__(
        self, offer: FileOffer, next_index: int = 0, hasher: hashlib._Hash | None = None
    ) -> None:
        super().__init__(offer)
        self.next_index = next_index
        self._hash = hasher or hashlib.sha256()

    @property
    def complete(self) -> bool:
        return self.next_index >= self.offer.chunks

    def receive(self, data: bytes) -> bytes:
        """Check and decrypt the next chunk; returns its plaintext.

        Raises:
            FileTransferError: another file, a chunk out of order, a chunk that
                does not authenticate (tampered, or the final flag moved), or a
                complete file whose SHA-256 differs from the offer's.
        """
        offer = self.offer
        try:
            chunk = FileChunk.parse(data)
        except MessageFormatError as exc:
            raise FileTransferError(f"{offer.name!r}: {exc}") from None
        if chunk.file_id != offer.file_id:
            raise FileTransferError(f"{offer.name!r}: a chunk of another file")
        if chunk.index != self.next_index:
            raise FileTransferError(
                f"{offer.name!r}: chunk {chunk.index} out of order (expected {self.next_index})"
            )
        final = chunk.index == offer.chunks - 1
        plaintext = self._aead.open(
            self._nonce(chunk.index, final), chunk.ciphertext, chunk.header()
        )
        if plaintext is None or chunk.final != final:
            raise FileTransferError(
                f"{offer.name!r}: chunk {chunk.index} does not authenticate (tampered, "
                "truncated or from another transfer)"
            )
        if len(plaintext) != offer.chunk_length(chunk.index):
            raise FileTransferError(f"{offer.name!r}: chunk {chunk.index} has a wrong length")
        self._hash.update(plaintext)
        self.next_index += 1
        if final and not pqc.constant_time_eq(self._hash.digest(), offer.sha256):
            raise FileTransferError(
                f"{offer.name!r}: the SHA-256 of the received file differs from the sender's"
            )
        return plaintext
