"""Sealing, approving and rejecting: what ``qcall seal`` does, above the pure cores.

:class:`Signer` is a user who can sign statements: their identity, their
organisation certificate and its authority (``qcall org install``). The flows
sign a statement, record its digest in the user's journal of signed statements
(what ``qcall seal audit`` compares the log with), submit it to the log through
a :class:`LogSink` (the HTTPS :class:`~qcall.seal.logclient.LogClient`, or a
:class:`LocalLog` in process), check the receipt, and return the grown bundle.

Files in the qcall home (``<home>/seal/``)::

    config.json      {"log": LOG_ID, "workflows": DIR}   (``qcall seal setup``)
    logs/<ID>.json   trusted logs: {"name", "algorithm", "public_key", "log_id",
                     "url", "tls_ca"}  (``qcall seal trust-log``)
    signed.jsonl     one line per statement this home signed: digest, kind, time, document
    audit.db         the audit monitor's state (:mod:`qcall.seal.audit`)
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from qcall import config, pqc
from qcall.exceptions import (
    ConfigError,
    SealFormatError,
    WorkflowError,
)
from qcall.identity import Identity
from qcall.org import Member, OrgTrust
from qcall.seal.bundle import Record, SealBundle
from qcall.seal.log import Submission, TransparencyLog
from qcall.seal.logformat import LogKey, Receipt
from qcall.seal.statement import Kind, Policy, SignedStatement, Statement
from qcall.seal.verify import SealReport, verify_bundle
from qcall.seal.workflow import Decision, Notify

__all__ = [
    "LocalLog",
    "LogSink",
    "SealHome",
    "Signer",
    "decide",
    "hash_file",
    "seal_document",
]

_CHUNK = 1 << 20


def hash_file(path: str | os.PathLike[str]) -> bytes:
    """SHA-384 of a file's bytes.

    Raises:
        ConfigError: the file cannot be read.
    """
    h = hashlib.sha384()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return h.digest()


def _now_ms() -> int:
    return int(time.time() * 1000)


class LogSink(Protocol):
    """Where statements get logged: returns a receipt that the caller then checks."""

    async def add(self, submission: Submission) -> Receipt: ...


class LocalLog:
    """A :class:`LogSink` over an in-process :class:`TransparencyLog` (tests, tools)."""

    def __init__(self, log: TransparencyLog) -> None:
        self.log = log

    async def add(self, submission: Submission) -> Receipt:
        (result,) = self.log.add([submission])
        if result.error is not None:
            raise result.error
        return self.log.receipt(result.index, result.timestamp)


@dataclass(frozen=True)
class Signer:
    """A certified user who signs statements."""

    identity: Identity
    member: Member
    authority: x509.Certificate = field(repr=False)

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def chain_ders(self) -> tuple[bytes, bytes]:
        return pqc.x509_der(self.member.certificate), pqc.x509_der(self.authority)

    @property
    def chain_ids(self) -> tuple[bytes, bytes]:
        return self.member.fingerprint, self.member.issuer_fingerprint

    @classmethod
    def load(cls, home: str | os.PathLike[str], *, at: datetime.datetime | None = None) -> Signer:
        """The signer of a qcall home: identity + installed, currently valid certificate.

        Raises:
            ConfigError: no certificate installed (with the command that fixes it).
            CertificateError: the certificate is expired, revoked or untrusted.
        """
        identity = Identity.load(home)
        trust = OrgTrust.in_home(home)
        cert = trust.own_certificate()
        if cert is None:
            raise ConfigError(
                "you have no organisation certificate: ask your organisation for one "
                "('qcall org issue NAME --key identity.json') and install it with "
                "'qcall org install CERT.pem'"
            )
        member = trust.validate(cert, at or datetime.datetime.now(datetime.UTC))
        if member.public_key != identity.public_key:
            raise ConfigError("your installed certificate is for another identity key")
        return cls(identity, member, trust.issuer_of(cert))

    def sign(self, statement: Statement) -> SignedStatement:
        return SignedStatement.sign(statement, self.identity.signing_key)

    def submission(self, signed: SignedStatement) -> Submission:
        return Submission(signed, self.chain_ders)


class SealHome:
    """The seal files of a qcall home (see the module docstring)."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.directory = self.home / "seal"

    # configuration -----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.exists():
            return {}
        try:
            obj = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is corrupt: {exc}") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{path} is corrupt: not an object")
        return obj

    def set_config(self, **values: Any) -> None:
        obj = self.config()
        obj.update({k: v for k, v in values.items() if v is not None})
        config.make_private_dir(self.directory)
        data = (json.dumps(obj, indent=2) + "\n").encode()
        config.atomic_write(self.directory / "config.json", data, mode=0o644)

    def trust_log(self, key: LogKey, *, url: str | None = None, tls_ca: str | None = None) -> None:
        """Trust a log (and make it the default for signing)."""
        obj = {**key.to_json(), "url": url, "tls_ca": tls_ca}
        path = config.make_private_dir(self.directory / "logs") / f"{key.log_id.hex()[:16]}.json"
        config.atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode(), mode=0o644)
        self.set_config(log=key.log_id.hex())

    def logs(self) -> dict[bytes, LogKey]:
        """Trusted log keys by log ID."""
        return {k.log_id: k for k, _ in self._log_entries()}

    def _log_entries(self) -> list[tuple[LogKey, dict[str, Any]]]:
        out = []
        for path in sorted((self.directory / "logs").glob("*.json")):
            try:
                obj = json.loads(path.read_bytes())
                out.append((LogKey.from_json(obj), obj))
            except (OSError, ValueError, SealFormatError) as exc:
                raise ConfigError(f"{path} is corrupt: {exc}") from None
        return out

    def default_log(self) -> tuple[LogKey, str, str | None]:
        """The log to sign with: its key, URL and TLS CA file.

        Raises:
            ConfigError: none configured.
        """
        wanted = self.config().get("log")
        for key, obj in self._log_entries():
            if key.log_id.hex() == wanted and isinstance(obj.get("url"), str):
                return key, obj["url"], obj.get("tls_ca")
        raise ConfigError(
            "no transparency log configured: run 'qcall seal trust-log LOG.pub --url URL "
            "--ca TLS-CA.pem'"
        )

    def workflows(self) -> Path:
        """The shared workflow directory (``qcall seal setup --workflows DIR``)."""
        value = self.config().get("workflows")
        return Path(value) if isinstance(value, str) else self.directory / "workflows"

    # the journal of signed statements ------------------------------------------------------

    def _append_journal(self, obj: dict[str, Any]) -> None:
        config.make_private_dir(self.directory)
        fd = os.open(self.directory / "signed.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, (json.dumps(obj) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def record_signed(self, statement: Statement) -> None:
        """Journal a statement before it is logged (``signed.jsonl``, fsynced)."""
        self._append_journal(
            {
                "digest": statement.digest().hex(),
                "kind": statement.kind.label,
                "signing_time": statement.signing_time,
                "document": statement.document_name,
            }
        )

    def record_receipt(self, signed: SignedStatement, receipt: Receipt) -> None:
        """Journal where the log put a statement (the audit checks it stays there)."""
        self._append_journal(
            {
                "digest": signed.statement.digest().hex(),
                "log_id": receipt.tree_head.log_id.hex(),
                "leaf_index": receipt.leaf_index,
                "leaf_hash": receipt.entry(signed).leaf_hash().hex(),
            }
        )

    def journal(self, log_id: bytes | None = None) -> dict[bytes, bytes | None]:
        """Statements this home signed: digest -> leaf hash of its acknowledged entry in
        ``log_id`` (``None``: signed, no receipt known)."""
        path = self.directory / "signed.jsonl"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        out: dict[bytes, bytes | None] = {}
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
                digest = bytes.fromhex(obj["digest"])
            except (ValueError, KeyError, TypeError):
                if n == len(lines):  # a torn last line was never acknowledged
                    break
                raise ConfigError(f"{path}: line {n} is corrupt") from None
            leaf = obj.get("leaf_hash")
            if isinstance(leaf, str) and (log_id is None or obj.get("log_id") == log_id.hex()):
                try:
                    out[digest] = bytes.fromhex(leaf)
                except ValueError:
                    raise ConfigError(f"{path}: line {n} is corrupt") from None
            else:
                out.setdefault(digest, None)
        return out


async def _log(
    sink: LogSink,
    signer: Signer,
    signed: SignedStatement,
    logs: Mapping[bytes, LogKey],
    home: SealHome | None,
) -> Record:
    if home is not None:
        home.record_signed(signed.statement)
    receipt = await sink.add(signer.submission(signed))
    receipt.verify(signed, logs)  # never keep a receipt that does not prove inclusion
    if home is not None:
        home.record_receipt(signed, receipt)
    return Record(signed, receipt)


async def seal_document(
    signer: Signer,
    document: str | os.PathLike[str],
    sink: LogSink,
    logs: Mapping[bytes, LogKey],
    *,
    reason: str = "",
    policy: Policy | None = None,
    home: SealHome | None = None,
    now_ms: int | None = None,
) -> SealBundle:
    """Seal a document: sign, record, log, and return the bundle.

    Raises:
        LogError: the log refused or could not be reached.
        LogProofError: the log's receipt does not prove inclusion.
    """
    path = Path(document)
    statement = Statement(
        Kind.SEAL,
        hash_file(path),
        path.name[:255],
        now_ms if now_ms is not None else _now_ms(),
        reason,
        signer.chain_ids,
        policy,
    )
    signed = signer.sign(statement)
    record = await _log(sink, signer, signed, logs, home)
    return SealBundle(record, (), signer.chain_ders)


async def decide(
    signer: Signer,
    bundle: SealBundle,
    trust: OrgTrust,
    sink: LogSink,
    logs: Mapping[bytes, LogKey],
    *,
    approve: bool,
    reason: str = "",
    document_hash: bytes | None = None,
    home: SealHome | None = None,
    now_ms: int | None = None,
) -> tuple[SealBundle, SealReport, list[Notify]]:
    """Approve or reject a seal's workflow: verify the bundle, sign, log, append.

    The bundle must verify (document included, if ``document_hash`` is given) and
    be waiting for ``signer``; the new decision is checked by the workflow rules
    before it is signed.

    Returns:
        The grown bundle, its new verification report, and the notifications the
        workflow emits (the next approver, or the outcome for the sealer).

    Raises:
        SealError: the bundle does not verify (the first failure), or the workflow
            does not wait for ``signer`` (:class:`WorkflowError`).
        LogError: the log refused or could not be reached.
    """
    report = verify_bundle(bundle, trust, logs, document_hash=document_hash)
    report.raise_first()
    seal = bundle.seal.statement
    workflow = report.machine
    if workflow is None:
        raise WorkflowError("this seal asks for no approvals")
    statement = Statement(
        Kind.APPROVE if approve else Kind.REJECT,
        seal.document_hash,
        seal.document_name,
        now_ms if now_ms is not None else _now_ms(),
        reason,
        signer.chain_ids,
        seal_digest=workflow.seal_digest,
        previous_digest=workflow.expected_previous(),
    )
    decision = Decision(signer.name, signer.member.issuer_fingerprint, statement)
    workflow.check(decision)
    signed = signer.sign(statement)
    record = await _log(sink, signer, signed, logs, home)
    grown = bundle.with_decision(record, list(signer.chain_ders))
    notices = workflow.receive(decision)
    new_report = verify_bundle(grown, trust, logs, document_hash=document_hash)
    new_report.raise_first()
    return grown, new_report, notices
