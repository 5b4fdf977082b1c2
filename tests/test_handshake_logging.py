"""No key bytes in logs: capture a whole handshake and rekeys at DEBUG and search them."""

from __future__ import annotations

import base64
import logging
import os

import pytest

from qcall.handshake import BackendKEM, KeysDerived, QKDKey
from tests.test_handshake_support import (
    ALICE_SEED,
    BOB_SEED,
    NOW,
    Pair,
    drain,
    make_pair,
    run_handshake,
    serve_qkd,
    transfer,
)


class RecordingKEM(BackendKEM):
    """The default ML-KEM, remembering every shared secret it produces (to search for)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[bytes] = []

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        shared, ct = super().encapsulate(public_key)
        self.secrets.append(shared)
        return shared, ct


def _forms(secret: bytes) -> list[str]:
    """Hex (both cases), base64 and base64url forms, plus a 12-byte window of each."""
    b64 = base64.b64encode(secret).decode()
    b64url = base64.urlsafe_b64encode(secret).decode().rstrip("=")
    forms = [secret.hex(), secret.hex().upper(), b64, b64url]
    if len(secret) >= 12:
        window = secret[:12]
        forms += [window.hex(), base64.b64encode(window).decode()[:16]]
    return forms


@pytest.mark.parametrize("policy", ["hybrid", "pqc"])
def test_no_secret_in_debug_logs(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets: list[bytes] = [ALICE_SEED, BOB_SEED]
    exporter = os.urandom(88)
    secrets.append(exporter)
    kem = RecordingKEM()
    pair = make_pair(policy, callee_kwargs={"kem": kem})
    run_handshake(pair, exporter=exporter)
    assert pair.callee._schedule is not None
    secrets.append(pair.callee._schedule.current.secret)  # S_0
    # rekey with a fresh QKD key and ML-KEM, and one with a wrong QKD key (failure path)
    for wrong in (False, True):
        keys = []
        if policy == "hybrid":
            key = QKDKey(f"00000000-0000-0000-0000-00000000000{int(wrong)}", os.urandom(32))
            pair.qkd[key.key_id] = key.key
            keys.append(key)
        pair.caller.rekey(NOW + 1, keys, fresh_kem=True)
        transfer(pair.caller, pair.callee, NOW + 1)
        serve_qkd(pair, wrong=wrong)
        transfer(pair.callee, pair.caller, NOW + 1)
        transfer(pair.caller, pair.callee, NOW + 1)
        drain(pair)
        if not wrong and policy == "pqc":
            break
    secrets += list(pair.qkd.values())
    secrets += kem.secrets  # K_kem of the handshake and of the rekey
    assert len(kem.secrets) >= 2
    for event in pair.caller_events + pair.callee_events:
        if isinstance(event, KeysDerived):
            secrets += [event.local_keys.key, event.local_keys.salt]
            secrets += [event.remote_keys.key, event.remote_keys.salt]
    assert len(secrets) > 6
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n" + caplog.text
    text += repr(pair.caller) + repr(pair.callee) + repr(pair.caller_events + pair.callee_events)
    assert "OFFER" in text and "CONFIRM" in text  # we did capture the debug log
    for secret in secrets:
        for form in _forms(secret):
            assert form not in text, f"secret leaked in logs/reprs ({len(secret)} bytes)"


def test_key_ids_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pair: Pair = run_handshake(make_pair("hybrid"))
    assert pair.caller.qkd_key_ids[0] in caplog.text
