"""Interop: one party's ML-KEM is the independent pure-Python kyber-py (FIPS 203)."""

from __future__ import annotations

import pytest

from qcall import pqc
from qcall.handshake import BackendKEM, KeysDerived, RekeyCompleted, State
from tests.test_handshake_support import (
    NOW,
    Pair,
    drain,
    make_pair,
    new_qkd_key,
    run_handshake,
    serve_qkd,
    transfer,
)

ml_kem = pytest.importorskip("kyber_py.ml_kem", reason="kyber-py is a test dependency")


class KyberPyKey:
    """A kyber-py ML-KEM-768 key pair behind qcall's KEMDecapsulationKey interface."""

    def __init__(self) -> None:
        self._ek, self._dk = ml_kem.ML_KEM_768.keygen()

    def public_bytes(self) -> bytes:
        return bytes(self._ek)

    def decapsulate(self, ciphertext: bytes) -> bytes:
        return bytes(ml_kem.ML_KEM_768.decaps(self._dk, ciphertext))


class KyberPyKEM:
    """qcall's KEMScheme over kyber-py."""

    algorithm = pqc.KEM.ML_KEM_768

    def __init__(self) -> None:
        self.used = 0

    def generate(self) -> KyberPyKey:
        self.used += 1
        return KyberPyKey()

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        self.used += 1
        shared, ct = ml_kem.ML_KEM_768.encaps(public_key)
        return bytes(shared), bytes(ct)


def _all_keys(pair: Pair, epoch: int) -> tuple[KeysDerived, KeysDerived]:
    (a,) = [e for e in pair.caller_events if isinstance(e, KeysDerived) and e.epoch == epoch]
    (b,) = [e for e in pair.callee_events if isinstance(e, KeysDerived) and e.epoch == epoch]
    return a, b


@pytest.mark.parametrize("kyber_side", ["caller", "callee"])
@pytest.mark.parametrize("policy", ["hybrid", "pqc"])
def test_handshake_and_rekey_agree_with_kyber_py(kyber_side: str, policy: str) -> None:
    kyber = KyberPyKEM()
    other = BackendKEM(pqc.KEM.ML_KEM_768, pqc.get_backend("cryptography"))
    pair = make_pair(
        policy,
        caller_kwargs={"kem": kyber if kyber_side == "caller" else other},
        callee_kwargs={"kem": kyber if kyber_side == "callee" else other},
    )
    run_handshake(pair)
    assert pair.caller.state is State.ESTABLISHED and pair.callee.state is State.ESTABLISHED
    # a rekey with a fresh ML-KEM exchange goes through kyber-py again
    keys = [new_qkd_key()] if policy == "hybrid" else []
    for key in keys:
        pair.qkd[key.key_id] = key.key
    pair.caller.rekey(NOW + 1, keys, fresh_kem=True)
    transfer(pair.caller, pair.callee, NOW + 1)
    serve_qkd(pair)
    transfer(pair.callee, pair.caller, NOW + 1)
    transfer(pair.caller, pair.callee, NOW + 1)
    drain(pair)
    assert kyber.used == 2  # keygen+keygen (caller) or encaps+encaps (callee)
    for epoch in (0, 1):
        a, b = _all_keys(pair, epoch)
        assert a.local_keys == b.remote_keys  # caller → callee key and salt
        assert a.remote_keys == b.local_keys  # callee → caller key and salt
        assert a.profile == b.profile
    assert pair.caller.sas == pair.callee.sas is not None
    assert any(isinstance(e, RekeyCompleted) for e in pair.callee_events)


def test_kyber_py_and_pyca_agree_directly() -> None:
    backend = pqc.get_backend("cryptography")
    key = backend.kem_generate(pqc.KEM.ML_KEM_768)
    shared, ct = KyberPyKEM().encapsulate(key.public_bytes())
    assert key.decapsulate(ct) == shared
    kyber_key = KyberPyKey()
    shared2, ct2 = backend.kem_encapsulate(pqc.KEM.ML_KEM_768, kyber_key.public_bytes())
    assert kyber_key.decapsulate(ct2) == shared2
