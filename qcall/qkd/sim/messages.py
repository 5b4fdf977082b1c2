"""Messages of the BB84 post-processing protocol and their binary encoding.

Every message is a frozen dataclass. Field kinds come from the annotation:

* ``int``    -> unsigned 64-bit little endian,
* ``float``  -> IEEE-754 binary64,
* ``bytes``  -> u32 length + bytes,
* ``Bits``   -> u64 bit count + bit-packed bytes (numpy ``uint8`` array of 0/1),
* ``U8`` / ``U16`` / ``U32`` / ``U64`` -> u64 element count + little-endian array.

:func:`decode` treats its input as hostile: every length is checked against
the bytes present and against :data:`MAX_ELEMENTS`, and errors name the
message type and field (:class:`~qcall.exceptions.PostProcessingError`).

Protocol order (Bob asks, Alice answers; see docs/qkd-simulation.md):
``Detections -> Sifting``, ``Disclosure -> Parameters``, then Cascade
``PassRequest -> PassSetup`` and ``ParityQuery -> ParityReply``, then
``ReconciliationDone -> VerifyChallenge``, ``VerifyResult -> Amplification``.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from qcall.exceptions import PostProcessingError

__all__ = [
    "MESSAGE_TYPES",
    "Amplification",
    "Bits",
    "Detections",
    "Disclosure",
    "Message",
    "Parameters",
    "ParityQuery",
    "ParityReply",
    "PassRequest",
    "PassSetup",
    "ReconciliationDone",
    "Sifting",
    "VerifyChallenge",
    "VerifyResult",
    "decode",
    "encode",
]

Bits: TypeAlias = npt.NDArray[np.uint8]
U8: TypeAlias = npt.NDArray[np.uint8]
U16: TypeAlias = npt.NDArray[np.uint16]
U32: TypeAlias = npt.NDArray[np.uint32]
U64: TypeAlias = npt.NDArray[np.uint64]

#: Upper bound on any array length in a message (2**28 elements / bits).
MAX_ELEMENTS = 1 << 28

_DTYPES: dict[str, np.dtype[Any]] = {
    "U8": np.dtype("<u1"), "U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
}


class Message:
    """Base class: ``TYPE`` is the one-byte wire type."""

    TYPE: ClassVar[int] = 0

    def __repr__(self) -> str:
        # Never show array contents (bits may be key material): only sizes.
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                parts.append(f"{f.name}=<{v.size} x {v.dtype}>")
            elif isinstance(v, bytes):
                parts.append(f"{f.name}=<{len(v)} bytes>")
            else:
                parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --- Bob -> Alice ----------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Detections(Message):
    """Bob announces which pulses he detected and his measurement bases.

    Pulse indices travel as gaps (``index[i] - index[i-1]``, with
    ``index[-1] = -1``): a ``u16`` each, ``0xFFFF`` meaning "the next entry of
    ``long_gaps``" (2 bytes per detection up to ~150 km instead of 8).
    """

    TYPE: ClassVar[int] = 1
    n_pulses: int
    gaps: U16
    long_gaps: U64
    bases: Bits

    ESCAPE: ClassVar[int] = 0xFFFF

    @classmethod
    def from_indices(cls, n_pulses: int, indices: npt.NDArray[np.int64],
                     bases: Bits) -> Detections:
        """Build the message from strictly increasing pulse indices."""
        gaps = np.diff(indices, prepend=-1)
        long = gaps >= cls.ESCAPE
        small = np.where(long, cls.ESCAPE, gaps).astype(np.uint16)
        return cls(n_pulses=n_pulses, gaps=small, long_gaps=gaps[long].astype(np.uint64),
                   bases=bases)

    def indices(self) -> npt.NDArray[np.int64]:
        """Decode the pulse indices.

        Raises:
            PostProcessingError: inconsistent escapes, a zero gap (indices not
                strictly increasing) or indices beyond ``n_pulses``.
        """
        escaped = self.gaps == self.ESCAPE
        if int(escaped.sum()) != self.long_gaps.size:
            raise PostProcessingError("Detections.long_gaps: count does not match escapes")
        if self.long_gaps.size and int(self.long_gaps.max()) >= 1 << 48:
            raise PostProcessingError("Detections.long_gaps: gap too large")
        gaps = self.gaps.astype(np.int64)
        gaps[escaped] = self.long_gaps.astype(np.int64)
        if gaps.size and int(gaps.min()) < 1:
            raise PostProcessingError("Detections.gaps: indices not strictly increasing")
        out: npt.NDArray[np.int64] = np.cumsum(gaps) - 1
        if out.size and int(out[-1]) >= self.n_pulses:
            raise PostProcessingError("Detections.gaps: index beyond n_pulses")
        return out


@dataclass(frozen=True, repr=False)
class Disclosure(Message):
    """Bob's bits at the positions to disclose (decoy, vacuum and sampled signal)."""

    TYPE: ClassVar[int] = 3
    bits: Bits


@dataclass(frozen=True, repr=False)
class PassRequest(Message):
    """Bob asks for a new Cascade pass with this top-level block size."""

    TYPE: ClassVar[int] = 5
    block_size: int


