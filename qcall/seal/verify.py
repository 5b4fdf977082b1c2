"""Offline verification of a ``.qseal`` bundle (docs/seal.md §8). Pure: no network.

Inputs are the bundle, the document's SHA-384, the authorities the verifier trusts
(with their CRLs, :class:`~qcall.org.OrgTrust`) and the public keys of the logs
it trusts. For the seal and for every decision, in this order:

1. the signer's certificate is in the bundle and is the one the statement names;
2. the ML-DSA signature verifies under its key (FIPS 204, statement context);
3. a trusted authority issued the certificate;
4. the log receipt exists, its tree head is signed by a trusted log, and its
   inclusion proof leads from the entry to that tree head's root (RFC 9162);
5. the certificate was valid, and not revoked, at the **log's** time of the entry
   (the signer's own clock is shown but never trusted);

then the document's hash is compared with the sealed one, and the decisions are
replayed through :class:`~qcall.seal.workflow.Workflow`. Nothing stops at the
first problem: :func:`verify_bundle` returns a :class:`SealReport` listing every
failure with its cause (``document_changed``, ``signature_invalid``,
``certificate_untrusted``, ``certificate_expired``, ``certificate_revoked``,
``not_in_log``, ``log_proof_invalid``, ``approval_invalid``, ...); it is valid
only if there is none.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from qcall.exceptions import (
    CertificateError,
    DocumentChangedError,
    NotInLogError,
    QCallError,
    SealError,
    SealFormatError,
    SealSignatureError,
    WorkflowError,
)
from qcall.org import (
    Member,
    OrgTrust,
    certificate_fingerprint,
    from_millis,
    load_certificates,
    member_public_key,
)
from qcall.seal.bundle import Record, SealBundle
from qcall.seal.logformat import LogKey, TreeHead
from qcall.seal.statement import Kind
from qcall.seal.workflow import Decision, Workflow

__all__ = ["Failure", "RecordReport", "SealReport", "verify_bundle"]


@dataclass(frozen=True)
class Failure:
    """One failed check: ``cause`` is stable (for scripts), ``message`` is for people."""

    cause: str
    message: str
    error: QCallError = field(repr=False, compare=False)


@dataclass
class RecordReport:
    """What one statement of the bundle says, and what was verified of it."""

    kind: str
    signer: str
    reason: str
    signing_time: int
    member: Member | None = None
    certificate: x509.Certificate | None = field(default=None, repr=False)
    log_name: str | None = None
    log_time: int | None = None
    leaf_index: int | None = None
    tree_size: int | None = None
    tree_head: TreeHead | None = field(default=None, repr=False)
    failures: list[Failure] = field(default_factory=list)

    @property
    def in_log(self) -> bool:
        """Whether the receipt verified."""
        return self.log_time is not None

    def to_json(self) -> dict[str, Any]:
        m = self.member
        return {
            "kind": self.kind,
            "signer": self.signer,
            "organisation": m.organisation if m else None,
            "department": m.department if m else None,
            "role": m.role if m else None,
            "certificate_serial": m.serial_hex if m else None,
            "reason": self.reason,
            "signing_time": _iso(self.signing_time),
            "log_time": _iso(self.log_time) if self.log_time is not None else None,
            "log": self.log_name,
            "leaf_index": self.leaf_index,
            "log_size": self.tree_size,
            "revoked_later": (
                {"at": m.revoked_later.at.isoformat(), "reason": m.revoked_later.reason}
                if m and m.revoked_later
                else None
            ),
            "verified": not self.failures,
        }


@dataclass
class SealReport:
    """The verdict on a bundle."""

    document_name: str
    document_hash: bytes
    document_checked: bool
    seal: RecordReport
    decisions: list[RecordReport]
    workflow: str | None  #: the workflow's status text (``None``: no approvals asked)
    workflow_state: str | None
    failures: list[Failure]
    machine: Workflow | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def inclusion_verified(self) -> bool:
        """Every statement's log receipt verified."""
        return self.seal.in_log and all(d.in_log for d in self.decisions)

    def tree_heads(self) -> list[TreeHead]:
        """The verified tree heads of the receipts (for the audit monitor)."""
        return [r.tree_head for r in (self.seal, *self.decisions) if r.tree_head and r.in_log]

    def raise_first(self) -> None:
        """Raise the first failure's error (typed), if any."""
        if self.failures:
            raise self.failures[0].error

    def to_json(self) -> dict[str, Any]:
        return {
            "verified": self.ok,
            "document": {
                "name": self.document_name,
                "sha384": self.document_hash.hex(),
                "checked": self.document_checked,
            },
            "seal": self.seal.to_json(),
            "decisions": [d.to_json() for d in self.decisions],
            "workflow": {"state": self.workflow_state, "status": self.workflow}
            if self.workflow
            else None,
            "inclusion_verified": self.inclusion_verified,
            "log_size": self.seal.tree_size,
            "failures": [{"cause": f.cause, "message": f.message} for f in self.failures],
        }


def _iso(ms: int) -> str:
    return from_millis(ms).isoformat(timespec="milliseconds")


