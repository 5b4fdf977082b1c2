"""The small KEM interface the handshake uses, so any ML-KEM can be plugged in.

The default, :class:`BackendKEM`, wraps :mod:`qcall.pqc`; tests plug in the
independent pure-Python ``kyber-py`` through the same two methods.
"""

from __future__ import annotations

from typing import Protocol

from qcall import pqc

__all__ = ["BackendKEM", "KEMDecapsulationKey", "KEMScheme"]


class KEMDecapsulationKey(Protocol):
    """An ephemeral ML-KEM key pair (FIPS 203 §7.1)."""

    def public_bytes(self) -> bytes:
        """The encapsulation key ``ek``."""
        ...

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """FIPS 203 §7.3 ``ML-KEM.Decaps``: 32 bytes (implicit rejection, no error)."""
        ...


class KEMScheme(Protocol):
    """Key generation and encapsulation for one ML-KEM parameter set."""

    algorithm: pqc.KEM

    def generate(self) -> KEMDecapsulationKey:
        """FIPS 203 §7.1 ``ML-KEM.KeyGen``."""
        ...

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """FIPS 203 §7.2 ``ML-KEM.Encaps``: return ``(shared_secret, ciphertext)``.

        Raises:
            InvalidKeyError or ValueError: ``public_key`` fails the input checks.
        """
        ...


class BackendKEM:
    """:class:`KEMScheme` over a :class:`qcall.pqc.Backend` (default: pyca/OpenSSL)."""

    def __init__(
        self, algorithm: pqc.KEM = pqc.KEM.ML_KEM_768, backend: pqc.Backend | None = None
    ) -> None:
        self.algorithm = algorithm
        self._backend = backend or pqc.get_backend()

    def generate(self) -> KEMDecapsulationKey:
        return self._backend.kem_generate(self.algorithm)

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return self._backend.kem_encapsulate(self.algorithm, public_key)

    def __repr__(self) -> str:
        return f"<BackendKEM {self.algorithm.value} ({self._backend.name})>"
