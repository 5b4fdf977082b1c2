"""The server's offline message store and prekey directory (``docs/messaging.md`` §12).

The signaling server keeps, for each recipient, the envelopes sent while it
was offline, and for each user the prekey bundle others need to reach it. It
only ever holds ciphertext, sizes, times and routing names.

:class:`MessageStore` is the small interface the server talks to (a PostgreSQL
backend can implement it later); :class:`SQLiteMessageStore` is the default:
one SQLite file in WAL mode, ``synchronous=FULL``, a versioned schema.

Rules:

* :meth:`MessageStore.put` returns once the envelope is committed to disk:
  acknowledge it to the sender only then, and it survives ``kill -9``.
  A sender's ``client_ref`` makes a resend idempotent (the same id comes back).
* :meth:`~MessageStore.fetch` returns envelopes in id order; :meth:`~MessageStore.ack`
  deletes them. Delivery is at-least-once; the client drops envelope ids it has
  processed already, so each message is processed exactly once.
* :meth:`~MessageStore.claim_prekeys` hands out each one-time prekey once (it is
  deleted in the same transaction that returns it).
* Limits per envelope and per recipient (:class:`StoreLimits`) are checked before
  anything is stored: :class:`~qcall.exceptions.MessageTooLargeError`,
  :class:`~qcall.exceptions.MailboxFullError`.

Group commit: writes are queued to one worker thread, which runs every write
waiting in the queue in one transaction (each in its own savepoint, so one
refused write does not undo the others) and commits them with one ``fsync``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qcall._sqlite import durable, migrate, schema_version
from qcall.exceptions import MailboxFullError, MessageStoreError, MessageTooLargeError

__all__ = [
    "SCHEMA_VERSION",
    "ClaimedPrekeys",
    "MessageStore",
    "SQLiteMessageStore",
    "StoreLimits",
    "StoredEnvelope",
]

logger = logging.getLogger(__name__)

_SCHEMA_1 = """
CREATE TABLE envelopes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL, sender TEXT NOT NULL,
    received_ms INTEGER NOT NULL, data BLOB NOT NULL);
