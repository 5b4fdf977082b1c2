"""The organisation certificate profile (docs/seal.md §3): parse and check, hostile input.

Every check names the rule a certificate breaks, as a typed
:class:`~qcall.exceptions.CertificateError`.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from qcall import pqc
from qcall.exceptions import (
    CertificateError,
    ConfigError,
    InvalidKeyError,
    UntrustedCertificateError,
)
from qcall.identity import short_fingerprint, validate_name

__all__ = [
    "AUTHORITY_DAYS",
    "AUTHORITY_SCHEME",
    "CRL_DAYS",
    "MEMBER_DAYS",
    "OID_DOCUMENT_SIGNING",
    "ORG_DIR",
    "PUBLIC_MODE",
    "REASONS",
    "REGISTRY_VERSION",
    "UTC",
    "Member",
    "Revocation",
    "certificate_fingerprint",
    "certified_key",
    "check_authority",
    "common_name",
    "crl_number",
    "format_time",
    "from_millis",
    "key_usage",
    "load_certificates",
    "load_crl",
    "member_public_key",
    "parse_member",
    "parse_serial",
    "random_serial",
    "read_file",
    "revocation",
    "short_hex",
]

logger = logging.getLogger(__name__)

#: id-kp-documentSigning (RFC 9336): the extended key usage of a sealing identity.
OID_DOCUMENT_SIGNING: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")
#: ML-DSA parameter set of authorities (the long-lived keys).
AUTHORITY_SCHEME: Final = pqc.SignatureScheme.ML_DSA_87
#: Default validity of a member certificate, and of an authority, in days.
MEMBER_DAYS: Final = 365
AUTHORITY_DAYS: Final = 20 * 365
#: Validity of each CRL (``nextUpdate - thisUpdate``), in days.
CRL_DAYS: Final = 30
#: Largest certificate, chain or CRL file read.
MAX_FILE: Final = 4 * 1024 * 1024

#: ``--reason`` names of ``qcall org revoke`` → CRL reason codes (RFC 5280 §5.3.1).
REASONS: Final = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
_REASON_NAMES = {flag: name for name, flag in REASONS.items()}

ORG_DIR = "org"
REGISTRY_VERSION = 1
PUBLIC_MODE = 0o644
UTC = datetime.UTC


def from_millis(ms: int) -> datetime.datetime:
    """A UTC datetime from milliseconds since the Unix epoch (the log's time unit)."""
    return datetime.datetime.fromtimestamp(ms / 1000, UTC)


def format_time(t: datetime.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def certificate_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding (32 bytes): how statements name certificates."""
    return hashlib.sha256(pqc.x509_der(cert)).digest()


def short_hex(fpr: bytes) -> str:
    return fpr.hex()[:16]


def common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


# --- reading certificates and CRLs (hostile input) ---------------------------------------------


def load_certificates(data: bytes, source: str = "certificate") -> list[x509.Certificate]:
    """Parse one DER certificate, or one or more PEM certificates.

    Raises:
        UntrustedCertificateError: not a certificate (names ``source``).
    """
    if len(data) > MAX_FILE:
        raise UntrustedCertificateError(f"{source} is larger than {MAX_FILE} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise UntrustedCertificateError(f"{source} is not an X.509 certificate: {exc}") from None
    return certs


def load_crl(data: bytes, source: str = "CRL") -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL.

    Raises:
        CertificateError: not a CRL (names ``source``).
    """
    if len(data) > MAX_FILE:
        raise CertificateError(f"{source} is larger than {MAX_FILE} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CertificateError(f"{source} is not an X.509 CRL: {exc}") from None


def read_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_FILE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


# --- the profile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """A CRL entry: ``at`` is when the certificate stopped being trustworthy (the
    invalidity date when the authority gave one, else the revocation date)."""

    serial: int
    at: datetime.datetime
    reason: str


@dataclass(frozen=True)
class Member:
    """A member certificate that follows the profile (docs/seal.md §3.2).

    Attributes:
        name: the subject's common name (the qcall user name).
        organisation: the subject's O (the authority's name).
        department: the subject's OU ("" if none).
        role: the subject's title ("" if none).
        serial: the certificate serial number.
        not_before, not_after: the validity period (UTC).
        scheme, public_key: the certified ML-DSA identity key.
        fingerprint: SHA-256 of the certificate (DER).
        issuer_fingerprint: SHA-256 of the authority certificate that signed it.
        certificate: the certificate itself.
        revoked_later: a revocation that takes effect after the time checked.
    """

    name: str
    organisation: str
    department: str
    role: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    scheme: pqc.SignatureScheme
    public_key: bytes = field(repr=False)
    fingerprint: bytes = field(repr=False)
    issuer_fingerprint: bytes = field(repr=False)
    certificate: x509.Certificate = field(repr=False, compare=False)
    revoked_later: Revocation | None = None

    @property
    def serial_hex(self) -> str:
        """The serial as ``qcall org`` prints and reads it (upper-case hex)."""
        return f"{self.serial:X}"

    def describe(self) -> str:
        """``alice (Finance, auditor) of Hefei Municipal``."""
        extra = ", ".join(x for x in (self.department, self.role) if x)
        return f"{self.name}{f' ({extra})' if extra else ''} of {self.organisation}"

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``--json`` outputs."""
        return {
            "name": self.name,
            "organisation": self.organisation,
            "department": self.department,
            "role": self.role,
            "serial": self.serial_hex,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "algorithm": self.scheme.value,
            "key_fingerprint": short_fingerprint(self.public_key),
            "certificate_sha256": self.fingerprint.hex(),
        }


def certified_key(cert: x509.Certificate, who: str) -> tuple[pqc.SignatureScheme, bytes]:
    try:
        key = pqc.x509_mldsa_public_key(cert.public_key())
    except ValueError:
        key = None
    if key is None:
        raise UntrustedCertificateError(f"{who}: the certified key is not an ML-DSA key")
    return key


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType], who: str) -> x509.Extension[Any]:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        raise UntrustedCertificateError(f"{who}: no {kind.__name__} extension") from None
    except ValueError as exc:  # duplicate or malformed extension
        raise UntrustedCertificateError(f"{who}: bad extensions ({exc})") from None


