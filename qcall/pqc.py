"""Post-quantum and symmetric primitives: the only importer of ``cryptography.hazmat``.

qcall uses:

* ML-KEM-768 (default) and ML-KEM-1024, FIPS 203, for the ephemeral key exchange;
* ML-DSA-65 (default), ML-DSA-44 and ML-DSA-87, FIPS 204, for identities;
* SHA-384 for transcript hashes and HKDF-SHA-384 (RFC 5869) for the key schedule.
  SHA-384 matches the 192-bit security category of ML-KEM-768/ML-DSA-65 and is
  the hash of TLS 1.3 suites at that level; SHA3 would add no margin here.

Two backends implement the asymmetric primitives:

* ``cryptography`` (pyca, OpenSSL ≥ 3.5): the default, always present.
* ``oqs`` (liboqs-python): optional, used only when a liboqs shared library is
  already installed (see :mod:`qcall._oqs`); it never downloads anything.

Choose with :func:`get_backend` or the ``QCALL_PQC_BACKEND`` environment
variable (``auto``, ``cryptography`` or ``oqs``). :data:`BACKENDS` names every
backend class; a new backend is added there, and whatever iterates over it
(``tests/hygiene.py``, ``scripts/bench_pqc.py``) covers it without further
change. docs/backends.md describes both and how to build liboqs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qcall.exceptions import (
    ConfigError,
    InvalidKeyError,
    UnsupportedAlgorithmError,
)

__all__ = [
    "AEAD_KEY_LEN",
    "AEAD_NONCE_LEN",
    "AEAD_TAG_LEN",
    "AES256GCM",
    "BACKENDS",
    "HASH_LEN",
    "KEM",
    "Backend",
    "KEMPrivateKey",
    "SignatureScheme",
    "SigningKey",
    "available_backends",
    "backend_class",
    "check_support",
    "constant_time_eq",
    "get_backend",
    "hkdf_expand",
    "hkdf_extract",
    "hmac_sha384",
    "sha384",
    "x509_crl_signed_by",
    "x509_der",
    "x509_mldsa_public_key",
    "x509_pem",
    "x509_public_key",
    "x509_sign_certificate",
    "x509_sign_crl",
]

#: Output length of SHA-384 in bytes; HKDF's PRK and every transcript hash.
HASH_LEN = 48


class KEM(enum.Enum):
    """ML-KEM parameter sets (FIPS 203, section 8)."""

    ML_KEM_768 = "ML-KEM-768"
    ML_KEM_1024 = "ML-KEM-1024"

    @property
    def sizes(self) -> KEMSizes:
        return _KEM_SIZES[self]


class SignatureScheme(enum.Enum):
    """ML-DSA parameter sets (FIPS 204, section 4)."""

    ML_DSA_44 = "ML-DSA-44"
    ML_DSA_65 = "ML-DSA-65"
    ML_DSA_87 = "ML-DSA-87"

    @property
    def sizes(self) -> SignatureSizes:
        return _SIG_SIZES[self]


@dataclass(frozen=True)
class KEMSizes:
    """Byte lengths of ML-KEM objects (FIPS 203, table 3)."""

    encapsulation_key: int
    ciphertext: int
    seed: int = 64  # d ‖ z
    shared_secret: int = 32


@dataclass(frozen=True)
class SignatureSizes:
    """Byte lengths of ML-DSA objects (FIPS 204, table 2)."""

    public_key: int
    signature: int
    seed: int = 32  # ξ


_KEM_SIZES = {
    KEM.ML_KEM_768: KEMSizes(encapsulation_key=1184, ciphertext=1088),
    KEM.ML_KEM_1024: KEMSizes(encapsulation_key=1568, ciphertext=1568),
}
_SIG_SIZES = {
    SignatureScheme.ML_DSA_44: SignatureSizes(public_key=1312, signature=2420),
    SignatureScheme.ML_DSA_65: SignatureSizes(public_key=1952, signature=3309),
    SignatureScheme.ML_DSA_87: SignatureSizes(public_key=2592, signature=4627),
}


# --- backend interface ----------------------------------------------------------


class KEMPrivateKey(Protocol):
    """An ML-KEM decapsulation key."""

    algorithm: KEM

    def public_bytes(self) -> bytes:
        """Return the encapsulation key (FIPS 203 ``ek``)."""

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """Return the 32-byte shared secret.

        ML-KEM uses implicit rejection: a tampered ciphertext yields a wrong,
        pseudo-random secret, never an error.
        """

    def secret_parts(self) -> tuple[bytes, ...]:
        """Return the secret values this key holds, for leak checks only.

        Every byte of each part is secret (public fields embedded in a
        backend's private-key encoding, such as ``ek`` inside FIPS 203 ``dk``,
        are left out), so a checker may search logs for any part. The key
        hygiene plugin (``tests/hygiene.py``) calls it for every key any backend
        makes; nothing else in qcall does. Never log, store or send the result.
        """


class SigningKey(Protocol):
    """An ML-DSA signing key."""

    algorithm: SignatureScheme

    def public_bytes(self) -> bytes:
        """Return the raw public key (FIPS 204 ``pk``)."""

    def seed_bytes(self) -> bytes:
        """Return the 32-byte seed ξ this key was generated from (secret!)."""

    def sign(self, data: bytes, context: bytes = b"") -> bytes:
        """Sign ``data`` (ML-DSA pure, with an optional context of ≤ 255 bytes)."""

    def secret_parts(self) -> tuple[bytes, ...]:
        """Return the secret values this key holds, for leak checks only.

        As :meth:`KEMPrivateKey.secret_parts`: each part wholly secret (the
        public ``ρ`` and ``tr`` of a FIPS 204 ``sk`` are left out).
        """


class Backend(Protocol):
    """What a post-quantum backend provides."""

    name: str

    def kem_generate(self, algorithm: KEM) -> KEMPrivateKey: ...

    def kem_from_seed(self, algorithm: KEM, seed: bytes) -> KEMPrivateKey: ...

    def kem_encapsulate(self, algorithm: KEM, public_key: bytes) -> tuple[bytes, bytes]:
        """Return ``(shared_secret, ciphertext)``."""

    def signing_generate(self, algorithm: SignatureScheme) -> SigningKey: ...

    def signing_from_seed(self, algorithm: SignatureScheme, seed: bytes) -> SigningKey: ...

    def verify(
        self,
        algorithm: SignatureScheme,
        public_key: bytes,
        signature: bytes,
        data: bytes,
        context: bytes = b"",
    ) -> bool: ...


def _check_length(what: str, value: bytes, expected: int) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidKeyError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != expected:
        raise InvalidKeyError(f"{what} must be {expected} bytes, got {len(value)}")


# --- pyca/cryptography backend ------------------------------------------------------


_ClassMap = dict[KEM, tuple[type, type]]
_SigClassMap = dict[SignatureScheme, tuple[type, type]]


def _pyca_classes() -> tuple[_ClassMap, _SigClassMap]:
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
    except ImportError as exc:  # cryptography < 47
        raise UnsupportedAlgorithmError(
            "the installed 'cryptography' has no ML-KEM/ML-DSA; "
            "install cryptography>=48 (pip install -U 'cryptography>=48')"
        ) from exc
    kems: _ClassMap = {
        KEM.ML_KEM_768: (mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey),
        KEM.ML_KEM_1024: (mlkem.MLKEM1024PrivateKey, mlkem.MLKEM1024PublicKey),
    }
    sigs: _SigClassMap = {
        SignatureScheme.ML_DSA_44: (mldsa.MLDSA44PrivateKey, mldsa.MLDSA44PublicKey),
        SignatureScheme.ML_DSA_65: (mldsa.MLDSA65PrivateKey, mldsa.MLDSA65PublicKey),
        SignatureScheme.ML_DSA_87: (mldsa.MLDSA87PrivateKey, mldsa.MLDSA87PublicKey),
    }
    return kems, sigs


class _PycaKEMKey:
    __slots__ = ("_key", "algorithm")

    def __init__(self, algorithm: KEM, key: object) -> None:
        self.algorithm = algorithm
        self._key = key

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_key().public_bytes_raw())  # type: ignore[attr-defined]

    def decapsulate(self, ciphertext: bytes) -> bytes:
        _check_length("ML-KEM ciphertext", ciphertext, self.algorithm.sizes.ciphertext)
        return bytes(self._key.decapsulate(bytes(ciphertext)))  # type: ignore[attr-defined]

    def secret_parts(self) -> tuple[bytes, ...]:
        # pyca keeps the 64-byte seed d ‖ z (FIPS 203 ML-KEM.KeyGen_internal input).
        return (bytes(self._key.private_bytes_raw()),)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<KEMPrivateKey {self.algorithm.value} (cryptography)>"


class _PycaSigningKey:
    __slots__ = ("_key", "algorithm")

    def __init__(self, algorithm: SignatureScheme, key: object) -> None:
        self.algorithm = algorithm
        self._key = key

    def public_bytes(self) -> bytes:
        return bytes(self._key.public_key().public_bytes_raw())  # type: ignore[attr-defined]

    def seed_bytes(self) -> bytes:
        return bytes(self._key.private_bytes_raw())  # type: ignore[attr-defined]

    def sign(self, data: bytes, context: bytes = b"") -> bytes:
        # FIPS 204 algorithm 2 (ML-DSA.Sign, hedged): |ctx| ≤ 255 bytes.
        if len(context) > 255:
            raise ValueError("ML-DSA context must be at most 255 bytes")
        return bytes(self._key.sign(bytes(data), bytes(context) or None))  # type: ignore[attr-defined]

    def secret_parts(self) -> tuple[bytes, ...]:
        return (self.seed_bytes(),)  # the 32-byte seed ξ

    def __repr__(self) -> str:
        return f"<SigningKey {self.algorithm.value} (cryptography)>"


class PycaBackend:
    """pyca/cryptography (OpenSSL) implementation of :class:`Backend`."""

    name = "cryptography"

    def __init__(self) -> None:
        self._kems, self._sigs = _pyca_classes()

    def kem_generate(self, algorithm: KEM) -> KEMPrivateKey:
        return _PycaKEMKey(algorithm, self._kems[algorithm][0].generate())  # type: ignore[attr-defined]

    def kem_from_seed(self, algorithm: KEM, seed: bytes) -> KEMPrivateKey:
        _check_length("ML-KEM seed", seed, algorithm.sizes.seed)
        key = self._kems[algorithm][0].from_seed_bytes(bytes(seed))  # type: ignore[attr-defined]
        return _PycaKEMKey(algorithm, key)

    def kem_encapsulate(self, algorithm: KEM, public_key: bytes) -> tuple[bytes, bytes]:
        _check_length("ML-KEM encapsulation key", public_key, algorithm.sizes.encapsulation_key)
        try:
            pub = self._kems[algorithm][1].from_public_bytes(bytes(public_key))  # type: ignore[attr-defined]
        except ValueError as exc:  # FIPS 203 7.2 modulus check failed
            raise InvalidKeyError("ML-KEM encapsulation key is not valid") from exc
        shared, ciphertext = pub.encapsulate()
        return bytes(shared), bytes(ciphertext)

    def signing_generate(self, algorithm: SignatureScheme) -> SigningKey:
        return _PycaSigningKey(algorithm, self._sigs[algorithm][0].generate())  # type: ignore[attr-defined]

    def signing_from_seed(self, algorithm: SignatureScheme, seed: bytes) -> SigningKey:
        _check_length("ML-DSA seed", seed, algorithm.sizes.seed)
        key = self._sigs[algorithm][0].from_seed_bytes(bytes(seed))  # type: ignore[attr-defined]
        return _PycaSigningKey(algorithm, key)

    def verify(
        self,
        algorithm: SignatureScheme,
        public_key: bytes,
        signature: bytes,
        data: bytes,
        context: bytes = b"",
    ) -> bool:
        from cryptography.exceptions import InvalidSignature

        _check_length("ML-DSA public key", public_key, algorithm.sizes.public_key)
        # FIPS 204 algorithm 3 (ML-DSA.Verify) rejects |ctx| > 255: never valid.
        if len(signature) != algorithm.sizes.signature or len(context) > 255:
            return False
        try:
            pub = self._sigs[algorithm][1].from_public_bytes(bytes(public_key))  # type: ignore[attr-defined]
        except ValueError as exc:
            raise InvalidKeyError("ML-DSA public key is not valid") from exc
        try:
            pub.verify(bytes(signature), bytes(data), bytes(context) or None)
        except InvalidSignature:
            return False
        return True


if TYPE_CHECKING:  # mypy checks that the class implements the whole interface
    _PYCA_IS_A_BACKEND: type[Backend] = PycaBackend


# --- backend selection -----------------------------------------------------------------

#: Every backend, by name: the ``module:Class`` implementing :class:`Backend`. Importing
#: a backend's module must be cheap and safe (``qcall._oqs`` never imports ``oqs``);
#: constructing the class is what needs the backend's library.
BACKENDS: dict[str, str] = {
    "cryptography": "qcall.pqc:PycaBackend",
    "oqs": "qcall._oqs:OQSBackend",
}

_BACKENDS: dict[str, Backend] = {}


def backend_class(name: str) -> type[Backend]:
    """Return the class of backend ``name`` (a key of :data:`BACKENDS`), without creating one.

    Raises:
        ConfigError: unknown backend name.
    """
    try:
        module_name, _, class_name = BACKENDS[name].partition(":")
    except KeyError:
        known = ", ".join(repr(n) for n in BACKENDS)
        raise ConfigError(f"unknown post-quantum backend {name!r}: use one of {known}") from None
    return cast("type[Backend]", getattr(importlib.import_module(module_name), class_name))


def available_backends() -> list[str]:
    """Names of the backends usable on this machine (never triggers a download)."""
    from qcall import _oqs

    names = ["cryptography"]
    if _oqs.liboqs_library_path() is not None:
        names.append("oqs")
    return names


def get_backend(name: str | None = None) -> Backend:
    """Return a backend by name: ``cryptography``, ``oqs`` or ``auto``.

    ``None`` reads ``QCALL_PQC_BACKEND`` (default ``auto``, which is
    ``cryptography``: the audited-by-many default; ``oqs`` only on request).

    Raises:
        BackendUnavailableError: ``oqs`` was requested but liboqs is absent.
        UnsupportedAlgorithmError: OpenSSL lacks ML-KEM/ML-DSA.
        ConfigError: unknown backend name.
    """
    if name is None:
        name = os.environ.get("QCALL_PQC_BACKEND", "auto") or "auto"
    if name == "auto":
        name = "cryptography"
    if name not in _BACKENDS:
        _BACKENDS[name] = backend_class(name)()
    return _BACKENDS[name]


def check_support(backend: Backend | None = None) -> None:
    """Fail early, with a clear message, if ML-KEM/ML-DSA do not work.

    Called at CLI start-up. OpenSSL builds older than 3.5 (or FIPS-restricted
    ones) raise ``UnsupportedAlgorithm`` on first use; this turns that into a
    :class:`UnsupportedAlgorithmError` naming the fix.
    """
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        b = backend or get_backend()
        kem_key = b.kem_generate(KEM.ML_KEM_768)
        shared, ct = b.kem_encapsulate(KEM.ML_KEM_768, kem_key.public_bytes())
        if kem_key.decapsulate(ct) != shared:
            raise UnsupportedAlgorithmError("ML-KEM-768 self-test failed")
        sig_key = b.signing_generate(SignatureScheme.ML_DSA_65)
        sig = sig_key.sign(b"qcall self-test")
        if not b.verify(SignatureScheme.ML_DSA_65, sig_key.public_bytes(), sig, b"qcall self-test"):
            raise UnsupportedAlgorithmError("ML-DSA-65 self-test failed")
    except UnsupportedAlgorithm as exc:
        from cryptography.hazmat.backends.openssl import backend as ossl

        raise UnsupportedAlgorithmError(
            f"{ossl.openssl_version_text()} has no ML-KEM/ML-DSA support; qcall needs "
            "OpenSSL >= 3.5 as bundled by cryptography>=48 wheels "
            "(pip install -U 'cryptography>=48')"
        ) from exc


# --- hashing and key derivation (SHA-384) ------------------------------------------------


def sha384(*parts: bytes) -> bytes:
    """SHA-384 of the concatenation of ``parts``."""
    h = hashlib.sha384()
    for part in parts:
        h.update(part)
    return h.digest()


def hmac_sha384(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA-384 (RFC 2104)."""
    return hmac.new(key, data, hashlib.sha384).digest()


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-384 (RFC 5869, section 2.2): ``HMAC(salt, IKM)``."""
    return hmac_sha384(salt or bytes(HASH_LEN), ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-384 (RFC 5869, section 2.3)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    if not 0 < length <= 255 * HASH_LEN:
        raise ValueError(f"HKDF-Expand length must be 1..{255 * HASH_LEN}, got {length}")
    return HKDFExpand(algorithm=hashes.SHA384(), length=length, info=info).derive(prk)


def constant_time_eq(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of their contents."""
    return hmac.compare_digest(a, b)


