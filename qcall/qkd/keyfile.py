"""A pre-loaded key file as a QKD key source (keys delivered out of band, like key cards).

Two SAEs receive copies of the same keys out of band (a courier, a key card).
Each copy is a JSON file, mode 0600, documented in ``docs/key-sources.md``::

    {
      "format": "qcall-keyfile",
      "version": 1,
      "sae_id": "alice",                 # the SAE owning this copy
      "key_size": 256,                   # bits, every key
      "keys": [
        {"key_ID": "<uuid>", "master_SAE_ID": "alice", "slave_SAE_ID": "bob",
         "key": "<base64>"},             # unused
        {"key_ID": "<uuid>", "master_SAE_ID": "bob", "slave_SAE_ID": "alice",
         "used": true}                   # consumed: key bytes erased
      ]
    }

Roles follow ETSI GS QKD 014: a key whose ``master_SAE_ID`` is us is handed
out by :meth:`KeyFile.take` (the ``enc_keys`` analogue, first unused key in
file order); a key whose ``slave_SAE_ID`` is us by :meth:`KeyFile.take_by_id`
(the ``dec_keys`` analogue). Splitting the keys by direction means the two
SAEs never pick the same key on their own.

Consumption is crash-safe: under an exclusive ``fcntl.flock`` on the side file
``.<name>.lock``, the file is read, the key marked used and erased, and the new
content written with :func:`qcall.config.atomic_write` (temporary file, fsync,
rename, directory fsync) *before* the key is returned. A process killed at any
point leaves either the old file (the key was not handed out) or the new one
(the key is gone for good): a key is never handed out twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from qcall.config import atomic_write, read_private_file
from qcall.exceptions import ConfigError, InvalidKeyError, KeyExhaustedError, KeyNotFoundError
from qcall.qkd.client import KeySource, register_key_source
from qcall.qkd.etsi014 import KeyStatus, QKDKey, validate_key_id, validate_sae_id
from qcall.qkd.kme import random_keys
from qcall.typing import KeyId, SAEId

__all__ = ["FORMAT", "KeyFile", "KeyFileSource", "create_key_files"]

#: Value of the ``format`` field.
FORMAT: Final = "qcall-keyfile"
#: Value of the ``version`` field.
VERSION: Final = 1
#: Largest key file read, in bytes.
MAX_FILE: Final = 64 * 1024 * 1024


def _parse(raw: bytes, path: Path) -> dict[str, Any]:
    """Parse and check a key file; raise InvalidKeyError naming the bad field."""
    where = f"key file {path}"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidKeyError(f"{where} is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidKeyError(f"{where}: top level must be an object")
    if data.get("format") != FORMAT:
        raise InvalidKeyError(f"{where}: format must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise InvalidKeyError(f"{where}: unsupported version {data.get('version')!r}")
    try:
        validate_sae_id(data.get("sae_id"), "sae_id")
    except ValueError as exc:
        raise InvalidKeyError(f"{where}: {exc}") from None
    size = data.get("key_size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
        raise InvalidKeyError(f"{where}: key_size must be a positive multiple of 8")
    keys = data.get("keys")
    if not isinstance(keys, list):
        raise InvalidKeyError(f"{where}: keys must be an array")
    seen: set[str] = set()
    for i, entry in enumerate(keys):
        field = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise InvalidKeyError(f"{where}: {field} must be an object")
        try:
            kid = validate_key_id(entry.get("key_ID"), f"{field}.key_ID")
            validate_sae_id(entry.get("master_SAE_ID"), f"{field}.master_SAE_ID")
            validate_sae_id(entry.get("slave_SAE_ID"), f"{field}.slave_SAE_ID")
        except ValueError as exc:
            raise InvalidKeyError(f"{where}: {exc}") from None
        if kid in seen:
            raise InvalidKeyError(f"{where}: {field}.key_ID {kid} appears twice")
        seen.add(kid)
        entry["key_ID"] = kid
        used = entry.get("used", False)
        if not isinstance(used, bool):
            raise InvalidKeyError(f"{where}: {field}.used must be true or false")
        if used:
            continue
        encoded = entry.get("key")
        if not isinstance(encoded, str):
            raise InvalidKeyError(f"{where}: {field}.key must be a base64 string")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKeyError(f"{where}: {field}.key is not valid base64") from None
        if len(key) * 8 != size:
            raise InvalidKeyError(f"{where}: {field}.key is not {size} bits")
    return data


def _dump(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()


class KeyFile:
    """Synchronous, crash-safe access to one key file (see the module docstring).

    Safe to use from several threads and processes at once: every operation
    holds an exclusive ``flock`` on ``.<name>.lock`` beside the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")

    def __repr__(self) -> str:
        return f"KeyFile({str(self.path)!r})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot lock key file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = read_private_file(self.path)
            if len(raw) > MAX_FILE:
                raise InvalidKeyError(f"key file {self.path} is larger than {MAX_FILE} bytes")
            yield _parse(raw, self.path)
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _commit(self, data: Mapping[str, Any]) -> None:
        atomic_write(self.path, _dump(data))

    def read(self) -> dict[str, Any]:
        """Return the parsed, checked file content."""
        with self._locked() as data:
            return data

    def take(self, peer: str, number: int = 1, size_bits: int | None = None) -> list[QKDKey]:
        """Consume the first ``number`` unused keys with us as master and ``peer`` as slave.

        Raises:
            ConfigError: ``size_bits`` differs from the file's ``key_size``.
            KeyExhaustedError: fewer than ``number`` such keys are left (none consumed).
        """
        if number < 1:
            raise ConfigError("number must be positive")
        with self._locked() as data:
            me, size = data["sae_id"], data["key_size"]
            if size_bits is not None and size_bits != size:
                raise ConfigError(f"key file {self.path} holds {size}-bit keys, not {size_bits}")
            picked = [
                e
                for e in data["keys"]
                if not e.get("used") and e["master_SAE_ID"] == me and e["slave_SAE_ID"] == peer
            ][:number]
            if len(picked) < number:
                raise KeyExhaustedError(
                    f"key file {self.path}: {len(picked)} unused keys for {me}->{peer}, "
                    f"{number} requested"
                )
            return self._consume(data, picked)

    def take_by_id(self, peer: str, key_ids: Sequence[str]) -> list[QKDKey]:
        """Consume the keys ``key_ids`` with ``peer`` as master and us as slave.

        Raises:
            KeyNotFoundError: a key_ID is not in the file for this direction, or
                was already consumed (none consumed then).
        """
        try:
            ids = [validate_key_id(k) for k in key_ids]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not ids or len(set(ids)) != len(ids):
            raise ConfigError("key_ids must be non-empty and distinct")
        with self._locked() as data:
            me = data["sae_id"]
            by_id = {
                e["key_ID"]: e
                for e in data["keys"]
                if e["master_SAE_ID"] == peer and e["slave_SAE_ID"] == me
            }
            for kid in ids:
                entry = by_id.get(kid)
                if entry is None:
                    raise KeyNotFoundError(f"key file {self.path}: no key_ID {kid} from {peer}")
                if entry.get("used"):
                    raise KeyNotFoundError(
                        f"key file {self.path}: key_ID {kid} was already consumed"
                    )
            return self._consume(data, [by_id[k] for k in ids])

    def _consume(self, data: dict[str, Any], entries: list[dict[str, Any]]) -> list[QKDKey]:
        keys = [QKDKey(KeyId(e["key_ID"]), base64.b64decode(e["key"])) for e in entries]
        for e in entries:
            e["used"] = True
            del e["key"]
        self._commit(data)  # fsynced before any key leaves this function
        return keys

    def status(self, peer: str) -> KeyStatus:
        """Return Status-like counts for keys we master towards ``peer``."""
        data = self.read()
        me, size = data["sae_id"], data["key_size"]
        mine = [e for e in data["keys"] if e["master_SAE_ID"] == me and e["slave_SAE_ID"] == peer]
        left = sum(1 for e in mine if not e.get("used"))
        return KeyStatus(
            source_kme_id=f"keyfile:{self.path.name}",
            target_kme_id=f"keyfile:{self.path.name}",
            master_sae_id=SAEId(me),
            slave_sae_id=SAEId(peer),
            key_size=size,
            stored_key_count=left,
            max_key_count=len(mine),
            max_key_per_request=max(len(mine), 1),
            max_key_size=size,
            min_key_size=size,
            max_sae_id_count=0,
        )


