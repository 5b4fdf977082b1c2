"""Organisation authorities, member certificates, CRLs and org-verified contacts (qcall.org)."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import mldsa

from qcall import pqc
from qcall.contacts import ContactStore
from qcall.exceptions import (
    CertificateError,
    CertificateExpiredError,
    CertificateRevokedError,
    ConfigError,
    IdentityChangedError,
    UntrustedCertificateError,
)
from qcall.identity import Identity
from qcall.org import (
    OID_DOCUMENT_SIGNING,
    Authority,
    OrgTrust,
    check_authority,
    load_certificates,
    load_crl,
    parse_member,
    parse_serial,
)

T0 = datetime.datetime(2026, 3, 1, 9, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


@pytest.fixture
def org(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path / "ca", "Hefei Municipal", now=T0)


@pytest.fixture
def alice() -> Identity:
    return Identity.generate("alice")


def trust_of(tmp_path: Path, org: Authority, name: str = "home") -> OrgTrust:
    trust = OrgTrust(tmp_path / name / "org")
    trust.trust((org.directory / "authority.pem").read_bytes())
    trust.update_crl((org.directory / "crl.pem").read_bytes())
    return trust


def test_authority_certificate_follows_the_profile(org: Authority) -> None:
    cert = org.certificate
    check_authority(cert)
    assert cert.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.19"  # ML-DSA-87
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert Authority.load(org.directory).fingerprint == org.fingerprint
    with pytest.raises(ConfigError, match="already exists"):
        Authority.create(org.directory, "again")
    assert (org.directory / "authority.key").stat().st_mode & 0o777 == 0o600


def test_member_certificate_follows_the_profile(org: Authority, alice: Identity) -> None:
    member = org.issue("alice", alice.public_key, department="Finance", role="auditor", now=T0)
    cert = member.certificate
    assert member.describe() == "alice (Finance, auditor) of Hefei Municipal"
    assert member.public_key == alice.public_key and member.scheme is pqc.SignatureScheme.ML_DSA_65
    assert member.not_after - member.not_before == datetime.timedelta(days=365)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.content_commitment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert OID_DOCUMENT_SIGNING in eku
    # Plain FIPS 204: the certificate signature verifies with the CA's raw key, empty context.
    ca_public = org.certificate.public_key()
    assert isinstance(ca_public, mldsa.MLDSA87PublicKey)  # for mypy
    ca_key = ca_public.public_bytes_raw()
    backend = pqc.get_backend("cryptography")
    assert backend.verify(
        pqc.SignatureScheme.ML_DSA_87, ca_key, cert.signature, cert.tbs_certificate_bytes
    )
    chain = load_certificates(org.issued_path(member.serial).read_bytes())
    assert [c.subject for c in chain] == [cert.subject, org.certificate.subject]
    assert org.issued()[member.serial_hex]["name"] == "alice"


def test_standard_tools_read_the_certificate(org: Authority, alice: Identity) -> None:
    member = org.issue("alice", alice.public_key, now=T0)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-serial", "-in", org.issued_path(member.serial)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CN = alice" in out and member.serial_hex in out.upper()


def test_profile_violations_are_named(org: Authority, alice: Identity, tmp_path: Path) -> None:
    member = org.issue("alice", alice.public_key, now=T0)
    other = Authority.create(tmp_path / "other", "Hefei Municipal", now=T0)  # same name!
    with pytest.raises(UntrustedCertificateError, match="was not issued by"):
        parse_member(member.certificate, other.certificate)
    with pytest.raises(UntrustedCertificateError, match="BasicConstraints"):
        check_authority(member.certificate)
    with pytest.raises(UntrustedCertificateError, match=r"not an X\.509 certificate"):
        load_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(UntrustedCertificateError, match=r"not an X\.509 certificate"):
        load_certificates(b"\x30\x03\x02\x01\x01")
    with pytest.raises(CertificateError, match=r"not an X\.509 CRL"):
        load_crl(b"garbage")
    with pytest.raises(ConfigError):
        org.issue("bad\nname", alice.public_key)
    with pytest.raises(ConfigError, match="hexadecimal"):
        parse_serial("xyz")
    assert parse_serial("5e:c0") == 0x5EC0


def test_validate_times_and_revocation(org: Authority, alice: Identity, tmp_path: Path) -> None:
    member = org.issue("alice", alice.public_key, days=10, now=T0)
    trust = trust_of(tmp_path, org)
    assert trust.validate(member.certificate, T0 + DAY).name == "alice"
    with pytest.raises(CertificateExpiredError, match="expired on 2026-03-11"):
        trust.validate(member.certificate, T0 + 11 * DAY)
    with pytest.raises(CertificateExpiredError, match="not yet valid"):
        trust.validate(member.certificate, T0 - DAY)
    # Revoked on day 5, backdated to day 3 (key compromise found late).
    crl = org.revoke(member.serial, "key-compromise", now=T0 + 5 * DAY, invalid_since=T0 + 3 * DAY)
    trust.update_crl(pqc.x509_pem(crl))
    ok = trust.validate(member.certificate, T0 + 2 * DAY)  # sealed before: still valid
    assert ok.revoked_later is not None and ok.revoked_later.reason == "key-compromise"
    with pytest.raises(CertificateRevokedError, match=r"revoked \(key-compromise\) on 2026-03-04"):
        trust.validate(member.certificate, T0 + 3 * DAY + datetime.timedelta(seconds=1))
    with pytest.raises(ConfigError, match="already revoked"):
        org.revoke(member.serial, now=T0)
    with pytest.raises(ConfigError, match="was not issued"):
        org.revoke(12345)
    with pytest.raises(ConfigError, match="reason"):
        org.revoke(member.serial, "bored")


def test_crl_rollback_and_foreign_crl_refused(
    org: Authority, alice: Identity, tmp_path: Path
) -> None:
    member = org.issue("alice", alice.public_key, now=T0)
    trust = trust_of(tmp_path, org)
    old = (org.directory / "crl.pem").read_bytes()
    org.revoke(member.serial, now=T0 + DAY)
    trust.update_crl((org.directory / "crl.pem").read_bytes())
    with pytest.raises(CertificateError, match="refusing to roll revocations back"):
        trust.update_crl(old)
    other = Authority.create(tmp_path / "other", "Hefei Municipal", now=T0)
    with pytest.raises(CertificateError, match="not signed by an authority you trust"):
        trust.update_crl((other.directory / "crl.pem").read_bytes())
    # A tampered stored CRL is detected, not used.
    stored = next((trust.directory / "trusted").glob("*.crl"))
    stored.write_bytes((other.directory / "crl.pem").read_bytes())
    with pytest.raises(CertificateError, match="is not signed by"):
        trust.validate(member.certificate, T0 + 2 * DAY)


def test_untrusted_authority_and_missing_crl(
    org: Authority, alice: Identity, tmp_path: Path
) -> None:
    member = org.issue("alice", alice.public_key, now=T0)
    trust = OrgTrust(tmp_path / "h" / "org")
    with pytest.raises(UntrustedCertificateError, match="which you do not trust"):
        trust.validate(member.certificate, T0 + DAY)
    trust.trust((org.directory / "authority.pem").read_bytes())
    with pytest.raises(CertificateError, match="no revocation list"):
        trust.validate(member.certificate, T0 + DAY)


def test_install_checks_the_key(org: Authority, alice: Identity, tmp_path: Path) -> None:
    member = org.issue("alice", alice.public_key, now=T0)
    trust = trust_of(tmp_path, org)
    data = org.issued_path(member.serial).read_bytes()
    with pytest.raises(UntrustedCertificateError, match="not your identity key"):
        trust.install(data, Identity.generate("mallory").public_key)
    trust.install(data, alice.public_key)
    assert trust.own_certificate() == member.certificate


# --- calls and messages: ContactStore.check_peer with an organisation -------------------------


def test_certified_peer_is_verified_without_tofu(
    org: Authority, alice: Identity, tmp_path: Path
) -> None:
    bob_home = tmp_path / "bob"
    trust_of(tmp_path, org, "bob")
    member = org.issue("alice", alice.public_key, department="Finance", now=T0)
    OrgTrust.in_home(bob_home).import_member(org.issued_path(member.serial).read_bytes())
    contacts = ContactStore.in_home(bob_home, strict=True)  # strict: TOFU would refuse
    contacts.check_peer("alice", alice.public_key)
    assert contacts.peer_trust("alice") == "organisation: alice (Finance) of Hefei Municipal"
    assert contacts.get("alice") is None  # nothing pinned
    # Another key under the certified name: refused, whatever the contacts say.
    mallory = Identity.generate("alice")
    with pytest.raises(IdentityChangedError, match="no certificate of your organisation"):
        contacts.check_peer("alice", mallory.public_key)
    assert contacts.peer_trust("alice") is None
    # A name without certificate falls back to TOFU.
    ContactStore.in_home(bob_home).check_peer("carol", Identity.generate("carol").public_key)


def test_revoked_or_expired_peer_is_refused(
    org: Authority, alice: Identity, tmp_path: Path
) -> None:
    bob_home = tmp_path / "bob"
    trust = trust_of(tmp_path, org, "bob")
    now = datetime.datetime.now(datetime.UTC)
    member = org.issue("alice", alice.public_key, now=now)
    trust.import_member(org.issued_path(member.serial).read_bytes())
    contacts = ContactStore.in_home(bob_home)
    contacts.check_peer("alice", alice.public_key)
    trust.update_crl(pqc.x509_pem(org.revoke(member.serial, "affiliation-changed", now=now)))
    with pytest.raises(CertificateRevokedError, match="revoked \\(affiliation-changed\\)"):
        contacts.check_peer("alice", alice.public_key)
    dave = Identity.generate("dave")
    old = org.issue("dave", dave.public_key, days=1, now=now - 3 * DAY, not_before=now - 3 * DAY)
    trust.import_member(org.issued_path(old.serial).read_bytes())
    trust.update_crl(pqc.x509_pem(org.crl()))
    with pytest.raises(CertificateExpiredError, match="expired on"):
        contacts.check_peer("dave", dave.public_key)
