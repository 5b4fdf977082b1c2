"""Files: chunked AEAD, order, truncation, tampering, resume, the hash check, size limits."""

from __future__ import annotations

import hashlib
import os

import pytest

from qcall.exceptions import FileTransferError, MessageFormatError, MessageTooLargeError
from qcall.messaging.content import MAX_TEXT_BYTES, Content, ContentKind, ReceiptStatus, pad, unpad
from qcall.messaging.files import (
    FileChunk,
    FileDecryptor,
    FileEncryptor,
    FileOffer,
    check_file_size,
)
from tests.messaging_utils import NOW

CHUNK = 1024


def offer_for(data: bytes, name: str = "report.pdf") -> FileOffer:
    return FileOffer.new(name, len(data), hashlib.sha256(data).digest(), chunk_size=CHUNK)


def chunks_of(offer: FileOffer, data: bytes) -> list[bytes]:
    enc = FileEncryptor(offer)
    return [enc.chunk(i, data[i * CHUNK : (i + 1) * CHUNK]) for i in range(offer.chunks)]


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 5 * CHUNK - 3])
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    offer = FileOffer.parse(offer_for(data).serialize())
    dec = FileDecryptor(offer)
    out = b"".join(dec.receive(c) for c in chunks_of(offer, data))
    assert out == data and dec.complete


def test_resume_from_the_last_good_chunk() -> None:
    data = os.urandom(4 * CHUNK + 10)
    offer = offer_for(data)
    wires = chunks_of(offer, data)
    first = FileDecryptor(offer)
    part = first.receive(wires[0]) + first.receive(wires[1])
    # The connection breaks; a new receiver re-hashes what it has and resumes at 2.
    resumed = FileDecryptor(offer, next_index=2, hasher=hashlib.sha256(part))
    rest = b"".join(resumed.receive(w) for w in wires[2:])
    assert part + rest == data


def test_bad_chunks_are_refused() -> None:
    data = os.urandom(3 * CHUNK)
    offer = offer_for(data)
    wires = chunks_of(offer, data)
    dec = FileDecryptor(offer)
    with pytest.raises(FileTransferError, match="out of order"):
        dec.receive(wires[1])
    flipped = bytearray(wires[0])
    flipped[-1] ^= 1
    with pytest.raises(FileTransferError, match="does not authenticate"):
        dec.receive(bytes(flipped))
    other = offer_for(data, "other.pdf")
    with pytest.raises(FileTransferError, match="another file"):
        dec.receive(chunks_of(other, data)[0])
    with pytest.raises(FileTransferError, match=r"bad|truncated|type"):
        dec.receive(wires[0][:20])
    # Truncation: the last chunk re-flagged as non-final (or a middle one as final).
    dec.receive(wires[0])
    mid = FileChunk.parse(wires[1])
    with pytest.raises(FileTransferError, match="does not authenticate"):
        dec.receive(FileChunk(mid.file_id, 1, True, mid.ciphertext).serialize())
    assert dec.next_index == 1  # nothing was lost: the good chunk still goes in
    dec.receive(wires[1])
    last = FileChunk.parse(wires[2])
    with pytest.raises(FileTransferError, match="does not authenticate"):
        dec.receive(FileChunk(last.file_id, 2, False, last.ciphertext).serialize())


def test_hash_mismatch_is_reported() -> None:
    data = os.urandom(2 * CHUNK)
    honest = offer_for(data)
    lying = FileOffer(honest.file_id, honest.name, honest.size, bytes(32), honest.key, CHUNK)
    dec = FileDecryptor(lying)
    dec.receive(chunks_of(honest, data)[0])
    with pytest.raises(FileTransferError, match="SHA-256"):
        dec.receive(chunks_of(honest, data)[1])


def test_size_limits_are_checked_before_upload() -> None:
    check_file_size(10, "a.txt", limit=10)
    with pytest.raises(MessageTooLargeError, match=r"a\.txt is 11 bytes"):
        check_file_size(11, "a.txt", limit=10)
    with pytest.raises(MessageTooLargeError, match="over the limit"):
        Content.text_message("x" * (MAX_TEXT_BYTES + 1), NOW)
    Content.text_message("é" * (MAX_TEXT_BYTES // 2), NOW)


def test_offer_validation() -> None:
    good = offer_for(b"abc")
    for name in ("", "../etc/passwd", "a/b", "..", "x\0y"):
        with pytest.raises(MessageFormatError):
            FileOffer(good.file_id, name, 3, good.sha256, good.key)
    with pytest.raises(MessageFormatError):
        FileOffer(good.file_id, "a", 3, good.sha256, good.key, chunk_size=10)
    assert "report.pdf" in repr(good) and good.key.hex() not in repr(good)


def test_content_kinds_and_padding() -> None:
    receipt = Content(
        ContentKind.RECEIPT,
        b"\1" * 16,
        5,
        status=ReceiptStatus.READ,
        receipts=(b"\2" * 16, b"\3" * 16),
    )
    file_content = Content(ContentKind.FILE, b"\4" * 16, 6, body=offer_for(b"x").serialize())
    for content in (Content.text_message("héllo", NOW), receipt, file_content):
        padded = content.padded()
        assert len(padded) % 64 == 0
        back = Content.parse(padded)
        assert back.serialize() == content.serialize()
    for bad in (b"", b"\0" * 64, pad(b"abc")[:-1], pad(b"\x09" + bytes(30))):
        with pytest.raises(MessageFormatError):
            Content.parse(bad)
    assert unpad(pad(b"")) == b""
