"""Tests of qcall.signaling.messages: round trips, validation, hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall import identity, pqc
from qcall.exceptions import SignalingAuthError, SignalingProtocolError
from qcall.signaling import messages as m

FP = "ab" * 48


@pytest.fixture(scope="module")
def key() -> pqc.SigningKey:
    return pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_65)


def challenge() -> m.Challenge:
    return m.Challenge(bytes(range(32)), "server-1", 1_700_000_000)


SERVER_SAMPLES: list[m.Message] = [
    challenge(),
    m.Registered("alice", FP, (m.OnlinePeer("bob", FP),), ("call-0001",)),
    m.Registered("alice", FP),
    m.Presence("bob", FP, True),
    m.Presence("bob", FP, False),
    m.ErrorMessage("unavailable", "bob is offline", "call-0001", "invite"),
    m.ErrorMessage("bad_message"),
    m.Invite("call-0001", "bob", FP),
    m.Hangup("call-0001", "bob", FP, "peer lost"),
    m.Offer("call-0001", "bob", FP, payload='{"sdp": "v=0\\r\\n", "hs": "…"}'),
    m.ICECandidate("call-0001", "bob", FP, payload=""),
]

CLIENT_SAMPLES: list[m.Message] = [
    m.Invite("call-0001", peer="bob"),
    m.Ringing("call-0001"),
    m.Accept("call-0001"),
    m.Reject("call-0001", reason="not now"),
    m.Busy("call-0001"),
    m.Cancel("call-0001"),
    m.Hangup("call-0001"),
    m.Offer("call-0001", payload="x" * m.MAX_PAYLOAD_SIZE),
    m.Answer("call-0001", payload="é\u2028\x00"),
    m.ICECandidate("call-0001", payload="candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host"),
]


@pytest.mark.parametrize("msg", SERVER_SAMPLES, ids=lambda x: x.TYPE)
def test_server_messages_round_trip(msg: m.Message) -> None:
    text = msg.serialize()
    assert m.parse_server_message(text) == msg
    assert type(msg).parse(text) == msg
    assert json.loads(text)["type"] == msg.TYPE


@pytest.mark.parametrize("msg", CLIENT_SAMPLES, ids=lambda x: x.TYPE)
def test_client_messages_round_trip(msg: m.Message) -> None:
    assert m.parse_client_message(msg.serialize()) == msg


@pytest.mark.parametrize("cls", [m.Offer, m.Answer, m.ICECandidate])
def test_payloads_stay_out_of_reprs(cls: type[m.PayloadMessage]) -> None:
    text = repr(cls("call-0001", "bob", payload="secret-looking-payload"))
    assert "secret-looking-payload" not in text and "<22 chars>" in text


def test_payload_is_preserved_exactly() -> None:
    payload = '{"b":1,  "a":[2,3]}\n\t"quoted" \\ back\u00e9'
    relayed = m.parse_client_message(m.Offer("call-0001", payload=payload).serialize())
    assert isinstance(relayed, m.Offer)
    assert relayed.payload == payload


def test_register_signs_the_domain_separated_challenge(key: pqc.SigningKey) -> None:
    ch = challenge()
    reg = m.Register.create(key, "alice", ch)
    assert m.parse_client_message(reg.serialize()) == reg
    data = m.registration_data(ch.nonce, "alice", ch.server_id)
    assert data.startswith(b"\x00\x1bqcall-signaling-register-v1\x00\x20")
    backend = pqc.get_backend()
    assert backend.verify(pqc.SignatureScheme.ML_DSA_65, reg.public_key, reg.signature, data)
    # Another server id or name gives different signed data.
    assert m.registration_data(ch.nonce, "alice", "server-2") != data
    assert m.registration_data(ch.nonce, "alicf", ch.server_id) != data
    # Key bytes never show in the repr.
    assert reg.public_key.hex()[:32] not in repr(reg)
    assert m.fingerprint(reg.public_key)[:16] in repr(reg)


def test_fingerprint_is_the_identity_fingerprint(key: pqc.SigningKey) -> None:
    fp = m.fingerprint(key.public_bytes())
    assert fp == identity.fingerprint(key.public_bytes())
    assert m.Presence("alice", fp, True) == m.Presence.parse(
        m.Presence("alice", fp, True).serialize()
    )


def test_names_follow_the_identity_rules() -> None:
    for name in ["alice", "Alice Smith", "张伟", "o'brien", "a" * 64]:
        msg = m.Invite("call-0001", peer=name)
        assert m.parse_client_message(msg.serialize()) == msg
    with pytest.raises(ValueError, match="fingerprint"):
        m.Presence("alice", "short", True)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"type":"invite","call_id":"call-0001"}', "peer"),
        ('{"type":"invite","call_id":"short","peer":"bob"}', "call_id"),
        ('{"type":"invite","call_id":"call-0001","peer":" bob"}', "peer"),
        ('{"type":"invite","call_id":"call-0001","peer":"' + "b" * 65 + '"}', "peer"),
        ('{"type":"invite","call_id":"call-0001","peer":"b\\u0000b"}', "peer"),
        ('{"type":"invite","call_id":"call-0001","peer":""}', "peer"),
        ('{"type":"invite","call_id":"call-0001","peer":["bob"]}', "peer"),
        ('{"type":"hangup"}', "call_id"),
        ('{"type":"hangup","call_id":12345678}', "call_id"),
        ('{"type":"hangup","call_id":"call-0001","reason":"\\u0007"}', "reason"),
        ('{"type":"hangup","call_id":"call-0001","fingerprint":"' + FP + '"}', "fingerprint"),
        ('{"type":"offer","call_id":"call-0001"}', "payload"),
        ('{"type":"offer","call_id":"call-0001","payload":5}', "payload"),
        ('{"type":"offer","call_id":"call-0001","payload":"\\ud800"}', "payload"),
        ('{"type":"register","name":"alice","public_key":"AAAA","signature":"AAAA"}', "public_key"),
        ('{"type":"register","name":"alice","public_key":"!!","signature":"AAAA"}', "public_key"),
        ('{"type":"register","public_key":"AAAA","signature":"AAAA"}', "name"),
        ('{"type":"nope"}', "type"),
        ('{"type":7}', "type"),
        ("{}", "type"),
    ],
)
def test_bad_client_messages_name_the_field(text: str, field: str) -> None:
    with pytest.raises(SignalingProtocolError, match=field) as info:
        m.parse_client_message(text)
    assert info.value.code == "bad_message"


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(ValueError, match="payload"):
        m.Offer("call-0001", payload="é" * (m.MAX_PAYLOAD_SIZE // 2 + 1))


def test_register_algorithm_and_sizes(key: pqc.SigningKey) -> None:
    reg = m.Register.create(key, "alice", challenge())
    obj = json.loads(reg.serialize())
    with pytest.raises(SignalingProtocolError, match="algorithm"):
        m.parse_client_message(json.dumps({**obj, "algorithm": "ML-DSA-44"}))
    with pytest.raises(SignalingProtocolError, match="signature"):
        m.parse_client_message(json.dumps({**obj, "signature": obj["signature"][:-8]}))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        '"register"',
        "{",
        '{"type":"challenge","nonce":"AA==","server_id":"s","time":1}',
        '{"type":"offer","call_id":"call-0001","payload":NaN}',
        "[" * 100_000 + "]" * 100_000,
        '{"type":"invite","call_id":"call-0001","peer":"bob","x":' + "1" * 5000 + "}",
        b'{"type":"hangup","call_id":"call-0001"}',
    ],
)
def test_hostile_frames_raise_protocol_errors(text: str | bytes) -> None:
    with pytest.raises(SignalingProtocolError):
        m.parse_client_message(text)


def test_direction_is_enforced() -> None:
    # A client may not send server messages, and relayed call messages need the sender.
    with pytest.raises(SignalingProtocolError, match="unknown message type"):
        m.parse_client_message(challenge().serialize())
    with pytest.raises(SignalingProtocolError, match="fingerprint"):
        m.parse_server_message(m.Hangup("call-0001").serialize())
    with pytest.raises(SignalingProtocolError, match="expected a 'presence'"):
        m.Presence.parse(challenge().serialize())


def test_error_codes_map_to_exception_classes() -> None:
    exc = m.ErrorMessage("name_taken", "name registered with another key").exception()
    assert isinstance(exc, SignalingAuthError)
    assert exc.code == "name_taken"
    for code, (cls, meaning) in m.ERROR_CODES.items():
        assert m.error_for(code, "x").code == code
        assert isinstance(m.error_for(code, "x"), cls)
        assert meaning
    assert {"bad_message", "auth_failed", "rate_limited", "unavailable"} <= set(m.ERROR_CODES)


# --- fuzzing ---------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_field_names = st.sampled_from(
    [
        "type", "call_id", "peer", "fingerprint", "reason", "payload", "name", "public_key",
        "signature", "algorithm", "nonce", "server_id", "time", "version", "online", "calls",
        "code", "message", "ref",
    ]
)  # fmt: skip
_types = st.sampled_from([*m.CLIENT_MESSAGES, *m.SERVER_MESSAGES, "x"])
_objects = st.builds(
    lambda kind, rest: {"type": kind, **rest},
    _types,
    st.dictionaries(_field_names, _json_values | st.sampled_from(["call-0001", "bob", FP])),
)


def _parse_both(text: str | bytes) -> None:
    for parse in (m.parse_client_message, m.parse_server_message):
        try:
            msg = parse(text)
        except SignalingProtocolError:
            continue
        # Whatever parses, serializes and parses back to the same message.
        assert parse(msg.serialize()) == msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_objects)
def test_fuzz_structured(obj: dict[str, object]) -> None:
    _parse_both(json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=50))
def test_fuzz_raw(text: str | bytes) -> None:
    _parse_both(text)
