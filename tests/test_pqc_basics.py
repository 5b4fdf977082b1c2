from __future__ import annotations

import pytest

from qcall import pqc
from qcall.exceptions import ConfigError, InvalidKeyError


def test_kem_roundtrip_768() -> None:
    backend = pqc.get_backend("cryptography")
    key = backend.kem_generate(pqc.KEM.ML_KEM_768)
    shared, ct = backend.kem_encapsulate(pqc.KEM.ML_KEM_768, key.public_bytes())
    assert len(ct) == 1088
    assert key.decapsulate(ct) == shared


def test_wrong_length_key_is_typed_error() -> None:
    backend = pqc.get_backend("cryptography")
    with pytest.raises(InvalidKeyError, match="1184 bytes"):
        backend.kem_encapsulate(pqc.KEM.ML_KEM_768, b"\x00" * 10)


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError):
        pqc.get_backend("nope")


def test_hkdf_rfc5869_shape() -> None:
    prk = pqc.hkdf_extract(b"salt", b"ikm")
    assert len(prk) == pqc.HASH_LEN
    assert len(pqc.hkdf_expand(prk, b"info", 100)) == 100
    assert pqc.hkdf_extract(b"", b"x") == pqc.hkdf_extract(bytes(48), b"x")


def test_check_support() -> None:
    pqc.check_support()
