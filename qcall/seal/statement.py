"""Signed statements: the canonical bytes a seal, an approval or a rejection signs.

A :class:`Statement` says *who* (the signer's certificate chain, by SHA-256),
*what* (the document's SHA-384 and name), *when* (the signer's clock), *why*
(the reason) and, for a seal that asks for approvals, the approval policy; an
approval or rejection also names the seal and the decision it follows. Its
canonical encoding (``docs/seal.md`` §4) is what ML-DSA signs, in pure mode
(FIPS 204 algorithm 2) with the context string :data:`STATEMENT_CONTEXT`::

    Statement = u8 version ‖ u8 kind ‖ opaque document_hash[48] ‖ vec8 document_name
              ‖ u64 signing_time ‖ vec16 reason ‖ u8 n ‖ n × opaque cert_sha256[32]
              ‖ (kind seal:           u8 mode ‖ u8 threshold ‖ u8 m ‖ m × vec8 approver)
              ‖ (kind approve/reject: opaque seal_digest[48] ‖ opaque previous_digest[48])

Both directions are strict: :meth:`Statement.parse` (binary, from a log entry) and
:meth:`Statement.from_json` (a ``.qseal`` bundle) treat input as hostile and raise
:class:`~qcall.exceptions.SealFormatError` naming the field; ``parse(encode(s)) == s``
and every statement has exactly one encoding.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from qcall import pqc
from qcall.exceptions import ConfigError, SealFormatError
from qcall.identity import validate_name

__all__ = [
    "DIGEST_SIZE",
    "STATEMENT_CONTEXT",
    "Kind",
    "Mode",
    "Policy",
    "Reader",
    "SignedStatement",
    "Statement",
    "b64decode",
    "hex_field",
]

#: Statement format version (the first byte).
VERSION: Final = 1
#: ML-DSA context string of every statement signature (FIPS 204 §5.2 ``ctx``).
STATEMENT_CONTEXT: Final = b"qcall-seal-v1 statement"
#: SHA-384 output length: document hashes and statement digests.
DIGEST_SIZE: Final = 48
#: SHA-256 output length: certificate fingerprints.
CERT_ID_SIZE: Final = 32
MAX_NAME_BYTES: Final = 255
MAX_REASON_BYTES: Final = 1024
MAX_CHAIN: Final = 4
MAX_APPROVERS: Final = 32
MAX_TIME: Final = (1 << 63) - 1


class Kind(enum.IntEnum):
    """What a statement is (its second byte)."""

    SEAL = 1
    APPROVE = 2
    REJECT = 3

    @property
    def label(self) -> str:
        """The JSON name: ``seal``, ``approve`` or ``reject``."""
        return self.name.lower()


class Mode(enum.IntEnum):
    """How a seal's approvals are collected."""

    NONE = 0  #: no approvals asked
    ORDERED = 1  #: every approver, in the listed order
    THRESHOLD = 2  #: any ``threshold`` of the approvers, in any order


# --- binary helpers ---------------------------------------------------------------------


class Reader:
    """Reads a byte string front to back; every shortfall is a :class:`SealFormatError`."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def take(self, n: int, field_name: str) -> bytes:
        if self.pos + n > len(self.data):
            raise SealFormatError(f"{self.what}: truncated in field {field_name!r}")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def uint(self, size: int, field_name: str) -> int:
        return int.from_bytes(self.take(size, field_name), "big")

    def vec(self, size: int, field_name: str) -> bytes:
        return self.take(self.uint(size, field_name), field_name)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SealFormatError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _vec(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def _text(value: bytes, field_name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SealFormatError(f"field {field_name!r} is not UTF-8") from None


def hex_field(obj: dict[str, Any], name: str, size: int) -> bytes:
    """A lowercase-hex field of ``size`` bytes from a JSON object."""
    value = obj.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise SealFormatError(f"field {name!r} must be {2 * size} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise SealFormatError(f"field {name!r} is not hex") from None


def b64decode(value: object, name: str, max_size: int = 1 << 20) -> bytes:
    """A standard base64 field (padding required)."""
    if not isinstance(value, str) or len(value) > 4 * max_size // 3 + 4:
        raise SealFormatError(f"field {name!r} must be base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SealFormatError(f"field {name!r} is not valid base64") from None


def _int(obj: dict[str, Any], name: str, lo: int = 0, hi: int = MAX_TIME) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SealFormatError(f"field {name!r} must be an integer in {lo}..{hi}")
    return value


def _str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise SealFormatError(f"field {name!r} must be a string")
    return value


# --- the statement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The approvals a seal asks for (docs/seal.md §6).

    Attributes:
        mode: :attr:`Mode.ORDERED` (everyone, in order) or :attr:`Mode.THRESHOLD`.
        threshold: approvals needed (the number of approvers when ordered).
        approvers: the approvers' names, as their certificates give them.
    """

    mode: Mode
    threshold: int
    approvers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.mode is Mode.NONE:
            raise SealFormatError("a policy needs mode ordered or threshold")
        if not 1 <= len(self.approvers) <= MAX_APPROVERS:
            raise SealFormatError(f"a policy lists 1..{MAX_APPROVERS} approvers")
        if len(set(self.approvers)) != len(self.approvers):
            raise SealFormatError("an approver is listed twice")
        for name in self.approvers:
            try:
                validate_name(name, "approver name")
            except ConfigError as exc:
                raise SealFormatError(str(exc)) from None
            if len(name.encode()) > MAX_NAME_BYTES:
                raise SealFormatError("approver name is too long")
        if self.mode is Mode.ORDERED and self.threshold != len(self.approvers):
            raise SealFormatError("an ordered policy needs every approver (threshold = count)")
        if not 1 <= self.threshold <= len(self.approvers):
            raise SealFormatError(f"threshold must be 1..{len(self.approvers)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.name.lower(),
            "threshold": self.threshold,
            "approvers": list(self.approvers),
        }

    @classmethod
    def from_json(cls, obj: object) -> Policy:
        if not isinstance(obj, dict):
            raise SealFormatError("field 'policy' must be an object")
        mode = obj.get("mode")
        if mode not in ("ordered", "threshold"):
            raise SealFormatError("field 'policy.mode' must be 'ordered' or 'threshold'")
        approvers = obj.get("approvers")
        if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
            raise SealFormatError("field 'policy.approvers' must be a list of names")
        return cls(Mode[mode.upper()], _int(obj, "threshold", 1, 255), tuple(approvers))