# --- X.509 with ML-DSA: organisation certificates (docs/seal.md §3) ------------------------
#
# Recipes for qcall.org, which builds certificates and CRLs with cryptography's x509 API
# but needs key objects from ``hazmat`` to sign them and to read their public keys.
# Certificates and CRLs are signed with ML-DSA in pure mode with an empty context, as
# RFC 9881 (ML-DSA in X.509) requires; the signature algorithm OID follows the key
# (id-ml-dsa-44/65/87, 2.16.840.1.101.3.4.3.17-19).


def _pyca_signing_key(key: SigningKey) -> object:
    """The pyca private key object of any backend's ML-DSA key (re-derived from ξ)."""
    if isinstance(key, _PycaSigningKey):
        return key._key
    _, sigs = _pyca_classes()
    return sigs[key.algorithm][0].from_seed_bytes(key.seed_bytes())  # type: ignore[attr-defined]


def x509_sign_certificate(builder: x509.CertificateBuilder, key: SigningKey) -> x509.Certificate:
    """Sign a certificate with ML-DSA (FIPS 204 algorithm 2, ``ctx`` empty; RFC 9881)."""
    return builder.sign(_pyca_signing_key(key), None)  # type: ignore[arg-type]


def x509_sign_crl(
    builder: x509.CertificateRevocationListBuilder, key: SigningKey
) -> x509.CertificateRevocationList:
    """Sign a CRL with ML-DSA (pure, empty context)."""
    return builder.sign(_pyca_signing_key(key), None)  # type: ignore[arg-type]


