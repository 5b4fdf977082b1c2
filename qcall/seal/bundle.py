"""The ``.qseal`` file: a seal, its approvals, their certificates and log receipts.

A bundle is one JSON object (UTF-8, docs/seal.md §7)::

    {"format": "qcall-seal", "version": 1,
     "seal":      {"statement": {...}, "signature": "<base64>", "receipt": {...} | null},
     "decisions": [{"statement": {...}, "signature": "<base64>", "receipt": {...}}, ...],
     "certificates": ["<base64 DER>", ...]}

The statements are in their JSON form (:meth:`~qcall.seal.statement.Statement.to_json`);
verifiers re-encode them canonically, so any change to a field breaks its signature.
``certificates`` holds every certificate the statements' chains name (the signers'
and their authority's), deduplicated. :meth:`SealBundle.parse` treats the file as
hostile: size limit, strict types, unknown fields refused, typed errors only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from qcall.exceptions import SealFormatError
from qcall.seal.logformat import Receipt
from qcall.seal.statement import Kind, SignedStatement, Statement, b64decode

__all__ = ["FORMAT", "MAX_BUNDLE", "SUFFIX", "Record", "SealBundle"]

FORMAT: Final = "qcall-seal"
VERSION: Final = 1
#: File name suffix: ``FILE`` is sealed in ``FILE.qseal``.
SUFFIX: Final = ".qseal"
#: Largest bundle parsed.
MAX_BUNDLE: Final = 4 * 1024 * 1024
MAX_DECISIONS: Final = 64
MAX_CERTIFICATES: Final = 128


@dataclass(frozen=True)
class Record:
    """A signed statement and (once logged) its receipt."""

    signed: SignedStatement
    receipt: Receipt | None = None

    @property
    def statement(self) -> Statement:
        return self.signed.statement

    def to_json(self) -> dict[str, Any]:
        return {
            "statement": self.signed.statement.to_json(),
            "signature": base64.b64encode(self.signed.signature).decode(),
            "receipt": self.receipt.to_json() if self.receipt else None,
        }

    @classmethod
    def from_json(cls, obj: object, where: str) -> Record:
        if not isinstance(obj, dict):
            raise SealFormatError(f"{where} must be an object")
        extra = set(obj) - {"statement", "signature", "receipt"}
        if extra:
            raise SealFormatError(f"{where}: unknown field {sorted(extra)[0]!r}")
        try:
            statement = Statement.from_json(obj.get("statement"))
            signature = b64decode(obj.get("signature"), "signature", 8192)
            receipt = None if obj.get("receipt") is None else Receipt.from_json(obj["receipt"])
        except SealFormatError as exc:
            raise SealFormatError(f"{where}: {exc}") from None
        return cls(SignedStatement(statement, signature), receipt)


@dataclass(frozen=True)
class SealBundle:
    """A parsed ``.qseal`` file."""

    seal: Record
    decisions: tuple[Record, ...] = ()
    certificates: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.seal.statement.kind is not Kind.SEAL:
            raise SealFormatError("the bundle's first statement must be a seal")
        for record in self.decisions:
            if record.statement.kind is Kind.SEAL:
                raise SealFormatError("a decision must be an approval or a rejection")

    @property
    def workflow_id(self) -> str:
        """SHA-384 of the seal statement, in hex: names the approval workflow."""
        return self.seal.statement.digest().hex()

    def certificate_map(self) -> dict[bytes, bytes]:
        """DER certificates by SHA-256."""
        return {hashlib.sha256(der).digest(): der for der in self.certificates}

    def with_certificates(self, ders: list[bytes]) -> SealBundle:
        """The bundle with ``ders`` added (deduplicated, order kept)."""
        known = self.certificate_map()
        extra = tuple(d for d in ders if hashlib.sha256(d).digest() not in known)
        return SealBundle(
            self.seal, self.decisions, self.certificates + tuple(dict.fromkeys(extra))
        )

    def with_decision(self, record: Record, ders: list[bytes]) -> SealBundle:
        """The bundle with one more decision (and its signer's certificates)."""
        bundle = SealBundle(self.seal, (*self.decisions, record), self.certificates)
        return bundle.with_certificates(ders)

    def serialize(self) -> bytes:
        """The file's bytes (indented JSON, UTF-8, trailing newline)."""
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "seal": self.seal.to_json(),
            "decisions": [d.to_json() for d in self.decisions],
            "certificates": [base64.b64encode(c).decode() for c in self.certificates],
        }
        return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, source: str = "seal bundle") -> SealBundle:
        """Parse a ``.qseal`` file (hostile input).

        Raises:
            SealFormatError: naming ``source`` and the field.
        """
        if len(data) > MAX_BUNDLE:
            raise SealFormatError(f"{source} is larger than {MAX_BUNDLE} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SealFormatError(f"{source} is not a seal bundle (not JSON: {exc})") from None
        try:
            return cls._from_json(obj)
        except SealFormatError as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def _from_json(cls, obj: object) -> SealBundle:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SealFormatError(f"not a {FORMAT} file")
        if obj.get("version") != VERSION:
            raise SealFormatError(f"unsupported version {obj.get('version')!r}")
        extra = set(obj) - {"format", "version", "seal", "decisions", "certificates"}
        if extra:
            raise SealFormatError(f"unknown field {sorted(extra)[0]!r}")
        decisions = obj.get("decisions", [])
        certs = obj.get("certificates")
        if not isinstance(decisions, list) or len(decisions) > MAX_DECISIONS:
            raise SealFormatError(f"field 'decisions' must list at most {MAX_DECISIONS}")
        if not isinstance(certs, list) or len(certs) > MAX_CERTIFICATES:
            raise SealFormatError(f"field 'certificates' must list at most {MAX_CERTIFICATES}")
        return cls(
            Record.from_json(obj.get("seal"), "seal"),
            tuple(Record.from_json(d, f"decisions[{i}]") for i, d in enumerate(decisions)),
            tuple(b64decode(c, f"certificates[{i}]", 65536) for i, c in enumerate(certs)),
        )
