"""The test PKI: CA, KME and SAE certificates, TLS contexts, peer identity."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qcall.exceptions import ConfigError
from qcall.qkd.pki import (
    client_ssl_context,
    create_pki,
    peer_identity,
    server_ssl_context,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_create_pki(tmp_path: Path) -> None:
    paths = create_pki(tmp_path / "pki", ["KME-Beijing", "KME_A"], ["alice", "bob"])
    ca = load(paths.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for p in (paths.ca_key, *(c.key for c in paths.kmes.values())):
        assert p.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "pki").stat().st_mode & 0o777 == 0o700

    kme = load(paths.kmes["KME-Beijing"].cert)
    assert kme.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "KME-Beijing"
    assert kme.issuer == ca.subject
    assert isinstance(kme.public_key(), ec.EllipticCurvePublicKey)
    assert kme.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    san = kme.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kme-beijing"} <= set(san.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    eku = kme.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    # an ID that is no host name gets no DNS entry
    san_a = load(paths.kmes["KME_A"].cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "kme_a" not in san_a.value.get_values_for_type(x509.DNSName)

    sae = load(paths.saes["alice"].cert)
    san = sae.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:qcall:sae:alice"]
    eku = sae.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    sae.verify_directly_issued_by(ca)

    # contexts load; the pairs match
    server_ssl_context(paths.kmes["KME_A"].cert, paths.kmes["KME_A"].key, paths.ca_cert)
    client_ssl_context(paths.saes["bob"].cert, paths.saes["bob"].key, paths.ca_cert)
    assert paths.to_json()["saes"]["bob"]["cert"].endswith("sae/bob.pem")


def test_ca_is_reused(tmp_path: Path) -> None:
    first = create_pki(tmp_path, ["K1"], ["s1"])
    second = create_pki(tmp_path, ["K2"], ["s2"])
    assert first.ca_cert.read_bytes() == second.ca_cert.read_bytes()
    load(second.saes["s2"].cert).verify_directly_issued_by(load(first.ca_cert))
    assert (tmp_path / "sae" / "s1.pem").exists()


@pytest.mark.parametrize(
    ("kmes", "saes", "match"),
    [
        (["../evil"], [], "KME ID"),
        ([], ["a/b"], "SAE ID"),
        ([], [".hidden"], "SAE ID"),
        (["same"], ["same"], "both a KME ID and an SAE ID"),
    ],
)
def test_bad_ids(tmp_path: Path, kmes: list[str], saes: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_pki(tmp_path, kmes, saes)
    assert not (tmp_path / "ca.key").exists()


def test_context_errors(tmp_path: Path) -> None:
    paths = create_pki(tmp_path, ["K"], ["s", "t"])
    with pytest.raises(ConfigError, match="not found"):
        client_ssl_context(tmp_path / "nope.pem", paths.saes["s"].key, paths.ca_cert)
    with pytest.raises(ConfigError, match="cannot load certificate"):
        client_ssl_context(paths.saes["s"].cert, paths.saes["t"].key, paths.ca_cert)
    with pytest.raises(ConfigError, match="CA file not found"):
        server_ssl_context(paths.kmes["K"].cert, paths.kmes["K"].key, tmp_path / "x.pem")
    with pytest.raises(ConfigError, match="cannot load CA"):
        server_ssl_context(paths.kmes["K"].cert, paths.kmes["K"].key, paths.kmes["K"].key)


def test_peer_identity() -> None:
    cn = {"subject": ((("commonName", "bob"),),)}
    assert peer_identity(cn) == "bob"
    uri = {**cn, "subjectAltName": (("URI", "urn:qcall:sae:alice"), ("DNS", "x"))}
    assert peer_identity(uri) == "alice"
    assert peer_identity({"subjectAltName": (("URI", "urn:qcall:sae:a/b"),)}) is None
    assert peer_identity({"subject": ((("commonName", "bad id"),),)}) is None
    assert peer_identity(None) is None and peer_identity({}) is None


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    # OpenSSL's own error has no file name ("file not found: None" before).
    paths = create_pki(tmp_path, ["K"], ["s"])
    files = {"cert": paths.kmes["K"].cert, "key": paths.kmes["K"].key}
    files[missing] = tmp_path / f"absent-{missing}.pem"
    with pytest.raises(ConfigError, match=f"absent-{missing}.pem"):
        server_ssl_context(files["cert"], files["key"], paths.ca_cert)
    with pytest.raises(ConfigError, match=f"absent-{missing}.pem"):
        client_ssl_context(files["cert"], files["key"], paths.ca_cert)
