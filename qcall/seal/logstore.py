"""The transparency log's durable state: one SQLite database (WAL, versioned schema).

Schema version 1 (``PRAGMA user_version``)::

    meta(key TEXT PRIMARY KEY, value BLOB)        log_id, name
    entries(idx INTEGER PRIMARY KEY,              0, 1, 2, ... with no gap
            leaf BLOB, leaf_hash BLOB,            the RFC 9162 leaf input and its hash
            statement_digest BLOB UNIQUE,         SHA-384 of the statement (dedup)
            signer BLOB, timestamp INTEGER,       signer certificate SHA-256, log time (ms)
            chain BLOB)                           certificate SHA-256s, concatenated
    certificates(fpr BLOB PRIMARY KEY, der BLOB)  every certificate an entry names
    heads(tree_size INTEGER PRIMARY KEY,          every signed tree head
          timestamp INTEGER, root BLOB, signature BLOB)

**Atomicity.** :meth:`LogStore.append` writes a batch of entries *and* the tree
head that covers them in one transaction, with ``synchronous=FULL``: after a
crash (``kill -9``, power loss) the database holds either the whole batch and its
head or neither, and the log answers a request only after that commit returned,
so every acknowledged entry survives. On open, :meth:`LogStore.check` finds what
a damaged file would break: a gap in the indexes, or a recomputed root that is
not the latest signed head's (:class:`~qcall.exceptions.LogStorageError`, naming
the file); a file that is not a database at all is reported the same way.

Two connections: the writer (used by one worker thread at a time) and the
reader (the event loop's thread); WAL lets the reader see the last commit
while the writer writes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from qcall.exceptions import LogStorageError
from qcall.seal.logformat import TreeHead

__all__ = ["SCHEMA_VERSION", "LogStore", "StoredEntry"]

SCHEMA_VERSION: Final = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE entries (
    idx INTEGER PRIMARY KEY,
    leaf BLOB NOT NULL,
    leaf_hash BLOB NOT NULL,
    statement_digest BLOB NOT NULL UNIQUE,
    signer BLOB NOT NULL,
    timestamp INTEGER NOT NULL,
    chain BLOB NOT NULL
);
CREATE INDEX entries_signer ON entries (signer);
CREATE INDEX entries_leaf_hash ON entries (leaf_hash);
CREATE TABLE certificates (fpr BLOB PRIMARY KEY, der BLOB NOT NULL);
CREATE TABLE heads (
    tree_size INTEGER PRIMARY KEY,
    timestamp INTEGER NOT NULL,
    root BLOB NOT NULL,
    signature BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class StoredEntry:
    """One row of ``entries`` as the log writes it."""

    index: int
    leaf: bytes = field(repr=False)
    leaf_hash: bytes = field(repr=False)
    statement_digest: bytes = field(repr=False)
    signer: bytes = field(repr=False)
    timestamp: int
    chain: tuple[bytes, ...] = field(repr=False)


class LogStore:
    """A log's SQLite database. Use :meth:`open`.

    Args:
        path: the database file.
        synchronous: SQLite ``synchronous`` (``FULL``: durable across power loss).
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LogStore({str(self.path)!r})"

    def _error(self, exc: BaseException, doing: str) -> LogStorageError:
        return LogStorageError(f"log database {self.path}: {doing} failed ({exc})")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        log_id: bytes | None = None,
        create: bool = False,
        synchronous: str = "FULL",
    ) -> LogStore:
        """Open (or with ``create``, make) the database and check its schema.

        Raises:
            LogStorageError: missing, not a database, another schema version, or
                the database belongs to another log (``log_id``).
        """
        store = cls(path, synchronous=synchronous)
        if not create and not store.path.exists():
            raise LogStorageError(f"log database {store.path} does not exist")
        try:
            store._writer = store._connect()
            store._writer.execute("PRAGMA journal_mode = WAL")
            store._writer.execute(f"PRAGMA synchronous = {synchronous}")
            version = store._writer.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = store._writer.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise LogStorageError(f"{store.path} is a database, but not a seal log")
                if not create:
                    raise LogStorageError(f"{store.path} is empty: not a seal log")
                store._create(log_id)
            elif version != SCHEMA_VERSION:
                raise LogStorageError(
                    f"{store.path} has schema version {version}; this qcall reads "
                    f"version {SCHEMA_VERSION}"
                )
            store._reader = store._connect()
            stored = store.meta("log_id")
            if log_id is not None and stored != log_id:
                raise LogStorageError(f"{store.path} belongs to another log (other log ID)")
        except sqlite3.DatabaseError as exc:
            store.close()
            raise LogStorageError(
                f"log database {store.path} is corrupt or not a database ({exc})"
            ) from None
        except LogStorageError:
            store.close()
            raise
        return store

    def _create(self, log_id: bytes | None) -> None:
        assert self._writer is not None
        self._writer.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA}"
            f"INSERT INTO meta VALUES ('log_id', X'{(log_id or b'').hex()}');"
            f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    def close(self) -> None:
        """Close both connections."""
        with self._lock:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = None

    def _read(self) -> sqlite3.Connection:
        if self._reader is None:
            raise LogStorageError(f"log database {self.path} is closed")
        return self._reader

    # --- reading ----------------------------------------------------------------------

    def meta(self, key: str) -> bytes | None:
        conn = self._reader or self._writer
        assert conn is not None
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def size(self) -> int:
        """Number of committed entries."""
        try:
            return int(self._read().execute("SELECT count(*) FROM entries").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "counting entries") from None

    def leaf_hashes(self) -> Iterator[bytes]:
        """Every leaf hash, in index order (checks that indexes have no gap).

        Raises:
            LogStorageError: a gap or a malformed hash (a damaged database).
        """
        try:
            rows = self._read().execute("SELECT idx, leaf_hash FROM entries ORDER BY idx")
            for expected, (idx, h) in enumerate(rows):
                if idx != expected or not isinstance(h, bytes) or len(h) != 32:
                    raise LogStorageError(
                        f"log database {self.path} is damaged: entry {expected} is missing "
                        "or malformed"
                    )
                yield h
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "reading the entries") from None

    def latest_head(self) -> TreeHead | None:
        """The most recent signed tree head, or ``None`` for a new log."""
        return self._head("SELECT * FROM heads ORDER BY tree_size DESC LIMIT 1", ())

    def head(self, tree_size: int) -> TreeHead | None:
        """The signed head of exactly ``tree_size`` entries, if one was issued."""
        return self._head("SELECT * FROM heads WHERE tree_size = ?", (tree_size,))

    def _head(self, sql: str, args: tuple[int, ...]) -> TreeHead | None:
        try:
            row = self._read().execute(sql, args).fetchone()
            if row is None:
                return None
            log = self.meta("log_id") or b""
            return TreeHead(log, int(row[0]), int(row[1]), bytes(row[2]), bytes(row[3]))
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "reading the tree heads") from None
        except ValueError as exc:
            raise LogStorageError(f"log database {self.path}: a tree head is malformed") from exc

    def find(self, statement_digest: bytes) -> StoredEntry | None:
        """The entry of a statement, if logged."""
        return self._entry("WHERE statement_digest = ?", (statement_digest,))

    def find_leaf(self, leaf_hash: bytes) -> int | None:
        """The index of the first entry with this leaf hash, if any."""
        try:
            row = (
                self._read()
                .execute("SELECT min(idx) FROM entries WHERE leaf_hash = ?", (leaf_hash,))
                .fetchone()
            )
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "looking up a leaf") from None
        return None if row is None or row[0] is None else int(row[0])

    def entry(self, index: int) -> StoredEntry | None:
        return self._entry("WHERE idx = ?", (index,))

    def _entry(self, where: str, args: tuple[object, ...]) -> StoredEntry | None:
        try:
            row = (
                self._read()
                .execute(
                    "SELECT idx, leaf, leaf_hash, statement_digest, signer, timestamp, chain "
                    f"FROM entries {where}",
                    args,
                )
                .fetchone()
            )
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "reading an entry") from None
        return None if row is None else _stored(row)

    def entries(self, start: int, end: int) -> list[StoredEntry]:
        """Entries ``start`` to ``end`` - 1."""
        try:
            rows = (
                self._read()
                .execute(
                    "SELECT idx, leaf, leaf_hash, statement_digest, signer, timestamp, chain "
                    "FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                    (start, end),
                )
                .fetchall()
            )
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "reading entries") from None
        return [_stored(row) for row in rows]

    def certificate(self, fpr: bytes) -> bytes | None:
        try:
            row = (
                self._read()
                .execute("SELECT der FROM certificates WHERE fpr = ?", (fpr,))
                .fetchone()
            )
        except sqlite3.DatabaseError as exc:
            raise self._error(exc, "reading a certificate") from None
        return None if row is None else bytes(row[0])

    # --- writing ----------------------------------------------------------------------

    def append(
        self,
        entries: Sequence[StoredEntry],
        certificates: dict[bytes, bytes],
        head: TreeHead,
    ) -> None:
        """Write entries, their certificates and the head covering them: one transaction.

        Safe to call from a worker thread (one at a time).

        Raises:
            LogStorageError: the transaction failed and was rolled back.
        """
        with self._lock:
            conn = self._writer
            if conn is None:
                raise LogStorageError(f"log database {self.path} is closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            e.index,
                            e.leaf,
                            e.leaf_hash,
                            e.statement_digest,
                            e.signer,
                            e.timestamp,
                            b"".join(e.chain),
                        )
                        for e in entries
                    ],
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO certificates VALUES (?, ?)", certificates.items()
                )
                conn.execute(
                    "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?)",
                    (head.tree_size, head.timestamp, head.root_hash, head.signature),
                )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise self._error(exc, "writing entries") from None


def _stored(row: Any) -> StoredEntry:
    idx, leaf, leaf_hash, digest, signer, timestamp, chain = row
    chain = bytes(chain)
    return StoredEntry(
        int(idx),
        bytes(leaf),
        bytes(leaf_hash),
        bytes(digest),
        bytes(signer),
        int(timestamp),
        tuple(chain[i : i + 32] for i in range(0, len(chain), 32)),
    )