def create_key_files(
    sae_a: str,
    path_a: str | os.PathLike[str],
    sae_b: str,
    path_b: str | os.PathLike[str],
    count: int,
    *,
    key_size: int = 256,
) -> None:
    """Write a matching pair of key files: ``count`` keys a→b and ``count`` keys b→a.

    For tests and demos: the keys come from ``os.urandom``, not from QKD.
    """
    a, b = validate_sae_id(sae_a), validate_sae_id(sae_b)
    if a == b:
        raise ValueError("the two SAEs must differ")
    entries = []
    for master, slave in ((a, b), (b, a)):
        for kid, key in random_keys(count, key_size):
            entries.append(
                {
                    "key_ID": kid,
                    "master_SAE_ID": master,
                    "slave_SAE_ID": slave,
                    "key": base64.b64encode(key).decode("ascii"),
                }
            )
    for sae, path in ((a, path_a), (b, path_b)):
        data = {
            "format": FORMAT,
            "version": VERSION,
            "sae_id": sae,
            "key_size": key_size,
            "keys": entries,
        }
        atomic_write(path, _dump(data))


@register_key_source
class KeyFileSource(KeySource):
    """:class:`KeySource` over a :class:`KeyFile`; file work runs in a thread.

    Config: ``{"type": "keyfile", "path": PATH}`` or the URL ``keyfile:PATH``.
    """

    type_name = "keyfile"
    schemes = ("keyfile",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.keyfile = KeyFile(path)

    def __repr__(self) -> str:
        return f"KeyFileSource({str(self.keyfile.path)!r})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> KeyFileSource:
        path = config.get("path")
        url = config.get("url")
        if path is None and isinstance(url, str) and url.startswith("keyfile:"):
            path = url[len("keyfile:") :]
            if path.startswith("//"):
                path = path[2:]
        if not path or not isinstance(path, str | os.PathLike):
            raise ConfigError("keyfile key source needs 'path' (or url keyfile:PATH)")
        return cls(path)

    async def get_keys(
        self,
        peer_sae: str,
        number: int = 1,
        size_bits: int | None = None,
        *,
        application: str | None = None,
    ) -> list[QKDKey]:
        return await asyncio.to_thread(self.keyfile.take, peer_sae, number, size_bits)

    async def get_keys_by_id(
        self, peer_sae: str, key_ids: Sequence[str], *, application: str | None = None
    ) -> list[QKDKey]:
        return await asyncio.to_thread(self.keyfile.take_by_id, peer_sae, list(key_ids))

    async def status(self, peer_sae: str) -> KeyStatus:
        return await asyncio.to_thread(self.keyfile.status, peer_sae)

    async def close(self) -> None:
        return None
