"""REKEY_NACK: a callee whose KME fails during a rekey postpones it (docs/handshake.md §3.7).

Sans-I/O, with the manual clock of tests/test_handshake_support.py: the callee
declines, both keep epoch n, the caller retries with a fresh key_ID; forged,
replayed or misplaced NACKs fail the session instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from qcall.exceptions import (
    HandshakeStateError,
    KeyConfirmationError,
    KMEConnectionError,
    KMEUnavailableError,
)
from qcall.handshake import (
    HandshakeFailed,
    KeysDerived,
    QKDKey,
    QKDKeysNeeded,
    RekeyCompleted,
    RekeyPostponed,
    State,
)
from qcall.handshake.messages import RekeyNack, parse_message
from tests.test_handshake_support import (
    NOW,
    Pair,
    drain,
    events_of,
    make_pair,
    new_qkd_key,
    run_handshake,
    transfer,
)


def send_rekey(pair: Pair, now: float) -> str:
    """The caller starts a rekey; the callee receives it and asks for the key."""
    key = new_qkd_key()
    pair.qkd[key.key_id] = key.key
    pair.caller.rekey(now, [key], fresh_kem=True)
    transfer(pair.caller, pair.callee, now)
    (need,) = events_of(pair.callee.events_received(), QKDKeysNeeded)
    assert need.key_ids == (key.key_id,)
    return key.key_id


def serve_key(pair: Pair, key_id: str) -> None:
    """The callee's KME works: dec_keys delivers the key."""
    pair.callee.receive_qkd_keys([QKDKey(key_id, pair.qkd[key_id])])


def decline(pair: Pair, now: float) -> bytes:
    """The callee's KME is down: REKEY_NACK. Returns the NACK bytes (delivered)."""
    pair.callee.decline_rekey(KMEConnectionError("cannot connect to KME (test)"))
    (nack,) = pair.callee.data_to_send()
    pair.caller.receive_data(nack, now)
    return nack


def test_declined_rekey_keeps_the_epoch_and_a_retry_with_a_fresh_key_succeeds() -> None:
    pair = run_handshake(make_pair("hybrid"))
    first = send_rekey(pair, NOW + 1)
    nack = decline(pair, NOW + 1)
    message = parse_message(nack)
    assert isinstance(message, RekeyNack) and message.epoch == 1
    assert message.code == "qkd_unavailable" and len(nack) == 82
    assert "cannot connect" not in repr(message)  # the peer gets a code, not details

    caller_events, callee_events = pair.caller.events_received(), pair.callee.events_received()
    assert caller_events == [RekeyPostponed(epoch=1, code="qkd_unavailable", remote=True)]
    assert callee_events == [RekeyPostponed(epoch=1, code="qkd_unavailable", remote=False)]
    for side in (pair.caller, pair.callee):
        assert side.state is State.ESTABLISHED and side.epoch == 0
    assert pair.caller.get_timer() is None  # no rekey deadline left: the shell reschedules

    pair.caller.postpone_rekey(NOW + 1, 2.0)  # what the shell does (qcall/call/qkdkeys.py)
    assert pair.caller.get_timer() == NOW + 3
    second = send_rekey(pair, NOW + 3)
    assert second != first
    serve_key(pair, second)
    transfer(pair.callee, pair.caller, NOW + 3)
    transfer(pair.caller, pair.callee, NOW + 3)
    drain(pair)
    (done,) = events_of(pair.caller_events, RekeyCompleted)
    assert done.epoch == 1 and done.qkd_key_ids == (second,)
    assert events_of(pair.callee_events, RekeyCompleted)[0].qkd_key_ids == (second,)
    a = events_of(pair.caller_events, KeysDerived)[-1]
    b = events_of(pair.callee_events, KeysDerived)[-1]
    assert a.epoch == b.epoch == 1 and a.local_keys == b.remote_keys and a.kem_fresh


def test_several_declines_in_a_row_then_success() -> None:
    pair = run_handshake(make_pair("hybrid"))
    used = set()
    for attempt in range(3):
        used.add(send_rekey(pair, NOW + attempt))
        decline(pair, NOW + attempt)
        assert pair.caller.epoch == pair.callee.epoch == 0
        drain(pair)
    last = send_rekey(pair, NOW + 5)
    used.add(last)
    serve_key(pair, last)
    transfer(pair.callee, pair.caller, NOW + 5)
    transfer(pair.caller, pair.callee, NOW + 5)
    drain(pair)
    assert len(used) == 4  # every attempt named a new key_ID
    assert pair.caller.epoch == pair.callee.epoch == 1
    assert len(events_of(pair.caller_events, RekeyPostponed)) == 3


