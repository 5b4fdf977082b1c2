"""The client's message store: SQLite (WAL), versioned schema, secrets encrypted at rest.

One file per user (default ``messages.db`` in the qcall home, mode 0600) holds
the sessions, the prekeys' private keys, skipped keys (inside the sessions),
group states and sender chains, QKD keys fetched but not yet used, the outbox
and the history (``docs/messaging.md`` §10).

Encryption at rest: every secret or private column is AES-256-GCM under the
*store key* ``SK = store_key(identity seed, salt)``, re-derived from the ML-DSA
identity seed at each opening and never written; the nonce is random and the
associated data ``framed(table, row key)`` pins each value to its row. Names
(peers, conversations) are stored as keyed hashes ``HMAC(SK, name)[:16]``.

Atomicity: :meth:`ClientStore.transaction` is one SQLite transaction (``BEGIN
IMMEDIATE`` … ``COMMIT``, ``synchronous=FULL``). The messaging client advances a
session and stores the message it was advanced for in the same transaction, so
a ``kill -9`` at any point loses no message and never reuses a message key
(``tests/test_messaging_store.py`` kills a real child process to check it).

Errors: a file that is not a store, is corrupt, belongs to another identity or
to a newer qcall is a :class:`~qcall.exceptions.MessageStoreError` naming it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from qcall import config, pqc
from qcall._sqlite import durable, migrate, schema_version
from qcall.exceptions import MessageFormatError, MessageStoreError, PrekeyError
from qcall.messaging.keyschedule import store_key
from qcall.messaging.prekeys import PrekeyKind, PrekeyRecord, SignedPrekey
from qcall.messaging.records import HistoryEntry, OutboxEntry, Transfer
from qcall.messaging.state import SessionState
from qcall.messaging.store_tables import GroupAndTransferTables
from qcall.messaging.wire import framed

__all__ = [
    "MESSAGES_FILE",
    "SCHEMA_VERSION",
    "ClientStore",
    "HistoryEntry",
    "OutboxEntry",
    "Transfer",
]

logger = logging.getLogger(__name__)

#: Default file name in the qcall home.
MESSAGES_FILE = "messages.db"

_SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE prekeys (
    kind INTEGER NOT NULL, prekey_id INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    signed BLOB NOT NULL, private BLOB, used_ms INTEGER,
    PRIMARY KEY (kind, prekey_id));
CREATE TABLE sessions (
    session_id BLOB PRIMARY KEY, peer BLOB NOT NULL, state BLOB NOT NULL,
    active INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE INDEX sessions_peer ON sessions (peer, active);
CREATE TABLE inits (th BLOB PRIMARY KEY, session_id BLOB NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation BLOB NOT NULL,
    message_id BLOB NOT NULL, outgoing INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    status INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX history_conversation ON history (conversation, id);
CREATE UNIQUE INDEX history_message ON history (conversation, message_id, outgoing);
CREATE TABLE processed (envelope_id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, recipient TEXT NOT NULL,
    envelope BLOB NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE qkd_keys (key_id TEXT PRIMARY KEY, key BLOB NOT NULL, at_ms INTEGER NOT NULL);
CREATE TABLE groups (group_id BLOB PRIMARY KEY, name BLOB NOT NULL, state BLOB NOT NULL);
CREATE TABLE sender_chains (
    group_id BLOB NOT NULL, epoch INTEGER NOT NULL, sender BLOB NOT NULL, chain BLOB NOT NULL,
    PRIMARY KEY (group_id, epoch, sender));
CREATE TABLE pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT, envelope_id INTEGER, sender TEXT NOT NULL,
    envelope BLOB NOT NULL, reason TEXT NOT NULL, at_ms INTEGER NOT NULL);
"""

_SCHEMA_2 = """
CREATE TABLE transfers (
    file_id BLOB PRIMARY KEY, conversation BLOB NOT NULL, outgoing INTEGER NOT NULL,
    offer BLOB NOT NULL, next_chunk INTEGER NOT NULL, path TEXT NOT NULL,
    updated_ms INTEGER NOT NULL);
"""

