"""The small KEM interface the handshake uses, so any ML-KEM can be plugged in.

The default, :class:`BackendKEM`, wraps :mod:`qcall.pqc`; tests plug in the
independent pure-Python ``kyber-py`` through the same two methods.
"""

from __future__ import annotations

from typing import Protocol

from qcall import pqc

__all__ = ["BackendKEM", "KEMDecapsulationKey", "KEMPool", "KEMScheme"]


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


class KEMPool:
    """A :class:`KEMScheme` that hands out ML-KEM key pairs made ahead of time, each once.

    :meth:`generate` pops a pre-made pair (made by :meth:`fill`, e.g. after a
    call is set up) or, when none is left, makes one on the spot; a pair
    handed out is never kept. The repr gives the count only.

    Args:
        scheme: the KEM that makes the pairs (default ML-KEM-768, pyca/OpenSSL).
        size: pairs :meth:`fill` keeps ready (0: none, every pair made on use).
    """

    def __init__(self, scheme: KEMScheme | None = None, size: int = 2) -> None:
        self.scheme: KEMScheme = scheme or BackendKEM()
        self.algorithm = self.scheme.algorithm
        self.size = size
        self._ready: list[KEMDecapsulationKey] = []
        #: Pairs handed out pre-made / made on the spot (counts only).
        self.hits = self.misses = 0

    def generate(self) -> KEMDecapsulationKey:
        if self._ready:
            self.hits += 1
            return self._ready.pop(0)
        self.misses += 1
        return self.scheme.generate()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return self.scheme.encapsulate(public_key)

    def fill(self) -> int:
        """Make pairs until :attr:`size` are ready; return how many were made."""
        made = 0
        while len(self._ready) < self.size:
            self._ready.append(self.scheme.generate())
            made += 1
        return made

    def clear(self) -> None:
        """Drop every pair made ahead (never handed out)."""
        self._ready.clear()

    def __len__(self) -> int:
        return len(self._ready)

    def __repr__(self) -> str:
        return (
            f"<KEMPool {self.algorithm.value} {len(self._ready)}/{self.size} ready "
            f"(pre-made {self.hits}, on the spot {self.misses})>"
        )
