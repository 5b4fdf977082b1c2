"""Optional liboqs backend (liboqs-python), used only when liboqs is installed.

liboqs-python's ``import oqs`` tries to *download and build* liboqs when it
cannot load the shared library. qcall never lets that happen: :func:`probe`
first repeats liboqs-python's own library search (``find_library("liboqs")``,
``find_library("oqs")``, then ``$OQS_INSTALL_PATH/lib`` and ``lib64``, with
``~/_oqs`` standing in for an unset ``OQS_INSTALL_PATH``), loads the library
it would load with :mod:`ctypes`, and checks that it is one liboqs-python can
drive: the symbols it binds at import exist and the liboqs (major, minor)
version equals liboqs-python's. Only then does :class:`OQSBackend` import
``oqs``. Merely importing this module never imports ``oqs``. When no library
is found, asking for the backend raises
:class:`~qcall.exceptions.BackendUnavailableError` listing where it looked.

liboqs-python's import also logs "liboqs-python faulthandler is disabled"
through a handler of its own on *stdout*, which would corrupt machine-readable
output (``--json``). :func:`_import_oqs` imports it with stdout redirected and
its loggers silenced, removes that handler, and passes what it said to this
module's logger at DEBUG.

How to get this backend: build liboqs (https://github.com/open-quantum-safe/liboqs)
with ``-DBUILD_SHARED_LIBS=ON`` at the release matching ``liboqs-python``,
install it under a prefix, ``export OQS_INSTALL_PATH=<prefix>`` and
``pip install 'qcall[oqs]'``; docs/backends.md has the exact commands. (The
PyPI wheel ``pqcow-liboqs`` bundles liboqs 0.11.0, which lacks
``OQS_SIG_supports_ctx_str`` and the derandomised key generation that
liboqs-python ≥ 0.14 needs, so it cannot serve here.)

Capabilities (FIPS 203 / FIPS 204 through liboqs):

* ML-KEM-768/1024: generate, from seed ``d ‖ z`` (``OQS_KEM_keypair_derand``),
  encapsulate, decapsulate.
* ML-DSA-44/65/87: generate, sign and verify with a context string. liboqs-python
  has no API for ML-DSA key generation from the seed ξ, so
  :meth:`OQSBackend.signing_from_seed` and ``SigningKey.seed_bytes`` raise
  :class:`~qcall.exceptions.UnsupportedAlgorithmError`; identities (stored as
  seeds) therefore use the ``cryptography`` backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import io
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcall.exceptions import (
    BackendUnavailableError,
    InvalidKeyError,
    UnsupportedAlgorithmError,
)

if TYPE_CHECKING:
    from qcall.pqc import KEM, Backend, KEMPrivateKey, SignatureScheme, SigningKey

__all__ = ["LibOQSProbe", "OQSBackend", "liboqs_library_path", "probe"]

logger = logging.getLogger(__name__)

#: The loggers liboqs-python sets up at import (``oqs/oqs.py`` logs as ``oqs.oqs``).
_LIBOQS_LOGGERS = ("oqs", "oqs.oqs")

#: Symbols liboqs-python binds when ``oqs`` is imported or used by this backend.
_REQUIRED_SYMBOLS = (
    "OQS_init",
    "OQS_version",
    "OQS_KEM_new",
    "OQS_KEM_keypair_derand",
    "OQS_SIG_new",
    "OQS_SIG_supports_ctx_str",
    "OQS_SIG_sign_with_ctx_str",
    "OQS_SIG_verify_with_ctx_str",
)

_INSTALL_HINT = (
    "build and install liboqs as a shared library "
    "(https://github.com/open-quantum-safe/liboqs, -DBUILD_SHARED_LIBS=ON), "
    "set OQS_INSTALL_PATH to its prefix, then pip install 'qcall[oqs]' "
    "(docs/backends.md gives the commands)"
)


@dataclass(frozen=True)
class LibOQSProbe:
    """What :func:`probe` found.

    Attributes:
        path: the library liboqs-python would load, or ``None``.
        version: its ``OQS_version()``, if it could be loaded.
        problem: why the backend cannot be used, or ``None`` if it can.
    """

    path: str | None
    version: str | None
    problem: str | None


def _candidates() -> list[str]:
    """Library paths in the order liboqs-python's ``_load_shared_obj`` tries them."""
    found: list[str] = []
    # liboqs-python inserts find_library("oqs"), then find_library("liboqs"), at
    # position 0: the "liboqs" hit comes first, then the "oqs" one.
    for name in ("oqs", "liboqs"):
        try:
            hit = ctypes.util.find_library(name)
        except Exception:  # liboqs-python ignores every failure here too
            hit = None
        if hit:
            found.insert(0, hit)
    root_env = os.environ.get("OQS_INSTALL_PATH")
    root = Path(root_env) if root_env is not None else Path.home() / "_oqs"
    system = platform.system()
    if system == "Windows":
        found += [str(root / "bin" / "oqs.dll"), str(root / "bin" / "liboqs.dll")]
    elif system == "Darwin":
        found += [str(root / sub / "liboqs.dylib") for sub in ("lib", "lib64")]
    else:
        found += [str(root / sub / "liboqs.so") for sub in ("lib", "lib64")]
    return found


