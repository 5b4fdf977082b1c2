"""Tests for :mod:`qcall.contacts`."""

from __future__ import annotations

import json
import logging
import multiprocessing
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall import pqc
from qcall.contacts import CONTACTS_FILE, Contact, ContactStore, parse_contacts
from qcall.exceptions import (
    ConfigError,
    IdentityChangedError,
    InvalidKeyError,
    QCallError,
    UnknownIdentityError,
)
from qcall.identity import fingerprint


def _pk(i: int, scheme: pqc.SignatureScheme = pqc.SignatureScheme.ML_DSA_65) -> bytes:
    key = pqc.get_backend("cryptography").signing_from_seed(scheme, bytes([i]) * 32)
    return key.public_bytes()


BOB, BOB2, CAROL = _pk(1), _pk(2), _pk(3, pqc.SignatureScheme.ML_DSA_44)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> ContactStore:
    return ContactStore(tmp_path / CONTACTS_FILE, clock=Clock())


def test_tofu_pins_and_warns(store: ContactStore, caplog: pytest.LogCaptureFixture) -> None:
    assert store.get("bob") is None and store.list() == []
    with caplog.at_level(logging.WARNING, logger="qcall.contacts"):
        store.check_peer("bob", BOB)
    assert "UNVERIFIED" in caplog.text and fingerprint(BOB) in caplog.text
    contact = store.get("bob")
    assert isinstance(contact, Contact)
    assert contact.public_key == BOB and not contact.verified
    assert contact.scheme is pqc.SignatureScheme.ML_DSA_65
    assert contact.first_seen == 1_700_000_001.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcall.contacts"):
        store.check_peer("bob", BOB)  # same key: silent
    assert caplog.text == ""


def test_changed_key_is_loud_and_changes_nothing(store: ContactStore) -> None:
    store.check_peer("bob", BOB)
    before = store.path.read_bytes()
    with pytest.raises(IdentityChangedError) as info:
        store.check_peer("bob", BOB2)
    message = str(info.value)
    assert fingerprint(BOB) in message and fingerprint(BOB2) in message
    assert "qcall contacts forget bob" in message and "CHANGED" in message
    assert store.path.read_bytes() == before
    # After forgetting (user compared the SAS), the new key is pinned.
    store.remove("bob")
    store.check_peer("bob", BOB2)
    contact = store.get("bob")
    assert contact is not None and contact.public_key == BOB2


def test_strict_mode_refuses_unknown(tmp_path: Path) -> None:
    strict = ContactStore(tmp_path / CONTACTS_FILE, strict=True)
    with pytest.raises(UnknownIdentityError, match="qcall contacts pin bob"):
        strict.check_peer("bob", BOB)
    assert strict.get("bob") is None
    strict.pin("bob", BOB)
    strict.check_peer("bob", BOB)
    with pytest.raises(IdentityChangedError):
        strict.check_peer("bob", BOB2)


def test_mark_verified(store: ContactStore) -> None:
    store.check_peer("bob", BOB)
    contact = store.mark_verified("bob")
    assert contact.verified and contact.verified_at is not None
    assert store.get("bob") == contact
    assert store.mark_verified("bob") == contact  # idempotent
    with pytest.raises(UnknownIdentityError, match="carol"):
        store.mark_verified("carol")


def test_pin_and_remove(store: ContactStore) -> None:
    contact = store.pin("carol", CAROL, verified=True)
    assert contact.verified and contact.scheme is pqc.SignatureScheme.ML_DSA_44
    assert store.pin("carol", CAROL) == contact  # same key: unchanged
    with pytest.raises(IdentityChangedError):
        store.pin("carol", BOB)
    replaced = store.pin("carol", BOB, replace=True)
    assert replaced.public_key == BOB and not replaced.verified
    assert [c.name for c in store.list()] == ["carol"]
    assert store.remove("carol").public_key == BOB
    with pytest.raises(UnknownIdentityError):
        store.remove("carol")


def test_bad_inputs_are_typed(store: ContactStore) -> None:
    with pytest.raises(InvalidKeyError):
        store.check_peer("bob", b"short")
    with pytest.raises(ConfigError, match="contact name"):
        store.check_peer("", BOB)
    with pytest.raises(ConfigError, match="contact name"):
        store.check_peer("x\n", BOB)
    assert not store.path.exists()


