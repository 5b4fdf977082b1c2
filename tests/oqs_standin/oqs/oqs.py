"""A stand-in for liboqs-python's ``oqs.oqs``, for tests on machines without liboqs.

liboqs cannot be built or installed on the machines the test suite runs on (no
network, no liboqs source or binary), so liboqs-python's real ``import oqs``
cannot succeed there. This module has the part of liboqs-python 0.16's API that
``qcall._oqs`` uses, with the same behaviour where qcall depends on it:

* at import, it logs "liboqs-python faulthandler is disabled" at INFO through
  a handler of its own on ``stdout`` (bound with ``from sys import stdout``),
  exactly as ``oqs/oqs.py`` does;
* keys have liboqs's formats: ML-KEM ``dk`` is the FIPS 203 encoding
  ``dk_PKE ‖ ek ‖ H(ek) ‖ z`` and ML-DSA ``sk`` the FIPS 204 ``skEncode``, as
  ``export_secret_key()`` returns them; ``free()`` wipes the secret key;
* errors of the C library surface as ``RuntimeError``.

The arithmetic is kyber-py (FIPS 203) and dilithium-py (FIPS 204), pure
Python: this is *not* liboqs and says nothing about its speed or its
correctness. Tests that need the real library skip when it is absent.
"""

from __future__ import annotations

import logging
import os
from sys import stdout
from typing import Any

from dilithium_py.ml_dsa import ML_DSA_44, ML_DSA_65, ML_DSA_87
from kyber_py.ml_kem import ML_KEM_768, ML_KEM_1024

logger = logging.getLogger(__name__)
logger.setLevel(logging.INFO)
logger.addHandler(logging.StreamHandler(stdout))

if os.environ.get("PYOQS_ENABLE_FAULTHANDLER", "0") == "1":
    logger.info("liboqs-python faulthandler is enabled")
else:
    logger.info("liboqs-python faulthandler is disabled")

OQS_SUCCESS = 0
OQS_VERSION = "0.16.0"

_KEMS: dict[str, Any] = {"ML-KEM-768": ML_KEM_768, "ML-KEM-1024": ML_KEM_1024}
_SIGS: dict[str, Any] = {"ML-DSA-44": ML_DSA_44, "ML-DSA-65": ML_DSA_65, "ML-DSA-87": ML_DSA_87}
#: What this "build" enables; a test may narrow it, as a minimal liboqs build would.
enabled_kems: list[str] = list(_KEMS)
enabled_sigs: list[str] = list(_SIGS)


class MechanismNotSupportedError(Exception):
    """As liboqs-python: the algorithm is not in this liboqs."""


def oqs_version() -> str:
    return OQS_VERSION


def get_enabled_kem_mechanisms() -> tuple[str, ...]:
    return tuple(enabled_kems)


def get_enabled_sig_mechanisms() -> tuple[str, ...]:
    return tuple(enabled_sigs)


class _Mechanism:
    """What KeyEncapsulation and Signature share: the secret key buffer."""

    def __init__(self, alg_name: str, table: dict[str, Any], enabled: list[str]) -> None:
        if alg_name not in enabled:
            raise MechanismNotSupportedError(f"{alg_name} is not supported by OQS")
        self.alg_name = alg_name
        self._impl = table[alg_name]
        self.secret_key = bytearray()

    def export_secret_key(self) -> bytes:
        return bytes(self.secret_key)

    def free(self) -> None:
        self.secret_key[:] = bytes(len(self.secret_key))  # OQS_MEM_cleanse


class KeyEncapsulation(_Mechanism):
    def __init__(self, alg_name: str) -> None:
        super().__init__(alg_name, _KEMS, enabled_kems)
        self.length_keypair_seed = 64

    def generate_keypair(self) -> bytes:
        ek, dk = self._impl.keygen()
        self.secret_key = bytearray(dk)
        return bytes(ek)

    def generate_keypair_seed(self, seed: bytes) -> bytes:
        if len(seed) != self.length_keypair_seed:
            raise ValueError(f"Seed length must be 64 bytes, got {len(seed)} bytes")
        ek, dk = self._impl.key_derive(seed)
        self.secret_key = bytearray(dk)
        return bytes(ek)

    def encap_secret(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            shared, ciphertext = self._impl.encaps(public_key)
        except ValueError:  # OQS_KEM_encaps failed the FIPS 203 7.2 input check
            raise RuntimeError("Can not encapsulate secret") from None
        return bytes(ciphertext), bytes(shared)

    def decap_secret(self, ciphertext: bytes) -> bytes:
        try:
            return bytes(self._impl.decaps(bytes(self.secret_key), ciphertext))
        except ValueError:
            raise RuntimeError("Can not decapsulate secret") from None

    def __repr__(self) -> str:
        return f"Key encapsulation mechanism: {self.alg_name}"


class Signature(_Mechanism):
    def __init__(self, alg_name: str) -> None:
        super().__init__(alg_name, _SIGS, enabled_sigs)

    def generate_keypair(self) -> bytes:
        pk, sk = self._impl.keygen()
        self.secret_key = bytearray(sk)
        return bytes(pk)

    def sign_with_ctx_str(self, message: bytes, context: bytes) -> bytes:
        try:
            return bytes(self._impl.sign(bytes(self.secret_key), message, ctx=context))
        except ValueError:
            raise RuntimeError("Can not sign message with context string") from None

    def verify_with_ctx_str(
        self, message: bytes, signature: bytes, context: bytes, public_key: bytes
    ) -> bool:
        try:
            return bool(self._impl.verify(public_key, message, signature, ctx=context))
        except ValueError:
            return False

    def __repr__(self) -> str:
        return f"Signature mechanism: {self.alg_name}"
