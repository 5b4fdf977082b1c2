"""What a user trusts: authorities, their CRLs, known member certificates (no TOFU)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from qcall import config, pqc
from qcall.exceptions import (
    CertificateError,
    CertificateExpiredError,
    CertificateRevokedError,
    IdentityChangedError,
    UntrustedCertificateError,
)
from qcall.identity import short_fingerprint
from qcall.org.profile import (
    ORG_DIR,
    PUBLIC_MODE,
    UTC,
    Member,
    certificate_fingerprint,
    check_authority,
    common_name,
    crl_number,
    format_time,
    load_certificates,
    load_crl,
    parse_member,
    read_file,
    revocation,
    short_hex,
)

logger = logging.getLogger(__name__)

__all__ = ["OrgTrust"]


# --- what a user trusts ------------------------------------------------------------------------


class OrgTrust:
    """The authorities a user trusts, their CRLs, and known member certificates.

    Args:
        directory: ``<home>/org`` (created on the first change).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._crl_cache: dict[bytes, tuple[int, x509.CertificateRevocationList | None]] = {}
        # Signature and profile checks are pure functions of the certificate bytes and the
        # authority, so their results are cached (the seal log checks every entry);
        # validity periods and revocation are checked on every call.
        self._authority_cache: tuple[int, list[x509.Certificate]] | None = None
        self._checked: dict[tuple[bytes, bytes], Member] = {}

    def __repr__(self) -> str:
        return f"OrgTrust({str(self.directory)!r})"

    @classmethod
    def in_home(cls, home: str | os.PathLike[str]) -> OrgTrust:
        """The trust store of a qcall home."""
        return cls(Path(home) / ORG_DIR)

    def exists(self) -> bool:
        """Whether any authority is trusted."""
        return any((self.directory / "trusted").glob("*.pem"))

    # authorities ------------------------------------------------------------------------

    def trust(self, data: bytes, source: str = "authority certificate") -> x509.Certificate:
        """Trust the authority certificate in ``data`` (PEM or DER).

        Raises:
            UntrustedCertificateError: not an authority certificate of the profile.
        """
        cert = load_certificates(data, source)[0]
        check_authority(cert)
        fpr = certificate_fingerprint(cert)
        path = config.make_private_dir(self.directory / "trusted") / f"{short_hex(fpr)}.pem"
        config.atomic_write(path, pqc.x509_pem(cert), mode=PUBLIC_MODE)
        logger.info("= trusting authority %r (%s)", common_name(cert.subject), short_hex(fpr))
        return cert

    def authorities(self) -> list[x509.Certificate]:
        """The trusted authority certificates (re-read when the directory changes)."""
        trusted = self.directory / "trusted"
        try:
            stamp = trusted.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if self._authority_cache is not None and self._authority_cache[0] == stamp:
            return list(self._authority_cache[1])
        out = []
        for path in sorted(trusted.glob("*.pem")):
            out.extend(load_certificates(read_file(path, "trusted authority"), str(path))[:1])
        self._authority_cache = (stamp, out)
        self._checked.clear()
        return list(out)

    def _member(self, cert: x509.Certificate, authority: x509.Certificate) -> Member:
        """:func:`parse_member`, cached by (certificate, authority) fingerprints."""
        key = (certificate_fingerprint(cert), certificate_fingerprint(authority))
        member = self._checked.get(key)
        if member is None:
            member = parse_member(cert, authority)
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[key] = member
        return member

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate:
        """The trusted authority that signed ``cert``.

        Raises:
            UntrustedCertificateError: none did.
        """
        fpr = certificate_fingerprint(cert)
        authorities = self.authorities()
        for authority in authorities:
            if (fpr, certificate_fingerprint(authority)) in self._checked:
                return authority
        for authority in authorities:
            if authority.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return authority
        raise UntrustedCertificateError(
            f"the certificate of {common_name(cert.subject)!r} (serial {cert.serial_number:X}) was "
            f"issued by {cert.issuer.rfc4514_string()!r}, which you do not trust "
            "(trust an organisation with: qcall org trust CA.pem)"
        )

    # revocation lists ------------------------------------------------------------------

    def update_crl(self, data: bytes, source: str = "CRL") -> x509.CertificateRevocationList:
        """Store a CRL signed by a trusted authority, unless an equal or newer one is stored.

        Raises:
            CertificateError: not a CRL, not signed by a trusted authority, or older
                than the stored one (a rollback would un-revoke certificates).
        """
        crl = load_crl(data, source)
        for authority in self.authorities():
            if pqc.x509_crl_signed_by(crl, authority):
                break
        else:
            raise CertificateError(f"{source} is not signed by an authority you trust")
        fpr = certificate_fingerprint(authority)
        old = self.crl_for(authority)
        if old is not None and crl_number(old) > crl_number(crl):
            raise CertificateError(
                f"{source} is CRL number {crl_number(crl)}, older than the stored number "
                f"{crl_number(old)}: refusing to roll revocations back"
            )
        path = config.make_private_dir(self.directory / "trusted") / f"{short_hex(fpr)}.crl"
        config.atomic_write(path, pqc.x509_pem(crl), mode=PUBLIC_MODE)
        self._crl_cache.pop(fpr, None)
        return crl

    def crl_for(self, authority: x509.Certificate) -> x509.CertificateRevocationList | None:
        """The stored CRL of a trusted authority (signature checked), or ``None``."""
        fpr = certificate_fingerprint(authority)
        path = self.directory / "trusted" / f"{short_hex(fpr)}.crl"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        cached = self._crl_cache.get(fpr)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        crl = load_crl(read_file(path, "CRL"), str(path))
        if not pqc.x509_crl_signed_by(crl, authority):
            raise CertificateError(f"{path} is not signed by {common_name(authority.subject)!r}")
        self._crl_cache[fpr] = (mtime, crl)
        return crl

    # members --------------------------------------------------------------------------

    def import_member(self, data: bytes, source: str = "certificate") -> Member:
        """Remember a colleague's certificate (signature and profile checked, not dates).

        Raises:
            UntrustedCertificateError: not a member certificate of a trusted authority.
        """
        cert = load_certificates(data, source)[0]
        member = parse_member(cert, self.issuer_of(cert))
        path = (
            config.make_private_dir(self.directory / "certs")
            / f"{short_hex(member.fingerprint)}.pem"
        )
        config.atomic_write(path, pqc.x509_pem(cert), mode=PUBLIC_MODE)
        return member

    def install(self, data: bytes, public_key: bytes, source: str = "certificate") -> Member:
        """Install the user's own certificate; it must certify ``public_key``.

        Raises:
            UntrustedCertificateError: not from a trusted authority, or for another key.
        """
        member = self.import_member(data, source)
        if not pqc.constant_time_eq(member.public_key, public_key):
            raise UntrustedCertificateError(
                f"{source} certifies key {short_fingerprint(member.public_key)}…, not your "
                f"identity key {short_fingerprint(public_key)}…"
            )
        config.atomic_write(
            self.directory / "member.pem", pqc.x509_pem(member.certificate), mode=PUBLIC_MODE
        )
        return member

    def own_certificate(self) -> x509.Certificate | None:
        """The user's installed certificate, if any."""
        path = self.directory / "member.pem"
        if not path.exists():
            return None
        return load_certificates(read_file(path, "certificate"), str(path))[0]

    def known_certificates(self) -> Iterator[x509.Certificate]:
        """Every member certificate imported (own included)."""
        for path in sorted((self.directory / "certs").glob("*.pem")):
            yield from load_certificates(read_file(path, "certificate"), str(path))[:1]

    # validation -------------------------------------------------------------------------

    def validate(
        self,
        cert: x509.Certificate,
        at: datetime.datetime,
        *,
        authority: x509.Certificate | None = None,
    ) -> Member:
        """Check that ``cert`` was a trustworthy member certificate at time ``at``.

        Args:
            cert: the member certificate.
            at: the time that matters: now (a call), the log time (a seal).
            authority: the issuer, if already known (else looked up).

        Returns:
            The member, with ``revoked_later`` set if a revocation takes effect after ``at``.

        Raises:
            UntrustedCertificateError: no trusted authority signed it, or the profile.
            CertificateExpiredError: ``at`` is outside its (or its authority's) validity.
            CertificateRevokedError: revoked at ``at``.
            CertificateError: no CRL of the authority is stored.
        """
        authority = authority or self.issuer_of(cert)
        member = self._member(cert, authority)
        who = f"the certificate of {member.name!r} (serial {member.serial_hex})"
        if at < member.not_before:
            raise CertificateExpiredError(
                f"{who} was not yet valid on {format_time(at)} "
                f"(valid from {format_time(member.not_before)})"
            )
        if at > member.not_after:
            raise CertificateExpiredError(
                f"{who} expired on {format_time(member.not_after)}, before {format_time(at)}"
            )
        if not authority.not_valid_before_utc <= at <= authority.not_valid_after_utc:
            raise CertificateExpiredError(
                f"the authority {common_name(authority.subject)!r} was not valid "
                f"on {format_time(at)}"
            )
        crl = self.crl_for(authority)
        if crl is None:
            raise CertificateError(
                f"no revocation list of {common_name(authority.subject)!r} is stored, so {who} "
                "cannot be checked: get its crl.pem and run 'qcall org crl-update crl.pem'"
            )
        revoked = revocation(crl, member.serial)
        if revoked is not None and revoked.at <= at:
            raise CertificateRevokedError(
                f"{who} was revoked ({revoked.reason}) on {format_time(revoked.at)}, "
                f"before {format_time(at)}"
            )
        if revoked is not None:
            member = dataclasses.replace(member, revoked_later=revoked)
        return member

    def check_peer(
        self, name: str, public_key: bytes, now: datetime.datetime | None = None
    ) -> Member | None:
        """The organisation's word on a peer's identity key (calls and messages).

        Returns:
            The member if a known certificate of ``name`` certifies ``public_key``
            and is valid now; ``None`` if no known certificate names ``name`` (the
            caller falls back to trust on first use).

        Raises:
            CertificateError: the certificate certifying this key is expired, revoked
                or untrusted (the subclass says which).
            IdentityChangedError: ``name`` is certified, but for another key.
        """
        now = now or datetime.datetime.now(UTC)
        named: list[x509.Certificate] = []
        for cert in self.known_certificates():
            if common_name(cert.subject) != name:
                continue
            named.append(cert)
            key = pqc.x509_mldsa_public_key(cert.public_key())
            if key is not None and pqc.constant_time_eq(key[1], public_key):
                return self.validate(cert, now)
        if not named:
            return None
        raise IdentityChangedError(
            f"{name!r} presented key {short_fingerprint(public_key)}…, which no certificate of "
            f"your organisation certifies (its certificate is for another key). Refused; if "
            f"{name} has a new certificate, import it with: qcall org import CERT.pem"
        )