# A session kept in two parts (§10.4): sessions.state holds the small chain part (rewritten
# per message), session_epochs the big epoch part (rewritten when it changes); ``tag`` pairs
# them. A row written before version 3 has tag NULL and its whole state in sessions.state.
_SCHEMA_3 = """
ALTER TABLE sessions ADD COLUMN tag BLOB;
CREATE TABLE session_epochs (
    session_id BLOB PRIMARY KEY, tag BLOB NOT NULL, state BLOB NOT NULL);
"""

# Only sent messages are looked up by message id (receipts: set_status), so only they are
# indexed by it (§10.1): a received message no longer inserts into an index on a random key
# (one page of it dirtied, written and fsync'd per message of a batch).
_SCHEMA_4 = """
DROP INDEX history_message;
CREATE UNIQUE INDEX history_sent ON history (conversation, message_id) WHERE outgoing = 1;
"""

#: Schema migrations: version -> SQL that brings version-1 to it (docs/messaging.md §10.1).
MIGRATIONS: dict[int, str] = {1: _SCHEMA_1, 2: _SCHEMA_2, 3: _SCHEMA_3, 4: _SCHEMA_4}
#: The schema version this code writes.
SCHEMA_VERSION = max(MIGRATIONS)

_CHECK = b"qcall message store check v1"
#: Parsed session states kept in memory (ClientStore._session).
_PARSED_SESSIONS = 64
#: Length of the random tag pairing a session's two parts (§10.4).
_PART_TAG_LEN = 16
#: Names whose keyed hash is kept in memory (ClientStore.tag).
_TAGS = 1024


_TABLES: dict[str, bytes] = {}  # framed table names
_NONCE = pqc.AEAD_NONCE_LEN
_INSERT_HISTORY = (
    "INSERT INTO history (conversation, message_id, outgoing, at_ms, status, body) "
    "VALUES (?,?,?,?,?,?)"
)


def _framed_row(table: str, row: bytes) -> bytes:
    """``framed(table, row)``: the associated data of a sealed value (§10.2)."""
    prefix = _TABLES.get(table)
    if prefix is None:
        prefix = _TABLES[table] = framed(table.encode())
    return prefix + len(row).to_bytes(4, "big") + row


