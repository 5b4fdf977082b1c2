"""Raw mutation fuzzing of real handshake messages fed to the Sans-I/O handshakes.

Beyond the hypothesis tests of tests/test_handshake_messages.py: 20,000 seeded
byte-level mutations (tests/fuzz.py) of the real OFFER, ANSWER, CONFIRM, REKEY
and REKEY_ACK bytes of hybrid sessions (docs/handshake.md §3), each fed to a
handshake in the state that expects it. ``receive_data`` must never raise; the
only failures are :class:`HandshakeFailed` events carrying a
:class:`~qcall.exceptions.HandshakeError`, after which the failed side queues at
most one ERROR message that parses. ``QCALL_FUZZ_SEED`` changes the seed.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

import pytest

from qcall.exceptions import HandshakeError, QCallError
from qcall.handshake import (
    CalleeHandshake,
    HandshakeFailed,
    HandshakeProtocol,
    ReplayCache,
    State,
)
from qcall.handshake.messages import Error, RekeyAck, parse_message
from tests.fuzz import Mutator
from tests.test_handshake_support import (
    ALICE,
    BOB,
    NOW,
    SDP_ANSWER,
    SDP_OFFER,
    Pair,
    Pins,
    make_pair,
    new_qkd_key,
    run_handshake,
    serve_qkd,
    transfer,
)

SEED = int(os.environ.get("QCALL_FUZZ_SEED", "20261127"))
OFFERS = 17_000
ANSWERS = 1_000
LATER = 2_000


def check_after(side: HandshakeProtocol, data: bytes, outcomes: collections.Counter[str]) -> None:
    """The invariants after one (hostile) input: typed failure or going on."""
    events = side.events_received()
    failed = [e for e in events if isinstance(e, HandshakeFailed)]
    for event in failed:
        assert isinstance(event.error, HandshakeError), (event.error, data[:64])
        assert isinstance(event.error, QCallError)
    out = side.data_to_send()
    if side.state is State.FAILED:
        assert len(failed) <= 1
        assert len(out) <= 1
        for blob in out:
            assert isinstance(parse_message(blob), Error)
        outcomes[type(failed[0].error).__name__ if failed else "failed-silently"] += 1
    else:
        outcomes[f"ok:{side.state.name}"] += 1
    side.get_timer()  # the timer stays consistent


def offer_bytes() -> bytes:
    pair = make_pair("hybrid")
    pair.caller.send_offer(SDP_OFFER, NOW, [new_qkd_key()])
    (offer,) = pair.caller.data_to_send()
    return offer


def test_mutated_offers_at_the_callee() -> None:
    offer = offer_bytes()
    mutator = Mutator(SEED, [offer])
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(OFFERS):
        data = mutator.havoc(offer)
        callee = CalleeHandshake(
            BOB, "bob", check_peer=Pins(alice=ALICE.public_bytes()), replay_cache=ReplayCache()
        )
        callee.receive_data(data, NOW)  # must never raise
        check_after(callee, data, outcomes)
        if callee.state is not State.FAILED and data != offer:
            outcomes["accepted-mutated"] += 1  # the signature covers every byte
    print(dict(outcomes))
    assert sum(outcomes.values()) - outcomes["accepted-mutated"] == OFFERS
    assert "failed-silently" not in outcomes and "accepted-mutated" not in outcomes


def answer_pair() -> tuple[Pair, bytes]:
    """A caller waiting for the answer, and the real answer bytes."""
    pair = make_pair("hybrid")
    pair.caller.send_offer(SDP_OFFER, NOW, [key := new_qkd_key()])
    pair.qkd[key.key_id] = key.key
    transfer(pair.caller, pair.callee, NOW)
    serve_qkd(pair)
    pair.callee.send_answer(SDP_ANSWER, NOW)
    (answer,) = pair.callee.data_to_send()
    return pair, answer


@pytest.mark.slow
def test_mutated_answers_at_the_caller() -> None:
    mutator = Mutator(SEED + 1, [answer_pair()[1]])
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(ANSWERS):
        pair, answer = answer_pair()
        data = mutator.havoc(answer)
        pair.caller.receive_data(data, NOW)  # must never raise
        check_after(pair.caller, data, outcomes)
        assert pair.caller.state in (State.FAILED, State.EXPECT_KEY_MATERIAL)
    print(dict(outcomes))
    assert "failed-silently" not in outcomes


def feed_later(
    make: Callable[[], tuple[HandshakeProtocol, bytes]], seed: int, count: int
) -> collections.Counter[str]:
    """Feed ``count`` mutations to a live handshake, renewed whenever it failed."""
    side, sample = make()
    mutator = Mutator(seed, [sample])
    outcomes: collections.Counter[str] = collections.Counter()
    sessions = 1
    for _ in range(count):
        if side.state is State.FAILED:
            side, sample = make()
            sessions += 1
        data = mutator.havoc(sample)
        side.receive_data(data, NOW + 1)  # must never raise
        check_after(side, data, outcomes)
    outcomes["sessions"] = sessions
    return outcomes


@pytest.mark.slow
def test_mutated_rekey_and_acks_on_established_sessions() -> None:
    def callee_gets_rekey() -> tuple[HandshakeProtocol, bytes]:
        pair = run_handshake(make_pair("hybrid"))
        key = new_qkd_key()
        pair.caller.rekey(NOW + 1, [key], fresh_kem=True)
        (rekey,) = pair.caller.data_to_send()
        return pair.callee, rekey

    def caller_gets_ack() -> tuple[HandshakeProtocol, bytes]:
        pair = run_handshake(make_pair("hybrid"))
        key = new_qkd_key()
        pair.qkd[key.key_id] = key.key
        pair.caller.rekey(NOW + 1, [key], fresh_kem=True)
        transfer(pair.caller, pair.callee, NOW + 1)
        serve_qkd(pair)
        [ack] = [d for d in pair.callee.data_to_send() if isinstance(parse_message(d), RekeyAck)]
        return pair.caller, ack

    def callee_gets_confirm() -> tuple[HandshakeProtocol, bytes]:
        """A callee that sent its answer and waits for the caller's CONFIRM."""
        pair, answer = answer_pair()
        pair.caller.receive_data(answer, NOW)
        exporter = os.urandom(88)
        pair.caller.receive_dtls_exporter(exporter)
        pair.callee.receive_dtls_exporter(exporter)
        pair.callee.data_to_send()  # the callee's own CONFIRM: not needed here
        confirms = pair.caller.data_to_send()
        pair.caller.events_received()
        pair.callee.events_received()
        return pair.callee, confirms[-1]

    third = LATER // 3
    results = {
        "rekey": feed_later(callee_gets_rekey, SEED + 2, third),
        "rekey_ack": feed_later(caller_gets_ack, SEED + 3, third),
        "confirm": feed_later(callee_gets_confirm, SEED + 4, LATER - 2 * third),
    }
    print(results)
    for outcomes in results.values():
        assert "failed-silently" not in outcomes
