"""Long-term ML-DSA identities (FIPS 204) and their fingerprints.

An identity lives in the qcall home (see :func:`qcall.config.qcall_home`) as two files:

``identity.key`` (mode 0600, secret)
    The 32-byte ML-DSA seed ξ (FIPS 204, algorithm 6 ``ML-DSA.KeyGen_internal``),
    raw, nothing else. The key pair is re-derived from it on load.

``identity.json`` (mode 0644, public)
    ``{"version": 1, "name": ..., "algorithm": "ML-DSA-65", "public_key": <base64>,
    "fingerprint": ...}``. The same object, without ``version``, is what
    ``qcall identity show --json`` prints, and what ``qcall contacts pin --key`` reads.

Loading checks the key file's mode, the seed length, and that the seed derives
the stored public key; any mismatch is an :class:`~qcall.exceptions.InvalidKeyError`.

Fingerprint (see ``docs/identity.md``): ``SHA-256(public_key)``, all 32 bytes,
encoded in RFC 4648 base32 (upper case, no padding: 52 characters), split into
13 groups of 4 separated by spaces. The public key length fixes the ML-DSA
parameter set, so the fingerprint needs no separate algorithm tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcall import config, pqc
from qcall.exceptions import (
    ConfigError,
    IdentityError,
    IdentityNotFoundError,
    InvalidKeyError,
)

__all__ = [
    "IDENTITY_FILE",
    "KEY_FILE",
    "MAX_NAME_LENGTH",
    "PREVIOUS_IDENTITY_DIR",
    "Identity",
    "fingerprint",
    "identity_from_json",
    "scheme_for_public_key",
    "validate_name",
]

logger = logging.getLogger(__name__)

#: Public half of the identity, in the qcall home.
IDENTITY_FILE = "identity.json"
#: Secret seed of the identity, in the qcall home (mode 0600).
KEY_FILE = "identity.key"
#: Sub-folder of the home where ``qcall identity new --force`` keeps the replaced
#: identity: its key signs moving the name to the new key on the signaling server.
PREVIOUS_IDENTITY_DIR = "previous-identity"
#: Longest user or contact name, in characters.
MAX_NAME_LENGTH = 64
#: Largest identity.json accepted (a base64 ML-DSA-87 key is ~3.5 kB).
_MAX_JSON = 16 * 1024

_PUBLIC_MODE = 0o644
_FORMAT_VERSION = 1


def fingerprint(public_key: bytes) -> str:
    """Return the human-readable fingerprint of an ML-DSA public key.

    ``SHA-256(public_key)`` in upper-case base32 without padding (52 characters),
    in 13 space-separated groups of 4, e.g. ``"MFRG GZDF ... XXXX"``.
    """
    text = base64.b32encode(hashlib.sha256(public_key).digest()).decode("ascii").rstrip("=")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def short_fingerprint(public_key: bytes) -> str:
    """The first four groups of :func:`fingerprint`, for logs."""
    return fingerprint(public_key)[:19]


def scheme_for_public_key(public_key: bytes) -> pqc.SignatureScheme:
    """Return the ML-DSA parameter set whose public keys have this length.

    Raises:
        InvalidKeyError: no ML-DSA parameter set has this public key length.
    """
    for scheme in pqc.SignatureScheme:
        if len(public_key) == scheme.sizes.public_key:
            return scheme
    sizes = ", ".join(str(s.sizes.public_key) for s in pqc.SignatureScheme)
    raise InvalidKeyError(
        f"public_key: {len(public_key)} bytes is not an ML-DSA public key ({sizes} bytes)"
    )


def validate_name(name: object, what: str = "name") -> str:
    """Check a user or contact name: 1-64 printable characters, no surrounding spaces.

    Raises:
        ConfigError: naming ``what`` and the reason.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a string, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"{what} must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    if name != name.strip():
        raise ConfigError(f"{what} must not start or end with whitespace")
    if any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name):
        raise ConfigError(f"{what} must not contain control or separator characters")
    return name


