"""Checks of the members of signaling and mailbox frames (shared by both parsers).

Each raises :class:`ValueError` naming the field; the parsers turn it into a
:class:`~qcall.exceptions.SignalingProtocolError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from qcall import identity
from qcall.exceptions import ConfigError

__all__ = [
    "FINGERPRINT_RE",
    "PRINTABLE_RE",
    "b64",
    "b64decode",
    "check_b64",
    "check_fingerprint",
    "check_int",
    "check_name",
    "check_optional",
    "check_payload",
    "check_printable",
    "check_re",
    "check_str",
]

FINGERPRINT_RE = re.compile(r"[\x21-\x7e][\x20-\x7e]{14,126}[\x21-\x7e]")
PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")


def check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    return value


def check_re(name: str, value: object, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.fullmatch(check_str(name, value)):
        raise ValueError(f"field {name!r} must be {what}")


def check_name(name: str, value: object) -> str:
    try:
        return identity.validate_name(value, f"field {name!r}")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def check_fingerprint(name: str, value: object) -> None:
    check_re(name, value, FINGERPRINT_RE, "16-128 printable ASCII characters")


def check_printable(name: str, value: object, limit: int, *, empty: bool = True) -> None:
    text = check_str(name, value)
    if len(text) > limit or (not empty and not text):
        raise ValueError(f"field {name!r} must be {0 if empty else 1}-{limit} characters")
    if not PRINTABLE_RE.fullmatch(text):
        raise ValueError(f"field {name!r} must be printable ASCII")


def check_b64(name: str, value: object, size: int) -> None:
    if len(b64decode(name, value)) != size:
        raise ValueError(f"field {name!r} must encode {size} bytes")


def b64decode(name: str, value: object) -> bytes:
    text = check_str(name, value)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"field {name!r} must be standard base64") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"field {name!r} must be an integer in {low}..{high}")
    return value


def check_payload(name: str, value: object, limit: int) -> None:
    """A relayed payload: a string of at most ``limit`` UTF-8 bytes."""
    text = check_str(name, value)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"field {name!r} must be valid Unicode text") from exc
    if size > limit:
        raise ValueError(f"field {name!r} must be at most {limit} bytes")


def check_optional(name: str, value: object, check: Any, *args: Any) -> None:
    if value is not None:
        check(name, value, *args)
