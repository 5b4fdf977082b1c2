"""Issue 16, round 5: the callee's ANSWER signed in the phone's crypto worker process.

docs/performance.md, "Set-up speed: round 5": the ML-DSA signature (pyca/cryptography
holds the GIL while it signs) is made in a child process started with the phone, so
the event loop keeps serving ICE and DTLS. These tests check that the worker signs
with the phone's own key, that the handshake accepts only a well-formed signature of
the answer it prepared, that a failed worker falls back loudly to signing in the
loop, and that the worker dies with its phone — however the phone ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from qcall.call.crypto_worker import SigningWorker, send_answer
from qcall.call.phone import Phone
from qcall.call.session import CallOptions
from qcall.exceptions import (
    BadSignatureError,
    HandshakeStateError,
    InvalidKeyError,
    SignalingError,
)
from qcall.handshake import AnswerReceived, HandshakeFailed
from qcall.handshake.protocol import ANSWER_CONTEXT
from tests.test_call_session import Lab, connect, lab  # noqa: F401  (the lab fixture)
from tests.test_handshake_support import (
    BACKEND,
    BOB,
    BOB_SEED,
    NOW,
    SDP_ANSWER,
    SDP_OFFER,
    Pair,
    drain,
    events_of,
    make_pair,
    new_qkd_key,
    serve_qkd,
    transfer,
)
from tests.utils import TIMEOUT_FACTOR as T


def _offer_to_callee(pair: Pair) -> None:
    key = new_qkd_key()
    pair.qkd[key.key_id] = key.key
    pair.caller.send_offer(SDP_OFFER, NOW, [key])
    transfer(pair.caller, pair.callee, NOW)
    serve_qkd(pair)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as dead.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_the_worker_signs_with_the_phones_key() -> None:
    worker = SigningWorker(BOB)
    try:
        assert await worker.wait_ready(10 * T), worker.failed
        data = os.urandom(64)
        signature = await worker.sign(data, ANSWER_CONTEXT)
        assert BACKEND.verify(BOB.algorithm, BOB.public_bytes(), signature, data, ANSWER_CONTEXT)
        assert not BACKEND.verify(BOB.algorithm, BOB.public_bytes(), signature, data, b"x")
        assert worker.signed == 1
        # its repr names the process, never the key
        assert BOB_SEED.hex() not in repr(worker) and str(worker.pid) in repr(worker)
    finally:
        await worker.close()
    assert not worker.ready and worker.pid is not None and not _alive(worker.pid)


async def test_an_answer_signed_in_the_worker_is_verified_by_the_caller() -> None:
    pair = make_pair()
    _offer_to_callee(pair)
    worker = SigningWorker(BOB)
    try:
        assert await worker.wait_ready(10 * T), worker.failed
        assert await send_answer(pair.callee, SDP_ANSWER, NOW, worker) is True
    finally:
        await worker.close()
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    (answered,) = events_of(pair.caller_events, AnswerReceived)
    assert answered.sdp == SDP_ANSWER
    assert not events_of(pair.caller_events, HandshakeFailed)
    assert worker.signed == 1


def test_a_prepared_answer_takes_only_a_signature_of_its_own_length() -> None:
    pair = make_pair()
    _offer_to_callee(pair)
    with pytest.raises(HandshakeStateError):  # nothing prepared yet
        pair.callee.send_signed_answer(bytes(BOB.algorithm.sizes.signature))
    digest = pair.callee.prepare_answer(SDP_ANSWER, NOW)
    with pytest.raises(InvalidKeyError):
        pair.callee.send_signed_answer(b"\x00" * 10)
    assert pair.callee.data_to_send() == []  # nothing queued
    # Preparing again makes a new answer (a fresh nonce), so another hash to sign.
    assert pair.callee.prepare_answer(SDP_ANSWER, NOW) != digest
    # A signature of the right length that is not ours: the caller refuses the answer.
    pair.callee.send_signed_answer(os.urandom(BOB.algorithm.sizes.signature))
    with pytest.raises(HandshakeStateError):  # sent: it cannot be completed twice
        pair.callee.send_signed_answer(os.urandom(BOB.algorithm.sizes.signature))
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    (failed,) = events_of(pair.caller_events, HandshakeFailed)
    assert isinstance(failed.error, BadSignatureError)


async def test_a_dead_worker_falls_back_to_signing_here_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair = make_pair()
    _offer_to_callee(pair)
    worker = SigningWorker(BOB)
    try:
        assert await worker.wait_ready(10 * T), worker.failed
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5 * T
        while worker.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # its reader sees the end of the pipe
        with caplog.at_level(logging.WARNING, logger="qcall.call.crypto_worker"):
            assert await send_answer(pair.callee, SDP_ANSWER, NOW, worker) is False
    finally:
        await worker.close()
    assert "the crypto worker stopped" in caplog.text
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    assert events_of(pair.caller_events, AnswerReceived)  # signed here instead, same key
    assert not events_of(pair.caller_events, HandshakeFailed)


async def test_no_worker_signs_in_the_loop_as_before() -> None:
    pair = make_pair()
    _offer_to_callee(pair)
    assert await send_answer(pair.callee, SDP_ANSWER, NOW, None) is False
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    assert events_of(pair.caller_events, AnswerReceived)


_PARENT = """
import asyncio, sys
from qcall import pqc
from qcall.call.crypto_worker import SigningWorker