CREATE INDEX envelopes_recipient ON envelopes (recipient, id);
CREATE INDEX envelopes_received ON envelopes (received_ms);
CREATE TABLE mailboxes (
    recipient TEXT PRIMARY KEY, messages INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE refs (
    sender TEXT NOT NULL, recipient TEXT NOT NULL, ref BLOB NOT NULL,
    envelope_id INTEGER NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (sender, recipient, ref));
CREATE TABLE identities (
    owner TEXT PRIMARY KEY, identity_key BLOB NOT NULL, signed_prekey BLOB NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE one_time_prekeys (
    owner TEXT NOT NULL, prekey_id INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (owner, prekey_id));
"""

#: Schema migrations: version -> SQL bringing version-1 to it.
MIGRATIONS: dict[int, str] = {1: _SCHEMA_1}
SCHEMA_VERSION = max(MIGRATIONS)

_T = TypeVar("_T")


@dataclass(frozen=True)
class StoreLimits:
    """What one recipient may be sent while offline, and prekey bounds."""

    max_envelope_size: int = 1024 * 1024
    max_messages: int = 10_000  # per recipient
    max_bytes: int = 2 * 1024**3  # per recipient (a 1 GiB file in chunks, and more)
    max_one_time_prekeys: int = 500  # per owner
    max_prekey_size: int = 8 * 1024  # one signed prekey (record + ML-DSA signature)
    ttl: float = 30 * 86400.0  # seconds an envelope (and a client_ref) is kept

    def __post_init__(self) -> None:
        for name in ("max_envelope_size", "max_messages", "max_bytes", "max_one_time_prekeys"):
            if getattr(self, name) < 1:
                raise ValueError(f"field {name!r} must be at least 1")


@dataclass(frozen=True)
class StoredEnvelope:
    """An envelope waiting for its recipient (``data`` is opaque ciphertext)."""

    id: int
    recipient: str
    sender: str
    received_at: float
    data: bytes

    def __repr__(self) -> str:
        return f"<StoredEnvelope #{self.id} {self.sender}→{self.recipient} {len(self.data)} bytes>"


@dataclass(frozen=True)
class ClaimedPrekeys:
    """What a sender gets for ``owner``: identity key, signed prekey, ≤ 1 one-time prekey."""

    owner: str
    identity_key: bytes
    signed_prekey: bytes
    one_time_prekey: bytes | None


class MessageStore(abc.ABC):
    """The storage interface of offline messages and prekeys (SQLite now; PostgreSQL later)."""

    @abc.abstractmethod
    async def put(
        self, recipient: str, sender: str, data: bytes, now: float, client_ref: bytes | None = None
    ) -> int:
        """Store one envelope durably and return its id (the same id for a repeated
        ``(sender, recipient, client_ref)``).

        Raises:
            MessageTooLargeError: the envelope is over ``max_envelope_size``.
            MailboxFullError: the recipient's mailbox is over its limits.
        """

    @abc.abstractmethod
    async def fetch(self, recipient: str, after: int = 0, limit: int = 100) -> list[StoredEnvelope]:
        """The recipient's envelopes with an id above ``after``, oldest first."""

    @abc.abstractmethod
    async def ack(self, recipient: str, ids: Sequence[int]) -> int:
        """Delete the recipient's envelopes ``ids``; returns how many existed."""

    @abc.abstractmethod
    async def mailbox(self, recipient: str) -> tuple[int, int]:
        """``(messages, bytes)`` waiting for ``recipient``."""

    @abc.abstractmethod
    async def publish_prekeys(
        self,
        owner: str,
        identity_key: bytes,
        signed_prekey: bytes,
        one_time_prekeys: Sequence[tuple[int, bytes]],
        now: float,
    ) -> int:
        """Set the owner's identity key and signed prekey, add one-time prekeys.

        Returns the number of one-time prekeys now held. A new identity key
        drops the old one-time prekeys (they belonged to the old identity).
        """

    @abc.abstractmethod
    async def claim_prekeys(self, owner: str) -> ClaimedPrekeys | None:
        """The owner's bundle with one one-time prekey (deleted now), or ``None``."""

    @abc.abstractmethod
    async def one_time_prekeys(self, owner: str) -> int:
        """How many one-time prekeys of ``owner`` are left."""

    @abc.abstractmethod
    async def expire(self, now: float) -> int:
        """Delete envelopes older than the TTL; returns how many."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish the queued writes and close. Safe to call twice."""

    # Shared by the implementations: the checks made before anything is stored.
    limits: StoreLimits

    def _check_envelopes(self, items: Sequence[tuple[str, str, bytes, bytes | None]]) -> None:
        for recipient, _, data, _ in items:
            if len(data) > self.limits.max_envelope_size:
                raise MessageTooLargeError(
                    f"an envelope of {len(data)} bytes for {recipient} is over the server's "
                    f"limit of {self.limits.max_envelope_size} bytes"
                )

    def _check_prekeys(
        self, owner: str, signed_prekey: bytes, one_time_prekeys: Sequence[tuple[int, bytes]]
    ) -> None:
        limit = self.limits.max_prekey_size
        if len(signed_prekey) > limit or any(len(d) > limit for _, d in one_time_prekeys):
            raise MessageTooLargeError(f"a prekey of {owner} is over {limit} bytes")


class SQLiteMessageStore(MessageStore):
    """:class:`MessageStore` in one SQLite file (see the module docstring).

    Args:
        path: the database file (created with mode 0600).
        limits: per-envelope and per-recipient limits.

    Raises:
        MessageStoreError: the file is not such a store, is corrupt, or comes
            from a newer version (naming the file).
    """

    def __init__(self, path: str | os.PathLike[str], limits: StoreLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits or StoreLimits()
        if not self.path.exists():
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise MessageStoreError(f"cannot create {self.path}: {exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise MessageStoreError(
                f"{self.path} is not a qcall message store or is corrupt ({exc})"
            ) from None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="message-store", daemon=True)
        self._closed = False
        self._worker.start()
        #: Commits made and writes committed (for benchmarks and tests).
        self.commits = 0
        self.writes = 0

    def __repr__(self) -> str:
        return f"SQLiteMessageStore({str(self.path)!r})"

    def _migrate(self) -> None:
        db = self._db
        durable(db)
        version = schema_version(db, self.path, SCHEMA_VERSION, MessageStoreError)
        db.execute("BEGIN IMMEDIATE")
        try:
            migrate(db, MIGRATIONS, version, SCHEMA_VERSION)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("SELECT COUNT(*) FROM envelopes").fetchone()  # reads a page: corruption shows

    # --- the worker thread: group commit ----------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop:
                break
        self._db.close()

    def _run_batch(self, batch: list[_Job]) -> None:
        db = self._db
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for job in batch:
                db.execute("SAVEPOINT job")
                try:
                    value = job.fn(db)
                except Exception as exc:  # this job only: its savepoint is undone
                    db.execute("ROLLBACK TO job")
                    if isinstance(exc, sqlite3.Error):
                        exc = MessageStoreError(f"{self.path}: {exc}")
                    results.append((job, None, exc))
                else:
                    results.append((job, value, None))
                db.execute("RELEASE job")
            db.execute("COMMIT")
            self.commits += 1
            self.writes += len(batch)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            failed = MessageStoreError(f"{self.path}: {exc}")
            results = [(job, None, failed) for job in batch]
        for job, value, error in results:
            job.settle(value, error)

    async def _submit(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise MessageStoreError(f"{self.path}: the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._queue.put(_Job(fn, loop, future))
        return await future

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            await asyncio.to_thread(self._worker.join)

    # --- envelopes --------------------------------------------------------------------------

    async def put(
        self, recipient: str, sender: str, data: bytes, now: float, client_ref: bytes | None = None
    ) -> int:
        return (await self.put_many([(recipient, sender, data, client_ref)], now))[0]

    async def put_many(
        self, items: Sequence[tuple[str, str, bytes, bytes | None]], now: float
    ) -> list[int]:
        """Store several envelopes in one transaction (all or, on a limit, none)."""
        self._check_envelopes(items)
        ms = int(now * 1000)

        def write(db: sqlite3.Connection) -> list[int]:
            return [self._put_one(db, r, s, bytes(d), ms, ref) for r, s, d, ref in items]

        return await self._submit(write)

    def _put_one(
        self,
        db: sqlite3.Connection,
        recipient: str,
        sender: str,
        data: bytes,
        ms: int,
        ref: bytes | None,
    ) -> int:
        if ref is not None:
            row = db.execute(
                "SELECT envelope_id FROM refs WHERE sender = ? AND recipient = ? AND ref = ?",
                (sender, recipient, ref),
            ).fetchone()
            if row is not None:
                return int(row[0])
        box = db.execute(
            "SELECT messages, bytes FROM mailboxes WHERE recipient = ?", (recipient,)
        ).fetchone() or (0, 0)
        if box[0] + 1 > self.limits.max_messages or box[1] + len(data) > self.limits.max_bytes:
            raise MailboxFullError(
                f"the mailbox of {recipient} is full ({box[0]} messages, {box[1]} bytes waiting)"
            )
        cur = db.execute(
            "INSERT INTO envelopes (recipient, sender, received_ms, data) VALUES (?,?,?,?)",
            (recipient, sender, ms, data),
        )
        envelope_id = int(cur.lastrowid or 0)
        db.execute(
            "INSERT INTO mailboxes VALUES (?, 1, ?) ON CONFLICT (recipient) DO UPDATE SET "
            "messages = messages + 1, bytes = bytes + excluded.bytes",
            (recipient, len(data)),
        )
        if ref is not None:
            db.execute(
                "INSERT INTO refs VALUES (?,?,?,?,?)", (sender, recipient, ref, envelope_id, ms)
            )
        return envelope_id

    async def fetch(self, recipient: str, after: int = 0, limit: int = 100) -> list[StoredEnvelope]:
        def read(db: sqlite3.Connection) -> list[StoredEnvelope]:
            rows = db.execute(
                "SELECT id, sender, received_ms, data FROM envelopes WHERE recipient = ? "
                "AND id > ? ORDER BY id LIMIT ?",
                (recipient, after, limit),
            ).fetchall()
            return [
                StoredEnvelope(int(r[0]), recipient, r[1], r[2] / 1000, bytes(r[3])) for r in rows
            ]

        return await self._submit(read)

    async def ack(self, recipient: str, ids: Sequence[int]) -> int:
        def delete(db: sqlite3.Connection) -> int:
            gone, size = 0, 0
            for envelope_id in ids:
                row = db.execute(
                    "DELETE FROM envelopes WHERE id = ? AND recipient = ? RETURNING length(data)",
                    (int(envelope_id), recipient),
                ).fetchone()
                if row is not None:
                    gone, size = gone + 1, size + int(row[0])
            if gone:
                db.execute(
                    "UPDATE mailboxes SET messages = messages - ?, bytes = bytes - ? "
                    "WHERE recipient = ?",
                    (gone, size, recipient),
                )
            return gone

        return await self._submit(delete)

    async def mailbox(self, recipient: str) -> tuple[int, int]:
        def read(db: sqlite3.Connection) -> tuple[int, int]:
            row = db.execute(
                "SELECT messages, bytes FROM mailboxes WHERE recipient = ?", (recipient,)
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return await self._submit(read)

    async def expire(self, now: float) -> int:
        cutoff = int((now - self.limits.ttl) * 1000)

        def delete(db: sqlite3.Connection) -> int:
            old = db.execute(
                "SELECT recipient, COUNT(*), SUM(length(data)) FROM envelopes "
                "WHERE received_ms < ? GROUP BY recipient",
                (cutoff,),
            ).fetchall()
            for recipient, count, size in old:
                db.execute(
                    "UPDATE mailboxes SET messages = messages - ?, bytes = bytes - ? "
                    "WHERE recipient = ?",
                    (count, size, recipient),
                )
            db.execute("DELETE FROM envelopes WHERE received_ms < ?", (cutoff,))
            db.execute("DELETE FROM refs WHERE at_ms < ?", (cutoff,))
            return sum(int(r[1]) for r in old)

        return await self._submit(delete)

    # --- prekeys ------------------------------------------------------------------------------

    async def publish_prekeys(
        self,
        owner: str,
        identity_key: bytes,
        signed_prekey: bytes,
        one_time_prekeys: Sequence[tuple[int, bytes]],
        now: float,
    ) -> int:
        self._check_prekeys(owner, signed_prekey, one_time_prekeys)

        def write(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT identity_key FROM identities WHERE owner = ?", (owner,)
            ).fetchone()
            if row is not None and bytes(row[0]) != identity_key:
                db.execute("DELETE FROM one_time_prekeys WHERE owner = ?", (owner,))
            db.execute(
                "INSERT OR REPLACE INTO identities VALUES (?,?,?,?)",
                (owner, identity_key, signed_prekey, int(now * 1000)),
            )
            held = self._count_prekeys(db, owner)
            if held + len(one_time_prekeys) > self.limits.max_one_time_prekeys:
                raise MailboxFullError(
                    f"{owner} would hold more than {self.limits.max_one_time_prekeys} "
                    "one-time prekeys"
                )
            for prekey_id, data in one_time_prekeys:
                db.execute(
                    "INSERT OR REPLACE INTO one_time_prekeys VALUES (?,?,?)",
                    (owner, prekey_id, data),
                )
            return self._count_prekeys(db, owner)

        return await self._submit(write)

    @staticmethod
    def _count_prekeys(db: sqlite3.Connection, owner: str) -> int:
        row = db.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE owner = ?", (owner,))
        return int(row.fetchone()[0])

    async def claim_prekeys(self, owner: str) -> ClaimedPrekeys | None:
        def claim(db: sqlite3.Connection) -> ClaimedPrekeys | None:
            row = db.execute(
                "SELECT identity_key, signed_prekey FROM identities WHERE owner = ?", (owner,)
            ).fetchone()
            if row is None:
                return None
            opk = db.execute(
                "DELETE FROM one_time_prekeys WHERE rowid = (SELECT rowid FROM one_time_prekeys "
                "WHERE owner = ? ORDER BY prekey_id LIMIT 1) RETURNING data",
                (owner,),
            ).fetchone()
            return ClaimedPrekeys(
                owner, bytes(row[0]), bytes(row[1]), bytes(opk[0]) if opk else None
            )

        return await self._submit(claim)

    async def one_time_prekeys(self, owner: str) -> int:
        return await self._submit(lambda db: self._count_prekeys(db, owner))


class _Job:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn, self.loop, self.future = fn, loop, future

    def settle(self, value: Any, error: BaseException | None) -> None:
        def done() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.loop.call_soon_threadsafe(done)
