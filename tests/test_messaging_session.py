"""Session set-up: prekey bundles, the prekey message, modes, and every bad bundle or message."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import pytest

from qcall.exceptions import (
    IdentityChangedError,
    MessageAuthError,
    MessageFormatError,
    PrekeyError,
    QKDKeyMismatchError,
    SecurityPolicyError,
)
from qcall.messaging.messages import Mode, PrekeyMessage, RatchetMessage
from qcall.messaging.prekeys import (
    PrekeyBundle,
    PrekeyKind,
    PrekeyRecord,
    SignedPrekey,
    make_prekey,
)
from qcall.messaging.ratchet import Session
from qcall.messaging.session import initiate, respond
from tests.messaging_utils import BACKEND, NOW, User, qkd_key, start

DAY = 86400.0


def _inner(session: Session, wire: bytes) -> bytes:
    return session.decrypt(RatchetMessage.parse(PrekeyMessage.parse(wire).inner), NOW)


def test_hybrid_session_sets_up_with_no_round_trip() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    key = qkd_key()
    a, b, wire = start(alice, bob, key)
    assert a.mode is b.mode is Mode.HYBRID
    assert a.session_id == b.session_id
    message = PrekeyMessage.parse(wire)
    assert message.qkd == key.ref and message.one_time_prekey_id == 100
    assert _inner(b, wire) == b"hello"
    assert not a.acknowledged  # until bob answers, alice sends prekey messages
    assert PrekeyMessage.parse(a.encrypt(b"again", NOW)).qkd == key.ref


def test_pqc_session_is_marked_and_can_be_refused() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    a, b, wire = start(alice, bob, None)
    assert a.mode is b.mode is Mode.PQC
    assert PrekeyMessage.parse(wire).qkd is None
    message = PrekeyMessage.parse(wire)
    with pytest.raises(SecurityPolicyError, match="requires 'hybrid'"):
        respond(
            bob.responder(message),
            message,
            now=NOW,
            check_peer=bob.check_peer,
            accept_pqc=False,
            backend=BACKEND,
        )


def test_mode_cannot_be_downgraded_by_the_server() -> None:
    """Stripping the QKD reference (hybrid → pqc) breaks alice's signature."""
    alice, bob = User.make("alice"), User.make("bob")
    _, _, wire = start(alice, bob, qkd_key())
    message = PrekeyMessage.parse(wire)
    stripped = dataclasses.replace(message, mode=Mode.PQC, qkd=None)
    with pytest.raises(MessageAuthError, match="does not verify"):
        respond(
            bob.responder(stripped), stripped, now=NOW, check_peer=bob.check_peer, backend=BACKEND
        )


def test_session_without_one_time_prekey() -> None:
    alice, bob = User.make("alice"), User.make("bob", one_time=0)
    _, b, wire = start(alice, bob)
    assert PrekeyMessage.parse(wire).one_time_prekey_id == 0
    assert _inner(b, wire) == b"hello"


def test_bundle_round_trip_and_hostile_parse() -> None:
    bob = User.make("bob", one_time=3)
    bundle = PrekeyBundle("bob", bob.me.public_key, bob.spk, tuple(p for p, _ in bob.opks.values()))
    data = bundle.serialize()
    assert PrekeyBundle.parse(data) == bundle
    PrekeyBundle.parse(data).verify(BACKEND, int(NOW * 1000), owner="bob")
    for cut in range(0, len(data), 97):
        with pytest.raises(MessageFormatError):
            PrekeyBundle.parse(data[:cut])
    with pytest.raises(MessageFormatError, match="trailing"):
        PrekeyBundle.parse(data + b"\0")
    with pytest.raises(MessageFormatError, match="count"):
        PrekeyBundle.parse(data, max_one_time=2)


def test_bundle_signed_by_the_wrong_identity_is_refused() -> None:
    """A signed prekey made by carol, presented in a bundle with bob's identity key."""
    alice, bob, carol = User.make("alice"), User.make("bob"), User.make("carol")
    forged_spk, _ = make_prekey(
        carol.me.signing_key,
        "bob",
        PrekeyKind.SIGNED,
        1,
        int(NOW * 1000),
        backend=BACKEND,
        random=secrets.token_bytes,
    )
    bundle = PrekeyBundle("bob", bob.me.public_key, forged_spk)
    with pytest.raises(PrekeyError, match="does not verify with the bundle's identity key"):
        initiate(alice.me, "bob", bundle, now=NOW, check_peer=alice.check_peer, backend=BACKEND)


def test_tampered_prekey_is_refused() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    bundle = bob.bundle()
    opk = bundle.one_time_prekeys[0]
    ek = bytearray(opk.record.public_key)
    ek[10] ^= 1
    bad = SignedPrekey(dataclasses.replace(opk.record, public_key=bytes(ek)), opk.signature)
    bundle = dataclasses.replace(bundle, one_time_prekeys=(bad,))
    with pytest.raises(PrekeyError, match="one-time prekey #100"):
        initiate(alice.me, "bob", bundle, now=NOW, check_peer=alice.check_peer, backend=BACKEND)


