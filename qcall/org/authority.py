"""An organisation's certificate authority: issue and revoke member certificates."""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qcall import config, pqc
from qcall.exceptions import (
    ConfigError,
)
from qcall.identity import validate_name
from qcall.org.profile import (
    AUTHORITY_DAYS,
    AUTHORITY_SCHEME,
    CRL_DAYS,
    MEMBER_DAYS,
    OID_DOCUMENT_SIGNING,
    ORG_DIR,
    PUBLIC_MODE,
    REASONS,
    REGISTRY_VERSION,
    UTC,
    Member,
    certificate_fingerprint,
    certified_key,
    common_name,
    key_usage,
    load_certificates,
    parse_member,
    random_serial,
    read_file,
    short_hex,
)

logger = logging.getLogger(__name__)

__all__ = ["Authority"]


# --- the authority ----------------------------------------------------------------------------


class Authority:
    """An organisation's certificate authority (its directory; see the module docstring).

    Create one with :meth:`create`, open it with :meth:`load`.
    """

    KEY_FILE = "authority.key"
    CERT_FILE = "authority.pem"
    CRL_FILE = "crl.pem"
    REGISTRY_FILE = "registry.json"

    def __init__(
        self, directory: Path, certificate: x509.Certificate, signing_key: pqc.SigningKey
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = signing_key
        self.fingerprint = certificate_fingerprint(certificate)
        self.name = common_name(certificate.subject)

    def __repr__(self) -> str:
        return f"Authority({self.name!r}, {short_hex(self.fingerprint)})"

    @staticmethod
    def default_directory(home: str | os.PathLike[str]) -> Path:
        """``<home>/org/authority``."""
        return Path(home) / ORG_DIR / "authority"

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        name: str,
        *,
        now: datetime.datetime | None = None,
        days: int = AUTHORITY_DAYS,
        seed: bytes | None = None,
    ) -> Authority:
        """Make a new authority: an ML-DSA-87 key, its self-signed certificate, an empty CRL.

        Raises:
            ConfigError: bad name, an authority exists in ``directory`` already, or
                the files cannot be written.
        """
        validate_name(name, "organisation name")
        path = Path(directory)
        if (path / cls.KEY_FILE).exists():
            raise ConfigError(f"an authority already exists in {path}")
        config.make_private_dir(path / "issued")
        backend = pqc.get_backend("cryptography")
        key = (
            backend.signing_from_seed(AUTHORITY_SCHEME, seed)
            if seed is not None
            else backend.signing_generate(AUTHORITY_SCHEME)
        )
        now = now or datetime.datetime.now(UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            ]
        )
        public = pqc.x509_public_key(AUTHORITY_SCHEME, key.public_bytes())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(random_serial())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        cert = pqc.x509_sign_certificate(builder, key)
        config.atomic_write(path / cls.KEY_FILE, key.seed_bytes())
        config.atomic_write(path / cls.CERT_FILE, pqc.x509_pem(cert), mode=PUBLIC_MODE)
        authority = cls(path, cert, key)
        authority._save_registry({"version": REGISTRY_VERSION, "crl_number": 0, "issued": {}})
        authority.write_crl(now)
        logger.info(
            "= created authority %r (%s) in %s", name, short_hex(authority.fingerprint), path
        )
        return authority

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Authority:
        """Open the authority in ``directory``.

        Raises:
            ConfigError: no authority there, or its files do not match.
        """
        path = Path(directory)
        if not (path / cls.KEY_FILE).exists():
            raise ConfigError(
                f"no organisation authority in {path}: create one with 'qcall org init --name NAME'"
            )
        seed = config.read_private_file(path / cls.KEY_FILE)
        if len(seed) != AUTHORITY_SCHEME.sizes.seed:
            raise ConfigError(f"{path / cls.KEY_FILE}: not a {AUTHORITY_SCHEME.value} seed")
        key = pqc.get_backend("cryptography").signing_from_seed(AUTHORITY_SCHEME, seed)
        certs = load_certificates(read_file(path / cls.CERT_FILE, "certificate"), str(path))
        cert = certs[0]
        if certified_key(cert, str(path / cls.CERT_FILE))[1] != key.public_bytes():
            raise ConfigError(f"{path / cls.KEY_FILE} does not match {path / cls.CERT_FILE}")
        return cls(path, cert, key)

    # registry ---------------------------------------------------------------------------

    def _registry(self) -> dict[str, Any]:
        path = self.directory / self.REGISTRY_FILE
        try:
            obj = json.loads(read_file(path, "registry"))
        except ValueError as exc:
            raise ConfigError(f"{path} is corrupt (not JSON: {exc})") from None
        if not isinstance(obj, dict) or obj.get("version") != REGISTRY_VERSION:
            raise ConfigError(f"{path}: unsupported or corrupt registry")
        if not isinstance(obj.get("issued"), dict) or not isinstance(obj.get("crl_number"), int):
            raise ConfigError(f"{path}: corrupt registry (issued, crl_number)")
        return obj

    def _save_registry(self, registry: dict[str, Any]) -> None:
        data = json.dumps(registry, indent=2, sort_keys=True) + "\n"
        config.atomic_write(self.directory / self.REGISTRY_FILE, data.encode(), mode=PUBLIC_MODE)

    # issuing ----------------------------------------------------------------------------

    def issue(
        self,
        name: str,
        public_key: bytes,
        *,
        department: str = "",
        role: str = "",
        days: int = MEMBER_DAYS,
        now: datetime.datetime | None = None,
        not_before: datetime.datetime | None = None,
    ) -> Member:
        """Certify ``name``'s ML-DSA identity key (profile of docs/seal.md §3.2).

        Writes ``issued/<SERIAL>.pem`` (the certificate, then the authority's).

        Raises:
            ConfigError: bad name, department or role, or ``days`` not positive.
            InvalidKeyError: ``public_key`` is not an ML-DSA public key.
        """
        from qcall.identity import scheme_for_public_key

        validate_name(name, "member name")
        for what, value in (("department", department), ("role", role)):
            if value:
                validate_name(value, what)
        if days <= 0:
            raise ConfigError("validity must be at least one day")
        scheme = scheme_for_public_key(public_key)
        now = now or datetime.datetime.now(UTC)
        start = not_before or now - datetime.timedelta(minutes=5)
        attrs = [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.name),
        ]
        if department:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, department))
        if role:
            attrs.append(x509.NameAttribute(NameOID.TITLE, role))
        public = pqc.x509_public_key(scheme, public_key)
        issuer_key = self.certificate.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(random_serial())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([OID_DOCUMENT_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),  # type: ignore[arg-type]
                critical=False,
            )
        )
        cert = pqc.x509_sign_certificate(builder, self._key)
        member = parse_member(cert, self.certificate)
        path = self.directory / "issued" / f"{member.serial_hex}.pem"
        chain = pqc.x509_pem(cert) + pqc.x509_pem(self.certificate)
        config.atomic_write(path, chain, mode=PUBLIC_MODE)
        registry = self._registry()
        registry["issued"][member.serial_hex] = {
            "name": name,
            "department": department,
            "role": role,
            "not_before": member.not_before.isoformat(),
            "not_after": member.not_after.isoformat(),
            "certificate_sha256": member.fingerprint.hex(),
        }
        self._save_registry(registry)
        logger.info("= issued %s serial %s to %r", self.name, member.serial_hex, name)
        return member

    def issued_path(self, serial: int) -> Path:
        """Where :meth:`issue` wrote the chain of certificate ``serial``."""
        return self.directory / "issued" / f"{serial:X}.pem"

    def issued(self) -> dict[str, dict[str, Any]]:
        """The registry of issued certificates by serial (hex), with revocations."""
        return dict(self._registry()["issued"])

    # revoking ---------------------------------------------------------------------------

    def revoke(
        self,
        serial: int,
        reason: str = "unspecified",
        *,
        now: datetime.datetime | None = None,
        invalid_since: datetime.datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Revoke certificate ``serial`` and rewrite the CRL; returns the new CRL.

        ``invalid_since`` (RFC 5280 §5.3.2 invalidity date) backdates the point from
        which seals by this certificate are refused, e.g. to when a key leaked.

        Raises:
            ConfigError: unknown serial or reason, or already revoked.
        """
        if reason not in REASONS:
            raise ConfigError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        now = now or datetime.datetime.now(UTC)
        registry = self._registry()
        entry = registry["issued"].get(f"{serial:X}")
        if entry is None:
            raise ConfigError(f"serial {serial:X} was not issued by {self.name}")
        if entry.get("revoked"):
            raise ConfigError(f"serial {serial:X} is already revoked")
        entry["revoked"] = {
            "at": now.isoformat(),
            "reason": reason,
            "invalid_since": invalid_since.isoformat() if invalid_since else None,
        }
        self._save_registry(registry)
        logger.info("= revoked serial %X of %r (%s)", serial, entry.get("name"), reason)
        return self.write_crl(now)

    def crl(self, now: datetime.datetime | None = None) -> x509.CertificateRevocationList:
        """Sign a fresh CRL of every revocation (and advance the CRL number)."""
        now = now or datetime.datetime.now(UTC)
        registry = self._registry()
        number = registry["crl_number"] + 1
        registry["crl_number"] = number
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for serial_hex, entry in sorted(registry["issued"].items()):
            revoked = entry.get("revoked")
            if not revoked:
                continue
            rb = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial_hex, 16))
                .revocation_date(datetime.datetime.fromisoformat(revoked["at"]))
                .add_extension(x509.CRLReason(REASONS[revoked["reason"]]), critical=False)
            )
            if revoked.get("invalid_since"):
                since = datetime.datetime.fromisoformat(revoked["invalid_since"])
                rb = rb.add_extension(x509.InvalidityDate(since.replace(tzinfo=None)), False)
            builder = builder.add_revoked_certificate(rb.build())
        crl = pqc.x509_sign_crl(builder, self._key)
        self._save_registry(registry)
        return crl

    def write_crl(self, now: datetime.datetime | None = None) -> x509.CertificateRevocationList:
        """Sign a fresh CRL and write it to ``crl.pem``."""
        crl = self.crl(now)
        config.atomic_write(self.directory / self.CRL_FILE, pqc.x509_pem(crl), mode=PUBLIC_MODE)
        return crl