def x509_public_key(algorithm: SignatureScheme, public_key: bytes) -> CertificatePublicKeyTypes:
    """The key object ``CertificateBuilder.public_key()`` takes, from raw FIPS 204 ``pk``.

    Raises:
        InvalidKeyError: wrong length or not a valid ML-DSA public key.
    """
    _check_length("ML-DSA public key", public_key, algorithm.sizes.public_key)
    _, sigs = _pyca_classes()
    try:
        pub = sigs[algorithm][1].from_public_bytes(bytes(public_key))  # type: ignore[attr-defined]
    except ValueError as exc:
        raise InvalidKeyError("ML-DSA public key is not valid") from exc
    return pub  # type: ignore[no-any-return]


def x509_mldsa_public_key(
    key: CertificatePublicKeyTypes,
) -> tuple[SignatureScheme, bytes] | None:
    """The ML-DSA parameter set and raw ``pk`` of a certificate's key; ``None`` if not ML-DSA."""
    from cryptography.hazmat.primitives.asymmetric import mldsa

    if isinstance(key, mldsa.MLDSA44PublicKey):
        return SignatureScheme.ML_DSA_44, key.public_bytes_raw()
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return SignatureScheme.ML_DSA_65, key.public_bytes_raw()
    if isinstance(key, mldsa.MLDSA87PublicKey):
        return SignatureScheme.ML_DSA_87, key.public_bytes_raw()
    return None