class ClientStore(GroupAndTransferTables):
    """One user's message store (see the module docstring).

    Args:
        path: the SQLite file (created, mode 0600, if absent).
        identity_seed: the user's ML-DSA seed ξ; the store key derives from it.
        max_version: the newest schema to migrate to (tests of migrations only).

    Raises:
        MessageStoreError: the file is not a store, is corrupt, was written by a
            newer qcall, or belongs to another identity (each naming the file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity_seed: bytes,
        *,
        max_version: int = SCHEMA_VERSION,
    ) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        # Parsed sessions by id, with the sealed row they were read from or written as
        # (see _session): a hit only when the row in the file is still that one.
        self._parsed: dict[bytes, tuple[bytes, SessionState]] = {}
        # Epoch parts by session id: (tag, SessionState.epoch_fields()) of one written or
        # read. A tag is random per write, so the pair stays true even if that write rolled
        # back; save_session checks that the file still holds the tag (§10.4).
        self._epochs: dict[bytes, tuple[bytes, tuple[object, ...]]] = {}
        self._tags: dict[str, bytes] = {}  # tag() of recent names
        existed = self.path.exists()
        if not existed:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, config.PRIVATE_MODE)
                os.close(fd)
            except OSError as exc:
                raise MessageStoreError(f"cannot create {self.path}: {exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise MessageStoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            self._setup(identity_seed, max_version)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise MessageStoreError(
                f"{self.path} is not a qcall message store or is corrupt ({exc}); "
                "move it aside to start a new one"
            ) from None
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"ClientStore({str(self.path)!r})"

    # --- opening, schema, encryption ------------------------------------------------------

    def _setup(self, identity_seed: bytes, max_version: int) -> None:
        db = self._db
        durable(db)
        db.execute("PRAGMA foreign_keys = ON")
        version = schema_version(db, self.path, SCHEMA_VERSION, MessageStoreError)
        with self.transaction():
            for target in migrate(db, MIGRATIONS, version, max_version):
                logger.info("= %s: schema migrated to version %d", self.path, target)
            row = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()
            if row is None:
                salt = secrets.token_bytes(32)
                db.execute("INSERT INTO meta VALUES ('salt', ?)", (salt,))
                self._keys(identity_seed, salt)
                check = self._seal("meta", b"check", _CHECK)
                db.execute("INSERT INTO meta VALUES ('check', ?)", (check,))
                return
        self._keys(identity_seed, bytes(row[0]))
        row = db.execute("SELECT value FROM meta WHERE key = 'check'").fetchone()
        if row is None or self._open_raw("meta", b"check", bytes(row[0])) != _CHECK:
            raise MessageStoreError(
                f"{self.path} belongs to another identity: its store key does not open it"
            )

    def _keys(self, identity_seed: bytes, salt: bytes) -> None:
        self._key = pqc.AES256GCM(store_key(identity_seed, salt))
        self._mac_key = store_key(identity_seed, salt, b"store names")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic transaction.

        A nested call is a savepoint inside the outer transaction: if it raises, its
        own writes are rolled back and the outer transaction goes on (so one bad
        item of a batch committed together loses nothing else); if it returns, its
        writes commit with the outer transaction.
        """
        with self._lock:
            if self._depth:
                name = f"nested{self._depth}"
                self._db.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield
                except BaseException:
                    self._db.execute(f"ROLLBACK TO {name}")
                    raise
                finally:
                    self._depth -= 1
                    self._db.execute(f"RELEASE {name}")
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise MessageStoreError(f"{self.path}: cannot start a transaction: {exc}") from exc
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._db.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise MessageStoreError(f"{self.path}: cannot commit: {exc}") from exc

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            raise MessageStoreError(f"{self.path}: {exc}") from exc

    def _many(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        if not rows:
            return
        try:
            with self._lock:
                self._db.executemany(sql, rows)
        except sqlite3.DatabaseError as exc:
            raise MessageStoreError(f"{self.path}: {exc}") from exc

    def _seal(self, table: str, row: bytes, data: bytes) -> bytes:
        nonce = os.urandom(pqc.AEAD_NONCE_LEN)  # (= secrets.token_bytes)
        return self._key.seal_prefixed(nonce, data, _framed_row(table, row))

    def _seal_many(self, table: str, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """:meth:`_seal` of several ``(row, data)``: the same sealed values, their random
        nonces read from the OS in one call (each as random as one read alone)."""
        size = _NONCE
        nonces = os.urandom(size * len(items))
        seal, out = self._key.seal_prefixed, []
        for k, (row, data) in enumerate(items):
            out.append(seal(nonces[k * size : (k + 1) * size], data, _framed_row(table, row)))
        return out

    def _open_raw(self, table: str, row: bytes, blob: bytes) -> bytes | None:
        return self._key.open(
            blob[: pqc.AEAD_NONCE_LEN], blob[pqc.AEAD_NONCE_LEN :], _framed_row(table, row)
        )

    def _open(self, table: str, row: bytes, blob: bytes) -> bytes:
        data = self._open_raw(table, row, bytes(blob))
        if data is None:
            raise MessageStoreError(
                f"{self.path}: a {table} entry does not decrypt (corrupt or moved between rows)"
            )
        return data

    def tag(self, name: str) -> bytes:
        """The keyed hash under which ``name`` (a peer or conversation) is stored."""
        tag = self._tags.get(name)
        if tag is None:
            tag = hmac.digest(self._mac_key, name.encode("utf-8"), "sha256")[:16]
            if len(self._tags) >= _TAGS:
                self._tags.clear()
            self._tags[name] = tag
        return tag

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- prekeys (docs/messaging.md §2.4) ---------------------------------------------------

    def add_prekey(self, prekey: SignedPrekey, seed: bytes) -> None:
        """Keep a new prekey and its private seed."""
        rec = prekey.record
        row = bytes([rec.kind]) + rec.prekey_id.to_bytes(4, "big")
        self._exec(
            "INSERT INTO prekeys (kind, prekey_id, created_ms, signed, private) VALUES (?,?,?,?,?)",
            (
                rec.kind,
                rec.prekey_id,
                rec.created_ms,
                prekey.serialize(),
                self._seal("prekeys", row, seed),
            ),
        )

    def next_prekey_id(self) -> int:
        row = self._exec("SELECT MAX(prekey_id) FROM prekeys").fetchone()
        return int(row[0] or 0) + 1

    def prekey(self, kind: PrekeyKind, prekey_id: int) -> tuple[PrekeyRecord, bytes]:
        """The record and seed of a prekey a message names.

        Raises:
            PrekeyError: unknown, or a one-time prekey already used (its private
                key is gone): "a one-time prekey used twice".
        """
        row = self._exec(
            "SELECT signed, private, used_ms FROM prekeys WHERE kind = ? AND prekey_id = ?",
            (kind, prekey_id),
        ).fetchone()
        what = f"{kind.name.lower().replace('_', '-')} prekey #{prekey_id}"
        if row is None:
            raise PrekeyError(f"{what} is unknown here (never ours, or expired and deleted)")
        if row[1] is None:
            raise PrekeyError(
                f"{what} was already used: a one-time prekey used twice is refused "
                "(a replay, or the server handed it out twice)"
            )
        key = bytes([kind]) + prekey_id.to_bytes(4, "big")
        return SignedPrekey.parse(bytes(row[0])).record, self._open("prekeys", key, row[1])

    def prekey_record(self, kind: PrekeyKind, prekey_id: int) -> PrekeyRecord | None:
        """The public record of a prekey, used or not (to recompute a set-up transcript)."""
        row = self._exec(
            "SELECT signed FROM prekeys WHERE kind = ? AND prekey_id = ?", (kind, prekey_id)
        ).fetchone()
        return SignedPrekey.parse(bytes(row[0])).record if row else None

    def consume_one_time_prekey(self, prekey_id: int, now: float) -> None:
        """Delete the private key of a used one-time prekey (in the caller's transaction)."""
        self._exec(
            "UPDATE prekeys SET private = NULL, used_ms = ? WHERE kind = ? AND prekey_id = ?",
            (int(now * 1000), PrekeyKind.ONE_TIME, prekey_id),
        )

    def unused_one_time_prekeys(self) -> int:
        row = self._exec(
            "SELECT COUNT(*) FROM prekeys WHERE kind = ? AND private IS NOT NULL",
            (PrekeyKind.ONE_TIME,),
        ).fetchone()
        return int(row[0])

    def signed_prekeys(self) -> list[SignedPrekey]:
        """Our signed prekeys whose private keys are kept, newest first."""
        rows = self._exec(
            "SELECT signed FROM prekeys WHERE kind = ? AND private IS NOT NULL "
            "ORDER BY created_ms DESC, prekey_id DESC",
            (PrekeyKind.SIGNED,),
        ).fetchall()
        return [SignedPrekey.parse(bytes(r[0])) for r in rows]

    def delete_signed_prekeys_before(self, created_ms: int) -> int:
        """Forget old signed prekeys (their late prekey messages can no longer open)."""
        cur = self._exec(
            "DELETE FROM prekeys WHERE kind = ? AND created_ms < ?", (PrekeyKind.SIGNED, created_ms)
        )
        return cur.rowcount

    # --- sessions and prekey-message replay detection -----------------------------------------

    def save_session(self, state: SessionState, now: float, *, active: bool = True) -> None:
        """Insert or replace a session's state (the active one for its peer if ``active``).

        In two parts (``docs/messaging.md`` §10.4): the small chain part every time, the big
        epoch part only when it changed or the file no longer holds the one last seen.
        """
        sid = state.session_id
        peer = self.tag(state.peer_name)
        if active:
            self._exec(
                "UPDATE sessions SET active = 0 WHERE peer = ? AND session_id != ?",
                (peer, sid),
            )
        chains = state.serialize_chains()
        known = self._epochs.get(sid)
        if known is not None and known[1] == state.epoch_fields():
            tag = known[0]
            blob = self._seal("sessions", sid + tag, chains)
            cur = self._exec(
                "UPDATE sessions SET state = ?, updated_ms = ?, active = MAX(active, ?) "
                "WHERE session_id = ? AND tag = ?",
                (blob, int(now * 1000), int(active), sid, tag),
            )
            if cur.rowcount == 1:
                self._cache(sid, blob, state)
                return
        tag = secrets.token_bytes(_PART_TAG_LEN)
        self._exec(
            "INSERT INTO session_epochs VALUES (?,?,?) ON CONFLICT (session_id) DO UPDATE SET "
            "tag = excluded.tag, state = excluded.state",
            (sid, tag, self._seal("session_epochs", sid + tag, state.serialize_epoch())),
        )
        blob = self._seal("sessions", sid + tag, chains)
        self._exec(
            "INSERT INTO sessions (session_id, peer, state, active, updated_ms, tag) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT (session_id) DO UPDATE SET "
            "state = excluded.state, updated_ms = excluded.updated_ms, "
            "active = MAX(active, excluded.active), tag = excluded.tag",
            (sid, peer, blob, int(active), int(now * 1000), tag),
        )
        self._known_epoch(sid, tag, state)
        self._cache(sid, blob, state)

    def _known_epoch(self, session_id: bytes, tag: bytes, state: SessionState) -> None:
        self._epochs.pop(session_id, None)
        if len(self._epochs) >= 4 * _PARSED_SESSIONS:
            del self._epochs[next(iter(self._epochs))]
        self._epochs[session_id] = (tag, state.epoch_fields())

    def _cache(self, session_id: bytes, blob: bytes, state: SessionState) -> None:
        self._parsed.pop(session_id, None)
        if len(self._parsed) >= _PARSED_SESSIONS:
            del self._parsed[next(iter(self._parsed))]
        self._parsed[session_id] = (blob, state)

    def _session(self, row: tuple[bytes, bytes, bytes | None] | None) -> SessionState | None:
        """The state in ``row`` (session id, sealed state or chain part, tag or NULL).

        The state last written is kept in memory with its sealed row (random nonce) and
        used only while the file still holds that row (a rolled-back transaction or
        savepoint, or another process's write, is a miss); it is handed out once (saving
        caches it again), so a state advanced and never saved is never served.
        """
        if row is None:
            return None
        session_id, blob = bytes(row[0]), bytes(row[1])
        cached = self._parsed.pop(session_id, None)
        if cached is not None and cached[0] == blob:
            return cached[1]
        try:
            if row[2] is None:  # written before schema version 3: the whole state
                return SessionState.parse(self._open("sessions", session_id, blob))
            tag = bytes(row[2])
            epoch = self._exec(
                "SELECT state FROM session_epochs WHERE session_id = ? AND tag = ?",
                (session_id, tag),
            ).fetchone()
            if epoch is None:
                raise MessageStoreError(
                    f"{self.path}: a stored session is corrupt: its epoch part is missing"
                )
            state = SessionState.parse_parts(
                self._open("session_epochs", session_id + tag, epoch[0]),
                self._open("sessions", session_id + tag, blob),
            )
        except MessageFormatError as exc:
            raise MessageStoreError(f"{self.path}: a stored session is corrupt: {exc}") from None
        self._known_epoch(session_id, tag, state)
        return state

    def session(self, session_id: bytes) -> SessionState | None:
        row = self._exec(
            "SELECT session_id, state, tag FROM sessions WHERE session_id = ?", (session_id,)
        ).fetchone()
        return self._session(row)

    def active_session(self, peer: str) -> SessionState | None:
        row = self._exec(
            "SELECT session_id, state, tag FROM sessions WHERE peer = ? "
            "ORDER BY active DESC, updated_ms DESC LIMIT 1",
            (self.tag(peer),),
        ).fetchone()
        return self._session(row)

    def init_session(self, th_init: bytes) -> bytes | None:
        """The session a prekey message with this ``TH_init`` created, if any."""
        row = self._exec("SELECT session_id FROM inits WHERE th = ?", (th_init,)).fetchone()
        return bytes(row[0]) if row else None

    def record_init(self, th_init: bytes, session_id: bytes, now: float) -> None:
        self._exec("INSERT INTO inits VALUES (?,?,?)", (th_init, session_id, int(now * 1000)))

    # --- history -------------------------------------------------------------------------------

    def add_history(
        self,
        conversation: str,
        message_id: bytes,
        *,
        outgoing: bool,
        now: float,
        body: bytes,
        status: int = 0,
    ) -> int:
        """Append a message (``body``: the content bytes, encrypted here)."""
        conv = self.tag(conversation)
        sealed = self._seal("history", conv + message_id + bytes([outgoing]), body)
        cur = self._exec(
            _INSERT_HISTORY, (conv, message_id, int(outgoing), int(now * 1000), status, sealed)
        )
        return int(cur.lastrowid or 0)

    def add_histories(
        self, conversation: str, messages: list[tuple[bytes, bytes]], *, outgoing: bool, now: float
    ) -> None:
        """:meth:`add_history` for a burst of ``(message_id, body)`` (one statement)."""
        conv = self.tag(conversation)
        flag, out, at = bytes([outgoing]), int(outgoing), int(now * 1000)
        sealed = self._seal_many("history", [(conv + mid + flag, body) for mid, body in messages])
        self._many(
            _INSERT_HISTORY,
            [(conv, m[0], out, at, 0, blob) for m, blob in zip(messages, sealed, strict=True)],
        )

    def add_received(self, messages: list[tuple[str, bytes, bytes]], now: float) -> None:
        """Received messages ``(conversation, message_id, body)`` in one statement."""
        at, tag = int(now * 1000), self.tag
        convs = [tag(conversation) for conversation, _, _ in messages]
        sealed = self._seal_many(
            "history",
            [(conv + mid + b"\x00", body) for conv, (_, mid, body) in zip(convs, messages)],
        )
        rows: list[tuple[object, ...]] = [
            (conv, mid, 0, at, 0, blob)
            for conv, (_, mid, _), blob in zip(convs, messages, sealed, strict=True)
        ]
        self._many(_INSERT_HISTORY, rows)

    def history(self, conversation: str, *, limit: int = 1000) -> list[HistoryEntry]:
        """The last ``limit`` messages of a conversation, oldest first."""
        conv = self.tag(conversation)
        rows = self._exec(
            "SELECT id, message_id, outgoing, at_ms, status, body FROM history "
            "WHERE conversation = ? ORDER BY id DESC LIMIT ?",
            (conv, limit),
        ).fetchall()
        out = []
        for r in reversed(rows):
            mid, outgoing = bytes(r[1]), bool(r[2])
            body = self._open("history", conv + mid + bytes([outgoing]), r[5])
            out.append(HistoryEntry(int(r[0]), mid, outgoing, int(r[3]), int(r[4]), body))
        return out

    def set_status(self, conversation: str, message_id: bytes, status: int) -> bool:
        """Raise a sent message's status (delivered, read); never lowers it."""
        cur = self._exec(
            "UPDATE history SET status = ? WHERE conversation = ? AND message_id = ? "
            "AND outgoing = 1 AND status < ?",
            (status, self.tag(conversation), message_id, status),
        )
        return cur.rowcount > 0

    # --- exactly-once processing, outbox, pending ----------------------------------------------

    def processed(self, envelope_id: int) -> bool:
        """Whether the server's envelope ``envelope_id`` was already processed."""
        row = self._exec("SELECT 1 FROM processed WHERE envelope_id = ?", (envelope_id,))
        return row.fetchone() is not None

    def processed_ids(self, envelope_ids: list[int]) -> set[int]:
        """The envelope ids among ``envelope_ids`` already processed (one query)."""
        out: set[int] = set()
        for start in range(0, len(envelope_ids), 500):
            part = envelope_ids[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._exec(
                f"SELECT envelope_id FROM processed WHERE envelope_id IN ({marks})", tuple(part)
            )
            out.update(int(r[0]) for r in rows.fetchall())
        return out

    def mark_processed_many(self, envelope_ids: list[int], now: float) -> None:
        """:meth:`mark_processed` for several envelopes (one statement)."""
        at = int(now * 1000)
        self._many("INSERT OR IGNORE INTO processed VALUES (?,?)", [(i, at) for i in envelope_ids])

    def mark_processed(self, envelope_id: int, now: float) -> None:
        self._exec("INSERT OR IGNORE INTO processed VALUES (?,?)", (envelope_id, int(now * 1000)))

    def add_outbox(self, recipient: str, envelope: bytes, now: float) -> int:
        cur = self._exec(
            "INSERT INTO outbox (recipient, envelope, at_ms) VALUES (?,?,?)",
            (recipient, envelope, int(now * 1000)),
        )
        return int(cur.lastrowid or 0)

    def outbox(self) -> list[OutboxEntry]:
        """Every outbox entry, oldest first (:meth:`outbox_rows` is what a flush reads)."""
        rows = self._exec("SELECT id, recipient, envelope, at_ms FROM outbox ORDER BY id")
        return [OutboxEntry(int(r[0]), r[1], bytes(r[2]), int(r[3])) for r in rows.fetchall()]

    def outbox_rows(self, after: int = 0) -> list[tuple[int, str, bytes]]:
        """:meth:`outbox` as ``(id, recipient, envelope)`` tuples (what a flush needs)."""
        rows = self._exec(
            "SELECT id, recipient, envelope FROM outbox WHERE id > ? ORDER BY id", (after,)
        )
        return rows.fetchall()  # (INTEGER, TEXT and BLOB columns: int, str and bytes)

    def add_outboxes(self, recipient: str, envelopes: list[bytes], now: float) -> None:
        """:meth:`add_outbox` for a burst (one statement)."""
        self._many(
            "INSERT INTO outbox (recipient, envelope, at_ms) VALUES (?,?,?)",
            [(recipient, e, int(now * 1000)) for e in envelopes],
        )

    def remove_outbox(self, ids: list[int]) -> None:
        self._many("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def add_pending(
        self, envelope_id: int, sender: str, envelope: bytes, reason: str, now: float
    ) -> None:
        """Keep an envelope that cannot be opened yet (a sender key or QKD key to come)."""
        self._exec(
            "INSERT INTO pending (envelope_id, sender, envelope, reason, at_ms) VALUES (?,?,?,?,?)",
            (envelope_id, sender, envelope, reason, int(now * 1000)),
        )

    def pending(self) -> list[tuple[int, int, str, bytes]]:
        """``(pending id, envelope id, sender, envelope)``, oldest first."""
        rows = self._exec("SELECT id, envelope_id, sender, envelope FROM pending ORDER BY id")
        return [(int(r[0]), int(r[1]), r[2], bytes(r[3])) for r in rows.fetchall()]

    def remove_pending(self, pending_id: int) -> None:
        self._exec("DELETE FROM pending WHERE id = ?", (pending_id,))

    # --- QKD keys fetched but not yet used -------------------------------------------------------

    def put_qkd_key(self, key_id: str, key: bytes, now: float) -> None:
        """Keep a key fetched with ``dec_keys`` until the message it opens is stored."""
        sealed = self._seal("qkd_keys", key_id.encode(), key)
        self._exec(
            "INSERT OR REPLACE INTO qkd_keys VALUES (?,?,?)", (key_id, sealed, int(now * 1000))
        )

    def qkd_keys(self, key_ids: list[str]) -> dict[str, bytes]:
        out = {}
        for key_id in key_ids:
            row = self._exec("SELECT key FROM qkd_keys WHERE key_id = ?", (key_id,)).fetchone()
            if row is not None:
                out[key_id] = self._open("qkd_keys", key_id.encode(), row[0])
        return out

    def delete_qkd_keys(self, key_ids: list[str]) -> None:
        for key_id in key_ids:
            self._exec("DELETE FROM qkd_keys WHERE key_id = ?", (key_id,))
