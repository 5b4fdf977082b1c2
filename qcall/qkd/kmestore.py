"""Durable KME state: a killed KME loses no unused key and never serves a consumed one.

:class:`DurableKME` is a :class:`~qcall.qkd.kme.KME` whose every change is
recorded in a :class:`KMEStore`: a snapshot file plus an append-only journal,
both ``0600``. The rule that makes it safe (docs/faults.md):

    **mark consumed durably, then answer.**

A request changes the in-memory pools at once (the pure KME) and appends a
journal record to a buffer; the server awaits :meth:`KMEStore.commit` —
``write`` + ``fdatasync`` of every buffered record — *before* it sends the keys.
So after a crash (SIGKILL, power loss) the state on disk has every key that was
not yet handed out, and none that was:

* a key whose answer left the KME is marked consumed on disk;
* a key taken in memory whose record was not yet durable was never sent: it
  comes back as unused after a restart (at-most-once delivery never reuses);
* a request in flight when the KME dies may have consumed its keys durably
  without its answer reaching the SAE: those keys are lost to everyone, never
  reused (the SAE sees a connection error and asks again for *new* keys).

Group commit: while one ``fdatasync`` runs (in a worker thread, so the event
loop keeps serving), new records accumulate and the next flush writes them all
with one ``fdatasync``. Single requests pay one flush each.

Files, for ``state = PATH``::

    PATH          snapshot: JSON {format, version: 2, kme_id, key_size, generation,
                  saes, pools: [{master, slave, role, peer_kme_id, blocks, issued}]},
                  blocks (supplied keys) as [key_ID, base64 key, added, used],
                  used = [[start, end), …] bytes already handed out (zero here);
                  issued (local pools: keys issued, waiting for the slave) as
                  [key_ID, base64 key, issued]; written with atomic_write
    PATH.journal  line 1 {"generation": g}; then one JSON record per line:
                  sae, pair, supply (with base64 keys), enc (key_IDs and size:
                  replayed by cutting the same keys again), dec, expire

A version 1 snapshot (every key whole: ``enc``/``dec`` lists of [key_ID,
base64 key, added]) is read as well.

A journal whose generation is not the snapshot's is stale (a compaction was
interrupted after the new snapshot was in place) and is ignored. A torn last
line (no newline, or not JSON) was never acknowledged and is dropped; a bad
line before it is corruption (:class:`~qcall.exceptions.KMEStateError`).

Compaction writes a fresh snapshot and an empty journal when the journal grows
beyond ``max(compact_bytes, half the size of the last snapshot)`` — so at most
three bytes are written per journal byte, amortised — and when the store is
opened or closed. Consumed keys' bytes leave the
disk at compaction: until then the journal still holds the ``supply`` record of
a consumed key (the file is ``0600``, like the KME's memory; docs/faults.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from qcall.config import atomic_write
from qcall.exceptions import ConfigError, KMEStateError, KMEUnavailableError
from qcall.qkd.etsi014 import UNTAGGED, KeyContainer, KeyRequest, validate_key_id
from qcall.qkd.keypool import KeyPool, ranges_mask
from qcall.qkd.kme import DEFAULT_KEY_SIZE, KME, PoolRole
from qcall.typing import KeyId, SAEId

__all__ = ["FORMAT", "DurableKME", "KMEStore"]

logger = logging.getLogger(__name__)

#: ``format`` of a snapshot file.
FORMAT: Final = "qcall-kme-state"
VERSION: Final = 2

#: Snapshot versions this module reads.
READABLE_VERSIONS: Final = (1, 2)

#: Compact when the journal exceeds max(this, half the last snapshot's size), in bytes.
COMPACT_BYTES: Final = 1 << 20


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise KMEStateError(f"{where}: key must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KMEStateError(f"{where}: key is not valid base64") from None


class KMEStore:
    """The files of one KME's durable state (see the module docstring).

    Create it with :meth:`DurableKME.open`, which loads or creates the files.

    Args:
        path: the snapshot file; the journal is ``path + ".journal"``.
        compact_bytes: the smallest journal size that triggers compaction.
    """

    def __init__(self, path: str | os.PathLike[str], *, compact_bytes: int = COMPACT_BYTES):
        self.path = Path(path)
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.compact_bytes = compact_bytes
        self.generation = 0
        self._fd: int | None = None
        self._journal_bytes = 0
        self._snapshot_bytes = 0
        self._buffer: list[bytes] = []
        self._appended = 0  # records appended so far
        self._durable = 0  # records known to be on disk
        self._flushing: asyncio.Future[None] | None = None
        self._failed: KMEStateError | None = None
        self._kme: KME | None = None
        self._io = threading.Lock()  # the worker thread's flush vs close() in the loop
        #: Flushes done and records written (for the benchmark and tests).
        self.flushes = 0
        self.records_written = 0

    def __repr__(self) -> str:
        return f"KMEStore({str(self.path)!r}, generation={self.generation})"

    # --- records ----------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Buffer one journal record (no I/O; :meth:`commit` makes it durable)."""
        self._buffer.append(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._appended += 1

    @property
    def dirty(self) -> bool:
        """Whether some records are not durable yet."""
        return self._durable < self._appended

    async def commit(self) -> None:
        """Return once every record appended so far is on disk (group commit).

        Raises:
            KMEStateError: the journal or snapshot could not be written; the
                store then refuses every later commit (the KME must restart).
        """
        target = self._appended
        while self._durable < target:
            if self._failed is not None:
                raise self._failed
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush_async())
            flushing = self._flushing
            await asyncio.shield(flushing)
        if self._failed is not None:
            raise self._failed

    async def _flush_async(self) -> None:
        data, upto, snapshot = self._take()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._write, data, snapshot)
            self._durable = max(self._durable, upto)
        except (OSError, ConfigError) as exc:
            self._failed = KMEStateError(f"cannot write the KME state {self.path}: {exc}")
            logger.error("! %s", self._failed)
        finally:
            self._flushing = None

    def flush(self) -> None:
        """Write every buffered record now (synchronously).

        Raises:
            KMEStateError: the files could not be written.
            RuntimeError: an asynchronous flush is running (use :meth:`commit`).
        """
        if self._flushing is not None:
            raise RuntimeError("an asynchronous flush is running: await commit()")
        if not self.dirty:
            return
        data, upto, snapshot = self._take()
        try:
            self._write(data, snapshot)
        except (OSError, ConfigError) as exc:
            self._failed = KMEStateError(f"cannot write the KME state {self.path}: {exc}")
            raise KMEStateError(f"cannot write the KME state {self.path}: {exc}") from exc
        self._durable = max(self._durable, upto)

    def _take(self) -> tuple[bytes, int, bytes | None]:
        """Detach the buffer; decide (in the loop thread) whether to compact."""
        data = b"".join(self._buffer)
        count = len(self._buffer)
        self._buffer = []
        upto = self._appended
        snapshot = None
        limit = max(self.compact_bytes, self._snapshot_bytes // 2)
        if self._journal_bytes + len(data) > limit and self._kme is not None:
            snapshot = self._serialize(self._kme, self.generation + 1)
        self.records_written += count
        return data, upto, snapshot

    # --- files --------------------------------------------------------------------

    def _write(self, data: bytes, snapshot: bytes | None) -> None:
        """Append ``data`` and ``fdatasync``; or install ``snapshot`` (it includes ``data``)."""
        with self._io:
            self._write_locked(data, snapshot)

    def _write_locked(self, data: bytes, snapshot: bytes | None) -> None:
        if self._fd is None:  # closed meanwhile: its final snapshot has all of this
            raise OSError("the KME state is closed")
        self.flushes += 1
        if snapshot is not None:
            self._install(snapshot)
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fdatasync(self._fd)
        self._journal_bytes += len(data)

    def _install(self, snapshot: bytes) -> None:
        """New snapshot (generation g+1), then a new empty journal g+1; both atomic."""
        generation = self.generation + 1
        atomic_write(self.path, snapshot)
        header = json.dumps({"generation": generation}).encode() + b"\n"
        atomic_write(self.journal_path, header)
        self._reopen()
        self.generation = generation
        self._snapshot_bytes = len(snapshot)
        self._journal_bytes = len(header)

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def close(self) -> None:
        """Compact (so consumed keys leave the disk) and close the journal.

        Raises:
            KMEStateError: the final snapshot could not be written.
        """
        with self._io:  # waits for a flush running in the worker thread
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is None:
            return
        try:
            if self._kme is not None and self._failed is None:
                self._buffer = []
                self._durable = self._appended
                self._write_locked(b"", self._serialize(self._kme, self.generation + 1))
        except (OSError, ConfigError) as exc:
            raise KMEStateError(f"cannot write the KME state {self.path}: {exc}") from exc
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @staticmethod
    def _serialize(kme: KME, generation: int) -> bytes:
        pools = []
        for pool in kme._pools.values():  # same package, read-only
            pools.append(
                {
                    "master": pool.master,
                    "slave": pool.slave,
                    "role": pool.role.value,
                    "peer_kme_id": pool.peer_kme_id,
                    "blocks": [
                        [b.key_id, _b64(b.data), b.added, b.used_ranges()]
                        for b in pool.blocks.values()
                    ],
                    "issued": [[k, _b64(buf), when] for k, (buf, when) in pool.issued.items()],
                }
            )
        state = {
            "format": FORMAT,
            "version": VERSION,
            "kme_id": kme.kme_id,
            "key_size": kme.key_size,
            "generation": generation,
            "saes": sorted(kme.saes),
            "pools": pools,
        }
        return json.dumps(state, separators=(",", ":")).encode()


class DurableKME(KME):
    """A :class:`KME` that records every change in a :class:`KMEStore` (crash-safe).

    Use :meth:`open`. Servers (:class:`~qcall.qkd.server.KMEServer`) await
    ``kme.store.commit()`` before answering, so every key they hand out is
    durably consumed first. Other callers (a relay supplying keys) should call
    :meth:`KMEStore.flush` or ``await store.commit()`` after their changes.
    """

    store: KMEStore

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        kme_id: str,
        *,
        key_size: int = DEFAULT_KEY_SIZE,
        compact_bytes: int = COMPACT_BYTES,
        **options: Any,
    ) -> DurableKME:
        """Load the KME state from ``path`` (and its journal), or create it.

        Args:
            path: the snapshot file (created ``0600`` in an existing directory).
            kme_id, key_size, options: as for :class:`KME`; an existing state
                must have the same ``kme_id`` and ``key_size``.
            compact_bytes: see :class:`KMEStore`.

        Raises:
            KMEStateError: the files are corrupt, or belong to another KME.
            ConfigError: the directory does not exist or is not writable.
        """
        store = KMEStore(path, compact_bytes=compact_bytes)
        kme = cls(kme_id, key_size=key_size, **options)
        kme.store = store
        kme._recording = False
        if not store.path.parent.is_dir():
            raise ConfigError(f"cannot keep KME state in {store.path.parent}: no such directory")
        if store.path.exists():
            kme._load()
        store._kme = kme
        try:
            # A fresh snapshot and an empty journal: replayed records are now compact.
            store._install(KMEStore._serialize(kme, store.generation + 1))
        except (OSError, ConfigError) as exc:
            raise KMEStateError(f"cannot write the KME state {store.path}: {exc}") from exc
        kme._recording = True
        logger.info(
            "= KME %s state %s: %d pools, %d keys",
            kme.kme_id,
            store.path,
            len(kme._pools),
            sum(len(p.blocks) + len(p.issued) for p in kme._pools.values()),
        )
        return kme

    _recording = False

    def close(self) -> None:
        """Compact and close the state files (the KME object stays usable in memory)."""
        self.store.close()

    # --- loading ---------------------------------------------------------------------

    def _load(self) -> None:
        path = self.store.path
        try:
            raw = path.read_bytes()
            state = json.loads(raw)
        except OSError as exc:
            raise KMEStateError(f"cannot read the KME state {path}: {exc.strerror}") from exc
        except (ValueError, RecursionError):
            raise KMEStateError(f"{path}: not a KME state file (bad JSON)") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise KMEStateError(f"{path}: field 'format' is not {FORMAT!r}")
        if state.get("version") not in READABLE_VERSIONS:
            raise KMEStateError(f"{path}: field 'version' {state.get('version')!r} not supported")
        if state.get("kme_id") != self.kme_id:
            raise KMEStateError(
                f"{path}: field 'kme_id' is {state.get('kme_id')!r}, not {self.kme_id!r}"
            )
        if state.get("key_size") != self.key_size:
            raise KMEStateError(
                f"{path}: field 'key_size' is {state.get('key_size')!r}, not {self.key_size}"
            )
        generation = state.get("generation")
        if not isinstance(generation, int) or generation < 0:
            raise KMEStateError(f"{path}: field 'generation' must be a non-negative integer")
        try:
            for sae in _list(state, "saes", path):
                KME.add_sae(self, sae)
            for i, pool in enumerate(_list(state, "pools", path)):
                self._load_pool(pool, f"{path}: pools[{i}]")
        except (ValueError, TypeError, KeyError) as exc:
            raise KMEStateError(f"{path}: {exc}") from None
        self.store.generation = generation
        self.store._snapshot_bytes = len(raw)
        self._replay()

    def _load_pool(self, pool: Any, where: str) -> None:
        if not isinstance(pool, dict):
            raise KMEStateError(f"{where} must be an object")
        master, slave = pool["master"], pool["slave"]
        role = PoolRole(pool["role"])
        KME.add_pair(self, master, slave, role, peer_kme_id=pool["peer_kme_id"])
        target = self._pools[(SAEId(master), SAEId(slave))]
        if "blocks" in pool:  # version 2
            blocks, issued = ("blocks", pool["blocks"]), ("issued", pool["issued"])
        elif role is PoolRole.SLAVE:  # version 1: every key whole
            blocks, issued = ("dec", pool["dec"]), ("enc", [])
        else:
            blocks, issued = ("enc", pool["enc"]), ("dec", pool["dec"])
        for j, item in enumerate(blocks[1]):
            self._load_block(target, item, f"{where}.{blocks[0]}[{j}]")
        for j, item in enumerate(issued[1]):
            at = f"{where}.{issued[0]}[{j}]"
            key_id, key, when = item
            raw = _unb64(key, at)
            if not raw or not isinstance(when, int | float):
                raise KMEStateError(f"{at}: bad key size or time")
            target.add_issued(validate_key_id(key_id), bytearray(raw), float(when))

    def _load_block(self, pool: KeyPool, item: Any, where: str) -> None:
        key_id, key, added, *rest = item
        raw = _unb64(key, where)
        if len(raw) != self.key_size // 8 or not isinstance(added, int | float) or len(rest) > 1:
            raise KMEStateError(f"{where}: bad key size or time")
        used = ranges_mask(rest[0], len(raw)) if rest else 0
        master_side = pool.role is not PoolRole.SLAVE
        if used.bit_count() == len(raw) or (master_side and used & (used + 1)):
            raise KMEStateError(f"{where}: used bytes {rest[0]} are not possible here")
        pool.add(validate_key_id(key_id), bytearray(raw), float(added), used)

    def _replay(self) -> None:
        journal = self.store.journal_path
        try:
            data = journal.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise KMEStateError(f"cannot read {journal}: {exc.strerror}") from exc
        lines = data.split(b"\n")
        if lines.pop():  # bytes after the last newline: a write the crash cut short
            logger.warning("! %s: dropped a torn last record (never acknowledged)", journal)
        try:
            header = json.loads(lines[0]) if lines else None
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("generation") != self.store.generation:
            if lines:
                logger.info("= %s: stale journal (an interrupted compaction), ignored", journal)
            return
        for number, line in enumerate(lines[1:], start=2):
            try:
                self._apply(json.loads(line))
            except (ValueError, TypeError, KeyError) as exc:
                raise KMEStateError(f"{journal}: line {number}: bad record ({exc})") from None

    def _apply(self, record: Any) -> None:
        """Replay one journal record on the in-memory pools."""
        if not isinstance(record, dict):
            raise TypeError("a record must be an object")
        op = record["op"]
        if op == "sae":
            KME.add_sae(self, record["id"])
        elif op == "pair":
            KME.add_pair(self, record["m"], record["s"], record["role"], peer_kme_id=record["peer"])
        elif op == "supply":
            keys = [(k, _unb64(v, "supply")) for k, v in record["keys"]]
            KME.supply(
                self,
                record["m"],
                record["s"],
                keys,
                role=record["role"],
                peer_kme_id=record["peer"],
                now=float(record["now"]),
            )
        elif op in ("enc", "dec", "expire"):
            pool = self._pools[(SAEId(record["m"]), SAEId(record["s"]))]
            ids = [KeyId(k) for k in record["ids"]]
            if op == "enc":  # cut the same keys again: the cut is a function of the pool
                size = record.get("size", self.key_size)
                if not isinstance(size, int) or size <= 0 or size % 8:
                    raise ValueError(f"bad size {size!r}")
                if pool.stored_bytes() < len(ids) * size // 8:
                    raise KeyError(f"key_ID {ids[0]} is not in the enc pool")
                got = [k for k, _ in pool.issue(len(ids), size // 8, float(record["now"]))]
                wrong = [k for k, g in zip(ids, got, strict=True) if k != g]
                if wrong:
                    raise KeyError(f"key_ID {wrong[0]} is not in the enc pool")
            elif op == "dec":
                _, missing = pool.redeem(ids)
                if missing:
                    raise KeyError(f"key_ID {missing[0]} is not in the dec pool")
            else:
                for kid in ids:
                    pool.erase(kid)
        else:
            raise ValueError(f"unknown op {op!r}")

    # --- recorded changes ------------------------------------------------------------

    def add_sae(self, sae_id: str) -> None:
        new = sae_id not in self._saes
        super().add_sae(sae_id)
        if new and self._recording:
            self.store.append({"op": "sae", "id": sae_id})

    def add_pair(
        self,
        master: str,
        slave: str,
        role: PoolRole | str = PoolRole.LOCAL,
        *,
        peer_kme_id: str | None = None,
    ) -> None:
        new = (SAEId(master), SAEId(slave)) not in self._pools
        super().add_pair(master, slave, role, peer_kme_id=peer_kme_id)
        if new and self._recording:
            pool = self._pools[(SAEId(master), SAEId(slave))]
            self.store.append(
                {
                    "op": "pair",
                    "m": master,
                    "s": slave,
                    "role": pool.role.value,
                    "peer": pool.peer_kme_id,
                }
            )

    def supply(
        self,
        master: str,
        slave: str,
        keys: Iterable[tuple[str, bytes]],
        *,
        role: PoolRole | str = PoolRole.LOCAL,
        peer_kme_id: str | None = None,
        now: float = 0.0,
    ) -> int:
        keys = list(keys)
        stored = super().supply(master, slave, keys, role=role, peer_kme_id=peer_kme_id, now=now)
        if stored and self._recording:
            pool = self._pools[(SAEId(master), SAEId(slave))]
            self.store.append(
                {
                    "op": "supply",
                    "m": master,
                    "s": slave,
                    "role": pool.role.value,
                    "peer": pool.peer_kme_id,
                    "now": now,
                    "keys": [[k, _b64(v)] for k, v in keys[:stored]],
                }
            )
        return stored

    def enc_keys(
        self, caller: SAEId, slave: str, request: KeyRequest, now: float = 0.0
    ) -> KeyContainer:
        self._check_store()
        container = super().enc_keys(caller, slave, request, now)
        self.store.append(
            {
                "op": "enc",
                "m": caller,
                "s": slave,
                "now": now,
                "size": self.key_size if request.size is None else request.size,
                "ids": [k.key_id for k in container.keys],
            }
        )
        return container

    def dec_keys(
        self,
        caller: SAEId,
        master: str,
        key_ids: Sequence[KeyId],
        now: float = 0.0,
        *,
        application: str = UNTAGGED,
    ) -> KeyContainer:
        self._check_store()
        container = super().dec_keys(caller, master, key_ids, now, application=application)
        self.store.append(
            {"op": "dec", "m": master, "s": caller, "ids": [k.key_id for k in container.keys]}
        )
        return container

    def _expired(self, pool: KeyPool, key_ids: list[KeyId]) -> None:
        if self._recording:
            self.store.append({"op": "expire", "m": pool.master, "s": pool.slave, "ids": key_ids})

    def _check_store(self) -> None:
        if self.store._failed is not None:
            text = "KME state storage failed; no keys are served until it restarts"
            raise KMEUnavailableError(text, status=503, message=text)


def _list(state: dict[str, Any], name: str, path: Path) -> list[Any]:
    value = state.get(name)
    if not isinstance(value, list):
        raise KMEStateError(f"{path}: field {name!r} must be a list")
    return value


async def commit_all(kmes: Iterable[KME]) -> None:
    """``await store.commit()`` for every :class:`DurableKME` among ``kmes``."""
    for kme in kmes:
        if isinstance(kme, DurableKME):
            with contextlib.suppress(KMEStateError):  # requests will report it (503)
                await kme.store.commit()
