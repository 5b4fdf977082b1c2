"""The process behind :class:`~qcall.call.crypto_worker.SigningWorker`.

Run as ``python -m qcall.call.crypto_child`` by the phone, never by hand.

Kept apart from :mod:`qcall.call.crypto_worker` so that it starts with nothing but
the post-quantum backend imported (no asyncio, no handshake). It reads the identity
key's seed, answers with the public key, then signs each request in turn until its
standard input ends — which is how it dies with its phone. The frames are described
in :mod:`qcall.call.crypto_worker`. It writes nothing else, and an error goes back as
the exception's class name only (no message that could carry data).
"""

from __future__ import annotations

import signal
import struct
import sys
from typing import BinaryIO

__all__ = ["LENGTH", "MAX_FRAME", "frame", "main"]

#: Largest frame either side accepts (a signature request is < 300 bytes).
MAX_FRAME = 1 << 16
#: The frame header: the body's length, 4 bytes big-endian.
LENGTH = struct.Struct(">I")


def frame(body: bytes) -> bytes:
    """``body`` as one frame."""
    return LENGTH.pack(len(body)) + body


def _read_frame(stream: BinaryIO) -> bytes | None:
    """One frame from ``stream``; None at its end (or a truncated or oversized frame)."""
    header = stream.read(LENGTH.size)
    if len(header) < LENGTH.size:
        return None
    (length,) = LENGTH.unpack(header)
    if length > MAX_FRAME:
        return None
    body = stream.read(length)
    return body if len(body) == length else None


def _write(stream: BinaryIO, body: bytes) -> None:
    stream.write(frame(body))
    stream.flush()


def main() -> int:
    """Read the key, then sign what is sent until the input ends; the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the phone's to handle
    from qcall import pqc
    from qcall.exceptions import QCallError

    source, sink = sys.stdin.buffer, sys.stdout.buffer
    first = _read_frame(source)
    if first is None or first[:1] != b"K" or len(first) < 2:
        return 2
    size = first[1]
    alg, seed = first[2 : 2 + size].decode("ascii", "replace"), first[2 + size :]
    try:
        key = pqc.get_backend().signing_from_seed(pqc.SignatureScheme(alg), seed)
    except (ValueError, QCallError) as exc:
        _write(sink, b"e" + type(exc).__name__.encode("ascii"))
        return 2
    del first, seed
    _write(sink, b"R" + key.public_bytes())
    while (request := _read_frame(source)) is not None:
        if request[:1] != b"S" or len(request) < 2:
            _write(sink, b"eBadRequest")
            continue
        size = request[1]
        context, data = request[2 : 2 + size], request[2 + size :]
        try:
            signature = key.sign(data, context)
        except Exception as exc:  # only the class name goes back
            _write(sink, b"e" + type(exc).__name__.encode("ascii", "replace"))
            continue
        _write(sink, b"s" + signature)
    return 0


if __name__ == "__main__":
    sys.exit(main())