def _version_tuple(text: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def probe() -> LibOQSProbe:
    """Find the liboqs that ``import oqs`` would load, without importing ``oqs``.

    Never downloads or builds anything. Loading a candidate with :mod:`ctypes`
    is exactly what liboqs-python would do next, so it adds no new risk.
    """
    try:
        python_version: str | None = importlib.metadata.version("liboqs-python")
    except importlib.metadata.PackageNotFoundError:
        python_version = None
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue  # liboqs-python skips what it cannot load, and so do we
        missing = [s for s in _REQUIRED_SYMBOLS if not hasattr(lib, s)]
        if "OQS_version" in missing:
            return LibOQSProbe(candidate, None, f"{candidate} is not a liboqs library")
        lib.OQS_version.restype = ctypes.c_char_p
        raw = lib.OQS_version()
        version = raw.decode("ascii", "replace") if isinstance(raw, bytes) else "?"
        if missing:
            return LibOQSProbe(
                candidate,
                version,
                f"liboqs {version} at {candidate} is too old for liboqs-python "
                f"(missing {', '.join(missing)})",
            )
        if python_version is None:
            return LibOQSProbe(
                candidate, version, "liboqs-python is not installed: pip install 'qcall[oqs]'"
            )
        if _version_tuple(version) != _version_tuple(python_version):
            return LibOQSProbe(
                candidate,
                version,
                f"liboqs {version} at {candidate} does not match liboqs-python "
                f"{python_version}: install the liboqs release of the same major.minor",
            )
        return LibOQSProbe(candidate, version, None)
    searched = ", ".join(['find_library("liboqs")', 'find_library("oqs")', *_candidates()[-2:]])
    return LibOQSProbe(
        None,
        None,
        f"the liboqs shared library is not installed (searched {searched}); "
        "qcall never lets liboqs-python download or build it",
    )


def liboqs_library_path() -> str | None:
    """Return the path of a usable liboqs shared library, or ``None``."""
    result = probe()
    return result.path if result.problem is None else None


def _import_oqs() -> Any:
    """Import liboqs-python after :func:`probe` approved the library, printing nothing."""
    result = probe()
    if result.problem is not None:
        raise BackendUnavailableError(
            f"the 'oqs' backend is unavailable: {result.problem}; {_INSTALL_HINT}"
        )
    try:
        return _import_quietly()
    except (Exception, SystemExit) as exc:  # liboqs-python exits on load failure
        raise BackendUnavailableError(
            f"liboqs-python failed to load liboqs {result.version} from {result.path}: {exc}"
        ) from exc


def _import_quietly() -> Any:
    """``import oqs`` with stdout untouched; what it printed is logged at DEBUG.

    During the import stdout goes to a buffer (so the handler liboqs-python
    attaches to "stdout" is bound to that buffer) and its loggers do not
    propagate (so the root logger's handlers do not repeat the line). After it,
    that handler is removed: liboqs-python then logs like any library, through
    the root logger. The redirection is process-wide for the few milliseconds of
    the import; :func:`qcall.pqc.get_backend` does it once per process.
    """
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _LIBOQS_LOGGERS]
    propagate = [each.propagate for each in loggers]
    for each in loggers:
        each.propagate = False
    try:
        with contextlib.redirect_stdout(buffer):
            import oqs
    finally:
        for each, saved in zip(loggers, propagate, strict=True):
            each.propagate = saved
            for handler in list(each.handlers):
                if getattr(handler, "stream", None) is buffer:
                    each.removeHandler(handler)
        for line in buffer.getvalue().splitlines():
            logger.debug("= liboqs-python: %s", line)
    return oqs


