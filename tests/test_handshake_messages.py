"""Wire format: round trips, strictness, and hypothesis fuzzing of the parsers."""

from __future__ import annotations

import struct
import uuid
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall.exceptions import HandshakeError, InvalidMessageError, UnsupportedVersionError
from qcall.handshake import CalleeHandshake, HandshakeFailed, ReplayCache, State
from qcall.handshake.messages import (
    MAX_MESSAGE_SIZE,
    Answer,
    Confirm,
    Error,
    Message,
    MessageType,
    Offer,
    Rekey,
    RekeyAck,
    RekeyNack,
    parse_message,
)
from tests.test_handshake_support import ALICE, BOB, NOW, Pins, make_pair, new_qkd_key

KEY_ID = str(uuid.UUID(int=7))

OFFER = Offer(
    policy="hybrid",
    timestamp_ms=1_780_000_000_000,
    nonce=b"n" * 32,
    sas_commit=b"c" * 48,
    sender="alice",
    recipient="bob",
    sig_alg="ML-DSA-65",
    public_key=b"p" * 1952,
    kem_alg="ML-KEM-768",
    kem_ek=b"e" * 1184,
    srtp_profiles=("AEAD_AES_256_GCM", "AES128_CM_HMAC_SHA1_80"),
    kme_id="KME-Beijing",
    master_sae_id="SAE-alice",
    slave_sae_id="SAE-bob",
    qkd_key_ids=(KEY_ID,),
    qkd_key_size=32,
    sdp="v=0\r\n",
    signature=b"s" * 3309,
)
ANSWER = Answer(
    policy="hybrid",
    timestamp_ms=1,
    nonce=b"m" * 32,
    offer_nonce=b"n" * 32,
    sender="bob",
    sig_alg="ML-DSA-44",
    public_key=b"p" * 1312,
    kem_ct=b"c" * 1088,
    srtp_profile="AEAD_AES_256_GCM",
    sdp="",
    signature=b"s" * 2420,
)
SAMPLES: list[Message] = [
    OFFER,
    ANSWER,
    Confirm(
        epoch=3, role=2, tag=b"t" * 48, qkd_check=b"q" * 16, transcript_check=b"h" * 16,
        sas_reveal=b"",
    ),
    Confirm(
        epoch=0, role=1, tag=b"t" * 48, qkd_check=b"", transcript_check=b"h" * 16,
        sas_reveal=b"r" * 32,
    ),
    Rekey(epoch=1, qkd_key_ids=(KEY_ID,), qkd_key_size=32, kem_ek=b""),
    RekeyAck(epoch=1, kem_ct=b""),
    Error(code="bad_signature"),
    RekeyNack(epoch=1, code="qkd_unavailable", tag=b"t" * 48),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    data = message.serialize()
    assert data.startswith(b"QCHS\x02")
    assert parse_message(data) == message
    assert parse_message(data).serialize() == data  # canonical


def test_signed_part_is_prefix() -> None:
    data = OFFER.serialize()
    assert data == OFFER.signed_part() + struct.pack(">BH", 18, 3309) + b"s" * 3309


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"policy": "plain"}, "policy"),
        ({"nonce": b"short"}, "nonce"),
        ({"sender": "al ice"}, "sender"),
        ({"sender": "a" * 65}, "sender"),
        ({"sig_alg": "RSA"}, "sig_alg"),
        ({"public_key": b"p" * 100}, "public_key"),
        ({"signature": b"s" * 3308}, "signature"),
        ({"kem_ek": b"e" * 1183}, "kem_ek"),
        ({"srtp_profiles": ("NULL",)}, "srtp_profiles"),
        ({"qkd_key_ids": ("not-a-uuid",)}, "qkd_key_ids"),
        ({"qkd_key_ids": (KEY_ID, KEY_ID)}, "qkd_key_ids"),
        ({"qkd_key_ids": ()}, "qkd_key_ids"),
        ({"qkd_key_size": 8}, "qkd_key_size"),
        ({"kme_id": ""}, "kme_id"),
        ({"kme_id": "KME\nx"}, "kme_id"),
        ({"sdp": "v=0\x00"}, "sdp"),
        ({"policy": "pqc"}, "qkd_key_ids"),
    ],
)
def test_invalid_offer_fields_are_named(changes: dict[str, object], field: str) -> None:
    try:
        data = replace(OFFER, **changes).serialize()  # type: ignore[arg-type]
    except InvalidMessageError as exc:  # caught already when encoding
        assert repr(field) in str(exc)
        return
    with pytest.raises(InvalidMessageError, match=repr(field)):
        parse_message(data)


