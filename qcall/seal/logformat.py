"""The transparency log's data: entries (leaves), signed tree heads, receipts. Pure.

docs/seal.md §5 specifies the bytes:

* a **leaf** (RFC 9162 ``MerkleTreeLeaf`` input) is the log's time and the signed
  statement: ``u8 1 ‖ u64 timestamp ‖ u32 len ‖ Statement ‖ u16 len ‖ signature``;
  its hash is ``SHA-256(0x00 ‖ leaf)``;
* a **tree head** is ``u8 1 ‖ log_id[32] ‖ u64 tree_size ‖ u64 timestamp ‖ root[32]``
  signed with the log's ML-DSA key, context :data:`TREE_HEAD_CONTEXT`;
  ``log_id = SHA-256(log public key)``;
* a **receipt** is what the log returns for an entry and what a ``.qseal`` keeps:
  the leaf index and timestamp, a signed tree head that includes it, and the
  inclusion proof — everything needed to check inclusion offline.

Timestamps are milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from qcall import pqc
from qcall.exceptions import LogProofError, NotInLogError, SealFormatError
from qcall.seal.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from qcall.seal.statement import (
    MAX_TIME,
    Reader,
    SignedStatement,
    Statement,
    b64decode,
    hex_field,
)

__all__ = [
    "LOG_SCHEME",
    "TREE_HEAD_CONTEXT",
    "LogEntry",
    "LogKey",
    "Receipt",
    "TreeHead",
    "log_id",
]

#: ML-DSA context string of tree head signatures (FIPS 204 §5.2 ``ctx``).
TREE_HEAD_CONTEXT: Final = b"qcall-seal-v1 tree head"
#: ML-DSA parameter set of log keys.
LOG_SCHEME: Final = pqc.SignatureScheme.ML_DSA_87
LEAF_VERSION: Final = 1
TREE_HEAD_VERSION: Final = 1
MAX_STATEMENT: Final = 1 << 16
MAX_PROOF: Final = 64

#: SHA-256(log key ‖ tree head ‖ signature) of tree heads whose signature verified.
_VERIFIED_HEADS: set[bytes] = set()


def log_id(public_key: bytes) -> bytes:
    """A log's ID: SHA-256 of its raw ML-DSA public key."""
    return hashlib.sha256(public_key).digest()


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME:
        raise SealFormatError(f"field {name!r} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class LogKey:
    """A log's public key, as verifiers configure it (``log.pub``)."""

    name: str
    public_key: bytes = field(repr=False)
    scheme: pqc.SignatureScheme = LOG_SCHEME

    @property
    def log_id(self) -> bytes:
        return log_id(self.public_key)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.scheme.value,
            "public_key": base64.b64encode(self.public_key).decode(),
            "log_id": self.log_id.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> LogKey:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise SealFormatError("a log key must be an object with a name")
        try:
            scheme = pqc.SignatureScheme(obj.get("algorithm"))
        except ValueError:
            raise SealFormatError("field 'algorithm' is not an ML-DSA parameter set") from None
        key = b64decode(obj.get("public_key"), "public_key")
        if len(key) != scheme.sizes.public_key:
            raise SealFormatError(f"field 'public_key' must be {scheme.sizes.public_key} bytes")
        if "log_id" in obj and obj["log_id"] != log_id(key).hex():
            raise SealFormatError("field 'log_id' does not match the public key")
        return cls(obj["name"], key, scheme)


@dataclass(frozen=True)
class LogEntry:
    """One leaf of the log: the log's timestamp and a signed statement (docs/seal.md §5.1)."""

    timestamp: int
    signed: SignedStatement

    def encode(self) -> bytes:
        """The leaf input: ``u8 1 ‖ u64 timestamp ‖ vec32 statement ‖ vec16 signature``."""
        statement = self.signed.statement.encode()
        signature = self.signed.signature
        return b"".join(
            (
                struct.pack(">BQI", LEAF_VERSION, self.timestamp, len(statement)),
                statement,
                struct.pack(">H", len(signature)),
                signature,
            )
        )

    def leaf_hash(self) -> bytes:
        """RFC 9162 leaf hash ``SHA-256(0x00 ‖ leaf)``."""
        return leaf_hash(self.encode())

    @classmethod
    def parse(cls, data: bytes) -> LogEntry:
        """Parse a leaf input (hostile).

        Raises:
            SealFormatError: naming the field.
        """
        r = Reader(data, "log entry")
        version = r.uint(1, "version")
        if version != LEAF_VERSION:
            raise SealFormatError(f"log entry: unsupported version {version}")
        timestamp = r.uint(8, "timestamp")
        if timestamp > MAX_TIME:
            raise SealFormatError("log entry: timestamp out of range")
        statement = Statement.parse(r.vec(4, "statement"))
        signature = r.vec(2, "signature")
        r.end()
        return cls(timestamp, SignedStatement(statement, signature))


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head (docs/seal.md §5.2)."""

    log_id: bytes
    tree_size: int
    timestamp: int
    root_hash: bytes
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.log_id) != 32 or len(self.root_hash) != HASH_SIZE:
            raise SealFormatError("tree head: log_id and root_hash must be 32 bytes")
        if not 0 <= self.tree_size <= MAX_TIME or not 0 <= self.timestamp <= MAX_TIME:
            raise SealFormatError("tree head: size or timestamp out of range")

    @staticmethod
    def tbs(log: bytes, tree_size: int, timestamp: int, root_hash: bytes) -> bytes:
        """The signed bytes: ``u8 1 ‖ log_id ‖ u64 tree_size ‖ u64 timestamp ‖ root_hash``."""
        return b"".join(
            (bytes([TREE_HEAD_VERSION]), log, struct.pack(">QQ", tree_size, timestamp), root_hash)
        )

    @classmethod
    def sign(
        cls, key: pqc.SigningKey, tree_size: int, timestamp: int, root_hash: bytes
    ) -> TreeHead:
        """Sign a tree head with the log's key (FIPS 204 algorithm 2, tree head context)."""
        lid = log_id(key.public_bytes())
        tbs = cls.tbs(lid, tree_size, timestamp, root_hash)
        return cls(lid, tree_size, timestamp, root_hash, key.sign(tbs, TREE_HEAD_CONTEXT))

    def verify(self, logs: Mapping[bytes, LogKey]) -> LogKey:
        """Check the signature with the key of the log it names; return that log.

        Raises:
            LogProofError: unknown log, or the signature does not verify.
        """
        log = logs.get(self.log_id)
        if log is None:
            raise LogProofError(
                f"tree head from unknown log {self.log_id.hex()[:16]} (trust a log with: "
                "qcall seal trust-log log.pub)"
            )
        tbs = self.tbs(self.log_id, self.tree_size, self.timestamp, self.root_hash)
        seen = hashlib.sha256(log.public_key + tbs + self.signature).digest()
        if seen in _VERIFIED_HEADS:  # the receipts of one batch share their head
            return log
        backend = pqc.get_backend("cryptography")
        if not backend.verify(log.scheme, log.public_key, self.signature, tbs, TREE_HEAD_CONTEXT):
            raise LogProofError(
                f"the signature of log {log.name!r} on its tree head of size {self.tree_size} "
                "does not verify"
            )
        if len(_VERIFIED_HEADS) >= 1024:
            _VERIFIED_HEADS.clear()
        _VERIFIED_HEADS.add(seen)
        return log

    def to_json(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id.hex(),
            "tree_size": self.tree_size,
            "timestamp": self.timestamp,
            "root_hash": self.root_hash.hex(),
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, obj: object) -> TreeHead:
        if not isinstance(obj, dict):
            raise SealFormatError("a tree head must be a JSON object")
        return cls(
            hex_field(obj, "log_id", 32),
            _int(obj, "tree_size"),
            _int(obj, "timestamp"),
            hex_field(obj, "root_hash", HASH_SIZE),
            b64decode(obj.get("signature"), "signature", 8192),
        )


@dataclass(frozen=True)
class Receipt:
    """Proof that a statement is in a log (docs/seal.md §5.3)."""

    leaf_index: int
    timestamp: int
    tree_head: TreeHead
    inclusion_proof: tuple[bytes, ...]

    def entry(self, signed: SignedStatement) -> LogEntry:
        """The log entry this receipt is about, for ``signed``."""
        return LogEntry(self.timestamp, signed)

    def verify(self, signed: SignedStatement, logs: Mapping[bytes, LogKey]) -> LogKey:
        """Check the tree head's signature and the entry's inclusion under it.

        Raises:
            LogProofError: unknown log, bad signature, or the proof fails (the
                receipt is for a different tree or a different entry).
        """
        log = self.tree_head.verify(logs)
        verify_inclusion(
            self.entry(signed).leaf_hash(),
            self.leaf_index,
            self.tree_head.tree_size,
            self.inclusion_proof,
            self.tree_head.root_hash,
        )
        return log

    def to_json(self) -> dict[str, Any]:
        return {
            "leaf_index": self.leaf_index,
            "timestamp": self.timestamp,
            "tree_head": self.tree_head.to_json(),
            "inclusion_proof": [h.hex() for h in self.inclusion_proof],
        }

    @classmethod
    def from_json(cls, obj: object) -> Receipt:
        if not isinstance(obj, dict):
            raise NotInLogError("no transparency-log receipt")
        proof = obj.get("inclusion_proof")
        if not isinstance(proof, list) or len(proof) > MAX_PROOF:
            raise SealFormatError(f"field 'inclusion_proof' must list at most {MAX_PROOF} hashes")
        return cls(
            _int(obj, "leaf_index"),
            _int(obj, "timestamp"),
            TreeHead.from_json(obj.get("tree_head")),
            tuple(hex_field({"h": h}, "h", HASH_SIZE) for h in proof),
        )