def _fail(report: RecordReport, exc: QCallError, prefix: str) -> None:
    cause = getattr(exc, "cause", "invalid")
    report.failures.append(Failure(cause, f"{prefix}: {exc}", exc))


def _verify_record(
    record: Record,
    certificates: Mapping[bytes, bytes],
    trust: OrgTrust,
    logs: Mapping[bytes, LogKey],
) -> RecordReport:
    s = record.statement
    report = RecordReport(s.kind.label, "?", s.reason, s.signing_time)
    what = s.kind.label if s.kind is not Kind.SEAL else "seal"
    der = certificates.get(s.chain[0])
    if der is None:
        _fail(report, SealFormatError("the signer's certificate is missing from the bundle"), what)
        return report
    try:
        cert = load_certificates(der, "certificate")[0]
        scheme, public_key = member_public_key(cert)
    except QCallError as exc:
        _fail(report, exc, what)
        return report
    report.certificate = cert
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    report.signer = str(names[0].value) if names else cert.subject.rfc4514_string()
    prefix = f"{what} by {report.signer}"
    # 2. the signature
    if not record.signed.verify(scheme, public_key):
        _fail(
            report,
            SealSignatureError(
                f"the ML-DSA signature does not verify under {report.signer}'s certified key: "
                "the bundle was altered, or it was signed by another key"
            ),
            prefix,
        )
    # 3. the authority, and the chain the statement names
    authority = None
    try:
        authority = trust.issuer_of(cert)
        if s.chain[1:] and s.chain[-1] != certificate_fingerprint(authority):
            raise SealFormatError("the statement names another authority certificate")
    except (CertificateError, SealError) as exc:
        _fail(report, exc, prefix)
    # 4. the log receipt
    if record.receipt is None:
        _fail(report, NotInLogError("no transparency-log receipt: it was never logged"), prefix)
    else:
        try:
            log = record.receipt.verify(record.signed, logs)
        except SealError as exc:
            _fail(report, exc, prefix)
        else:
            report.log_name = log.name
            report.log_time = record.receipt.timestamp
            report.leaf_index = record.receipt.leaf_index
            report.tree_size = record.receipt.tree_head.tree_size
            report.tree_head = record.receipt.tree_head
    # 5. the certificate at the log's time (the signer's clock if the receipt failed)
    if authority is not None:
        at = from_millis(report.log_time if report.log_time is not None else s.signing_time)
        try:
            report.member = trust.validate(cert, at, authority=authority)
        except CertificateError as exc:
            _fail(report, exc, prefix)
    return report


def verify_bundle(
    bundle: SealBundle,
    trust: OrgTrust,
    logs: Mapping[bytes, LogKey],
    *,
    document_hash: bytes | None = None,
) -> SealReport:
    """Verify everything in ``bundle`` offline (see the module docstring).

    Args:
        bundle: the parsed ``.qseal``.
        trust: the verifier's trusted authorities and CRLs.
        logs: trusted log keys by log ID.
        document_hash: SHA-384 of the document as it is now (``None``: not checked).

    Returns:
        The report; ``report.ok`` only if every check passed.
    """
    certificates = bundle.certificate_map()
    seal = bundle.seal.statement
    seal_report = _verify_record(bundle.seal, certificates, trust, logs)
    failures = list(seal_report.failures)
    if document_hash is not None and document_hash != seal.document_hash:
        exc = DocumentChangedError(
            f"the document changed since it was sealed: its SHA-384 is "
            f"{document_hash.hex()[:16]}…, the seal is for {seal.document_hash.hex()[:16]}…"
        )
        failures.insert(0, Failure(exc.cause, str(exc), exc))
    decision_reports = []
    workflow = None
    if seal.policy is not None and seal_report.member is not None:
        workflow = Workflow(seal, seal_report.member.name, seal_report.member.issuer_fingerprint)
    elif bundle.decisions and seal.policy is None:
        exc2 = WorkflowError("the seal asks for no approvals, yet the bundle has decisions")
        failures.append(Failure(exc2.cause, str(exc2), exc2))
    for record in bundle.decisions:
        report = _verify_record(record, certificates, trust, logs)
        if workflow is not None and report.member is not None and not report.failures:
            try:
                workflow.receive(
                    Decision(report.member.name, report.member.issuer_fingerprint, record.statement)
                )
            except WorkflowError as exc:
                _fail(report, exc, f"{report.kind} by {report.signer}")
        failures.extend(report.failures)
        decision_reports.append(report)
    return SealReport(
        document_name=seal.document_name,
        document_hash=seal.document_hash,
        document_checked=document_hash is not None,
        seal=seal_report,
        decisions=decision_reports,
        workflow=workflow.status() if workflow else None,
        workflow_state=workflow.state.name.lower() if workflow else None,
        failures=failures,
        machine=workflow,
    )


def document_hash(data: bytes) -> bytes:
    """SHA-384 of a document's bytes (FIPS 180-4)."""
    return hashlib.sha384(data).digest()


def utc_now_ms() -> int:
    """Now, in ms since the Unix epoch."""
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
