"""The double ratchet: epochs, QKD generations, loss, reordering, replay, tampering, limits."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall.exceptions import (
    EpochNotOpenError,
    KeyNotFoundError,
    MessageAuthError,
    MessageFormatError,
    MessagingError,
    ReplayedMessageError,
    SkippedMessagesError,
    UnknownSessionError,
)
from qcall.messaging.messages import PrekeyMessage, RatchetMessage, message_type
from qcall.messaging.ratchet import QKDPolicy, RatchetLimits, Session
from qcall.messaging.state import SessionState
from tests.messaging_utils import BACKEND, NOW, User, qkd_key, start


def _msg(wire: bytes) -> RatchetMessage:
    if wire[1] == 1:
        wire = PrekeyMessage.parse(wire).inner
    return RatchetMessage.parse(wire)


def _pair(qkd: bool = True, **options: object) -> tuple[Session, Session]:
    a, b, wire = start(User.make("alice"), User.make("bob"), qkd_key() if qkd else None)
    for s in (a, b):
        for k, v in options.items():
            setattr(s, k, v)
    assert b.decrypt(_msg(wire), NOW) == b"hello"
    return a, b


def _snapshot(session: Session) -> bytes:
    return session.state.serialize()


def test_conversation_ratchets_epochs_and_stops_prekey_messages() -> None:
    a, b = _pair()
    assert not a.acknowledged
    reply = b.encrypt(b"hi alice", NOW)
    assert message_type(reply) == 2 and _msg(reply).epoch == 2
    assert a.decrypt(_msg(reply), NOW) == b"hi alice"
    assert a.acknowledged
    for n in range(3, 12):
        sender, receiver = (a, b) if n % 2 else (b, a)
        wire = sender.encrypt(f"m{n}".encode(), NOW)
        assert message_type(wire) == 2 and _msg(wire).epoch == n
        assert len(_msg(wire).kem_ciphertext) == 1088  # a fresh ML-KEM exchange
        assert receiver.decrypt(_msg(wire), NOW) == f"m{n}".encode()
    assert a.state.epoch == b.state.epoch == 11


#: Every message in full (type 2): any one message of an epoch opens it.
FULL = RatchetLimits(full_every=1)


def test_out_of_order_and_lost_messages_across_epochs() -> None:
    a, b = _pair(limits=FULL)
    sent = [a.encrypt(f"a{i}".encode(), NOW) for i in range(5)]  # epoch 1
    assert b.decrypt(_msg(sent[4]), NOW) == b"a4"
    reply = b.encrypt(b"b0", NOW)  # epoch 2
    assert a.decrypt(_msg(reply), NOW) == b"b0"
    later = [a.encrypt(f"c{i}".encode(), NOW) for i in range(3)]  # epoch 3, prev chain length 5
    assert b.decrypt(_msg(later[2]), NOW) == b"c2"
    # Late messages of epoch 1 and 3 still open; a1 is never delivered (lost).
    for i in (0, 2, 3):
        assert b.decrypt(_msg(sent[i]), NOW) == f"a{i}".encode()
    assert b.decrypt(_msg(later[0]), NOW) == b"c0"
    assert len(b.state.skipped) == 2  # a1 and c1 are kept for when they come


@pytest.mark.parametrize("seed", range(3))
def test_random_order_of_a_long_conversation(seed: int) -> None:
    rng = random.Random(seed)
    a, b = _pair(limits=FULL)
    inbox: dict[Session, list[tuple[bytes, bytes]]] = {a: [], b: []}
    for i in range(60):
        sender = a if rng.random() < 0.5 else b
        receiver = b if sender is a else a
        text = f"{i}".encode()
        inbox[receiver].append((sender.encrypt(text, NOW), text))
        if rng.random() < 0.3:  # deliver a random subset, in random order
            rng.shuffle(inbox[receiver])
            take = inbox[receiver][: rng.randint(0, len(inbox[receiver]))]
            for item in take:
                inbox[receiver].remove(item)
                assert receiver.decrypt(_msg(item[0]), NOW) == item[1]
    for receiver in (a, b):
        rng.shuffle(inbox[receiver])
        for wire, text in inbox[receiver]:
            assert receiver.decrypt(_msg(wire), NOW) == text


def test_replay_and_duplicate_are_refused_and_change_nothing() -> None:
    a, b = _pair()
    wire = a.encrypt(b"once", NOW)
    assert b.decrypt(_msg(wire), NOW) == b"once"
    before = _snapshot(b)
    with pytest.raises(ReplayedMessageError, match="already received"):
        b.decrypt(_msg(wire), NOW)
    assert _snapshot(b) == before
    # A replay of a message whose key sat in the skipped store, after use.
    w1, w2 = a.encrypt(b"1", NOW), a.encrypt(b"2", NOW)
    b.decrypt(_msg(w2), NOW)
    b.decrypt(_msg(w1), NOW)
    with pytest.raises(ReplayedMessageError):
        b.decrypt(_msg(w1), NOW)
    # A replay of an old epoch once the conversation moved on.
    a.decrypt(_msg(b.encrypt(b"r", NOW)), NOW)
    b.decrypt(_msg(a.encrypt(b"s", NOW)), NOW)
    with pytest.raises(ReplayedMessageError, match=r"epoch is over|already"):
        b.decrypt(_msg(wire), NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"ciphertext": "flip"},
        {"index": 3},
        {"prev_length": 7},
        {"prev_generation": 1},
        {"ratchet_key": "flip"},
    ],
)
def test_tampered_message_is_refused_and_the_genuine_one_still_decrypts(
    change: dict[str, Any]  # a field of RatchetMessage and its new value (or "flip")
) -> None:
    a, b = _pair()
    wire = a.encrypt(b"secret", NOW)
    message = _msg(wire)
    field, value = next(iter(change.items()))
    if value == "flip":
        raw = bytearray(getattr(message, field))
        raw[len(raw) // 2] ^= 0x40
        value = bytes(raw)
    forged = dataclasses.replace(message, **{field: value})
    before = _snapshot(b)
    with pytest.raises(MessageAuthError, match="does not authenticate"):
        b.decrypt(forged, NOW)
    assert _snapshot(b) == before
    assert b.decrypt(message, NOW) == b"secret"


def test_tampered_kem_ciphertext_of_a_new_epoch() -> None:
    a, b = _pair()
    reply = _msg(b.encrypt(b"epoch 2", NOW))
    raw = bytearray(reply.kem_ciphertext)
    raw[0] ^= 1
    with pytest.raises(MessageAuthError):  # ML-KEM implicit rejection, then the AEAD fails
        a.decrypt(dataclasses.replace(reply, kem_ciphertext=bytes(raw)), NOW)
    assert a.decrypt(reply, NOW) == b"epoch 2"


def test_forged_future_epoch_and_unknown_session() -> None:
    a, b = _pair()
    message = _msg(a.encrypt(b"x", NOW))
    with pytest.raises(MessageAuthError, match="cannot follow"):
        a.decrypt(dataclasses.replace(_msg(b.encrypt(b"y", NOW)), epoch=6), NOW)
    with pytest.raises(UnknownSessionError):
        b.decrypt(dataclasses.replace(message, session_id=bytes(16)), NOW)
    _, other_b = _pair()
    with pytest.raises(UnknownSessionError):
        other_b.decrypt(message, NOW)


def test_skipped_keys_are_bounded() -> None:
    a, b = _pair(limits=RatchetLimits(max_skip=10, max_skipped_keys=15))
    wires = [a.encrypt(b"%d" % i, NOW) for i in range(40)]
    with pytest.raises(SkippedMessagesError, match="ahead"):
        b.decrypt(_msg(wires[20]), NOW)  # 20 ahead of the next (1) > 10
    b.decrypt(_msg(wires[10]), NOW)  # keeps 1..9
    b.decrypt(_msg(wires[20]), NOW)  # keeps 11..19: 18 > 15, the oldest go
    assert len(b.state.skipped) == 15
    with pytest.raises(ReplayedMessageError):
        b.decrypt(_msg(wires[1]), NOW)  # dropped: reported, never shown as valid
    assert b.decrypt(_msg(wires[19]), NOW) == b"19"


def test_skipped_keys_expire() -> None:
    a, b = _pair(limits=RatchetLimits(skipped_key_lifetime=60.0))
    w0, w1 = a.encrypt(b"0", NOW), a.encrypt(b"1", NOW)
    b.decrypt(_msg(w1), NOW)
    with pytest.raises(SkippedMessagesError, match="expired"):
        b.decrypt(_msg(w0), NOW + 61)
    assert b.expire(NOW + 61) == 1 and not b.state.skipped


def test_qkd_policy_and_generations() -> None:
    policy = QKDPolicy(every_messages=3, every_seconds=600)
    a, b = _pair(policy=policy)
    assert not a.qkd_due(NOW)
    for _ in range(2):
        a.encrypt(b".", NOW)
    assert a.qkd_due(NOW)  # hello + 2 = 3 messages
    assert a.qkd_due(NOW + 601) and not b.qkd_due(NOW)
    k1, k2 = qkd_key(), qkd_key()
    g1 = [a.encrypt(b"g1-%d" % i, NOW, k1 if i == 0 else None) for i in range(2)]
    g2 = a.encrypt(b"g2", NOW, k2)
    assert not a.qkd_due(NOW)
    m = _msg(g2)
    assert (m.epoch, m.generation, m.generation_qkd) == (1, 2, k2.ref)
    assert b.qkd_refs_needed(m) == [k2.ref]
    with pytest.raises(KeyNotFoundError, match=k2.ref.key_id):
        b.decrypt(m, NOW)
    with pytest.raises(MessageAuthError):  # another key than alice's (a KME mismatch)
        b.decrypt(m, NOW, {k2.ref.key_id: k1.key})
    assert b.decrypt(m, NOW, {k2.ref.key_id: k2.key}) == b"g2"  # generation 2 before 1
    assert b.qkd_refs_needed(_msg(g1[1])) == [k1.ref]
    assert b.decrypt(_msg(g1[1]), NOW, {k1.ref.key_id: k1.key}) == b"g1-1"
    assert b.decrypt(_msg(g1[0]), NOW) == b"g1-0"
    assert b.qkd_refs_needed(_msg(g1[0])) == []


def test_qkd_key_at_an_epoch_start() -> None:
    a, b = _pair()
    key = qkd_key("bob-sae")
    reply = _msg(b.encrypt(b"with qkd", NOW, key))
    assert reply.epoch_qkd == key.ref and reply.generation == 0
    assert a.qkd_refs_needed(reply) == [key.ref]
    assert a.decrypt(reply, NOW, {key.ref.key_id: key.key}) == b"with qkd"


def test_post_compromise_security_after_one_round_trip() -> None:
    a, b = _pair()
    stolen = Session(SessionState.parse(_snapshot(b)), backend=BACKEND)
    # The thief reads what is sent right now (same epoch)...
    assert stolen.decrypt(_msg(a.encrypt(b"now", NOW)), NOW) == b"now"
    # ...but after one round trip, fresh ML-KEM secrets lock it out.
    a.decrypt(_msg(b.encrypt(b"reply", NOW)), NOW)
    later = _msg(a.encrypt(b"later", NOW))
    assert b.decrypt(later, NOW) == b"later"
    with pytest.raises(MessagingError):
        stolen.decrypt(later, NOW)


def test_forward_secrecy_of_received_messages() -> None:
    a, b = _pair()
    wire = a.encrypt(b"past", NOW)
    b.decrypt(_msg(wire), NOW)
    stolen = Session(SessionState.parse(_snapshot(b)), backend=BACKEND)
    with pytest.raises(ReplayedMessageError):  # the key is gone from the state
        stolen.decrypt(_msg(wire), NOW)


def test_state_round_trip_and_corrupt_state() -> None:
    a, b = _pair()
    b.decrypt(_msg(a.encrypt(b"1", NOW)), NOW)
    a.decrypt(_msg(b.encrypt(b"2", NOW)), NOW)
    for s in (a, b):
        data = _snapshot(s)
        assert SessionState.parse(data).serialize() == data
        assert "alice" in repr(s) and str(s.state.root_key) not in repr(s.state)
    revived = Session(SessionState.parse(_snapshot(b)), backend=BACKEND)
    assert revived.decrypt(_msg(a.encrypt(b"3", NOW)), NOW) == b"3"
    data = _snapshot(b)
    for cut in (0, 1, 17, 100, len(data) - 1):
        with pytest.raises(MessageFormatError):
            SessionState.parse(data[:cut])
    with pytest.raises(MessageFormatError, match="version"):
        SessionState.parse(b"\x09" + data[1:])


def test_message_hostile_parse() -> None:
    a, _ = _pair()
    wire = a.encrypt(b"x", NOW)
    inner = PrekeyMessage.parse(wire).inner
    assert RatchetMessage.parse(inner).serialize() == inner
    for cut in range(0, len(inner), 37):
        with pytest.raises(MessageFormatError):
            RatchetMessage.parse(inner[:cut])
    with pytest.raises(MessageFormatError, match="version"):
        RatchetMessage.parse(b"\x07" + inner[1:])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.integers(0, 2500))
def test_random_bytes_never_escape_as_anything_but_format_errors(noise: bytes, at: int) -> None:
    # Random bytes, and a valid header followed by garbage.
    for data in (noise, _HEADER[:at] + noise):
        try:
            RatchetMessage.parse(data)
        except MessageFormatError:
            pass
        try:
            PrekeyMessage.parse(data)
        except MessageFormatError:
            pass


_HEADER = RatchetMessage(
    bytes(16), 2, 0, 0, 0, 0, bytes(1184), bytes(1088), None, None, bytes(16)
).serialize()


def test_short_messages_open_only_in_an_opened_epoch_and_change_nothing_before() -> None:
    a, b = _pair(limits=RatchetLimits(full_every=4))
    a.decrypt(_msg(b.encrypt(b"b0", NOW)), NOW)  # epoch 2
    wires = [a.encrypt(f"c{i}".encode(), NOW) for i in range(9)]  # epoch 3
    assert [message_type(w).name for w in wires] == [
        "RATCHET" if i % 4 == 0 else "RATCHET_SHORT" for i in range(9)
    ]
    assert len(wires[1]) < len(wires[0]) - 2000  # no ek (1184 bytes), no ct (1088)
    before = _snapshot(b)
    for i in (1, 2, 3):  # before epoch 3's first full message: kept for later, no change
        with pytest.raises(EpochNotOpenError):
            b.decrypt(_msg(wires[i]), NOW)
        assert _snapshot(b) == before
    assert b.qkd_refs_needed(_msg(wires[1])) == []
    assert b.decrypt(_msg(wires[4]), NOW) == b"c4"  # a later full message opens epoch 3
    for i in (3, 1, 0, 2, 8, 6, 5, 7):
        assert b.decrypt(_msg(wires[i]), NOW) == f"c{i}".encode()
    with pytest.raises(ReplayedMessageError):
        b.decrypt(_msg(wires[6]), NOW)


def test_a_short_message_cannot_pass_for_a_full_one_or_carry_epoch_fields() -> None:
    a, b = _pair(limits=RatchetLimits(full_every=8))
    a.decrypt(_msg(b.encrypt(b"b0", NOW)), NOW)
    full, short = a.encrypt(b"c0", NOW), a.encrypt(b"c1", NOW)
    assert message_type(short).name == "RATCHET_SHORT"
    assert b.decrypt(_msg(full), NOW) == b"c0"
    parsed = _msg(short)
    forged = dataclasses.replace(  # the same fields sent as a full message: another header
        parsed, ratchet_key=_msg(full).ratchet_key, kem_ciphertext=_msg(full).kem_ciphertext,
        compact=False,
    )
    with pytest.raises(MessageAuthError):
        b.decrypt(forged, NOW)
    with pytest.raises(MessageFormatError):
        dataclasses.replace(parsed, ratchet_key=_msg(full).ratchet_key)
    assert b.decrypt(parsed, NOW) == b"c1"


def test_the_next_message_fast_path_gives_the_general_result() -> None:
    """decrypt's one-step case (the next message of an open chain) changes the state exactly
    as the general path does: the same messages opened in order (mostly one-step) and in a
    shuffled order (skipped keys, the general path) end in the very same state bytes."""
    a, b = _pair(qkd=False)
    b.encrypt(b"ack", NOW)  # (not delivered: alice stays in epoch 1, bob keeps receiving)
    sent = [a.encrypt(f"m{i}".encode(), NOW) for i in range(40)]
    in_order = Session(SessionState.parse(b.state.serialize()), backend=BACKEND)
    shuffled = Session(SessionState.parse(b.state.serialize()), backend=BACKEND)
    for i, wire in enumerate(sent):
        assert in_order.decrypt(_msg(wire), NOW) == f"m{i}".encode()
    order = list(range(40))
    random.Random(7).shuffle(order)
    for i in order:
        assert shuffled.decrypt(_msg(sent[i]), NOW) == f"m{i}".encode()
    assert not shuffled.state.skipped
    assert _snapshot(in_order) == _snapshot(shuffled)
    # A tampered next message is refused on the one-step path and changes nothing.
    more = a.encrypt(b"next", NOW)
    before = _snapshot(in_order)
    bad = bytearray(more)
    bad[-3] ^= 1
    with pytest.raises(MessageAuthError):
        in_order.decrypt(_msg(bytes(bad)), NOW)
    assert _snapshot(in_order) == before
    assert in_order.decrypt(_msg(more), NOW) == b"next"
    with pytest.raises(ReplayedMessageError):
        in_order.decrypt(_msg(more), NOW)
