"""The transparency log: admission rules, batching, tree heads and proofs.

:class:`TransparencyLog` joins the in-memory :class:`~qcall.seal.merkle.MerkleTree`,
the durable :class:`~qcall.seal.logstore.LogStore`, the log's ML-DSA-87 key and the
organisations whose members may add (:class:`~qcall.org.OrgTrust`). A batch of
additions goes through three steps, so that the server's event loop never waits
for the disk::

    prepare(submissions, now)  loop thread: dedup, leaves, tree.extend, sign the head
    store.append(...)          worker thread: one SQLite transaction (entries + head)
    commit(batch) / abort(batch)   loop thread: publish the head, or truncate the tree

Reads (:meth:`receipt`, :meth:`consistency`, :meth:`entries`) only ever use the
last committed head, whose subtrees no later append changes.

**Who may add** (docs/seal.md §5.4): an entry authenticates itself. It is
accepted only if its statement is signed (FIPS 204) by a key that a trusted
organisation certifies for document signing, valid and unrevoked *now*, and
if its ``signing_time`` is within :data:`MAX_SKEW_MS` of the log's clock (an old
statement cannot be slipped in later). Submitting a statement that is already in
the log returns its existing entry (idempotent retries).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from qcall import config, pqc
from qcall.exceptions import (
    CertificateError,
    ConfigError,
    LogError,
    LogStorageError,
    SealFormatError,
    SealSignatureError,
)
from qcall.org import OrgTrust, certificate_fingerprint, load_certificates, member_public_key
from qcall.seal.logformat import LOG_SCHEME, LogEntry, LogKey, Receipt, TreeHead
from qcall.seal.logstore import LogStore, StoredEntry
from qcall.seal.merkle import MerkleTree
from qcall.seal.statement import SignedStatement

__all__ = ["MAX_SKEW_MS", "AddResult", "Submission", "TransparencyLog"]

logger = logging.getLogger(__name__)

#: Largest difference between a statement's signing time and the log's clock.
MAX_SKEW_MS: Final = 10 * 60 * 1000

KEY_FILE: Final = "log.key"
PUBLIC_FILE: Final = "log.pub"
DB_FILE: Final = "log.db"


@dataclass(frozen=True)
class Submission:
    """An entry to add: the signed statement and its certificate chain (DER, signer first)."""

    signed: SignedStatement
    chain: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class AddResult:
    """The log's answer for one submission: its index and timestamp, or an error."""

    index: int = -1
    timestamp: int = 0
    duplicate: bool = False
    error: LogError | None = None


@dataclass
class _Batch:
    start: int
    rows: list[StoredEntry]
    certificates: dict[bytes, bytes]
    head: TreeHead
    results: list[AddResult]