def check_authority(cert: x509.Certificate) -> None:
    """Check an authority certificate against the profile (docs/seal.md §3.1).

    Raises:
        UntrustedCertificateError: naming the rule it breaks.
    """
    who = f"authority certificate {common_name(cert.subject)!r}"
    certified_key(cert, who)
    bc = _ext(cert, x509.BasicConstraints, who)
    if not bc.critical or not bc.value.ca:
        raise UntrustedCertificateError(f"{who}: BasicConstraints must be critical with cA true")
    ku = _ext(cert, x509.KeyUsage, who).value
    if not (ku.key_cert_sign and ku.crl_sign):
        raise UntrustedCertificateError(f"{who}: KeyUsage must allow keyCertSign and cRLSign")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise UntrustedCertificateError(f"{who}: not a valid self-signed certificate") from None


def parse_member(cert: x509.Certificate, authority: x509.Certificate) -> Member:
    """Check a member certificate's signature and profile; return what it says.

    Validity periods and revocation are checked by :meth:`OrgTrust.validate`.

    Raises:
        UntrustedCertificateError: ``authority`` did not sign it, or it breaks
            the profile (the rule is named).
    """
    name = common_name(cert.subject)
    who = f"certificate of {name!r} (serial {cert.serial_number:X})"
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise UntrustedCertificateError(
            f"{who} was not issued by {common_name(authority.subject)!r}"
        ) from None
    if cert.version != x509.Version.v3:
        raise UntrustedCertificateError(f"{who}: not an X.509 v3 certificate")
    scheme, public_key = certified_key(cert, who)
    bc = _ext(cert, x509.BasicConstraints, who)
    if bc.value.ca:
        raise UntrustedCertificateError(f"{who}: a member certificate must not be a CA")
    ku = _ext(cert, x509.KeyUsage, who).value
    if not (ku.digital_signature and ku.content_commitment):
        raise UntrustedCertificateError(
            f"{who}: KeyUsage must allow digitalSignature and nonRepudiation"
        )
    eku = _ext(cert, x509.ExtendedKeyUsage, who).value
    if OID_DOCUMENT_SIGNING not in eku:
        raise UntrustedCertificateError(f"{who}: ExtendedKeyUsage lacks documentSigning")
    try:
        validate_name(name, "certificate common name")
    except ConfigError as exc:
        raise UntrustedCertificateError(f"{who}: {exc}") from None
    return Member(
        name=name,
        organisation=_attr(cert.subject, NameOID.ORGANIZATION_NAME),
        department=_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        role=_attr(cert.subject, NameOID.TITLE),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        scheme=scheme,
        public_key=public_key,
        fingerprint=certificate_fingerprint(cert),
        issuer_fingerprint=certificate_fingerprint(authority),
        certificate=cert,
    )


def key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def random_serial() -> int:
    """A random positive 64-bit serial (RFC 5280 §4.1.2.2: ≤ 20 octets, positive)."""
    return secrets.randbits(63) | (1 << 62)


def parse_serial(text: str) -> int:
    """Read a serial as printed by ``qcall org`` (hex, colons allowed).

    Raises:
        ConfigError: not a hex serial.
    """
    clean = text.replace(":", "").strip()
    try:
        value = int(clean, 16)
    except ValueError:
        raise ConfigError(f"serial {text!r} is not a hexadecimal number") from None
    if not 0 < value < 1 << 159:
        raise ConfigError(f"serial {text!r} is out of range")
    return value


def revocation(crl: x509.CertificateRevocationList, serial: int) -> Revocation | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    if entry is None:
        return None
    at = entry.revocation_date_utc
    reason = "unspecified"
    for ext in entry.extensions:
        if isinstance(ext.value, x509.CRLReason):
            reason = _REASON_NAMES.get(ext.value.reason, ext.value.reason.value)
        elif isinstance(ext.value, x509.InvalidityDate):
            since = ext.value.invalidity_date_utc
            at = min(at, since)
    return Revocation(serial, at, reason)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def member_public_key(cert: x509.Certificate) -> tuple[pqc.SignatureScheme, bytes]:
    """The ML-DSA key a certificate certifies.

    Raises:
        InvalidKeyError: not an ML-DSA key.
    """
    key = pqc.x509_mldsa_public_key(cert.public_key())
    if key is None:
        raise InvalidKeyError("the certificate's key is not an ML-DSA key")
    return key