# --- keys ------------------------------------------------------------------------------


class _OQSKEMKey:
    """An ML-KEM decapsulation key held by liboqs (secret stays in a C buffer)."""

    __slots__ = ("_kem", "_public", "algorithm")

    def __init__(self, algorithm: KEM, kem: Any, public: bytes) -> None:
        self.algorithm = algorithm
        self._kem = kem
        self._public = public

    def public_bytes(self) -> bytes:
        return self._public

    def decapsulate(self, ciphertext: bytes) -> bytes:
        from qcall.pqc import _check_length

        _check_length("ML-KEM ciphertext", ciphertext, self.algorithm.sizes.ciphertext)
        try:
            return bytes(self._kem.decap_secret(bytes(ciphertext)))
        except RuntimeError as exc:  # liboqs returned an error code
            raise InvalidKeyError("liboqs could not decapsulate") from exc

    def secret_parts(self) -> tuple[bytes, ...]:
        # FIPS 203 algorithm 16: dk = dk_PKE ‖ ek ‖ H(ek) ‖ z; ek and H(ek) are public.
        dk = bytes(self._kem.export_secret_key())
        public = self.algorithm.sizes.encapsulation_key + 32
        return (dk[: len(dk) - public - 32], dk[-32:])

    def __del__(self) -> None:
        kem = getattr(self, "_kem", None)
        if kem is not None:
            kem.free()  # OQS_MEM_cleanse on the secret key

    def __repr__(self) -> str:
        return f"<KEMPrivateKey {self.algorithm.value} (oqs)>"


class _OQSSigningKey:
    """An ML-DSA signing key held by liboqs."""

    __slots__ = ("_public", "_sig", "algorithm")

    def __init__(self, algorithm: SignatureScheme, sig: Any, public: bytes) -> None:
        self.algorithm = algorithm
        self._sig = sig
        self._public = public

    def public_bytes(self) -> bytes:
        return self._public

    def seed_bytes(self) -> bytes:
        raise UnsupportedAlgorithmError(
            "ML-DSA keys made by liboqs have no exportable seed ξ; "
            "use the 'cryptography' backend for keys that must be stored"
        )

    def sign(self, data: bytes, context: bytes = b"") -> bytes:
        if len(context) > 255:
            raise ValueError("ML-DSA context must be at most 255 bytes")
        return bytes(self._sig.sign_with_ctx_str(bytes(data), bytes(context)))

    def secret_parts(self) -> tuple[bytes, ...]:
        # FIPS 204 algorithm 24: sk = ρ ‖ K ‖ tr ‖ s1 ‖ s2 ‖ t0; ρ and tr = H(pk) are public.
        sk = bytes(self._sig.export_secret_key())
        return (sk[32:64], sk[128:])

    def __del__(self) -> None:
        sig = getattr(self, "_sig", None)
        if sig is not None:
            sig.free()

    def __repr__(self) -> str:
        return f"<SigningKey {self.algorithm.value} (oqs)>"


# --- backend ---------------------------------------------------------------------------


