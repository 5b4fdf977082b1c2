"""ETSI GS QKD 014 data formats: parsers, serializers and hostile input."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from qcall.exceptions import KMEBadRequestError, KMEResponseError, QCallError
from qcall.qkd.etsi014 import (
    KeyContainer,
    KeyRequest,
    KeyStatus,
    QKDKey,
    key_ids_json,
    parse_error,
    parse_key_container,
    parse_key_ids,
    parse_key_request,
    parse_status,
    validate_key_id,
    validate_sae_id,
)
from qcall.typing import KeyId, SAEId

KEY = bytes(range(32))
KID = KeyId(str(uuid.uuid4()))

# Clause 6.1 Status, with every field.
STATUS = {
    "source_KME_ID": "AAAABBBBCCCCDDDD",
    "target_KME_ID": "EEEEFFFFGGGGHHHH",
    "master_SAE_ID": "IIIIJJJJKKKKLLLL",
    "slave_SAE_ID": "MMMMNNNNOOOOPPPP",
    "key_size": 352,
    "stored_key_count": 25000,
    "max_key_count": 100000,
    "max_key_per_request": 128,
    "max_key_size": 1024,
    "min_key_size": 64,
    "max_SAE_ID_count": 0,
}


def test_qkd_key_repr_hides_key() -> None:
    key = QKDKey(KID, KEY)
    for text in (repr(key), str(key), f"{key}"):
        assert KEY.hex() not in text
        assert base64.b64encode(KEY).decode() not in text
        assert KID in text
    assert key.size_bits == 256
    assert len(key.fingerprint) == 16


def test_status_roundtrip_and_alarm() -> None:
    status = parse_status(STATUS)
    assert status.key_size == 352 and status.max_sae_id_count == 0
    assert status.to_json() == STATUS
    assert status.alarm is None and status.qber is None
    alarmed = parse_status({**STATUS, "status_extension": {"alarm": "link X", "qber": 0.25}})
    assert alarmed.alarm == "link X" and alarmed.qber == 0.25


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key_size", "256"),
        ("key_size", 0),
        ("stored_key_count", -1),
        ("max_key_count", True),
        ("source_KME_ID", 5),
        ("status_extension", []),
    ],
)
def test_status_bad_field(field: str, value: object) -> None:
    with pytest.raises(KMEResponseError, match=field):
        parse_status({**STATUS, field: value})


def test_status_missing_field() -> None:
    data = dict(STATUS)
    del data["max_key_per_request"]
    with pytest.raises(KMEResponseError, match="max_key_per_request is missing"):
        parse_status(data)
    with pytest.raises(KMEResponseError, match="min_key_size exceeds"):
        parse_status({**STATUS, "min_key_size": 2048})


def test_key_container_roundtrip() -> None:
    keys = tuple(QKDKey(KeyId(str(uuid.uuid4())), bytes([i]) * 32) for i in range(3))
    container = KeyContainer(keys, {"x": 1})
    data = json.loads(json.dumps(container.to_json()))
    assert set(data) == {"keys", "key_container_extension"}
    assert set(data["keys"][0]) == {"key_ID", "key"}
    parsed = parse_key_container(data, expected_number=3, expected_size=256)
    assert parsed == container
    # dec_keys: reordered to the order we asked for
    wanted = [keys[2].key_id, keys[0].key_id, keys[1].key_id]
    assert [k.key_id for k in parse_key_container(data, expected_ids=wanted).keys] == wanted


def _container(*entries: dict[str, object]) -> dict[str, object]:
    return {"keys": list(entries)}


def _entry(kid: str = KID, key: bytes = KEY) -> dict[str, object]:
    return {"key_ID": kid, "key": base64.b64encode(key).decode()}


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        ([], {}, "Key container must be a JSON object"),
        ({}, {}, "keys is missing"),
        ({"keys": {}}, {}, "keys must be an array"),
        (_container({"key_ID": "nope", "key": "AAAA"}), {}, r"keys\[0\].key_ID .* not a UUID"),
        (_container({"key_ID": KID, "key": "!!!"}), {}, r"keys\[0\].key is not valid base64"),
        (_container({"key_ID": KID, "key": 5}), {}, r"keys\[0\].key must be"),
        (_container({"key_ID": KID, "key": ""}), {}, r"keys\[0\].key is empty"),
        (_container(_entry(), _entry()), {}, "twice"),
        (_container(_entry()), {"expected_number": 2}, "returned 1 keys, requested 2"),
        (_container(_entry(key=KEY[:16])), {"expected_size": 256}, "128 bits, requested 256"),
        (_container(_entry()), {"expected_ids": [KeyId(str(uuid.uuid4()))]}, "did not return"),
        (
            _container(_entry(), _entry(str(uuid.uuid4()))),
            {"expected_ids": [KID]},
            "not requested",
        ),
    ],
)
def test_key_container_errors(data: object, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(KMEResponseError, match=match):
        parse_key_container(data, **kwargs)  # type: ignore[arg-type]


def test_key_container_messages_never_contain_keys() -> None:
    with pytest.raises(KMEResponseError) as info:
        parse_key_container(_container(_entry(key=KEY[:16])), expected_size=256)
    assert base64.b64encode(KEY[:16]).decode() not in str(info.value)


def test_key_request() -> None:
    assert parse_key_request({}) == KeyRequest()
    req = parse_key_request(
        {
            "number": 3,
            "size": 1024,
            "additional_slave_SAE_IDs": ["ABCDEFG", "HIJKLMN"],
            "extension_mandatory": [{"abc_route_type": "direct"}],
            "extension_optional": [{"abc_max_age": 30000}],
        }
    )
    assert req.number == 3 and req.size == 1024
    assert req.additional_slave_sae_ids == ("ABCDEFG", "HIJKLMN")
    assert parse_key_request(req.to_json()) == req


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "Key request must be a JSON object"),
        ({"number": 0}, "number must be at least 1"),
        ({"number": "2"}, "number must be an integer"),
        ({"number": 1.5}, "number must be an integer"),
        ({"size": -8}, "size must be at least 1"),
        ({"additional_slave_SAE_IDs": "x"}, "additional_slave_SAE_IDs must be an array"),
        ({"additional_slave_SAE_IDs": ["a/b"]}, r"additional_slave_SAE_IDs\[0\]"),
        ({"extension_mandatory": [1]}, r"extension_mandatory\[0\]"),
    ],
)
def test_key_request_errors(data: object, match: str) -> None:
    with pytest.raises(KMEBadRequestError, match=match) as info:
        parse_key_request(data)
    assert info.value.status == 400
    assert info.value.message == str(info.value)  # goes back as the Error "message"


def test_key_ids() -> None:
    ids = [KeyId(str(uuid.uuid4())) for _ in range(3)]
    assert parse_key_ids(key_ids_json(ids)) == tuple(ids)
    upper = {"key_IDs": [{"key_ID": ids[0].upper(), "key_ID_extension": {}}]}
    assert parse_key_ids(upper) == (ids[0],)  # canonical lower-case form


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "key_IDs is missing"),
        ({"key_IDs": []}, "key_IDs is empty"),
        ({"key_IDs": [{"key_ID": "x"}]}, r"key_IDs\[0\].key_ID"),
        ({"key_IDs": [{}]}, r"key_IDs\[0\].key_ID"),
        ({"key_IDs": [{"key_ID": KID}, {"key_ID": KID}]}, "duplicate key_ID"),
    ],
)
def test_key_ids_errors(data: object, match: str) -> None:
    with pytest.raises(KMEBadRequestError, match=match):
        parse_key_ids(data)


def test_parse_error_is_lenient() -> None:
    assert parse_error({"message": "bad", "details": [{"a": 1}]}) == ("bad", [{"a": 1}])
    assert parse_error({"message": 5}) == (None, [])
    assert parse_error("x") == (None, [])
    message, details = parse_error({"message": "m" * 1000, "details": list(range(100))})
    assert len(message or "") == 300 and len(details) == 20


def test_ids() -> None:
    assert validate_sae_id("SAE_A-1.x") == SAEId("SAE_A-1.x")
    for bad in ("", "a/b", "../x", "-a", "a b", "x" * 129, 5):
        with pytest.raises(ValueError):
            validate_sae_id(bad)
    assert validate_key_id(KID.upper()) == KID
    with pytest.raises(ValueError, match="not a UUID"):
        validate_key_id("123")


def test_key_status_to_json_omits_empty_extension() -> None:
    status = KeyStatus("A", "B", SAEId("a"), SAEId("b"), 256, 0, 1, 1, 256, 256, 0)
    assert "status_extension" not in status.to_json()


# --- hostile input: only qcall errors come out ---------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
FIELD = st.sampled_from(
    [
        "keys",
        "key_ID",
        "key",
        "key_IDs",
        "number",
        "size",
        "key_size",
        "additional_slave_SAE_IDs",
        "extension_mandatory",
        "status_extension",
        "message",
        "details",
    ]
)
SPECISH = st.recursive(
    JSON,
    lambda children: (
        st.dictionaries(FIELD, children, max_size=5)
        | st.lists(st.dictionaries(FIELD, children, max_size=3), max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(SPECISH)
def test_parsers_raise_only_qcall_errors(data: object) -> None:
    for parser in (parse_status, parse_key_container, parse_key_request, parse_key_ids):
        try:
            parser(data)
        except QCallError:
            pass
    parse_error(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "key_ID": st.one_of(st.uuids().map(str), st.text(max_size=40)),
                "key": st.one_of(
                    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                    st.text(max_size=40),
                ),
            }
        ),
        max_size=5,
    ),
    st.integers(0, 6),
    st.sampled_from([None, 8, 256]),
)
def test_key_container_hostile(
    entries: list[dict[str, str]], number: int, size: int | None
) -> None:
    try:
        container = parse_key_container(
            {"keys": entries}, expected_number=number, expected_size=size
        )
    except KMEResponseError:
        return
    assert len(container.keys) == number
    assert len({k.key_id for k in container.keys}) == number
    assert all(size is None or k.size_bits == size for k in container.keys)
