"""The SAS cannot be ground: a man in the middle cannot choose it (docs/handshake.md §4.4).

Version 1 derived the SAS from ``S_0``. A man in the middle (mallory) who calls bob as
"alice" first learns that leg's SAS, then answers alice's call as "bob" — and since the
answer (and the DTLS key share) was her last free choice, she could try answers until the
SAS alice computes agreed with bob's, every try costing her one signature. These tests
run that attacker against the protocol objects: with the commitment she has nothing to
compute a SAS from before alice reveals her nonce, so all she can do is guess.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from qcall import pqc
from qcall.exceptions import HandshakeError, SASCommitmentError
from qcall.handshake import CalleeHandshake, CallerHandshake, HandshakeFailed, KeyConfirmed
from qcall.handshake.keyschedule import KeySchedule, SRTPProfile, sas_commitment
from qcall.handshake.messages import Confirm, parse_message
from qcall.handshake.replay import ReplayCache
from tests.test_handshake_support import (
    ALICE,
    BACKEND,
    BOB,
    NOW,
    SDP_ANSWER,
    SDP_OFFER,
    Pair,
    Pins,
    drain,
    events_of,
    make_pair,
    new_qkd_key,
    run_handshake,
    serve_qkd,
    transfer,
)

MALLORY = BACKEND.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, b"m" * 32)
TRIES = 2000  # enough to hit a 2-digit target (1 in 100) with certainty if SAS can be computed


def confirmed_sas(events: Sequence[object]) -> str:
    (event,) = [e for e in events if isinstance(e, KeyConfirmed) and e.epoch == 0]
    return event.sas


def leg_bob() -> str:
    """Mallory calls bob as "alice" (bob has pinned mallory's key: first contact)."""
    pair = Pair(
        CallerHandshake(MALLORY, "alice", "bob", check_peer=Pins(bob=BOB.public_bytes()),
                        policy="pqc"),
        CalleeHandshake(BOB, "bob", check_peer=Pins(alice=MALLORY.public_bytes()),
                        policy="pqc"),
    )  # fmt: skip
    run_handshake(pair)
    return confirmed_sas(pair.callee_events)


@dataclass
class Candidate:
    """One answer mallory could send alice, with what she knows of its SAS beforehand."""

    callee: CalleeHandshake
    answer: bytes
    exporter: bytes
    predicted: str | None  # the SAS as mallory can compute it before alice's CONFIRM


def mallory_answers(offer: bytes) -> Candidate:
    """Mallory answers alice's offer as "bob" with fresh randomness and a DTLS key share."""
    callee = CalleeHandshake(
        MALLORY,
        "bob",
        check_peer=Pins(alice=ALICE.public_bytes()),
        policy="pqc",
        replay_cache=ReplayCache(),
    )
    callee.receive_data(offer, NOW)
    callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = callee.data_to_send()
    exporter = os.urandom(88)  # as the DTLS client she picks her key share last
    callee.receive_dtls_exporter(exporter)
    return Candidate(callee, answer, exporter, callee.sas)


def test_a_man_in_the_middle_cannot_grind_the_sas() -> None:
    target = leg_bob()  # the SAS bob will read aloud
    alice = CallerHandshake(
        ALICE, "alice", "bob", check_peer=Pins(bob=MALLORY.public_bytes()), policy="pqc"
    )
    alice.send_offer(SDP_OFFER, NOW)
    (offer,) = alice.data_to_send()

    # Mallory grinds: answer after answer until the SAS she can compute matches bob's
    # on its first two digits (a 1-in-100 target; the real attack wants all six).
    chosen = mallory_answers(offer)
    for _ in range(TRIES):
        if chosen.predicted is None or chosen.predicted[:2] == target[:2]:
            break
        chosen = mallory_answers(offer)
    held = chosen.callee.data_to_send()  # her CONFIRM, sent once alice's arrived

    # The leg completes with the answer she chose.
    alice.receive_data(chosen.answer, NOW)
    alice.receive_dtls_exporter(chosen.exporter)
    transfer(alice, chosen.callee, NOW)  # alice's CONFIRM reveals R now
    for data in held:
        alice.receive_data(data, NOW)
    final = confirmed_sas(alice.events_received())
    assert confirmed_sas(chosen.callee.events_received()) == final  # the leg itself is sound

    # Before alice revealed R, mallory could not compute the SAS of any answer:
    # her choice of answer (and of DTLS key share) told her nothing about it.
    assert chosen.predicted is None, (
        f"mallory knew the SAS {chosen.predicted} before the reveal (final {final}, "
        f"target {target})"
    )


def test_the_sas_is_a_fresh_random_function_of_the_committed_nonce() -> None:
    # Everything mallory controls or knows at answer time (TH_0, K_kem, K_dtls) fixed:
    # the SAS still ranges over the whole space as the caller's nonce R varies, so her
    # chance of any particular SAS is one in a million whatever she chose.
    th, k_kem, k_dtls = os.urandom(48), os.urandom(32), os.urandom(88)
    gcm = SRTPProfile.AEAD_AES_256_GCM
    sases = {KeySchedule(gcm, th, b"", k_kem, k_dtls).sas(os.urandom(32)) for _ in range(2000)}
    assert len(sases) >= 1990  # 2000 draws from 10^6 values: a few collisions at most


def test_the_caller_cannot_change_its_nonce_after_the_answer() -> None:
    # A caller (or a man in the middle playing one) that sees the answer and then
    # reveals another R than it committed to is refused, before any SAS is shown.
    pair = make_pair("pqc")
    pair.caller.send_offer(SDP_OFFER, NOW)
    transfer(pair.caller, pair.callee, NOW)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    transfer(pair.callee, pair.caller, NOW)
    exporter = os.urandom(88)
    pair.caller.receive_dtls_exporter(exporter)
    pair.callee.receive_dtls_exporter(exporter)
    (confirm,) = pair.caller.data_to_send()
    message = parse_message(confirm)
    assert isinstance(message, Confirm) and len(message.sas_reveal) == 32
    assert pair.callee.sas is None  # the callee knows no SAS until R arrives
    forged = dataclasses.replace(message, sas_reveal=os.urandom(32)).serialize()
    pair.callee.receive_data(forged, NOW)
    drain(pair)
    (failed,) = [e for e in pair.callee_events if type(e).__name__ == "HandshakeFailed"]
    assert isinstance(failed, HandshakeFailed)  # for mypy
    assert isinstance(failed.error, SASCommitmentError)
    assert "commitment" in str(failed.error) and pair.callee.sas is None
    transfer(pair.callee, pair.caller, NOW)
    drain(pair)
    remote = [e for e in pair.caller_events if type(e).__name__ == "HandshakeFailed"]
    assert remote and isinstance(remote[0], HandshakeFailed)  # for mypy
    assert isinstance(remote[0].error, HandshakeError)  # a peer's error always is one
    assert remote[0].error.code == "sas_commitment"


def test_the_offer_commits_to_the_revealed_nonce() -> None:
    pair = run_handshake(make_pair("hybrid"))
    sas = confirmed_sas(pair.caller_events)
    assert sas == confirmed_sas(pair.callee_events) == pair.caller.sas == pair.callee.sas


def test_the_sas_stays_the_same_across_rekeys() -> None:
    pair = run_handshake(make_pair("hybrid"))
    sas = pair.caller.sas
    for epoch in (1, 2):
        key = new_qkd_key()
        pair.qkd[key.key_id] = key.key
        pair.caller.rekey(NOW + epoch, [key])
        transfer(pair.caller, pair.callee, NOW + epoch)
        serve_qkd(pair)
        transfer(pair.callee, pair.caller, NOW + epoch)
        transfer(pair.caller, pair.callee, NOW + epoch)
        drain(pair)
        confirmed = [e for e in events_of(pair.caller_events, KeyConfirmed) if e.epoch == epoch]
        assert confirmed and confirmed[0].sas == sas
    assert pair.callee.epoch == pair.caller.epoch == 2


def test_sas_commitment_is_the_documented_hash() -> None:
    import hashlib
    import struct

    nonce = bytes(range(32))
    domain = b"qcall-v2 sas commit"
    expected = hashlib.sha384(
        struct.pack(">I", len(domain)) + domain + struct.pack(">I", 32) + nonce
    ).digest()
    assert sas_commitment(nonce) == expected