class OQSBackend:
    """liboqs (via liboqs-python) implementation of :class:`qcall.pqc.Backend`.

    Raises:
        BackendUnavailableError: liboqs or liboqs-python is missing or unusable;
            the message says what to install.
    """

    name = "oqs"

    def __init__(self) -> None:
        self._oqs = _import_oqs()
        self.library_version: str = str(self._oqs.oqs_version())
        if not (
            hasattr(self._oqs.KeyEncapsulation, "generate_keypair_seed")
            and hasattr(self._oqs.Signature, "sign_with_ctx_str")
        ):
            raise BackendUnavailableError(
                "the installed liboqs-python is too old for qcall's 'oqs' backend: "
                "pip install -U 'liboqs-python>=0.14' (with the matching liboqs)"
            )

    def _kem(self, algorithm: KEM) -> Any:
        if algorithm.value not in self._oqs.get_enabled_kem_mechanisms():
            raise UnsupportedAlgorithmError(
                f"liboqs {self.library_version} was built without {algorithm.value}"
            )
        return self._oqs.KeyEncapsulation(algorithm.value)

    def _sig(self, algorithm: SignatureScheme) -> Any:
        if algorithm.value not in self._oqs.get_enabled_sig_mechanisms():
            raise UnsupportedAlgorithmError(
                f"liboqs {self.library_version} was built without {algorithm.value}"
            )
        return self._oqs.Signature(algorithm.value)

    def kem_generate(self, algorithm: KEM) -> KEMPrivateKey:
        """FIPS 203 ML-KEM.KeyGen (algorithm 19), randomness from liboqs."""
        kem = self._kem(algorithm)
        return _OQSKEMKey(algorithm, kem, bytes(kem.generate_keypair()))

    def kem_from_seed(self, algorithm: KEM, seed: bytes) -> KEMPrivateKey:
        """FIPS 203 ML-KEM.KeyGen_internal(d, z) (algorithm 16) from ``d ‖ z``."""
        from qcall.pqc import _check_length

        _check_length("ML-KEM seed", seed, algorithm.sizes.seed)
        kem = self._kem(algorithm)
        if int(kem.length_keypair_seed) != algorithm.sizes.seed:
            kem.free()
            raise UnsupportedAlgorithmError(
                f"liboqs {self.library_version} cannot derive {algorithm.value} keys from a seed"
            )
        return _OQSKEMKey(algorithm, kem, bytes(kem.generate_keypair_seed(bytes(seed))))

    def kem_encapsulate(self, algorithm: KEM, public_key: bytes) -> tuple[bytes, bytes]:
        """FIPS 203 ML-KEM.Encaps (algorithm 20): return ``(shared_secret, ciphertext)``."""
        from qcall.pqc import _check_length

        _check_length("ML-KEM encapsulation key", public_key, algorithm.sizes.encapsulation_key)
        kem = self._kem(algorithm)
        try:
            ciphertext, shared = kem.encap_secret(bytes(public_key))
        except RuntimeError as exc:  # FIPS 203 7.2 input check failed
            raise InvalidKeyError("ML-KEM encapsulation key is not valid") from exc
        finally:
            kem.free()
        return bytes(shared), bytes(ciphertext)

    def signing_generate(self, algorithm: SignatureScheme) -> SigningKey:
        """FIPS 204 ML-DSA.KeyGen (algorithm 1)."""
        sig = self._sig(algorithm)
        return _OQSSigningKey(algorithm, sig, bytes(sig.generate_keypair()))

    def signing_from_seed(self, algorithm: SignatureScheme, seed: bytes) -> SigningKey:
        """Not available: liboqs-python exposes no ML-DSA.KeyGen_internal(ξ).

        Raises:
            UnsupportedAlgorithmError: always (after checking the seed length).
        """
        from qcall.pqc import _check_length

        _check_length("ML-DSA seed", seed, algorithm.sizes.seed)
        raise UnsupportedAlgorithmError(
            f"the 'oqs' backend cannot make {algorithm.value} keys from a seed "
            "(liboqs-python has no such API); use the 'cryptography' backend"
        )

    def verify(
        self,
        algorithm: SignatureScheme,
        public_key: bytes,
        signature: bytes,
        data: bytes,
        context: bytes = b"",
    ) -> bool:
        """FIPS 204 ML-DSA.Verify (algorithm 3) with context string ``context``."""
        from qcall.pqc import _check_length

        _check_length("ML-DSA public key", public_key, algorithm.sizes.public_key)
        if len(signature) != algorithm.sizes.signature or len(context) > 255:
            return False
        sig = self._sig(algorithm)
        try:
            return bool(
                sig.verify_with_ctx_str(
                    bytes(data), bytes(signature), bytes(context), bytes(public_key)
                )
            )
        finally:
            sig.free()


if TYPE_CHECKING:  # mypy checks that the class implements the whole interface
    _OQS_IS_A_BACKEND: type[Backend] = OQSBackend