def _parse_scheme(value: object) -> pqc.SignatureScheme:
    try:
        return pqc.SignatureScheme(value)
    except ValueError:
        names = ", ".join(s.value for s in pqc.SignatureScheme)
        raise InvalidKeyError(f"algorithm: {value!r} is not one of {names}") from None


def _decode_public_key(value: object, scheme: pqc.SignatureScheme) -> bytes:
    if not isinstance(value, str):
        raise InvalidKeyError("public_key must be a base64 string")
    try:
        public_key = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidKeyError("public_key is not valid base64") from None
    if len(public_key) != scheme.sizes.public_key:
        raise InvalidKeyError(
            f"public_key must be {scheme.sizes.public_key} bytes for {scheme.value}, "
            f"got {len(public_key)}"
        )
    return public_key


def identity_from_json(data: bytes | str) -> tuple[str, pqc.SignatureScheme, bytes]:
    """Parse the public identity object (``identity.json`` / ``identity show --json``).

    Returns:
        ``(name, scheme, public_key)``.

    Raises:
        InvalidKeyError: malformed JSON or a bad field (named in the message).
        ConfigError: invalid ``name``.
    """
    if len(data) > _MAX_JSON:
        raise InvalidKeyError(f"identity JSON is larger than {_MAX_JSON} bytes")
    try:
        obj: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidKeyError(f"identity JSON is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidKeyError("identity JSON must be an object")
    version = obj.get("version", _FORMAT_VERSION)
    if version != _FORMAT_VERSION:
        raise InvalidKeyError(f"version: unsupported identity format {version!r}")
    name = validate_name(obj.get("name"), "name")
    scheme = _parse_scheme(obj.get("algorithm"))
    public_key = _decode_public_key(obj.get("public_key"), scheme)
    stated = obj.get("fingerprint")
    if stated is not None and stated != fingerprint(public_key):
        raise InvalidKeyError("fingerprint does not match public_key")
    return name, scheme, public_key


@dataclass(frozen=True, repr=False, eq=False)
class Identity:
    """A user's long-term ML-DSA identity.

    Attributes:
        name: the user's display name (also how contacts know them).
        scheme: the ML-DSA parameter set (default ML-DSA-65).
        signing_key: the private key; :meth:`sign` uses it.
        public_key: the raw FIPS 204 public key ``pk``.
        fingerprint: :func:`fingerprint` of ``public_key``.
    """

    name: str
    scheme: pqc.SignatureScheme
    signing_key: pqc.SigningKey
    public_key: bytes
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.signing_key.public_bytes() != self.public_key:
            raise InvalidKeyError("public_key does not belong to signing_key")
        object.__setattr__(self, "fingerprint", fingerprint(self.public_key))

    @classmethod
    def generate(
        cls,
        name: str,
        scheme: pqc.SignatureScheme = pqc.SignatureScheme.ML_DSA_65,
        *,
        backend: pqc.Backend | None = None,
    ) -> Identity:
        """Make a new identity (FIPS 204 algorithm 1, ``ML-DSA.KeyGen``).

        Raises:
            ConfigError: invalid ``name``.
        """
        validate_name(name)
        key = (backend or pqc.get_backend("cryptography")).signing_generate(scheme)
        return cls(name, scheme, key, key.public_bytes())

    @classmethod
    def from_seed(
        cls,
        name: str,
        scheme: pqc.SignatureScheme,
        seed: bytes,
        *,
        backend: pqc.Backend | None = None,
    ) -> Identity:
        """Re-derive an identity from its seed ξ (FIPS 204 algorithm 6)."""
        key = (backend or pqc.get_backend("cryptography")).signing_from_seed(scheme, seed)
        return cls(name, scheme, key, key.public_bytes())

    @classmethod
    def load(cls, home: str | os.PathLike[str]) -> Identity:
        """Load and validate the identity stored in ``home``.

        Raises:
            IdentityNotFoundError: there is no identity in ``home`` yet.
            InvalidKeyError: a file is malformed, or the seed does not derive
                the stored public key.
            ConfigError: the key file is readable by others, or unreadable.
        """
        home = Path(home)
        public_path, key_path = home / IDENTITY_FILE, home / KEY_FILE
        if not public_path.exists() and not key_path.exists():
            raise IdentityNotFoundError(
                f"no identity in {home}: create one with 'qcall identity new --name NAME'"
            )
        for path in (public_path, key_path):
            if not path.exists():
                raise IdentityNotFoundError(
                    f"{path} is missing; restore it from a backup, or make a new identity "
                    "with 'qcall identity new --force --name NAME' (contacts will see a new key)"
                )
        try:
            with public_path.open("rb") as f:
                raw = f.read(_MAX_JSON + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {public_path}: {exc.strerror}") from exc
        try:
            name, scheme, public_key = identity_from_json(raw)
        except (InvalidKeyError, ConfigError) as exc:
            raise InvalidKeyError(f"{public_path}: {exc}") from None
        seed = config.read_private_file(key_path)
        if len(seed) != scheme.sizes.seed:
            raise InvalidKeyError(
                f"{key_path}: must hold a {scheme.sizes.seed}-byte seed, found {len(seed)} bytes"
            )
        key = pqc.get_backend("cryptography").signing_from_seed(scheme, seed)
        if not pqc.constant_time_eq(key.public_bytes(), public_key):
            raise InvalidKeyError(
                f"{key_path} does not match the public key in {public_path} "
                f"(fingerprint {short_fingerprint(public_key)}…): files from different identities?"
            )
        logger.debug("= loaded identity %r (%s)", name, short_fingerprint(public_key))
        return cls(name, scheme, key, public_key)

    @staticmethod
    def exists(home: str | os.PathLike[str]) -> bool:
        """Whether ``home`` holds (part of) an identity."""
        home = Path(home)
        return (home / IDENTITY_FILE).exists() or (home / KEY_FILE).exists()

    def save(self, home: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Store this identity in ``home``: seed in a 0600 file, the rest in JSON.

        Raises:
            IdentityError: an identity exists already and ``overwrite`` is false.
            ConfigError: the files cannot be written.
        """
        home = Path(home)
        if not overwrite and self.exists(home):
            raise IdentityError(
                f"an identity already exists in {home}; replacing it changes your fingerprint "
                "for every contact: use --force if you really mean it"
            )
        seed = self.signing_key.seed_bytes()
        config.atomic_write(home / KEY_FILE, seed)
        data = json.dumps({"version": _FORMAT_VERSION, **self.to_public_dict()}, indent=2)
        config.atomic_write(home / IDENTITY_FILE, (data + "\n").encode(), mode=_PUBLIC_MODE)
        logger.info("= saved identity %r (%s) in %s", self.name, self.fingerprint, home)

    def to_public_dict(self) -> dict[str, str]:
        """The public identity object (what ``identity show --json`` prints)."""
        return {
            "name": self.name,
            "algorithm": self.scheme.value,
            "public_key": base64.b64encode(self.public_key).decode("ascii"),
            "fingerprint": self.fingerprint,
        }

    def sign(self, data: bytes, context: bytes = b"") -> bytes:
        """Sign ``data`` with ML-DSA (FIPS 204 algorithm 2), context ≤ 255 bytes."""
        return self.signing_key.sign(data, context)

    def verify(self, signature: bytes, data: bytes, context: bytes = b"") -> bool:
        """Verify a signature made by this identity (FIPS 204 algorithm 3)."""
        backend = pqc.get_backend("cryptography")
        return backend.verify(self.scheme, self.public_key, signature, data, context)

    def __repr__(self) -> str:
        return (
            f"Identity(name={self.name!r}, scheme={self.scheme.value}, "
            f"fingerprint={self.fingerprint!r})"
        )