def x509_der(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """DER encoding of a certificate or CRL."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return obj.public_bytes(Encoding.DER)


def x509_pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """PEM encoding of a certificate or CRL."""
    from cryptography.hazmat.primitives.serialization import Encoding

    return obj.public_bytes(Encoding.PEM)


def x509_crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``crl`` (and the names match)."""
    key = issuer.public_key()
    if crl.issuer != issuer.subject or x509_mldsa_public_key(key) is None:
        return False
    return crl.is_signature_valid(key)  # type: ignore[arg-type]


# --- recipes for the messaging service: AES-256-GCM (docs/messaging.md §2) ---------------

#: AES-256-GCM key, nonce and tag lengths in bytes (NIST SP 800-38D).
AEAD_KEY_LEN = 32
AEAD_NONCE_LEN = 12
AEAD_TAG_LEN = 16


class AES256GCM:
    """AES-256-GCM (NIST SP 800-38D) with a 96-bit nonce and a 128-bit tag.

    One object per key, so that a file's chunks reuse the expanded key. The key
    never appears in ``repr``.

    Raises:
        InvalidKeyError: the key is not 32 bytes.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        _check_length("AES-256-GCM key", key, AEAD_KEY_LEN)
        self._aead = AESGCM(bytes(key))  # (imported once: this runs for every message)

    def seal(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt and authenticate: returns ``ciphertext ‖ tag`` (16 bytes longer)."""
        if len(nonce) != AEAD_NONCE_LEN:
            raise ValueError(f"AES-GCM nonce must be {AEAD_NONCE_LEN} bytes")
        return bytes(self._aead.encrypt(bytes(nonce), bytes(plaintext), bytes(associated_data)))

    def seal_prefixed(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        """``nonce ‖ seal(nonce, plaintext, associated_data)``: the same checks and bytes,
        for arguments that are ``bytes`` already (a store's rows: no copies)."""
        if len(nonce) != AEAD_NONCE_LEN:
            raise ValueError(f"AES-GCM nonce must be {AEAD_NONCE_LEN} bytes")
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes | None:
        """Decrypt ``ciphertext ‖ tag``; ``None`` if the tag does not verify (never raises)."""
        if len(nonce) != AEAD_NONCE_LEN or len(ciphertext) < AEAD_TAG_LEN:
            return None
        try:
            return bytes(
                self._aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(associated_data))
            )
        except InvalidTag:
            return None

    def __repr__(self) -> str:
        return "<AES256GCM>"


def aead_seal_once(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """``AES256GCM(key).seal(nonce, plaintext, associated_data)`` for a key used once.

    The per-message path of the messaging ratchets: the same checks and bytes, without
    the object's set-up. ``key``, ``nonce`` and ``associated_data`` must be ``bytes``.

    Raises:
        InvalidKeyError: the key is not 32 bytes.
        ValueError: the nonce is not 12 bytes.
    """
    if len(key) != AEAD_KEY_LEN:
        _check_length("AES-256-GCM key", key, AEAD_KEY_LEN)
    if len(nonce) != AEAD_NONCE_LEN:
        raise ValueError(f"AES-GCM nonce must be {AEAD_NONCE_LEN} bytes")
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aead_open_once(
    key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes
) -> bytes | None:
    """``AES256GCM(key).open(...)`` for a key used once; ``None`` if it does not verify.

    Raises:
        InvalidKeyError: the key is not 32 bytes.
    """
    if len(key) != AEAD_KEY_LEN:
        _check_length("AES-256-GCM key", key, AEAD_KEY_LEN)
    if len(nonce) != AEAD_NONCE_LEN or len(ciphertext) < AEAD_TAG_LEN:
        return None
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag:
        return None