def test_swapped_bundle_is_refused() -> None:
    """The server answers alice's request for bob with carol's genuine bundle, or a fake bob."""
    alice, bob, carol = User.make("alice"), User.make("bob"), User.make("carol")
    with pytest.raises(PrekeyError, match="asked for 'bob'"):
        initiate(
            alice.me, "bob", carol.bundle(), now=NOW, check_peer=alice.check_peer, backend=BACKEND
        )
    start(alice, bob)  # alice pins bob's key
    impostor = User.make("bob-impostor")
    fake = PrekeyBundle("bob", impostor.me.public_key, *_resign(impostor, "bob"))
    with pytest.raises(IdentityChangedError):
        initiate(alice.me, "bob", fake, now=NOW, check_peer=alice.check_peer, backend=BACKEND)


def _resign(user: User, owner: str) -> tuple[SignedPrekey]:
    spk, _ = make_prekey(
        user.me.signing_key,
        owner,
        PrekeyKind.SIGNED,
        1,
        int(NOW * 1000),
        backend=BACKEND,
        random=secrets.token_bytes,
    )
    return (spk,)


def test_stale_signed_prekey_and_future_prekey_are_refused() -> None:
    alice, bob = User.make("alice"), User.make("bob", now=NOW - 60 * DAY)
    with pytest.raises(PrekeyError, match="days old"):
        initiate(
            alice.me, "bob", bob.bundle(), now=NOW, check_peer=alice.check_peer, backend=BACKEND
        )
    future = User.make("bob", now=NOW + 3 * DAY)
    with pytest.raises(PrekeyError, match="future"):
        initiate(
            alice.me, "bob", future.bundle(), now=NOW, check_peer=alice.check_peer, backend=BACKEND
        )


def test_bundle_kind_confusion_is_refused() -> None:
    bob = User.make("bob")
    opk = bob.bundle().one_time_prekeys[0]
    bundle = PrekeyBundle("bob", bob.me.public_key, opk)
    with pytest.raises(PrekeyError, match="in the place of a SIGNED"):
        bundle.verify(BACKEND, int(NOW * 1000))


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("signature", b"\0" * 3309, MessageAuthError),
        ("signed_prekey_ciphertext", b"\1" * 1088, MessageAuthError),
        ("time_ms", 1, MessageAuthError),
        ("sender", "mallory", MessageAuthError),
        ("recipient", "carol", PrekeyError),
        ("one_time_prekey_id", 101, PrekeyError),
        ("signed_prekey_id", 2, PrekeyError),
    ],
)
def test_tampered_prekey_message_is_refused(field: str, value: Any, error: type[Exception]) -> None:
    alice, bob = User.make("alice"), User.make("bob")
    _, _, wire = start(alice, bob, None)
    message = dataclasses.replace(PrekeyMessage.parse(wire), **{field: value})
    keys = bob.responder(PrekeyMessage.parse(wire))
    with pytest.raises(error):
        respond(keys, message, now=NOW, check_peer=bob.check_peer, backend=BACKEND)


def test_prekey_message_from_an_impostor_of_a_pinned_contact() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    start(alice, bob)  # bob pins alice
    mallory = User.make("alice")  # same name, a key made from the same seed...
    mallory.me = dataclasses.replace(User.make("mallory").me, name="alice")
    a = initiate(
        mallory.me, "bob", bob.bundle(), now=NOW, check_peer=mallory.check_peer, backend=BACKEND
    )
    message = PrekeyMessage.parse(a.encrypt(b"hi", NOW))
    with pytest.raises(IdentityChangedError):
        respond(
            bob.responder(message), message, now=NOW, check_peer=bob.check_peer, backend=BACKEND
        )


def test_wrong_or_missing_qkd_key() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    key = qkd_key()
    a = initiate(
        alice.me,
        "bob",
        bob.bundle(),
        now=NOW,
        check_peer=alice.check_peer,
        qkd=key,
        backend=BACKEND,
    )
    message = PrekeyMessage.parse(a.encrypt(b"hi", NOW))
    with pytest.raises(QKDKeyMismatchError, match="missing"):
        respond(
            bob.responder(message), message, now=NOW, check_peer=bob.check_peer, backend=BACKEND
        )
    # A KME handing bob another key than alice's: the session derives other keys.
    b, _ = respond(
        bob.responder(message),
        message,
        now=NOW,
        check_peer=bob.check_peer,
        qkd_key=secrets.token_bytes(32),
        backend=BACKEND,
    )
    with pytest.raises(MessageAuthError):
        b.decrypt(RatchetMessage.parse(message.inner), NOW)


def test_prekey_message_hostile_parse() -> None:
    alice, bob = User.make("alice"), User.make("bob")
    _, _, wire = start(alice, bob, qkd_key())
    for cut in range(0, len(wire), 211):
        with pytest.raises(MessageFormatError):
            PrekeyMessage.parse(wire[:cut])
    assert PrekeyMessage.parse(wire).serialize() == wire
    record = PrekeyMessage.parse(wire)
    assert "alice" in repr(record) and "hybrid" in repr(record)
    with pytest.raises(ValueError):
        PrekeyRecord(PrekeyKind.SIGNED, 0, 0, b"")
