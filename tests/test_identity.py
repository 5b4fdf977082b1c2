"""Tests for :mod:`qcall.identity`."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall import pqc
from qcall.exceptions import (
    ConfigError,
    IdentityError,
    IdentityNotFoundError,
    InvalidKeyError,
    QCallError,
)
from qcall.identity import (
    IDENTITY_FILE,
    KEY_FILE,
    Identity,
    fingerprint,
    identity_from_json,
    scheme_for_public_key,
    validate_name,
)

SEED = bytes(range(32))


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.from_seed("alice", pqc.SignatureScheme.ML_DSA_65, SEED)


def test_fingerprint_definition() -> None:
    pk = b"\x01" * 1952
    fp = fingerprint(pk)
    groups = fp.split(" ")
    assert len(groups) == 13 and all(len(g) == 4 for g in groups)
    expected = base64.b32encode(hashlib.sha256(pk).digest()).decode().rstrip("=")
    assert fp.replace(" ", "") == expected
    assert fingerprint(b"\x02" * 1952) != fp


def test_generate_defaults_to_ml_dsa_65() -> None:
    ident = Identity.generate("alice")
    assert ident.scheme is pqc.SignatureScheme.ML_DSA_65
    assert len(ident.public_key) == 1952
    assert ident.fingerprint == fingerprint(ident.public_key)
    sig = ident.sign(b"hello", b"ctx")
    assert ident.verify(sig, b"hello", b"ctx")
    assert not ident.verify(sig, b"hello", b"")


@pytest.mark.parametrize("scheme", list(pqc.SignatureScheme), ids=lambda s: s.value)
def test_save_load_roundtrip(tmp_path: Path, scheme: pqc.SignatureScheme) -> None:
    ident = Identity.generate("bob", scheme)
    ident.save(tmp_path)
    loaded = Identity.load(tmp_path)
    assert (loaded.name, loaded.scheme, loaded.public_key) == ("bob", scheme, ident.public_key)
    assert loaded.fingerprint == ident.fingerprint
    assert loaded.verify(ident.sign(b"m"), b"m")


def test_file_modes_and_contents(tmp_path: Path, alice: Identity) -> None:
    alice.save(tmp_path)
    key_file, public_file = tmp_path / KEY_FILE, tmp_path / IDENTITY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_file.stat().st_mode) == 0o644
    assert key_file.read_bytes() == SEED  # the seed only, raw
    public = json.loads(public_file.read_text())
    assert public["name"] == "alice" and public["algorithm"] == "ML-DSA-65"
    assert base64.b64decode(public["public_key"]) == alice.public_key
    assert SEED.hex() not in public_file.read_text()
    assert base64.b64encode(SEED).decode() not in public_file.read_text()


def test_repr_and_errors_never_show_secret(alice: Identity) -> None:
    text = repr(alice)
    assert "alice" in text and alice.fingerprint in text
    for secret in (SEED.hex(), repr(SEED), base64.b64encode(SEED).decode()):
        assert secret not in text
    assert SEED.hex() not in repr(alice.signing_key)


def test_save_refuses_to_overwrite(tmp_path: Path, alice: Identity) -> None:
    alice.save(tmp_path)
    other = Identity.generate("alice")
    with pytest.raises(IdentityError, match="--force"):
        other.save(tmp_path)
    assert Identity.load(tmp_path).public_key == alice.public_key
    other.save(tmp_path, overwrite=True)
    assert Identity.load(tmp_path).public_key == other.public_key


def test_load_missing(tmp_path: Path, alice: Identity) -> None:
    with pytest.raises(IdentityNotFoundError, match="qcall identity new"):
        Identity.load(tmp_path)
    alice.save(tmp_path)
    (tmp_path / KEY_FILE).unlink()
    with pytest.raises(IdentityNotFoundError, match=KEY_FILE):
        Identity.load(tmp_path)


def test_load_rejects_loose_key_mode(tmp_path: Path, alice: Identity) -> None:
    alice.save(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load(tmp_path)


def test_load_rejects_wrong_seed_length(tmp_path: Path, alice: Identity) -> None:
    alice.save(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(SEED + b"\n")
    with pytest.raises(InvalidKeyError, match="32-byte seed, found 33"):
        Identity.load(tmp_path)


def test_load_rejects_mismatched_pair(tmp_path: Path, alice: Identity) -> None:
    alice.save(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(bytes(32))
    with pytest.raises(InvalidKeyError, match="does not match the public key"):
        Identity.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"algorithm": "RSA-2048"}, "algorithm"),
        ({"public_key": "!!!"}, "public_key"),
        ({"public_key": base64.b64encode(b"x" * 10).decode()}, "public_key"),
        ({"public_key": 5}, "public_key"),
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"version": 2}, "version"),
        ({"fingerprint": "AAAA"}, "fingerprint"),
    ],
)
def test_identity_json_bad_fields_are_named(
    alice: Identity, change: dict[str, object], field: str
) -> None:
    obj: dict[str, object] = {**alice.to_public_dict(), **change}
    with pytest.raises(QCallError, match=field):
        identity_from_json(json.dumps(obj))


def test_identity_json_accepts_show_output(alice: Identity) -> None:
    name, scheme, pk = identity_from_json(json.dumps(alice.to_public_dict()))
    assert (name, scheme, pk) == ("alice", alice.scheme, alice.public_key)


def test_scheme_for_public_key() -> None:
    for scheme in pqc.SignatureScheme:
        assert scheme_for_public_key(bytes(scheme.sizes.public_key)) is scheme
    with pytest.raises(InvalidKeyError, match="public_key: 100 bytes"):
        scheme_for_public_key(bytes(100))


@pytest.mark.parametrize("name", ["", " x", "x ", "a" * 65, "tab\there", "nul\x00", 7])
def test_validate_name_rejects(name: object) -> None:
    with pytest.raises(ConfigError, match="name"):
        validate_name(name)


def test_validate_name_accepts() -> None:
    for name in ("alice", "Bob Smith", "张伟", "a" * 64, "x@example.org"):
        assert validate_name(name) == name


# --- hostile files ------------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_random_identity_json_only_qcall_errors(
    tmp_path: Path, alice: Identity, data: bytes
) -> None:
    alice.save(tmp_path, overwrite=True)
    (tmp_path / IDENTITY_FILE).write_bytes(data)
    with pytest.raises(QCallError):
        Identity.load(tmp_path)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), value=st.integers(0, 255), cut=st.booleans())
def test_mutated_identity_files_only_qcall_errors(
    tmp_path: Path, alice: Identity, position: int, value: int, cut: bool
) -> None:
    alice.save(tmp_path, overwrite=True)
    target = tmp_path / (KEY_FILE if position % 2 else IDENTITY_FILE)
    data = bytearray(target.read_bytes())
    i = position % len(data)
    if cut:
        del data[i:]
    else:
        data[i] = value
    target.write_bytes(bytes(data))
    try:
        loaded = Identity.load(tmp_path)
    except QCallError:
        return
    # A mutation that still loads must not have changed the key pair.
    assert loaded.public_key == alice.public_key
    assert loaded.signing_key.seed_bytes() == SEED