@dataclass(frozen=True, repr=False)
class ParityQuery(Message):
    """Bob asks Alice for the parities of ranges ``[starts, ends)`` of one pass."""

    TYPE: ClassVar[int] = 7
    pass_index: int
    starts: U32
    ends: U32


@dataclass(frozen=True, repr=False)
class ReconciliationDone(Message):
    """Bob has finished Cascade."""

    TYPE: ClassVar[int] = 9


@dataclass(frozen=True, repr=False)
class VerifyResult(Message):
    """Bob's verdict on the universal-hash check (1 = equal)."""

    TYPE: ClassVar[int] = 11
    ok: int


# --- Alice -> Bob ------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Sifting(Message):
    """Alice: which detections had matching bases, their intensity class, sample seed."""

    TYPE: ClassVar[int] = 2
    match: Bits
    intensity: U8
    sample_seed: bytes


@dataclass(frozen=True, repr=False)
class Parameters(Message):
    """Alice's parameter estimation and decision (``abort`` = 1 stops the block)."""

    TYPE: ClassVar[int] = 4
    abort: int
    qber: float
    y1_lower: float
    e1_upper: float
    single_photon_fraction: float


@dataclass(frozen=True, repr=False)
class PassSetup(Message):
    """Alice's shuffle seed and the top-level block parities of a new pass."""

    TYPE: ClassVar[int] = 6
    seed: bytes
    parities: Bits


@dataclass(frozen=True, repr=False)
class ParityReply(Message):
    """Alice's parities for a :class:`ParityQuery`."""

    TYPE: ClassVar[int] = 8
    parities: Bits


@dataclass(frozen=True, repr=False)
class VerifyChallenge(Message):
    """Alice's universal hash seed (n + 63 bits) and her 64-bit tag."""

    TYPE: ClassVar[int] = 10
    seed: Bits
    tag: int


@dataclass(frozen=True, repr=False)
class Amplification(Message):
    """Alice's Toeplitz seed (n + length - 1 bits) and the final key length."""

    TYPE: ClassVar[int] = 12
    length: int
    seed: Bits


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Detections, Sifting, Disclosure, Parameters, PassRequest, PassSetup,
        ParityQuery, ParityReply, ReconciliationDone, VerifyChallenge, VerifyResult,
        Amplification,
    )
}

_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")


def encode(msg: Message) -> bytes:
    """Serialize a message: type byte followed by its fields in order."""
    out = [bytes([msg.TYPE])]
    for f in dataclasses.fields(msg):  # type: ignore[arg-type]
        v: Any = getattr(msg, f.name)
        kind = f.type
        if kind == "int":
            out.append(_U64.pack(v))
        elif kind == "float":
            out.append(_F64.pack(v))
        elif kind == "bytes":
            out.append(_U32.pack(len(v)))
            out.append(v)
        elif kind == "Bits":
            out.append(_U64.pack(v.size))
            out.append(np.packbits(v).tobytes())
        else:
            out.append(_U64.pack(v.size))
            out.append(np.ascontiguousarray(v, dtype=_DTYPES[str(kind)]).tobytes())
    return b"".join(out)


def decode(data: bytes) -> Message:
    """Parse a message produced by :func:`encode`.

    Raises:
        PostProcessingError: unknown type, truncated data, oversized or
            trailing data, bits outside {0, 1}; the message names the field.
    """
    if not data:
        raise PostProcessingError("empty post-processing message")
    cls = MESSAGE_TYPES.get(data[0])
    if cls is None:
        raise PostProcessingError(f"unknown post-processing message type {data[0]}")
    view = memoryview(data)
    pos = 1
    values: dict[str, Any] = {}

    def take(n: int, field: str) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise PostProcessingError(f"{cls.__name__}.{field}: truncated message")
        chunk = view[pos : pos + n]
        pos += n
        return chunk

    def count(field: str) -> int:
        (n,) = _U64.unpack(take(8, field))
        if n > MAX_ELEMENTS:
            raise PostProcessingError(f"{cls.__name__}.{field}: {n} elements is too many")
        return int(n)

    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = f.type
        if kind == "int":
            values[f.name] = _U64.unpack(take(8, f.name))[0]
        elif kind == "float":
            values[f.name] = _F64.unpack(take(8, f.name))[0]
        elif kind == "bytes":
            (n,) = _U32.unpack(take(4, f.name))
            if n > MAX_ELEMENTS:
                raise PostProcessingError(f"{cls.__name__}.{f.name}: {n} bytes is too many")
            values[f.name] = bytes(take(n, f.name))
        elif kind == "Bits":
            n = count(f.name)
            raw = np.frombuffer(take((n + 7) // 8, f.name), dtype=np.uint8)
            values[f.name] = np.unpackbits(raw, count=n)
        else:
            dtype = _DTYPES[str(kind)]
            n = count(f.name)
            arr = np.frombuffer(take(n * dtype.itemsize, f.name), dtype=dtype)
            values[f.name] = arr.astype(dtype.newbyteorder("="), copy=True)
    if pos != len(view):
        raise PostProcessingError(f"{cls.__name__}: {len(view) - pos} trailing bytes")
    return cls(**values)
