"""Known-answer tests for ML-KEM (FIPS 203) and ML-DSA (FIPS 204) through :mod:`qcall.pqc`.

Vectors: ``cryptography_vectors`` (pyca), files ``asymmetric/MLKEM/kat_MLKEM_{768,1024}.rsp``
and ``asymmetric/MLDSA/kat_MLDSA_{44,65,87}_det_pure.rsp``. Every case of every file runs
against every backend in :func:`qcall.pqc.available_backends`; each file is parsed once.
"""

from __future__ import annotations

import cryptography_vectors
import pytest

from qcall import pqc
from qcall.exceptions import UnsupportedAlgorithmError

Case = dict[str, str]


def load_rsp(filename: str) -> list[Case]:
    """Parse a NIST-style ``.rsp`` file into one dict per ``count = …`` block."""
    cases: list[Case] = []
    with cryptography_vectors.open_vector_file(filename, "r") as f:
        for raw in f:
            line = raw.strip()
            if line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition(" =")
            key, value = key.strip(), value.strip()
            if key == "count":
                cases.append({})
            cases[-1][key] = value
    return cases


def _h(case: Case, field: str) -> bytes:
    return bytes.fromhex(case[field])


@pytest.fixture(scope="module", params=pqc.available_backends())
def backend(request: pytest.FixtureRequest) -> pqc.Backend:
    return pqc.get_backend(request.param)


KEM_FILES = {
    pqc.KEM.ML_KEM_768: "asymmetric/MLKEM/kat_MLKEM_768.rsp",
    pqc.KEM.ML_KEM_1024: "asymmetric/MLKEM/kat_MLKEM_1024.rsp",
}
SIG_FILES = {
    pqc.SignatureScheme.ML_DSA_44: "asymmetric/MLDSA/kat_MLDSA_44_det_pure.rsp",
    pqc.SignatureScheme.ML_DSA_65: "asymmetric/MLDSA/kat_MLDSA_65_det_pure.rsp",
    pqc.SignatureScheme.ML_DSA_87: "asymmetric/MLDSA/kat_MLDSA_87_det_pure.rsp",
}


@pytest.fixture(scope="module", params=list(KEM_FILES), ids=lambda k: k.value)
def kem_vectors(request: pytest.FixtureRequest) -> tuple[pqc.KEM, list[Case]]:
    return request.param, load_rsp(KEM_FILES[request.param])


@pytest.fixture(scope="module", params=list(SIG_FILES), ids=lambda s: s.value)
def sig_vectors(request: pytest.FixtureRequest) -> tuple[pqc.SignatureScheme, list[Case]]:
    return request.param, load_rsp(SIG_FILES[request.param])


def test_vector_files_are_complete(
    kem_vectors: tuple[pqc.KEM, list[Case]],
    sig_vectors: tuple[pqc.SignatureScheme, list[Case]],
) -> None:
    kem, kem_cases = kem_vectors
    scheme, sig_cases = sig_vectors
    assert len(kem_cases) == 1000
    assert len(sig_cases) == 100
    assert all(len(_h(c, "pk")) == kem.sizes.encapsulation_key for c in kem_cases)
    assert all(len(_h(c, "pk")) == scheme.sizes.public_key for c in sig_cases)


def test_mlkem_kat(backend: pqc.Backend, kem_vectors: tuple[pqc.KEM, list[Case]]) -> None:
    """FIPS 203 KeyGen_internal(d, z), Decaps, and implicit rejection (ct_n → ss_n)."""
    kem, cases = kem_vectors
    for case in cases:
        key = backend.kem_from_seed(kem, _h(case, "d") + _h(case, "z"))
        assert key.public_bytes() == _h(case, "pk"), case["count"]
        assert key.decapsulate(_h(case, "ct")) == _h(case, "ss"), case["count"]
        assert key.decapsulate(_h(case, "ct_n")) == _h(case, "ss_n"), case["count"]


def test_mlkem_encapsulate_to_kat_keys(
    backend: pqc.Backend, kem_vectors: tuple[pqc.KEM, list[Case]]
) -> None:
    """Encapsulation is randomised: check it against the KAT decapsulation keys."""
    kem, cases = kem_vectors
    for case in cases[:50]:
        key = backend.kem_from_seed(kem, _h(case, "d") + _h(case, "z"))
        shared, ct = backend.kem_encapsulate(kem, _h(case, "pk"))
        assert len(shared) == 32 and len(ct) == kem.sizes.ciphertext
        assert key.decapsulate(ct) == shared


def _split_sm(case: Case) -> tuple[bytes, bytes]:
    sm = _h(case, "sm")
    mlen = int(case["mlen"])
    assert int(case["smlen"]) == len(sm)
    signature, message = sm[: len(sm) - mlen], sm[len(sm) - mlen :]
    assert message == _h(case, "msg")
    return signature, message


def test_mldsa_kat_verify(
    backend: pqc.Backend, sig_vectors: tuple[pqc.SignatureScheme, list[Case]]
) -> None:
    """FIPS 204 ML-DSA.Verify on the deterministic KAT signatures, with context."""
    scheme, cases = sig_vectors
    for case in cases:
        signature, message = _split_sm(case)
        pk, ctx = _h(case, "pk"), _h(case, "ctx")
        assert len(signature) == scheme.sizes.signature
        assert backend.verify(scheme, pk, signature, message, ctx), case["count"]
        flipped = bytearray(signature)
        flipped[len(flipped) // 2] ^= 0x01
        assert not backend.verify(scheme, pk, bytes(flipped), message, ctx), case["count"]
        assert not backend.verify(scheme, pk, signature, message + b"\x00", ctx)
        assert not backend.verify(scheme, pk, signature, message, ctx + b"x")


def test_mldsa_kat_keygen_and_sign(
    backend: pqc.Backend, sig_vectors: tuple[pqc.SignatureScheme, list[Case]]
) -> None:
    """FIPS 204 KeyGen_internal(ξ) must reproduce pk; hedged Sign → Verify round-trips."""
    scheme, cases = sig_vectors
    for case in cases:
        try:
            key = backend.signing_from_seed(scheme, _h(case, "xi"))
        except UnsupportedAlgorithmError:
            assert backend.name == "oqs"  # documented limitation of liboqs-python
            return
        assert key.public_bytes() == _h(case, "pk"), case["count"]
        assert key.seed_bytes() == _h(case, "xi")
        _, message = _split_sm(case)
        ctx = _h(case, "ctx")
        signature = key.sign(message, ctx)
        assert backend.verify(scheme, key.public_bytes(), signature, message, ctx)
        assert not backend.verify(scheme, key.public_bytes(), signature, message, b"")


def test_load_rsp_fields() -> None:
    first = load_rsp("asymmetric/MLDSA/kat_MLDSA_44_det_pure.rsp")[0]
    assert set(first) == {"count", "xi", "seed", "pk", "sk", "msg", "mlen", "sm", "smlen", "ctx"}
    first = load_rsp("asymmetric/MLKEM/kat_MLKEM_768.rsp")[0]
    assert set(first) == {"count", "z", "d", "msg", "seed", "pk", "sk", "ct_n", "ss_n", "ct", "ss"}
