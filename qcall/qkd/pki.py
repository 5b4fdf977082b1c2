"""A small test PKI for KMEs and SAEs, and the TLS contexts of ETSI GS QKD 014.

ETSI GS QKD 014, clause 4.3 asks for HTTPS with mutual authentication between
SAE and KME. :func:`create_pki` writes one CA, one certificate per KME (server
and client use) and one per SAE (client use), all EC P-256, signed by the CA:

``DIR/ca.pem``, ``DIR/ca.key``,
``DIR/kme/<KME_ID>.pem|.key``, ``DIR/sae/<SAE_ID>.pem|.key`` (keys mode 0600).

Identity: the certificate's subject common name is the KME or SAE ID; an
SAE certificate also carries the SAN URI ``urn:qcall:sae:<SAE_ID>``. KME
certificates name ``localhost``, ``127.0.0.1``, ``::1`` and the KME ID (when
it is a valid host name) in their SAN, so a client can verify the server by
address or with ``server_name=<KME_ID>``.

This is a *test* PKI for the simulated network and the demo; a real
deployment gets its certificates from the operator of the QKD network.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qcall.config import atomic_write
from qcall.exceptions import ConfigError
from qcall.qkd.etsi014 import validate_sae_id
from qcall.typing import SAEId

__all__ = [
    "SAE_URI_PREFIX",
    "CertPaths",
    "PKIPaths",
    "client_ssl_context",
    "create_pki",
    "peer_identity",
    "server_ssl_context",
]

#: SAN URI prefix that names an SAE.
SAE_URI_PREFIX = "urn:qcall:sae:"

_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_VALIDITY = datetime.timedelta(days=825)


@dataclass(frozen=True)
class CertPaths:
    """Paths of one certificate (PEM) and its private key (PEM, mode 0600)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class PKIPaths:
    """What :func:`create_pki` wrote."""

    ca_cert: Path
    ca_key: Path
    kmes: Mapping[str, CertPaths] = field(default_factory=dict)
    saes: Mapping[str, CertPaths] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the paths as a JSON-able dict."""
        return {
            "ca_cert": str(self.ca_cert),
            "ca_key": str(self.ca_key),
            "kmes": {k: {"cert": str(v.cert), "key": str(v.key)} for k, v in self.kmes.items()},
            "saes": {k: {"cert": str(v.cert), "key": str(v.key)} for k, v in self.saes.items()},
        }


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    common_name: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return key, builder.sign(ca_key, hashes.SHA256())


def create_pki(
    out_dir: str | Path,
    kme_ids: Iterable[str],
    sae_ids: Iterable[str],
    *,
    ca_name: str = "qcall test CA",
) -> PKIPaths:
    """Create a test CA and certificates for ``kme_ids`` and ``sae_ids`` in ``out_dir``.

    An existing CA in ``out_dir`` (``ca.pem`` + ``ca.key``) is reused, so more
    KMEs and SAEs can be added later; existing leaf certificates are replaced.

    Args:
        out_dir: the directory to write (created, mode 0700).
        kme_ids: KME IDs; each gets a server+client certificate.
        sae_ids: SAE IDs; each gets a client certificate.
        ca_name: the CA's common name when a new CA is made.

    Returns:
        The paths written.

    Raises:
        ConfigError: an ID is not a valid SAE/KME ID, a KME ID is also an SAE
            ID, or the directory cannot be written.
    """
    out = Path(out_dir)
    try:
        kmes = [validate_sae_id(k, "KME ID") for k in kme_ids]
        saes = [validate_sae_id(s, "SAE ID") for s in sae_ids]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    both = set(kmes) & set(saes)
    if both:
        raise ConfigError(f"{sorted(both)[0]} is both a KME ID and an SAE ID")
    try:
        for d in (out, out / "kme", out / "sae"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}") from exc

    now = datetime.datetime.now(datetime.UTC)
    ca_cert_path, ca_key_path = out / "ca.pem", out / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"cannot load the existing CA in {out}") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ca_key_path} is not an EC key")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_cert_path, ca_cert)

    kme_paths: dict[str, CertPaths] = {}
    for kme_id in kmes:
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        if _HOSTNAME_RE.fullmatch(kme_id) and kme_id != "localhost":
            sans.append(x509.DNSName(kme_id.lower()))
        key, cert = _issue(
            ca_key,
            ca_cert.subject,
            kme_id,
            sans,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            now,
        )
        paths = CertPaths(out / "kme" / f"{kme_id}.pem", out / "kme" / f"{kme_id}.key")
        _write_key(paths.key, key)
        _write_cert(paths.cert, cert)
        kme_paths[kme_id] = paths

    sae_paths: dict[str, CertPaths] = {}
    for sae_id in saes:
        key, cert = _issue(
            ca_key,
            ca_cert.subject,
            sae_id,
            [x509.UniformResourceIdentifier(SAE_URI_PREFIX + sae_id)],
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            now,
        )
        paths = CertPaths(out / "sae" / f"{sae_id}.pem", out / "sae" / f"{sae_id}.key")
        _write_key(paths.key, key)
        _write_cert(paths.cert, cert)
        sae_paths[sae_id] = paths

    return PKIPaths(ca_cert_path, ca_key_path, kme_paths, sae_paths)


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path, ca: str | Path) -> None:
    # OpenSSL's FileNotFoundError has no file name: name the missing one ourselves.
    for what, name in (("certificate", cert), ("key", key), ("CA", ca)):
        if not Path(name).is_file():
            raise ConfigError(f"{what} file not found: {name}")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise ConfigError(f"certificate {cert} or key {key}: file not found") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError as exc:
        raise ConfigError(f"CA file not found: {ca}") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA file {ca}: {exc}") from exc


def server_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """Return a KME's TLS context: TLS ≥ 1.2, client certificate required (mutual TLS).

    Raises:
        ConfigError: a file is missing or unreadable, or key and certificate differ.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key, ca)
    return ctx


def client_ssl_context(cert: str | Path, key: str | Path, ca: str | Path) -> ssl.SSLContext:
    """Return an SAE's TLS context: verifies the KME against ``ca``, presents ``cert``.

    Raises:
        ConfigError: a file is missing or unreadable, or key and certificate differ.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_chain(ctx, cert, key, ca)
    return ctx


def peer_identity(peercert: Mapping[str, Any] | None) -> SAEId | None:
    """Return the SAE ID named by a verified peer certificate, or ``None``.

    ``peercert`` is :meth:`ssl.SSLSocket.getpeercert` output. The SAN URI
    ``urn:qcall:sae:<ID>`` wins; otherwise the subject common name is used.
    """
    if not peercert:
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and isinstance(value, str) and value.startswith(SAE_URI_PREFIX):
            try:
                return validate_sae_id(value[len(SAE_URI_PREFIX) :])
            except ValueError:
                return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                try:
                    return validate_sae_id(value)
                except ValueError:
                    return None
    return None