def test_file_mode_and_format(store: ContactStore) -> None:
    store.check_peer("bob", BOB)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    lock = store.path.with_name(CONTACTS_FILE + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    obj = json.loads(store.path.read_text())
    assert obj["version"] == 1
    assert obj["contacts"]["bob"]["fingerprint"] == fingerprint(BOB)
    assert obj["contacts"]["bob"]["algorithm"] == "ML-DSA-65"


def test_repr_is_short(store: ContactStore) -> None:
    store.check_peer("bob", BOB)
    contact = store.get("bob")
    assert contact is not None
    assert BOB.hex()[:32] not in repr(contact) and "bob" in repr(contact)


def test_corrupt_file_is_clear_error(store: ContactStore) -> None:
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        store.list()
    with pytest.raises(ConfigError, match="corrupt"):
        store.check_peer("bob", BOB)
    assert store.path.read_text() == "{not json"  # never silently replaced


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e.update(algorithm="ML-DSA-1"), "algorithm"),
        (lambda e: e.update(public_key="@@"), "public_key"),
        (lambda e: e.update(public_key=""), "public_key"),
        (lambda e: e.update(fingerprint="AAAA"), "fingerprint"),
        (lambda e: e.update(verified="yes"), "verified"),
        (lambda e: e.update(first_seen=float("nan")), "first_seen"),
        (lambda e: e.update(first_seen=True), "first_seen"),
        (lambda e: e.update(verified_at="now"), "verified_at"),
    ],
)
def test_corrupt_fields_are_named(store: ContactStore, mutate: object, field: str) -> None:
    store.check_peer("bob", BOB)
    obj = json.loads(store.path.read_text())
    mutate(obj["contacts"]["bob"])  # type: ignore[operator]
    store.path.write_text(json.dumps(obj))
    with pytest.raises(ConfigError, match=f"contacts.bob.{field}"):
        store.get("bob")


def _pin_many(path: str, prefix: str, count: int) -> None:
    store = ContactStore(path)
    for i in range(count):
        store.check_peer(f"{prefix}{i}", BOB)


def test_two_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / CONTACTS_FILE)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_pin_many, args=(path, p, 25)) for p in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    names = {c.name for c in ContactStore(path).list()}
    assert names == {f"{p}{i}" for p in ("a", "b") for i in range(25)}


# --- hostile files --------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_config_error(data: bytes) -> None:
    try:
        parse_contacts(data)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(value=_json_values, entry=_json_values, version=st.sampled_from([1, 2, "1", None]))
def test_random_json_only_config_error(value: object, entry: object, version: object) -> None:
    for obj in (
        value,
        {"version": version, "contacts": value},
        {"version": 1, "contacts": {"x": entry}},
    ):
        try:
            parse_contacts(json.dumps(obj).encode())
        except ConfigError:
            pass


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), value=st.integers(0, 255), cut=st.booleans())
def test_mutated_store_only_qcall_errors(
    tmp_path: Path, position: int, value: int, cut: bool
) -> None:
    store = ContactStore(tmp_path / CONTACTS_FILE)
    store.path.unlink(missing_ok=True)
    store.pin("bob", BOB)
    store.pin("carol", CAROL, verified=True)
    data = bytearray(store.path.read_bytes())
    i = position % len(data)
    if cut:
        del data[i:]
    else:
        data[i] = value
    store.path.write_bytes(bytes(data))
    try:
        contacts = store.list()
        store.check_peer("bob", BOB)
    except QCallError:
        return
    for contact in contacts:  # whatever still parses is self-consistent
        assert contact.fingerprint == fingerprint(contact.public_key)


def test_other_writers_are_seen(tmp_path: Path) -> None:
    """The parsed-file cache follows writes by other instances (or processes)."""
    one, two = ContactStore(tmp_path / CONTACTS_FILE), ContactStore(tmp_path / CONTACTS_FILE)
    one.check_peer("bob", BOB)
    assert two.get("bob") is not None and one.get("carol") is None
    two.pin("carol", CAROL)
    assert one.get("carol") is not None
    two.remove("bob")
    assert one.get("bob") is None
    one.check_peer("bob", BOB2)  # forgotten elsewhere: pinned afresh here
    assert two.get("bob") is not None and two.get("bob").public_key == BOB2  # type: ignore[union-attr]
