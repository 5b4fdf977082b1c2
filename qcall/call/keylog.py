"""``QCALL_KEYLOG``: write call keys to a file for debugging, like ``SSLKEYLOGFILE``.

Off by default. When the environment variable ``QCALL_KEYLOG`` names a file,
:func:`keylog_write` appends one line per key generation of every call and a
WARNING is logged (once per file and process): anyone who can read the file
can decrypt recorded calls.

The file is created with mode 0600 and opened ``O_APPEND | O_NOFOLLOW``; a file
that other users can access, or that is not a regular file, is refused. Each
record is a single ``write(2)`` of one line, so concurrent writers (two peers
of a local test call) never interleave. :func:`qcall.config.atomic_write` is not
used because the log is append-only by design.

Format (one line, fields separated by one space, hex in lower case)::

    QCALL_SRTP <call_id> <generation> <profile> <exporter_secret>
        <key_ids> <local_key> <local_salt> <remote_key> <remote_salt>

``call_id`` and each key ID are 1-128 characters of ``[A-Za-z0-9._:@-]``;
``key_ids`` is a comma-separated list (ETSI GS QKD 014 key_IDs) or ``-``;
``profile`` is an :class:`~qcall.call.srtpcore.SRTPProfile` name; ``local`` is
what the writing side sends. Lines starting with ``#`` are comments.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qcall.call.srtpcore import SRTPKeys, SRTPProfile
from qcall.exceptions import CallError, ConfigError, InvalidKeyError

__all__ = [
    "KEYLOG_ENV",
    "KEYLOG_LABEL",
    "KeylogRecord",
    "keylog_path",
    "keylog_write",
    "parse_keylog",
]

logger = logging.getLogger(__name__)

#: The environment variable that turns the key log on.
KEYLOG_ENV: Final = "QCALL_KEYLOG"

#: First field of every record line.
KEYLOG_LABEL: Final = "QCALL_SRTP"

_TOKEN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}")
_MAX_LINE = 4096
_warned: set[str] = set()


@dataclass(frozen=True, repr=False)
class KeylogRecord:
    """One parsed key log line."""

    call_id: str
    generation: int
    exporter_secret: bytes
    key_ids: tuple[str, ...]
    srtp_keys: SRTPKeys

    def __repr__(self) -> str:
        return (
            f"KeylogRecord({self.call_id!r}, generation={self.generation}, "
            f"key_ids={self.key_ids!r}, {self.srtp_keys!r})"
        )


def keylog_path() -> Path | None:
    """Return the key log file named by ``QCALL_KEYLOG``, or ``None`` when off."""
    value = os.environ.get(KEYLOG_ENV, "")
    return Path(value).expanduser() if value else None


def _check_token(field: str, value: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise CallError(f"{field}: must be 1-128 characters of [A-Za-z0-9._:@-]")
    return value


def keylog_write(
    call_id: str,
    exporter_secret: bytes,
    key_ids: Sequence[str],
    srtp_keys: SRTPKeys,
    *,
    generation: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> bool:
    """Append one record to the key log, if ``QCALL_KEYLOG`` (or ``path``) is set.

    Args:
        call_id: the call's identifier.
        exporter_secret: the DTLS exporter secret the key schedule used.
        key_ids: the QKD key_IDs mixed into this generation (may be empty).
        srtp_keys: this side's SRTP keys of this generation.
        generation: 0 for the initial keys, then one per rekey.
        path: write here instead of ``$QCALL_KEYLOG``.

    Returns:
        ``True`` if a record was written, ``False`` when the key log is off.

    Raises:
        CallError: ``call_id`` or a key ID is not a safe token, or ``generation``
            is negative.
        ConfigError: the file cannot be opened or is accessible by other users.
    """
    target = Path(path) if path is not None else keylog_path()
    if target is None:
        return False
    _check_token("call_id", call_id)
    for key_id in key_ids:
        _check_token("key_ids", key_id)
    if not isinstance(generation, int) or generation < 0:
        raise CallError("generation: must be a non-negative integer")
    if not isinstance(srtp_keys, SRTPKeys):
        raise CallError("srtp_keys: must be SRTPKeys")
    line = " ".join(
        [
            KEYLOG_LABEL,
            call_id,
            str(generation),
            srtp_keys.profile.name,
            bytes(exporter_secret).hex(),
            ",".join(key_ids) or "-",
            srtp_keys.local_key.hex(),
            srtp_keys.local_salt.hex(),
            srtp_keys.remote_key.hex(),
            srtp_keys.remote_salt.hex(),
        ]
    )
    _append(target, (line + "\n").encode("ascii"))
    return True


def _append(path: Path, data: bytes) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        logger.warning(
            "! %s is set: SRTP keys of every call are written to %s; "
            "anyone who can read it can decrypt recorded calls",
            KEYLOG_ENV,
            path,
        )
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"{KEYLOG_ENV}: cannot open {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{KEYLOG_ENV}: {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{KEYLOG_ENV}: {path} is accessible by other users "
                f"(mode {st.st_mode & 0o777:o}); run: chmod 600 {path}"
            )
        os.write(fd, data)
    except OSError as exc:
        raise ConfigError(f"{KEYLOG_ENV}: cannot write {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _hex_field(field: str, value: str, lineno: int) -> bytes:
    if not _HEX.fullmatch(value):
        raise ConfigError(f"key log line {lineno}: {field}: not lower-case hex")
    return bytes.fromhex(value)


def parse_keylog(text: str) -> list[KeylogRecord]:
    """Parse a key log written by :func:`keylog_write` (input treated as hostile).

    Raises:
        ConfigError: a line is malformed; the message names the line and field.
    """
    records: list[KeylogRecord] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        if len(line) > _MAX_LINE:
            raise ConfigError(f"key log line {lineno}: longer than {_MAX_LINE} characters")
        fields = line.split(" ")
        if len(fields) != 10 or fields[0] != KEYLOG_LABEL:
            raise ConfigError(f"key log line {lineno}: expected {KEYLOG_LABEL} and 9 fields")
        _, call_id, generation, profile_name, exporter, ids, lk, ls, rk, rs = fields
        if not _TOKEN.fullmatch(call_id):
            raise ConfigError(f"key log line {lineno}: call_id: not a safe token")
        if not generation.isdigit() or len(generation) > 9:
            raise ConfigError(f"key log line {lineno}: generation: not a small integer")
        key_ids = () if ids == "-" else tuple(ids.split(","))
        if not all(_TOKEN.fullmatch(key_id) for key_id in key_ids):
            raise ConfigError(f"key log line {lineno}: key_ids: not safe tokens")
        exporter_secret = _hex_field("exporter_secret", exporter, lineno)
        try:
            profile = SRTPProfile.from_name(profile_name)
            keys = SRTPKeys(
                profile,
                _hex_field("local_key", lk, lineno),
                _hex_field("local_salt", ls, lineno),
                _hex_field("remote_key", rk, lineno),
                _hex_field("remote_salt", rs, lineno),
            )
        except (ValueError, InvalidKeyError) as exc:
            raise ConfigError(f"key log line {lineno}: {exc}") from None
        records.append(
            KeylogRecord(
                call_id,
                int(generation),
                exporter_secret,
                key_ids,
                keys,
            )
        )
    return records
