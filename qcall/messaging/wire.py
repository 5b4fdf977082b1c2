"""Byte-level encoding shared by every messaging format (``docs/messaging.md`` §1).

All integers are unsigned big-endian; variable-length fields carry their length
first (``u8``, ``u16`` or ``u32``, as each format says). :class:`Reader` treats
its input as hostile: every read checks the remaining length, every failure is
a :class:`~qcall.exceptions.MessageFormatError` naming the field, and
:meth:`Reader.end` refuses trailing bytes, so one encoding has one meaning.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from qcall.exceptions import MessageFormatError

__all__ = ["Reader", "Writer", "framed"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def framed(*parts: bytes) -> bytes:
    """``u32(len(p1)) ‖ p1 ‖ u32(len(p2)) ‖ p2 ‖ …``: the framing of every KDF input."""
    return b"".join(_U32.pack(len(p)) + p for p in parts)


class Writer:
    """Builds one encoding; :meth:`bytes` returns it."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(bytes((value,)))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def raw(self, data: bytes) -> Writer:
        """Fixed-length bytes (the reader knows the length)."""
        self._parts.append(bytes(data))
        return self

    def var8(self, data: bytes) -> Writer:
        if len(data) > 0xFF:
            raise ValueError("field longer than 255 bytes")
        return self.u8(len(data)).raw(data)

    def var16(self, data: bytes) -> Writer:
        if len(data) > 0xFFFF:
            raise ValueError("field longer than 65535 bytes")
        return self.u16(len(data)).raw(data)

    def var32(self, data: bytes) -> Writer:
        return self.u32(len(data)).raw(data)

    def text8(self, text: str) -> Writer:
        return self.var8(text.encode("utf-8"))

    def text16(self, text: str) -> Writer:
        return self.var16(text.encode("utf-8"))

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads one encoding; every problem is a :class:`MessageFormatError` naming the field.

    Args:
        data: the encoding.
        what: what it is, for error messages (``"prekey bundle"``).
    """

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MessageFormatError(f"{what} must be bytes, not {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self.what = what

    def error(self, field: str, reason: str) -> MessageFormatError:
        return MessageFormatError(f"{self.what}: field {field!r} {reason}")

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def raw(self, n: int, field: str) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._data):
            raise self.error(field, f"is truncated (needs {n} bytes, {self.remaining} left)")
        self._pos = end
        return self._data[pos:end]

    def _unpack(self, fmt: struct.Struct, field: str) -> int:
        pos = self._pos
        if pos + fmt.size > len(self._data):
            raise self.error(
                field, f"is truncated (needs {fmt.size} bytes, {self.remaining} left)"
            )
        self._pos = pos + fmt.size
        return int(fmt.unpack_from(self._data, pos)[0])

    def skip(self, expected: bytes) -> bool:
        """Consume ``expected`` if the input continues with it; whether it did."""
        end = self._pos + len(expected)
        if self._data[self._pos : end] != expected:
            return False
        self._pos = end
        return True

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[Any, ...]:
        """Several fixed-size fields at once (``fmt``, big-endian)."""
        pos = self._pos
        if pos + fmt.size > len(self._data):
            raise self.error(
                field, f"is truncated (needs {fmt.size} bytes, {self.remaining} left)"
            )
        self._pos = pos + fmt.size
        return fmt.unpack_from(self._data, pos)

    def u8(self, field: str) -> int:
        pos = self._pos
        if pos >= len(self._data):
            raise self.error(field, "is truncated (needs 1 bytes, 0 left)")
        self._pos = pos + 1
        return self._data[pos]

    def u16(self, field: str) -> int:
        return self._unpack(_U16, field)

    def u32(self, field: str) -> int:
        return self._unpack(_U32, field)

    def u64(self, field: str) -> int:
        return self._unpack(_U64, field)

    def var8(self, field: str) -> bytes:
        return self.raw(self.u8(field), field)

    def var16(self, field: str, limit: int = 0xFFFF) -> bytes:
        n = self.u16(field)
        if n > limit:
            raise self.error(field, f"is longer than {limit} bytes")
        return self.raw(n, field)

    def var32(self, field: str, limit: int) -> bytes:
        n = self.u32(field)
        if n > limit:
            raise self.error(field, f"is longer than {limit} bytes")
        return self.raw(n, field)

    def text(self, data: bytes, field: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(field, "is not valid UTF-8") from None

    def text8(self, field: str) -> str:
        return self.text(self.var8(field), field)

    def text16(self, field: str, limit: int = 0xFFFF) -> str:
        return self.text(self.var16(field, limit), field)

    def flag(self, field: str) -> bool:
        value = self.u8(field)
        if value > 1:
            raise self.error(field, "must be 0 or 1")
        return value == 1

    def choice(self, field: str, allowed: Iterable[int]) -> int:
        value = self.u8(field)
        if value not in allowed:
            raise self.error(field, f"has unknown value {value}")
        return value

    def end(self) -> None:
        """Refuse trailing bytes."""
        if self.remaining:
            raise MessageFormatError(f"{self.what}: {self.remaining} unexpected trailing bytes")

    def consumed(self) -> bytes:
        """The bytes read so far (for signatures over a prefix)."""
        return self._data[: self._pos]
