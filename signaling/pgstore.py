"""The offline message store and prekey directory in PostgreSQL (``--database postgresql://``).

:class:`PostgresMessageStore` implements :class:`~signaling.store.MessageStore`
with the same rules as :class:`~signaling.store.SQLiteMessageStore` (the same
tests run against both, ``tests/test_signaling_store.py``), for several
signaling instances sharing one database:

* every operation is one transaction on one of ``pool_size`` connections;
  :meth:`put` returns once PostgreSQL committed it (acknowledge it only then);
* a recipient's mailbox row is locked (``SELECT ... FOR UPDATE``) while an
  envelope is added, so the limits and the ``client_ref`` idempotency hold
  when two instances store for the same recipient at once;
* a one-time prekey is deleted by the statement that returns it
  (``FOR UPDATE SKIP LOCKED``), so two instances never hand out the same one;
* the schema is created or migrated under an advisory lock (instances may start
  together) and its version kept in ``qcall_schema``.

When PostgreSQL cannot be reached, every call raises
:class:`~qcall.exceptions.MessageStoreError` naming the server (never its
password): a message is then refused, never accepted and lost. A broken
connection is dropped and a new one opened by the next operation, so the store
recovers by itself when the server is back.

psycopg 3 (``pip install 'qcall[scale]'``) is imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from qcall.exceptions import MailboxFullError, MessageStoreError
from signaling.store import ClaimedPrekeys, MessageStore, StoredEnvelope, StoreLimits

__all__ = ["PG_SCHEMA_VERSION", "PostgresMessageStore"]

logger = logging.getLogger(__name__)

_SCHEMA_1 = """
CREATE TABLE envelopes (
    id BIGSERIAL PRIMARY KEY, recipient TEXT NOT NULL, sender TEXT NOT NULL,
    received_ms BIGINT NOT NULL, data BYTEA NOT NULL);
CREATE INDEX envelopes_recipient ON envelopes (recipient, id);
CREATE INDEX envelopes_received ON envelopes (received_ms);
CREATE TABLE mailboxes (
    recipient TEXT PRIMARY KEY, messages BIGINT NOT NULL, bytes BIGINT NOT NULL);
CREATE TABLE refs (
    sender TEXT NOT NULL, recipient TEXT NOT NULL, ref BYTEA NOT NULL,
    envelope_id BIGINT NOT NULL, at_ms BIGINT NOT NULL, PRIMARY KEY (sender, recipient, ref));
CREATE INDEX refs_at ON refs (at_ms);
CREATE TABLE identities (
    owner TEXT PRIMARY KEY, identity_key BYTEA NOT NULL, signed_prekey BYTEA NOT NULL,
    updated_ms BIGINT NOT NULL);
CREATE TABLE one_time_prekeys (
    owner TEXT NOT NULL, prekey_id BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (owner, prekey_id));