class TransparencyLog:
    """An append-only, signed Merkle tree log (see the module docstring).

    Args:
        store: the open database.
        key: the log's ML-DSA signing key.
        trust: organisations whose members may add (``None``: checked elsewhere).
        name: the log's name (in ``log.pub``).
        clock: seconds since the Unix epoch.
    """

    def __init__(
        self,
        store: LogStore,
        key: pqc.SigningKey,
        trust: OrgTrust | None,
        *,
        name: str = "qcall seal log",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._key = key
        self.trust = trust
        self.clock = clock
        self.log_key = LogKey(name, key.public_bytes(), key.algorithm)
        self.log_id = self.log_key.log_id
        self.tree = MerkleTree()
        self.tree.extend(store.leaf_hashes())
        self._pending: set[bytes] = set()
        latest = store.latest_head()
        if latest is None:
            if self.tree.size:
                raise LogStorageError(f"{store.path} has entries but no signed tree head")
            latest = TreeHead.sign(key, 0, self.now_ms(), self.tree.root(0))
            store.append([], {}, latest)
        self._check_head(latest)
        self.head = latest

    def __repr__(self) -> str:
        return f"TransparencyLog({self.log_key.name!r}, size={self.head.tree_size})"

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _check_head(self, head: TreeHead) -> None:
        """The stored head must be this log's and match the stored entries."""
        where = f"log database {self.store.path}"
        if head.tree_size != self.tree.size:
            raise LogStorageError(
                f"{where} is damaged: {self.tree.size} entries, but the latest signed tree "
                f"head is for {head.tree_size}"
            )
        if head.root_hash != self.tree.root():
            raise LogStorageError(
                f"{where} is damaged: the entries' root is not the one the log signed "
                f"for size {head.tree_size}"
            )
        try:
            head.verify({self.log_id: self.log_key})
        except Exception as exc:
            raise LogStorageError(f"{where} is damaged or from another log: {exc}") from None

    # --- files ------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], name: str) -> TransparencyLog:
        """Make a new log in ``directory``: ``log.key`` (0600), ``log.pub``, ``log.db``.

        Raises:
            ConfigError: a log exists there already.
        """
        path = Path(directory)
        if (path / KEY_FILE).exists():
            raise ConfigError(f"a seal log already exists in {path}")
        config.make_private_dir(path)
        key = pqc.get_backend("cryptography").signing_generate(LOG_SCHEME)
        config.atomic_write(path / KEY_FILE, key.seed_bytes())
        public = LogKey(name, key.public_bytes(), LOG_SCHEME)
        text = json.dumps(public.to_json(), indent=2) + "\n"
        config.atomic_write(path / PUBLIC_FILE, text.encode(), mode=0o644)
        store = LogStore.open(path / DB_FILE, log_id=public.log_id, create=True)
        return cls(store, key, OrgTrust(path / "org"), name=name)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> TransparencyLog:
        """Open the log in ``directory`` (checks the database against the signed head).

        Raises:
            ConfigError: no log there.
            LogStorageError: the database is corrupt.
        """
        path = Path(directory)
        if not (path / KEY_FILE).exists():
            raise ConfigError(f"no seal log in {path}: create one with 'qcall seal-log init'")
        seed = config.read_private_file(path / KEY_FILE)
        if len(seed) != LOG_SCHEME.sizes.seed:
            raise ConfigError(f"{path / KEY_FILE}: not a {LOG_SCHEME.value} seed")
        key = pqc.get_backend("cryptography").signing_from_seed(LOG_SCHEME, seed)
        try:
            public = LogKey.from_json(json.loads((path / PUBLIC_FILE).read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path / PUBLIC_FILE}: {exc}") from None
        if public.public_key != key.public_bytes():
            raise ConfigError(f"{path / KEY_FILE} does not match {path / PUBLIC_FILE}")
        store = LogStore.open(path / DB_FILE, log_id=public.log_id, synchronous=synchronous)
        try:
            return cls(store, key, OrgTrust(path / "org"), name=public.name, clock=clock)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    # --- admission --------------------------------------------------------------------

    def check_submission(self, sub: Submission, now_ms: int) -> str:
        """Authenticate a submission (module docstring); returns the signer's name.

        Raises:
            LogError: refused, the message says why (status 400 or 403).
        """
        s = sub.signed.statement
        try:
            if not sub.chain:
                raise SealFormatError("the certificate chain is empty")
            cert = load_certificates(sub.chain[0], "signer certificate")[0]
            if certificate_fingerprint(cert) != s.chain[0]:
                raise SealFormatError("the statement names another signer certificate")
            scheme, public_key = member_public_key(cert)
            if not sub.signed.verify(scheme, public_key):
                raise SealSignatureError("the statement's signature does not verify")
            if abs(s.signing_time - now_ms) > MAX_SKEW_MS:
                raise SealFormatError(
                    f"the signing time is {abs(s.signing_time - now_ms) // 1000} s away from "
                    f"the log's clock (at most {MAX_SKEW_MS // 1000} s)"
                )
            if self.trust is not None:
                at = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
                member = self.trust.validate(cert, at)
                if s.chain[-1] != member.issuer_fingerprint:
                    raise SealFormatError("the statement names another authority")
                return member.name
            return cert.subject.rfc4514_string()
        except CertificateError as exc:
            raise LogError(
                f"not an authenticated member of a trusted organisation: {exc}", status=403
            ) from None
        except (SealFormatError, SealSignatureError) as exc:
            raise LogError(f"refused: {exc}", status=400) from None
        except Exception as exc:  # e.g. a certificate the x509 parser dislikes
            raise LogError(f"refused: {type(exc).__name__}: {exc}", status=400) from None

    # --- adding -----------------------------------------------------------------------

    def prepare(self, subs: Sequence[Submission], now_ms: int) -> _Batch:
        """Append admitted submissions to the tree and sign the new head (not yet durable).

        Duplicates (already logged, or pending) get their existing index.
        """
        now_ms = max(now_ms, self.head.timestamp)  # log time never goes backwards
        start = self.tree.size
        rows: list[StoredEntry] = []
        certs: dict[bytes, bytes] = {}
        results: list[AddResult] = []
        batch_digests: dict[bytes, StoredEntry] = {}
        for sub in subs:
            digest = sub.signed.statement.digest()
            existing = batch_digests.get(digest) or self.store.find(digest)
            if existing is not None:
                results.append(AddResult(existing.index, existing.timestamp, duplicate=True))
                continue
            if digest in self._pending:
                results.append(AddResult(error=LogError("already being added", status=409)))
                continue
            entry = LogEntry(now_ms, sub.signed)
            leaf = entry.encode()
            row = StoredEntry(
                index=start + len(rows),
                leaf=leaf,
                leaf_hash=entry.leaf_hash(),
                statement_digest=digest,
                signer=sub.signed.statement.chain[0],
                timestamp=now_ms,
                chain=sub.signed.statement.chain,
            )
            rows.append(row)
            batch_digests[digest] = row
            for der in sub.chain:
                certs[hashlib.sha256(der).digest()] = der
            results.append(AddResult(row.index, now_ms))
        self.tree.extend(r.leaf_hash for r in rows)
        self._pending.update(batch_digests)
        head = (
            TreeHead.sign(self._key, self.tree.size, now_ms, self.tree.root())
            if rows
            else self.head
        )
        return _Batch(start, rows, certs, head, results)

    def write(self, batch: _Batch) -> None:
        """Make a prepared batch durable (blocking: run it in a worker thread)."""
        if batch.rows:
            self.store.append(batch.rows, batch.certificates, batch.head)

    def commit(self, batch: _Batch) -> None:
        """Publish a written batch's head."""
        self._pending.difference_update(r.statement_digest for r in batch.rows)
        if batch.rows:
            self.head = batch.head
            logger.debug(
                "= log %s: %d entries, size %d",
                self.log_key.name,
                len(batch.rows),
                self.head.tree_size,
            )

    def abort(self, batch: _Batch) -> None:
        """Forget a batch whose write failed."""
        self._pending.difference_update(r.statement_digest for r in batch.rows)
        self.tree.truncate(batch.start)

    def add(self, subs: Sequence[Submission]) -> list[AddResult]:
        """Check, prepare, write and commit, all at once (tools and benchmarks).

        Refused submissions get an :class:`AddResult` with ``error``.
        """
        now = self.now_ms()
        results: list[AddResult | None] = []
        admitted: list[Submission] = []
        for sub in subs:
            try:
                self.check_submission(sub, now)
            except LogError as exc:
                results.append(AddResult(error=exc))
            else:
                results.append(None)
                admitted.append(sub)
        batch = self.prepare(admitted, now)
        try:
            self.write(batch)
        except LogStorageError:
            self.abort(batch)
            raise
        self.commit(batch)
        it = iter(batch.results)
        return [r if r is not None else next(it) for r in results]

    # --- reading ----------------------------------------------------------------------

    def receipt(self, index: int, timestamp: int, head: TreeHead | None = None) -> Receipt:
        """The receipt of entry ``index`` under ``head`` (default: the latest)."""
        head = head or self.head
        proof = tuple(self.tree.inclusion_proof(index, head.tree_size))
        return Receipt(index, timestamp, head, proof)

    def consistency(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between two committed sizes.

        Raises:
            LogError: a size beyond the committed head (status 400).
        """
        if not 0 <= first <= second <= self.head.tree_size:
            raise LogError(
                f"sizes must satisfy 0 <= first <= second <= {self.head.tree_size}", status=400
            )
        return self.tree.consistency_proof(first, second)

    def proof_by_hash(self, leaf_hash: bytes, tree_size: int) -> tuple[int, list[bytes]]:
        """Index and inclusion proof of a leaf hash in the tree of ``tree_size``.

        Raises:
            LogError: unknown leaf, or a size beyond the committed head.
        """
        if not 0 < tree_size <= self.head.tree_size:
            raise LogError(f"tree_size must be 1..{self.head.tree_size}", status=400)
        index = self.store.find_leaf(leaf_hash)
        if index is None or index >= tree_size:
            raise LogError("no entry with this leaf hash in that tree", status=404)
        return index, self.tree.inclusion_proof(index, tree_size)