@dataclass(frozen=True)
class Statement:
    """What a seal, approval or rejection asserts (docs/seal.md §4).

    Attributes:
        kind: seal, approve or reject.
        document_hash: SHA-384 of the document (48 bytes).
        document_name: the document's file name (informational, ≤ 255 UTF-8 bytes).
        signing_time: the signer's clock, ms since the Unix epoch (claimed; the log's
            time is what verification uses).
        reason: why (≤ 1024 UTF-8 bytes).
        chain: SHA-256 of each certificate, the signer's first, then its authority's.
        policy: for a seal, the approvals it asks for (``None``: none).
        seal_digest: for a decision, SHA-384 of the seal's statement.
        previous_digest: for a decision, SHA-384 of the statement it follows (the
            previous decision in an ordered workflow, else the seal's).
    """

    kind: Kind
    document_hash: bytes
    document_name: str
    signing_time: int
    reason: str
    chain: tuple[bytes, ...]
    policy: Policy | None = None
    seal_digest: bytes = b""
    previous_digest: bytes = b""
    _encoded: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = Kind(self.kind)
        object.__setattr__(self, "kind", kind)
        if len(self.document_hash) != DIGEST_SIZE:
            raise SealFormatError(f"document hash must be {DIGEST_SIZE} bytes (SHA-384)")
        if len(self.document_name.encode()) > MAX_NAME_BYTES:
            raise SealFormatError(f"document name is longer than {MAX_NAME_BYTES} bytes")
        if len(self.reason.encode()) > MAX_REASON_BYTES:
            raise SealFormatError(f"reason is longer than {MAX_REASON_BYTES} bytes")
        if not 0 <= self.signing_time <= MAX_TIME:
            raise SealFormatError("signing time is out of range")
        if not 1 <= len(self.chain) <= MAX_CHAIN:
            raise SealFormatError(f"the certificate chain must have 1..{MAX_CHAIN} entries")
        if any(len(c) != CERT_ID_SIZE for c in self.chain):
            raise SealFormatError(f"certificate IDs must be {CERT_ID_SIZE} bytes (SHA-256)")
        if kind is Kind.SEAL:
            if self.seal_digest or self.previous_digest:
                raise SealFormatError("a seal names no seal or previous decision")
        else:
            if self.policy is not None:
                raise SealFormatError("only a seal carries a policy")
            if len(self.seal_digest) != DIGEST_SIZE or len(self.previous_digest) != DIGEST_SIZE:
                raise SealFormatError(f"seal and previous digests must be {DIGEST_SIZE} bytes")
        object.__setattr__(self, "_encoded", self._encode())

    def _encode(self) -> bytes:
        out = [
            bytes([VERSION, self.kind]),
            self.document_hash,
            _vec(1, self.document_name.encode()),
            struct.pack(">Q", self.signing_time),
            _vec(2, self.reason.encode()),
            bytes([len(self.chain)]),
            *self.chain,
        ]
        if self.kind is Kind.SEAL:
            policy = self.policy
            if policy is None:
                out.append(bytes([Mode.NONE, 0, 0]))
            else:
                out.append(bytes([policy.mode, policy.threshold, len(policy.approvers)]))
                out.extend(_vec(1, name.encode()) for name in policy.approvers)
        else:
            out += [self.seal_digest, self.previous_digest]
        return b"".join(out)

    def encode(self) -> bytes:
        """The canonical bytes (docs/seal.md §4.1): what ML-DSA signs."""
        return self._encoded

    def digest(self) -> bytes:
        """SHA-384 of :meth:`encode`: how decisions and the audit name a statement."""
        return hashlib.sha384(self._encoded).digest()

    @classmethod
    def parse(cls, data: bytes) -> Statement:
        """Parse canonical bytes (hostile input).

        Raises:
            SealFormatError: naming the field.
        """
        r = Reader(data, "statement")
        version = r.uint(1, "version")
        if version != VERSION:
            raise SealFormatError(f"statement: unsupported version {version}")
        raw_kind = r.uint(1, "kind")
        if raw_kind not in Kind._value2member_map_:
            raise SealFormatError(f"statement: unknown kind {raw_kind}")
        kind = Kind(raw_kind)
        document_hash = r.take(DIGEST_SIZE, "document_hash")
        name = _text(r.vec(1, "document_name"), "document_name")
        signing_time = r.uint(8, "signing_time")
        reason = _text(r.vec(2, "reason"), "reason")
        chain = tuple(r.take(CERT_ID_SIZE, "chain") for _ in range(r.uint(1, "chain")))
        policy = None
        seal_digest = previous = b""
        if kind is Kind.SEAL:
            raw_mode, threshold, count = r.uint(1, "mode"), r.uint(1, "threshold"), r.uint(1, "n")
            names = tuple(_text(r.vec(1, "approver"), "approver") for _ in range(count))
            if raw_mode not in Mode._value2member_map_:
                raise SealFormatError(f"statement: unknown mode {raw_mode}")
            if raw_mode == Mode.NONE:
                if threshold or count:
                    raise SealFormatError("statement: mode none with approvers")
            else:
                policy = Policy(Mode(raw_mode), threshold, names)
        else:
            seal_digest = r.take(DIGEST_SIZE, "seal_digest")
            previous = r.take(DIGEST_SIZE, "previous_digest")
        r.end()
        return cls(
            kind, document_hash, name, signing_time, reason, chain, policy, seal_digest, previous
        )

    def to_json(self) -> dict[str, Any]:
        """The statement's fields as a ``.qseal`` bundle carries them (docs/seal.md §7)."""
        obj: dict[str, Any] = {
            "kind": self.kind.label,
            "document_sha384": self.document_hash.hex(),
            "document_name": self.document_name,
            "signing_time": self.signing_time,
            "reason": self.reason,
            "chain": [c.hex() for c in self.chain],
        }
        if self.kind is Kind.SEAL:
            obj["policy"] = self.policy.to_json() if self.policy else None
        else:
            obj["seal_digest"] = self.seal_digest.hex()
            obj["previous_digest"] = self.previous_digest.hex()
        return obj

    @classmethod
    def from_json(cls, obj: object) -> Statement:
        """Parse the JSON form (hostile input); unknown fields are refused.

        Raises:
            SealFormatError: naming the field.
        """
        if not isinstance(obj, dict):
            raise SealFormatError("a statement must be a JSON object")
        kinds = {k.label: k for k in Kind}
        kind = kinds.get(obj.get("kind"))  # type: ignore[arg-type]
        if kind is None:
            raise SealFormatError("field 'kind' must be seal, approve or reject")
        allowed = {"kind", "document_sha384", "document_name", "signing_time", "reason", "chain"}
        allowed |= {"policy"} if kind is Kind.SEAL else {"seal_digest", "previous_digest"}
        extra = set(obj) - allowed
        if extra:
            raise SealFormatError(f"unknown statement field {sorted(extra)[0]!r}")
        chain = obj.get("chain")
        if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN:
            raise SealFormatError(f"field 'chain' must list 1..{MAX_CHAIN} certificate IDs")
        policy = None
        seal_digest = previous = b""
        if kind is Kind.SEAL:
            if obj.get("policy") is not None:
                policy = Policy.from_json(obj["policy"])
        else:
            seal_digest = hex_field(obj, "seal_digest", DIGEST_SIZE)
            previous = hex_field(obj, "previous_digest", DIGEST_SIZE)
        return cls(
            kind=kind,
            document_hash=hex_field(obj, "document_sha384", DIGEST_SIZE),
            document_name=_str(obj, "document_name"),
            signing_time=_int(obj, "signing_time"),
            reason=_str(obj, "reason"),
            chain=tuple(hex_field({"chain": c}, "chain", CERT_ID_SIZE) for c in chain),
            policy=policy,
            seal_digest=seal_digest,
            previous_digest=previous,
        )


@dataclass(frozen=True)
class SignedStatement:
    """A statement and its ML-DSA signature (FIPS 204, ``ctx`` = ``qcall-seal-v1 statement``)."""

    statement: Statement
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, statement: Statement, key: pqc.SigningKey) -> SignedStatement:
        """Sign with ML-DSA.Sign (algorithm 2, hedged) and the statement context."""
        return cls(statement, key.sign(statement.encode(), STATEMENT_CONTEXT))

    def verify(self, scheme: pqc.SignatureScheme, public_key: bytes) -> bool:
        """ML-DSA.Verify (FIPS 204 algorithm 3) of the signature under ``public_key``."""
        backend = pqc.get_backend("cryptography")
        return backend.verify(
            scheme, public_key, self.signature, self.statement.encode(), STATEMENT_CONTEXT
        )