"""

# Version 2: one envelope stored in one statement (one round trip instead of five);
# the same steps as before, in the same order, under the same mailbox row lock.
_PUT_FUNCTION = """
CREATE OR REPLACE FUNCTION qcall_put(
    p_recipient TEXT, p_sender TEXT, p_data BYTEA, p_ms BIGINT, p_ref BYTEA,
    p_max_messages BIGINT, p_max_bytes BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    box_messages BIGINT; box_bytes BIGINT; found_id BIGINT; new_id BIGINT;
BEGIN
    INSERT INTO mailboxes VALUES (p_recipient, 0, 0) ON CONFLICT (recipient) DO NOTHING;
    SELECT messages, bytes INTO box_messages, box_bytes FROM mailboxes
        WHERE recipient = p_recipient FOR UPDATE;
    IF p_ref IS NOT NULL THEN
        SELECT envelope_id INTO found_id FROM refs
            WHERE sender = p_sender AND recipient = p_recipient AND ref = p_ref;
        IF found_id IS NOT NULL THEN RETURN found_id; END IF;
    END IF;
    IF box_messages + 1 > p_max_messages OR box_bytes + length(p_data) > p_max_bytes THEN
        RETURN -1;
    END IF;
    INSERT INTO envelopes (recipient, sender, received_ms, data)
        VALUES (p_recipient, p_sender, p_ms, p_data) RETURNING id INTO new_id;
    UPDATE mailboxes SET messages = messages + 1, bytes = bytes + length(p_data)
        WHERE recipient = p_recipient;
    IF p_ref IS NOT NULL THEN
        INSERT INTO refs VALUES (p_sender, p_recipient, p_ref, new_id, p_ms);
    END IF;
    RETURN new_id;
END $$
"""


def _statements(sql: str) -> list[str]:
    return [statement for statement in sql.split(";") if statement.strip()]


#: Schema migrations: version -> the statements bringing version-1 to it.
PG_MIGRATIONS: dict[int, list[str]] = {1: _statements(_SCHEMA_1), 2: [_PUT_FUNCTION]}
#: Envelopes stored in one transaction at most (group commit).
MAX_GROUP = 256
PG_SCHEMA_VERSION = max(PG_MIGRATIONS)
#: ``pg_advisory_xact_lock`` key held while the schema is created or migrated.
_MIGRATION_LOCK = 0x71CA11

_T = TypeVar("_T")
_Conn = AsyncConnection[Any]


def describe(url: str) -> str:
    """``postgresql://HOST:PORT/DB`` of ``url`` without user or password (for messages)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "PostgreSQL (unparsable URL)"
    host, port = info.get("host") or "localhost", info.get("port") or "5432"
    return f"postgresql://{host}:{port}/{info.get('dbname') or ''}"


class PostgresMessageStore(MessageStore):
    """:class:`MessageStore` in PostgreSQL (see the module docstring).

    Make one with :meth:`connect`, which checks the server and the schema.

    Args:
        url: a libpq URL or conninfo string (``postgresql://user@host:port/db``).
        limits: per-envelope and per-recipient limits.
        pool_size: connections used at most at once.
        connect_timeout: seconds to wait for a new connection.
    """

    def __init__(
        self,
        url: str,
        limits: StoreLimits | None = None,
        *,
        pool_size: int = 4,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.where = describe(url)
        self.limits = limits or StoreLimits()
        self.connect_timeout = connect_timeout
        self._idle: asyncio.Queue[_Conn | None] = asyncio.Queue()
        for _ in range(pool_size):
            self._idle.put_nowait(None)  # a slot without a connection yet
        self._busy: set[_Conn] = set()
        self._closed = False
        self._pool_size = pool_size
        self._waiting: list[_Put] = []  # puts not yet taken by a committer
        self._committers = 0
        #: Commits of write transactions, and writes committed (for benchmarks and tests).
        self.commits = 0
        self.writes = 0

    def __repr__(self) -> str:
        return f"PostgresMessageStore({self.where!r})"

    @classmethod
    async def connect(
        cls, url: str, limits: StoreLimits | None = None, **kwargs: Any
    ) -> PostgresMessageStore:
        """A store on ``url`` with its schema created or migrated.

        Raises:
            MessageStoreError: PostgreSQL is unreachable, or its schema is newer
                than this qcall's.
        """
        store = cls(url, limits, **kwargs)
        try:
            await store._run(store._migrate)
        except BaseException:
            await store.close()
            raise
        return store

    async def _migrate(self, db: _Conn) -> None:
        await db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await db.execute("CREATE TABLE IF NOT EXISTS qcall_schema (version INTEGER NOT NULL)")
        row = await (await db.execute("SELECT max(version) FROM qcall_schema")).fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        if version > PG_SCHEMA_VERSION:
            raise MessageStoreError(
                f"{self.where} has schema version {version}, from a newer qcall "
                f"(this one knows up to {PG_SCHEMA_VERSION})"
            )
        for target in range(version + 1, PG_SCHEMA_VERSION + 1):
            for statement in PG_MIGRATIONS[target]:
                await db.execute(statement)  # our constant SQL
            await db.execute("INSERT INTO qcall_schema VALUES (%s)", (target,))

    # --- connections ------------------------------------------------------------------------

    async def _open(self) -> _Conn:
        try:
            return await asyncio.wait_for(
                AsyncConnection.connect(
                    self.url, connect_timeout=max(1, int(self.connect_timeout))
                ),
                self.connect_timeout,
            )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise MessageStoreError(
                f"{self.where} is unavailable: {_reason(exc)}; nothing was stored"
            ) from None

    async def _run(self, fn: Callable[[_Conn], Awaitable[_T]], *, write: bool | int = False) -> _T:
        """Run ``fn`` in one transaction on a pooled connection.

        A pooled connection the server closed while it was idle (PostgreSQL
        restarted) fails at ``BEGIN``, before anything ran: the transaction is
        then run once more on a new connection.
        """
        if self._closed:
            raise MessageStoreError(f"{self.where}: the store is closed")
        conn = await self._idle.get()
        retried = False
        try:
            while True:
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    conn = await self._open()
                self._busy.add(conn)
                began = False
                try:
                    async with conn.transaction():
                        began = True
                        value = await fn(conn)
                except psycopg.OperationalError:
                    if began or retried or not (conn.closed or conn.broken):
                        raise
                    retried = True
                    logger.info("! %s closed an idle connection: opening another", self.where)
                    self._busy.discard(conn)
                    continue
                if write:
                    self.commits += 1
                    self.writes += 1 if write is True else write
                return value
        except psycopg.Error as exc:
            if conn is not None and (conn.closed or conn.broken):
                await _quietly_close(conn)
                conn = None
            raise MessageStoreError(f"{self.where}: {_reason(exc)}") from None
        finally:
            if conn is not None:
                self._busy.discard(conn)
            if self._closed and conn is not None:
                await _quietly_close(conn)
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await _quietly_close(conn)

    # --- envelopes --------------------------------------------------------------------------

    async def put(
        self, recipient: str, sender: str, data: bytes, now: float, client_ref: bytes | None = None
    ) -> int:
        """Store one envelope; concurrent puts share transactions (group commit).

        Waiting puts are taken by up to ``pool_size`` committers, each running up
        to :data:`MAX_GROUP` of them in one transaction, all their statements
        sent at once (pipeline mode), sorted by recipient so that two committers
        lock mailboxes in the same order. A full mailbox refuses its envelope
        only; a failed transaction refuses all of its envelopes (none stored).
        """
        self._check_envelopes([(recipient, sender, data, client_ref)])
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        put = _Put(recipient, sender, bytes(data), int(now * 1000), client_ref, future)
        self._waiting.append(put)
        if self._committers < self._pool_size:
            self._committers += 1
            task = asyncio.create_task(self._commit_waiting())
            task.add_done_callback(_consume)
        return await future

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                batch.sort(key=lambda put: put.recipient)  # stable: per-recipient order kept
                futures = [put.future for put in batch if put.future is not None]
                try:
                    ids = await self._run(partial(self._put_group, batch=batch), write=len(batch))
                except Exception as exc:  # nothing of this transaction was stored
                    if not isinstance(exc, MessageStoreError):
                        logger.exception("! group commit failed")
                        exc = MessageStoreError(f"{self.where}: {_reason(exc)}")
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for put, future, envelope_id in zip(batch, futures, ids, strict=True):
                    if future.done():
                        continue  # the sender gave up waiting (it resends, same client_ref)
                    if envelope_id < 0:
                        future.set_exception(self._full(put.recipient))
                    else:
                        future.set_result(envelope_id)
        finally:
            self._committers -= 1

    async def _put_group(self, db: _Conn, *, batch: list[_Put]) -> list[int]:
        most = (self.limits.max_messages, self.limits.max_bytes)
        sql = "SELECT qcall_put(%s, %s, %s, %s, %s, %s, %s)"
        async with db.pipeline():
            cursors = [
                await db.execute(sql, (p.recipient, p.sender, p.data, p.ms, p.ref, *most))
                for p in batch
            ]
        return [int((await cur.fetchone() or (0,))[0]) for cur in cursors]

    def _full(self, recipient: str) -> MailboxFullError:
        return MailboxFullError(
            f"the mailbox of {recipient} is full (at most {self.limits.max_messages} messages, "
            f"{self.limits.max_bytes} bytes waiting)"
        )

    async def put_many(
        self, items: Sequence[tuple[str, str, bytes, bytes | None]], now: float
    ) -> list[int]:
        """Store several envelopes in one transaction (all or, on a limit, none)."""
        self._check_envelopes(items)
        batch = [_Put(r, s, bytes(d), int(now * 1000), ref, None) for r, s, d, ref in items]

        async def write(db: _Conn) -> list[int]:
            ids = await self._put_group(db, batch=batch)
            for put, envelope_id in zip(batch, ids, strict=True):
                if envelope_id < 0:
                    raise self._full(put.recipient)  # rolls the transaction back
            return ids

        return await self._run(write, write=len(batch))

    async def fetch(self, recipient: str, after: int = 0, limit: int = 100) -> list[StoredEnvelope]:
        async def read(db: _Conn) -> list[StoredEnvelope]:
            cur = await db.execute(
                "SELECT id, sender, received_ms, data FROM envelopes WHERE recipient = %s "
                "AND id > %s ORDER BY id LIMIT %s",
                (recipient, after, limit),
            )
            return [
                StoredEnvelope(int(r[0]), recipient, r[1], r[2] / 1000, bytes(r[3]))
                for r in await cur.fetchall()
            ]

        return await self._run(read)

    async def ack(self, recipient: str, ids: Sequence[int]) -> int:
        async def delete(db: _Conn) -> int:
            cur = await db.execute(
                "DELETE FROM envelopes WHERE recipient = %s AND id = ANY(%s) "
                "RETURNING length(data)",
                (recipient, [int(i) for i in ids]),
            )
            sizes = [int(r[0]) for r in await cur.fetchall()]
            if sizes:
                await db.execute(
                    "UPDATE mailboxes SET messages = messages - %s, bytes = bytes - %s "
                    "WHERE recipient = %s",
                    (len(sizes), sum(sizes), recipient),
                )
            return len(sizes)

        return await self._run(delete, write=True)

    async def mailbox(self, recipient: str) -> tuple[int, int]:
        async def read(db: _Conn) -> tuple[int, int]:
            cur = await db.execute(
                "SELECT messages, bytes FROM mailboxes WHERE recipient = %s", (recipient,)
            )
            row = await cur.fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return await self._run(read)

    async def expire(self, now: float) -> int:
        cutoff = int((now - self.limits.ttl) * 1000)

        async def delete(db: _Conn) -> int:
            cur = await db.execute(
                "DELETE FROM envelopes WHERE received_ms < %s RETURNING recipient, length(data)",
                (cutoff,),
            )
            per: dict[str, list[int]] = {}
            for recipient, size in await cur.fetchall():
                count_size = per.setdefault(recipient, [0, 0])
                count_size[0] += 1
                count_size[1] += int(size)
            for recipient, (count, size) in sorted(per.items()):  # one lock order
                await db.execute(
                    "UPDATE mailboxes SET messages = messages - %s, bytes = bytes - %s "
                    "WHERE recipient = %s",
                    (count, size, recipient),
                )
            await db.execute("DELETE FROM refs WHERE at_ms < %s", (cutoff,))
            return sum(c for c, _ in per.values())

        return await self._run(delete, write=True)

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

        async def write(db: _Conn) -> int:
            cur = await db.execute(
                "SELECT identity_key FROM identities WHERE owner = %s FOR UPDATE", (owner,)
            )
            row = await cur.fetchone()
            if row is not None and bytes(row[0]) != identity_key:
                await db.execute("DELETE FROM one_time_prekeys WHERE owner = %s", (owner,))
            await db.execute(
                "INSERT INTO identities VALUES (%s,%s,%s,%s) ON CONFLICT (owner) DO UPDATE SET "
                "identity_key = excluded.identity_key, signed_prekey = excluded.signed_prekey, "
                "updated_ms = excluded.updated_ms",
                (owner, identity_key, signed_prekey, int(now * 1000)),
            )
            held = await self._count_prekeys(db, owner)
            if held + len(one_time_prekeys) > self.limits.max_one_time_prekeys:
                raise MailboxFullError(
                    f"{owner} would hold more than {self.limits.max_one_time_prekeys} "
                    "one-time prekeys"
                )
            for prekey_id, data in one_time_prekeys:
                await db.execute(
                    "INSERT INTO one_time_prekeys VALUES (%s,%s,%s) ON CONFLICT (owner, prekey_id) "
                    "DO UPDATE SET data = excluded.data",
                    (owner, prekey_id, data),
                )
            return await self._count_prekeys(db, owner)

        return await self._run(write, write=True)

    @staticmethod
    async def _count_prekeys(db: _Conn, owner: str) -> int:
        cur = await db.execute("SELECT COUNT(*) FROM one_time_prekeys WHERE owner = %s", (owner,))
        return int((await cur.fetchone() or (0,))[0])

    async def claim_prekeys(self, owner: str) -> ClaimedPrekeys | None:
        async def claim(db: _Conn) -> ClaimedPrekeys | None:
            cur = await db.execute(
                "SELECT identity_key, signed_prekey FROM identities WHERE owner = %s", (owner,)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            cur = await db.execute(
                "DELETE FROM one_time_prekeys WHERE (owner, prekey_id) = (SELECT owner, prekey_id "
                "FROM one_time_prekeys WHERE owner = %s ORDER BY prekey_id LIMIT 1 "
                "FOR UPDATE SKIP LOCKED) RETURNING data",
                (owner,),
            )
            opk = await cur.fetchone()
            return ClaimedPrekeys(
                owner, bytes(row[0]), bytes(row[1]), bytes(opk[0]) if opk else None
            )

        return await self._run(claim, write=True)

    async def one_time_prekeys(self, owner: str) -> int:
        return await self._run(lambda db: self._count_prekeys(db, owner))


@dataclass(slots=True)
class _Put:
    """One envelope waiting for a group commit (``future``: its id or error)."""

    recipient: str
    sender: str
    data: bytes
    ms: int
    ref: bytes | None
    future: asyncio.Future[int] | None

    def __repr__(self) -> str:
        return f"<_Put {self.sender}→{self.recipient} {len(self.data)} bytes>"


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("! group commit failed: %r", task.exception())


def _reason(exc: BaseException) -> str:
    """A one-line cause of a driver error (no URL, no password: libpq never echoes it)."""
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


async def _quietly_close(conn: _Conn) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
