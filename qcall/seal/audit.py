"""``qcall seal audit``: a monitor and witness of the transparency log.

The log signs what it shows, so misbehaviour leaves signed evidence. The monitor
keeps, in one SQLite file (``<home>/seal/audit.db``), every tree head it has seen
(from the log, and from the receipts of bundles it verified) and the leaf hash,
statement digest and signer key of every entry it has read. Each run:

1. fetches the latest tree head (signature checked);
2. raises a **fork / split view** alarm if a head of the same size with another
   root was ever seen — two signed, contradicting heads are the evidence;
3. checks an RFC 9162 consistency proof from every head not yet checked (and the
   largest checked one) to the new head: a failure is a **rewritten history**;
   a head smaller than one already seen is a **rollback**;
4. reads the new entries, recomputes the Merkle root from *all* entries read so
   far and compares it with the head: an entry left out, changed or reordered
   by ``get-entries`` is an **entries mismatch** (the log omits an entry);
5. compares every entry signed with one of the user's identity keys with the
   user's journal of what they signed (``signed.jsonl``): an entry the user never
   signed is an **unknown entry** (a stolen key, or a forged one), and an
   acknowledged entry of the user that is not at its index is an **omitted entry**.

Alarms are kept with their evidence; :meth:`Monitor.observe` is also what
``qcall seal verify`` calls with each verified receipt head (offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from qcall.exceptions import LogError, LogProofError, LogStorageError
from qcall.seal.logclient import LogClient
from qcall.seal.logformat import LogKey, TreeHead
from qcall.seal.merkle import MerkleTree, verify_inclusion

__all__ = ["Alarm", "AuditResult", "AuditStore", "Monitor", "own_key_id"]

SCHEMA_VERSION: Final = 1
PAGE: Final = 256

_SCHEMA = """
CREATE TABLE heads (
    log_id BLOB NOT NULL, tree_size INTEGER NOT NULL, timestamp INTEGER NOT NULL,
    root BLOB NOT NULL, signature BLOB NOT NULL, source TEXT NOT NULL,
    checked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (log_id, tree_size, root)
);
CREATE TABLE leaves (
    log_id BLOB NOT NULL, idx INTEGER NOT NULL, leaf_hash BLOB NOT NULL,
    statement_digest BLOB NOT NULL, signer_key BLOB NOT NULL,
    PRIMARY KEY (log_id, idx)
);
CREATE TABLE alarms (
    id INTEGER PRIMARY KEY, log_id BLOB NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, evidence TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Alarm:
    """Something the log did that an honest log cannot do.

    ``kind``: ``fork``, ``rewritten``, ``rollback``, ``entries_mismatch``,
    ``unknown_entry`` or ``omitted_entry``. ``evidence`` holds the signed heads
    (and indexes) that prove it.
    """

    kind: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class AuditResult:
    """What one audit run saw."""

    log: str
    tree_size: int
    entries_checked: int
    own_entries: int
    alarms: list[Alarm]

    def to_json(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "tree_size": self.tree_size,
            "entries_checked": self.entries_checked,
            "own_entries": self.own_entries,
            "alarms": [{"kind": a.kind, "message": a.message} for a in self.alarms],
            "ok": not self.alarms,
        }


class AuditStore:
    """The monitor's SQLite file (WAL, versioned schema)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode = WAL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self.db.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            elif version != SCHEMA_VERSION:
                raise LogStorageError(f"{self.path}: unknown audit schema version {version}")
        except (sqlite3.DatabaseError, OSError) as exc:
            raise LogStorageError(f"audit database {self.path} is unusable ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def heads(self, log: bytes) -> list[tuple[TreeHead, bool]]:
        rows = self.db.execute(
            "SELECT tree_size, timestamp, root, signature, checked FROM heads WHERE log_id = ? "
            "ORDER BY tree_size",
            (log,),
        ).fetchall()
        return [(TreeHead(log, r[0], r[1], bytes(r[2]), bytes(r[3])), bool(r[4])) for r in rows]

    def add_head(self, head: TreeHead, source: str, checked: bool) -> None:
        self.db.execute(
            "INSERT INTO heads VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
            "checked = max(checked, excluded.checked)",
            (head.log_id, head.tree_size, head.timestamp, head.root_hash, head.signature,
             source, int(checked)),
        )  # fmt: skip

    def leaf_hashes(self, log: bytes) -> list[bytes]:
        rows = self.db.execute("SELECT leaf_hash FROM leaves WHERE log_id = ? ORDER BY idx", (log,))
        return [bytes(r[0]) for r in rows]

    def leaf_count(self, log: bytes) -> int:
        row = self.db.execute("SELECT count(*) FROM leaves WHERE log_id = ?", (log,)).fetchone()
        return int(row[0])

    def add_leaves(self, log: bytes, rows: Iterable[tuple[int, bytes, bytes, bytes]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO leaves VALUES (?, ?, ?, ?, ?)",
            [(log, i, h, d, k) for i, h, d, k in rows],
        )
        self.db.execute("COMMIT")

    def digest_at(self, log: bytes, index: int) -> bytes | None:
        row = self.db.execute(
            "SELECT statement_digest FROM leaves WHERE log_id = ? AND idx = ?", (log, index)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def own_entries(self, log: bytes, keys: set[bytes]) -> list[tuple[int, bytes]]:
        rows = self.db.execute(
            "SELECT idx, statement_digest, signer_key FROM leaves WHERE log_id = ?", (log,)
        )
        return [(int(r[0]), bytes(r[1])) for r in rows if bytes(r[2]) in keys]

    def add_alarm(self, log: bytes, alarm: Alarm) -> None:
        self.db.execute(
            "INSERT INTO alarms (log_id, kind, message, evidence) VALUES (?, ?, ?, ?)",
            (log, alarm.kind, alarm.message, json.dumps(alarm.evidence)),
        )


class Monitor:
    """Audits one log for one user (see the module docstring).

    Args:
        store: the audit database.
        log_key: the log's trusted key.
        own_keys: SHA-256 of each of the user's ML-DSA identity public keys.
        signed: the user's journal: statement digest -> leaf hash of its
            acknowledged entry (``None`` if signed but not known to be acknowledged).
    """

    def __init__(
        self,
        store: AuditStore,
        log_key: LogKey,
        *,
        own_keys: set[bytes] | None = None,
        signed: dict[bytes, bytes | None] | None = None,
    ) -> None:
        self.store = store
        self.log_key = log_key
        self.log_id = log_key.log_id
        self.own_keys = own_keys or set()
        self.signed = signed or {}

    def _alarm(self, alarms: list[Alarm], alarm: Alarm) -> None:
        self.store.add_alarm(self.log_id, alarm)
        alarms.append(alarm)

    def observe(self, head: TreeHead, source: str) -> list[Alarm]:
        """Record a tree head (signature checked); alarm on a second root for its size.

        Raises:
            LogProofError: the head is not signed by this log.
        """
        head.verify({self.log_id: self.log_key})
        alarms: list[Alarm] = []
        for seen, _ in self.store.heads(self.log_id):
            if seen.tree_size == head.tree_size and seen.root_hash != head.root_hash:
                self._alarm(
                    alarms,
                    Alarm(
                        "fork",
                        f"FORK: the log {self.log_key.name!r} signed two different heads of "
                        f"size {head.tree_size} (roots {seen.root_hash.hex()[:16]}… and "
                        f"{head.root_hash.hex()[:16]}…): it shows different histories to "
                        "different users (split view)",
                        {"heads": [seen.to_json(), head.to_json()], "source": source},
                    ),
                )
        self.store.add_head(head, source, checked=False)
        return alarms

    async def audit(self, client: LogClient) -> AuditResult:
        """One monitoring run against the log (module docstring, steps 1-5)."""
        alarms: list[Alarm] = []
        head = await client.get_sth()
        alarms += self.observe(head, "log")
        await self._check_consistency(client, head, alarms)
        checked = await self._read_entries(client, head, alarms)
        own = await self._check_own(client, head, alarms)
        return AuditResult(self.log_key.name, head.tree_size, checked, own, alarms)

    async def _check_consistency(
        self, client: LogClient, head: TreeHead, alarms: list[Alarm]
    ) -> None:
        heads = self.store.heads(self.log_id)
        older_checked = [h for h, c in heads if c and h.tree_size <= head.tree_size]
        newer_checked = [h for h, c in heads if c and h.tree_size > head.tree_size]
        todo = [h for h, c in heads if not c and h != head]
        if older_checked:
            todo.append(older_checked[-1])
        if newer_checked:
            todo.append(newer_checked[0])
        for old in todo:
            if old.root_hash == head.root_hash and old.tree_size == head.tree_size:
                continue
            if old.tree_size > head.tree_size:
                self._alarm(
                    alarms,
                    Alarm(
                        "rollback",
                        f"ROLLBACK: the log {self.log_key.name!r} now shows {head.tree_size} "
                        f"entries, but it signed a head of {old.tree_size} before",
                        {"heads": [old.to_json(), head.to_json()]},
                    ),
                )
                continue  # it cannot prove anything about a tree it no longer shows
            try:
                await client.verify_consistency(old, head)
            except LogProofError as exc:
                self._alarm(
                    alarms,
                    Alarm(
                        "rewritten",
                        f"REWRITTEN HISTORY: the log {self.log_key.name!r} cannot prove that "
                        f"its tree of {max(old.tree_size, head.tree_size)} extends the one "
                        f"of {min(old.tree_size, head.tree_size)} ({exc})",
                        {"heads": [old.to_json(), head.to_json()]},
                    ),
                )
                continue
            self.store.add_head(old, "log", checked=True)
        self.store.add_head(head, "log", checked=not alarms)

    async def _read_entries(self, client: LogClient, head: TreeHead, alarms: list[Alarm]) -> int:
        start = self.store.leaf_count(self.log_id)
        read = 0
        while start < head.tree_size:
            end = min(head.tree_size, start + PAGE) - 1
            entries = await client.get_entries(start, end)
            rows = []
            for i, (entry, chain) in enumerate(entries[: end - start + 1]):
                signer_key = b""
                if chain:
                    signer_key = _signer_key(chain[0])
                rows.append(
                    (start + i, entry.leaf_hash(), entry.signed.statement.digest(), signer_key)
                )
            self.store.add_leaves(self.log_id, rows)
            start += len(rows)
            read += len(rows)
        tree = MerkleTree(self.store.leaf_hashes(self.log_id))
        if tree.size >= head.tree_size and tree.root(head.tree_size) != head.root_hash:
            self._alarm(
                alarms,
                Alarm(
                    "entries_mismatch",
                    f"ENTRIES MISMATCH: the entries the log {self.log_key.name!r} served do "
                    f"not hash to its signed root of size {head.tree_size}: it omitted, "
                    "changed or reordered an entry",
                    {"head": head.to_json()},
                ),
            )
        return read

    async def _check_own(self, client: LogClient, head: TreeHead, alarms: list[Alarm]) -> int:
        own = self.store.own_entries(self.log_id, self.own_keys)
        for index, digest in own:
            if digest not in self.signed:
                self._alarm(
                    alarms,
                    Alarm(
                        "unknown_entry",
                        f"UNKNOWN ENTRY: entry {index} of the log {self.log_key.name!r} is "
                        "signed with your identity key, but you never signed it here: your "
                        "key may be stolen (revoke your certificate) or the entry forged",
                        {"index": index, "statement_digest": digest.hex()},
                    ),
                )
        for digest, leaf in self.signed.items():
            if leaf is None or head.tree_size == 0:
                continue
            try:
                index, proof = await client.get_proof(leaf, head.tree_size)
                verify_inclusion(leaf, index, head.tree_size, proof, head.root_hash)
            except (LogError, LogProofError) as exc:
                if isinstance(exc, LogError) and exc.status not in (404, None):
                    raise
                self._alarm(
                    alarms,
                    Alarm(
                        "omitted_entry",
                        f"OMITTED ENTRY: the log acknowledged your statement "
                        f"{digest.hex()[:16]}…, but its tree of {head.tree_size} does not "
                        f"include it ({exc})",
                        {"statement_digest": digest.hex(), "head": head.to_json()},
                    ),
                )
        return len(own)


def _signer_key(der: bytes) -> bytes:
    """SHA-256 of the ML-DSA key a DER certificate certifies (b"" if unreadable)."""
    try:
        from qcall.org import load_certificates, member_public_key

        return hashlib.sha256(member_public_key(load_certificates(der)[0])[1]).digest()
    except Exception:  # a monitor reads anything the log serves
        return b""


def own_key_id(public_key: bytes) -> bytes:
    """How the monitor names an identity key: SHA-256 of the raw public key."""
    return hashlib.sha256(public_key).digest()