def failure(events: Sequence[object]) -> HandshakeFailed:
    (ev,) = [e for e in events if isinstance(e, HandshakeFailed)]
    return ev


def test_forged_nack_fails_the_session() -> None:
    pair = run_handshake(make_pair("hybrid"))
    send_rekey(pair, NOW + 1)
    forged = RekeyNack(epoch=1, code="qkd_unavailable", tag=bytes(48)).serialize()
    pair.caller.receive_data(forged, NOW + 1)
    assert isinstance(failure(pair.caller.events_received()).error, KeyConfirmationError)


def test_tampered_code_does_not_verify() -> None:
    pair = run_handshake(make_pair("hybrid"))
    send_rekey(pair, NOW + 1)
    pair.callee.decline_rekey(KMEUnavailableError("not enough keys"))
    (nack,) = pair.callee.data_to_send()
    message = parse_message(nack)
    assert isinstance(message, RekeyNack)
    pair.caller.receive_data(replace(message, code="timeout").serialize(), NOW + 1)
    assert isinstance(failure(pair.caller.events_received()).error, KeyConfirmationError)


def test_old_nack_cannot_be_replayed_against_the_retry() -> None:
    pair = run_handshake(make_pair("hybrid"))
    send_rekey(pair, NOW + 1)
    nack = decline(pair, NOW + 1)
    drain(pair)
    send_rekey(pair, NOW + 3)  # same epoch number, another REKEY
    pair.caller.receive_data(nack, NOW + 3)  # the recorded NACK, replayed
    assert isinstance(failure(pair.caller.events_received()).error, KeyConfirmationError)


def test_nack_without_a_pending_rekey_or_for_another_epoch_fails() -> None:
    pair = run_handshake(make_pair("hybrid"))
    send_rekey(pair, NOW + 1)
    nack = decline(pair, NOW + 1)
    drain(pair)
    pair.caller.receive_data(nack, NOW + 2)  # a duplicate: no rekey is pending now
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeStateError)

    pair = run_handshake(make_pair("hybrid"))
    send_rekey(pair, NOW + 1)
    pair.callee.decline_rekey(KMEConnectionError("down"))
    message = parse_message(pair.callee.data_to_send()[0])
    assert isinstance(message, RekeyNack)
    pair.caller.receive_data(replace(message, epoch=2).serialize(), NOW + 1)
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeStateError)


def test_nack_after_the_ack_is_refused() -> None:
    pair = run_handshake(make_pair("hybrid"))
    key_id = send_rekey(pair, NOW + 1)
    rekey = pair.callee._rekey  # the callee answered REKEY_ACK; a NACK after it is a lie
    assert rekey is not None
    schedule = pair.callee._schedule
    assert schedule is not None
    from qcall.handshake.keyschedule import rekey_nack_tag

    body = RekeyNack(epoch=1, code="qkd_unavailable", tag=bytes(48)).mac_part()
    tag = rekey_nack_tag(schedule.current, rekey.message, body)
    late = RekeyNack(epoch=1, code="qkd_unavailable", tag=tag).serialize()
    serve_key(pair, key_id)
    transfer(pair.callee, pair.caller, NOW + 1)  # REKEY_ACK + CONFIRM: epoch 1 derived
    pair.caller.receive_data(late, NOW + 1)
    assert isinstance(failure(pair.caller.events_received()).error, HandshakeStateError)


def test_decline_is_only_valid_while_waiting_for_qkd_keys() -> None:
    pair = run_handshake(make_pair("hybrid"))
    with pytest.raises(HandshakeStateError):
        pair.callee.decline_rekey(KMEConnectionError("down"))  # no rekey pending
    serve_key(pair, send_rekey(pair, NOW + 1))
    with pytest.raises(HandshakeStateError):
        pair.callee.decline_rekey(KMEConnectionError("down"))  # keys already arrived


def test_parser_checks_the_nack_fields() -> None:
    from qcall.exceptions import InvalidMessageError

    good = RekeyNack(epoch=1, code="qkd_unavailable", tag=b"t" * 48).serialize()
    assert parse_message(good) == RekeyNack(1, "qkd_unavailable", b"t" * 48)
    with pytest.raises(InvalidMessageError, match="'epoch'"):
        parse_message(RekeyNack(epoch=0, code="x", tag=b"t" * 48).serialize())
    with pytest.raises(InvalidMessageError, match="'tag'"):
        parse_message(good[:-1])
    with pytest.raises(InvalidMessageError, match="'code'"):
        parse_message(good.replace(b"qkd_unavailable", b"QKD_UNAVAILABLE"))