async def main():
    key = pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_65)
    worker = SigningWorker(key)
    assert await worker.wait_ready(20)
    print(worker.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_the_worker_dies_with_its_phones_process() -> None:
    """SIGKILL of the phone's process (no clean close): the worker exits on its own."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5 * T
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid), "the crypto worker outlived its phone"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# --- in a call ------------------------------------------------------------------------------


def _port_of(sdp: str, kind: str) -> int:
    (line,) = [x for x in sdp.splitlines() if x.startswith(f"m={kind} ")]
    return int(line.split()[1])


@pytest.mark.slow
async def test_a_call_signs_the_answer_in_the_worker_and_bundles_the_control_channel(
    lab: Lab,  # noqa: F811 (the fixture)
) -> None:
    options = CallOptions(rekey_interval=0.3)
    alice = await lab.phone("alice", tone=440, options=options, crypto_worker=True)
    bob = await lab.phone("bob", record=True, options=options, crypto_worker=True)
    assert bob.signer is not None and await bob.signer.wait_ready(10 * T), bob.signer
    caller, callee = await connect(alice, bob)
    assert bob.signer.signed == 1  # bob's answer; alice answered nothing
    assert alice.signer is not None and alice.signer.signed == 0
    # The control channel rides the audio's ICE and DTLS transport from the start
    # (max-bundle): it gathers no candidates of its own, on either side.
    for session in (caller, callee):
        assert session.pc is not None
        sdp = session.pc.localDescription.sdp
        assert _port_of(sdp, "application") == _port_of(sdp, "audio")
        assert len(session.pc._RTCPeerConnection__iceTransports) == 1  # type: ignore[attr-defined]
    # ... and carries the rekeys; no packet fails to decrypt.
    deadline = time.monotonic() + 10 * T
    while min(caller.status.rekeys, callee.status.rekeys) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert caller._channel is not None and caller._channel.readyState == "open"
    assert caller.status.rekeys >= 2 and callee.status.rekeys >= 2
    for session in (caller, callee):
        await session.refresh_stats()
        assert session.status.decrypt_failures == 0
    await caller.hangup()


@pytest.mark.slow
async def test_the_phone_ends_its_worker(lab: Lab) -> None:  # noqa: F811 (the fixture)
    bob = await lab.phone("bob", crypto_worker=True)
    assert bob.signer is not None and await bob.signer.wait_ready(10 * T)
    pid = bob.signer.pid
    assert pid is not None and _alive(pid)
    await bob.close()
    assert not _alive(pid)
    lab.phones.remove(bob)


async def test_a_phone_that_cannot_start_ends_its_worker() -> None:
    """No close() follows a failed start (``async with`` never entered): start ends it."""
    phone = Phone(
        "ws://127.0.0.1:9", BOB, "bob", check_peer=lambda *_: None, key_source=None,
        crypto_worker=True,
    )  # fmt: skip
    with pytest.raises(SignalingError):
        await phone.start()
    assert phone.signer is not None and phone.signer.failed == "the crypto worker was closed"
    pid = phone.signer.pid
    assert pid is None or not _alive(pid)


@pytest.mark.slow
async def test_without_the_worker_the_answer_is_signed_in_the_loop(
    lab: Lab,  # noqa: F811 (the fixture)
) -> None:
    """The default (docs/performance.md, round 5): no worker process, calls as before."""
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    assert alice.signer is None and bob.signer is None
    caller, callee = await connect(alice, bob)
    assert callee.status.sas == caller.status.sas is not None
    await caller.hangup()