def test_structure_errors() -> None:
    data = OFFER.serialize()
    with pytest.raises(InvalidMessageError, match="trailing"):
        parse_message(data + b"\0")
    with pytest.raises(InvalidMessageError, match=r"truncated|missing"):
        parse_message(data[:-1])
    with pytest.raises(InvalidMessageError, match="expected field 'timestamp_ms'"):
        parse_message(data[:15] + b"\x09" + data[16:])
    with pytest.raises(UnsupportedVersionError):
        parse_message(b"QCHS\x07" + data[5:])
    with pytest.raises(InvalidMessageError, match="too long"):
        parse_message(b"QCHS\x02\x01" + bytes(MAX_MESSAGE_SIZE))
    with pytest.raises(InvalidMessageError, match="UTF-8"):
        parse_message(Error(code="x").serialize()[:-1] + b"\xff")
    with pytest.raises(InvalidMessageError, match="must be bytes"):
        parse_message("text")  # type: ignore[arg-type]


# --- fuzzing --------------------------------------------------------------------------------

VALID = [m.serialize() for m in SAMPLES]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "length" and pos + 2 < len(data):
            data[pos : pos + 2] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
    return bytes(data)


def _parse_or_qcall_error(data: bytes) -> None:
    try:
        message = parse_message(data)
    except (InvalidMessageError, UnsupportedVersionError):
        return
    assert parse_message(message.serialize()) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_qcall_errors(data: bytes) -> None:
    _parse_or_qcall_error(data)
    _parse_or_qcall_error(b"QCHS\x02" + data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_messages_only_raise_qcall_errors(data: bytes) -> None:
    _parse_or_qcall_error(data)


REAL_OFFER: list[bytes] = []


def _real_offer() -> bytes:
    if not REAL_OFFER:
        pair = make_pair("hybrid")
        pair.caller.send_offer("v=0\r\n", NOW, [new_qkd_key()])
        REAL_OFFER.extend(pair.caller.data_to_send())
    return REAL_OFFER[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_protocol_survives_mutated_offers(data: st.DataObject) -> None:
    offer = bytearray(_real_offer())
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(offer) - 1))
        offer[pos] ^= data.draw(st.integers(1, 255))
    callee = CalleeHandshake(
        BOB, "bob", check_peer=Pins(alice=ALICE.public_bytes()), replay_cache=ReplayCache()
    )
    callee.receive_data(bytes(offer), NOW)  # must never raise
    events = callee.events_received()
    if callee.state is State.FAILED:
        (failed,) = events
        assert isinstance(failed, HandshakeFailed) and isinstance(failed.error, HandshakeError)
        assert len(callee.data_to_send()) == 1


def test_docs_tables_match_the_schema() -> None:
    """docs/handshake.md §3 lists every field with its tag, encoding and size limits."""
    import re
    from pathlib import Path

    from qcall.handshake.messages import _CLASSES

    text = (Path(__file__).parent.parent / "docs" / "handshake.md").read_text()
    for type_code, cls in _CLASSES.items():
        title = MessageType(type_code).name  # e.g. REKEY_ACK
        section = text.split(f"#### {title} (type {int(type_code)})")[1].split("####")[0]
        rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (\w+) \| ([\d.]+) \|", section, re.M)
        assert [(int(t), n, k) for t, n, k, _ in rows] == [
            (f.tag, name, f.kind) for name, f in cls.SCHEMA.items()
        ]
        for (_, name, _, size), f in zip(rows, cls.SCHEMA.values(), strict=True):
            if f.kind in ("bytes", "text", "list"):
                expected = str(f.max_len) if f.min_len == f.max_len else f"{f.min_len}..{f.max_len}"
                assert size == expected, name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_protocol_survives_mutated_answers_and_later_messages(data: st.DataObject) -> None:
    """Mutated ANSWER at the caller, or mutated CONFIRM/REKEY at an established callee."""
    from tests.test_handshake_support import run_handshake, serve_qkd

    pair = make_pair("hybrid")
    pair.caller.send_offer("v=0\r\n", NOW, [key := new_qkd_key()])
    pair.qkd[key.key_id] = key.key
    pair.callee.receive_data(pair.caller.data_to_send()[0], NOW)
    serve_qkd(pair)
    pair.callee.send_answer("v=0\r\n", NOW)
    (answer,) = pair.callee.data_to_send()
    mutated_answer = bytearray(answer)
    pos = data.draw(st.integers(0, len(answer) - 1))
    mutated_answer[pos] ^= data.draw(st.integers(1, 255))
    pair.caller.receive_data(bytes(mutated_answer), NOW)  # must never raise
    assert pair.caller.state in (State.FAILED, State.EXPECT_KEY_MATERIAL)

    established = run_handshake(make_pair("pqc"))
    later = data.draw(st.sampled_from(VALID[2:]))  # CONFIRM, REKEY, REKEY_ACK, ERROR
    blob = bytearray(later)
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(0, 255))
    established.callee.receive_data(bytes(blob), NOW)  # must never raise
    for event in established.callee.events_received():
        if isinstance(event, HandshakeFailed):
            assert isinstance(event.error, HandshakeError)
