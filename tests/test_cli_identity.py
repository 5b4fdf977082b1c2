"""Tests for ``qcall identity`` and ``qcall contacts`` (through :func:`qcall.cli.main`)."""

from __future__ import annotations

import base64
import json
import logging
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm

from qcall import pqc
from qcall.cli import main
from qcall.contacts import ContactStore
from qcall.identity import IDENTITY_FILE, KEY_FILE, Identity, fingerprint


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _reset_logging() -> None:
    # main() calls logging.basicConfig; keep tests independent of each other.
    logging.getLogger().handlers.clear()


def test_identity_new_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "h"
    code, out, _ = run(capsys, "--home", str(home), "identity", "new", "--name", "alice")
    assert code == 0
    ident = Identity.load(home)
    assert ident.name == "alice" and ident.scheme is pqc.SignatureScheme.ML_DSA_65
    assert ident.fingerprint in out and "ML-DSA-65" in out
    assert stat.S_IMODE((home / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700

    code, out, _ = run(capsys, "--home", str(home), "identity", "show")
    assert code == 0 and ident.fingerprint in out and "alice" in out

    code, out, _ = run(capsys, "--home", str(home), "identity", "show", "--json")
    shown = json.loads(out)
    assert shown == {
        "name": "alice",
        "algorithm": "ML-DSA-65",
        "public_key": base64.b64encode(ident.public_key).decode(),
        "fingerprint": ident.fingerprint,
    }
    seed = (home / KEY_FILE).read_bytes()
    assert seed.hex() not in out and base64.b64encode(seed).decode() not in out


def test_identity_new_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path)
    assert run(capsys, "--home", home, "identity", "new", "--name", "alice")[0] == 0
    first = Identity.load(home).public_key
    code, _, err = run(capsys, "--home", home, "identity", "new", "--name", "alice")
    assert code == 1 and "--force" in err
    assert Identity.load(home).public_key == first
    code, _, _ = run(
        capsys,
        "--home",
        home,
        "identity",
        "new",
        "--name",
        "al",
        "--algorithm",
        "ML-DSA-87",
        "--force",
        "--seal-only",
    )
    assert code == 0
    again = Identity.load(home)
    assert again.public_key != first and again.scheme is pqc.SignatureScheme.ML_DSA_87


def test_identity_home_from_environment(
    qcall_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "identity", "new", "--name", "env")[0] == 0
    assert (qcall_home / IDENTITY_FILE).exists()


def test_identity_show_without_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--home", str(tmp_path), "identity", "show")
    assert code == 1 and out == ""
    assert "qcall identity new" in err


def test_identity_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--home", str(tmp_path), "identity", "new", "--name", " x")
    assert code == 1 and "whitespace" in err
    assert not (tmp_path / KEY_FILE).exists()


@pytest.fixture(params=list(pqc.BACKENDS))
def backend_without_mlkem(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """``QCALL_PQC_BACKEND`` set to each backend in turn, that backend lacking ML-KEM-768
    the way it would in the field; returns (backend, what its error must say).

    cryptography: an OpenSSL older than 3.5 raises ``UnsupportedAlgorithm``;
    oqs: a minimal liboqs build without ML-KEM-768 (over the stand-in liboqs-python).
    """
    monkeypatch.setenv("QCALL_PQC_BACKEND", request.param)
    monkeypatch.setattr(pqc, "_BACKENDS", {})
    if request.param == "cryptography":

        def unsupported(self: object, algorithm: pqc.KEM) -> pqc.KEMPrivateKey:
            raise UnsupportedAlgorithm("no ML-KEM in this OpenSSL")

        monkeypatch.setattr(pqc.PycaBackend, "kem_generate", unsupported)
        return request.param, "no ML-KEM/ML-DSA support; qcall needs OpenSSL >= 3.5 as bundled by "
    if request.param == "oqs":
        request.getfixturevalue("oqs_standin")
        pqc.get_backend("oqs")  # imports the stand-in liboqs-python
        monkeypatch.setattr(sys.modules["oqs.oqs"], "enabled_kems", ["ML-KEM-1024"])
        return request.param, "liboqs 0.16.0 was built without ML-KEM-768"
    raise AssertionError(f"no way to break backend {request.param!r} yet: add one here")


def test_startup_self_test_failure_is_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend_without_mlkem: tuple[str, str]
) -> None:
    backend, expected = backend_without_mlkem
    code, out, err = run(capsys, "--home", str(tmp_path), "identity", "new", "--name", "alice")
    assert code == 1 and out == ""
    assert err.startswith("qcall: error: ") and expected in err
    if backend == "cryptography":
        assert "pip install -U 'cryptography>=48'" in err
    assert not (tmp_path / KEY_FILE).exists()
    # Commands without post-quantum crypto still work.
    code, out, _ = run(capsys, "--home", str(tmp_path), "contacts", "list")
    assert code == 0 and "No contacts" in out


# --- contacts -----------------------------------------------------------------------------


@pytest.fixture
def bob_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """``identity show --json`` of a second user, saved as a file."""
    bob_home = tmp_path / "bob"
    assert run(capsys, "--home", str(bob_home), "identity", "new", "--name", "bob")[0] == 0
    code, out, _ = run(capsys, "--home", str(bob_home), "identity", "show", "--json")
    assert code == 0
    path = tmp_path / "bob.json"
    path.write_text(out)
    return path


def test_contacts_pin_list_show_verify_forget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bob_file: Path
) -> None:
    home = str(tmp_path / "alice")
    bob = json.loads(bob_file.read_text())

    code, out, _ = run(capsys, "--home", home, "contacts", "list")
    assert code == 0 and "No contacts" in out

    code, out, _ = run(capsys, "--home", home, "contacts", "pin", "bob", "--key", str(bob_file))
    assert code == 0 and bob["fingerprint"] in out and "UNVERIFIED" in out

    code, out, _ = run(capsys, "--home", home, "contacts", "list")
    assert "bob" in out and "UNVERIFIED" in out and bob["fingerprint"] in out
    code, out, _ = run(capsys, "--home", home, "contacts", "list", "--json")
    listed = json.loads(out)
    assert [c["name"] for c in listed] == ["bob"] and listed[0]["verified"] is False
    assert listed[0]["public_key"] == bob["public_key"]

    # Non-interactive verify without --yes refuses.
    code, _, err = run(capsys, "--home", home, "contacts", "verify", "bob")
    assert code == 1 and "--yes" in err
    code, out, _ = run(capsys, "--home", home, "contacts", "verify", "bob", "--yes")
    assert code == 0 and "now verified" in out
    code, out, _ = run(capsys, "--home", home, "contacts", "show", "bob", "--json")
    assert json.loads(out)["verified"] is True
    code, out, _ = run(capsys, "--home", home, "contacts", "show", "bob")
    assert "verified" in out and bob["fingerprint"] in out

    code, out, _ = run(capsys, "--home", home, "contacts", "forget", "bob")
    assert code == 0 and "Forgot bob" in out
    code, _, err = run(capsys, "--home", home, "contacts", "remove", "bob")
    assert code == 1 and "no contact named 'bob'" in err
    code, _, err = run(capsys, "--home", home, "contacts", "show", "bob")
    assert code == 1 and "no contact named 'bob'" in err


def test_contacts_pin_formats_and_changed_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "alice")
    first = Identity.generate("carol")
    raw, b64 = tmp_path / "carol.raw", tmp_path / "carol.b64"
    raw.write_bytes(first.public_key)
    b64.write_text(base64.encodebytes(first.public_key).decode())  # wrapped lines
    assert run(capsys, "--home", home, "contacts", "pin", "carol", "--key", str(raw))[0] == 0
    code, out, _ = run(capsys, "--home", home, "contacts", "pin", "carol", "--key", str(b64))
    assert code == 0 and first.fingerprint in out

    other = tmp_path / "other.raw"
    new_key = Identity.generate("carol").public_key
    other.write_bytes(new_key)
    code, _, err = run(capsys, "--home", home, "contacts", "pin", "carol", "--key", str(other))
    assert code == 1 and "HAS CHANGED" in err and fingerprint(new_key) in err
    assert "qcall contacts forget carol" in err
    code, _, _ = run(
        capsys,
        "--home",
        home,
        "contacts",
        "pin",
        "carol",
        "--key",
        str(other),
        "--force",
        "--verified",
    )
    assert code == 0
    contact = ContactStore.in_home(home).get("carol")
    assert contact is not None and contact.public_key == new_key and contact.verified


def test_contacts_pin_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "alice")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "--home", home, "contacts", "pin", "x", "--key", str(junk))
    assert code == 1 and "not an ML-DSA public key" in err
    code, _, err = run(
        capsys, "--home", home, "contacts", "pin", "x", "--key", str(tmp_path / "nope")
    )
    assert code == 1 and "cannot read" in err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"name": "x", "algorithm": "ML-DSA-65", "public_key": "AAAA"}')
    code, _, err = run(capsys, "--home", home, "contacts", "pin", "x", "--key", str(bad_json))
    assert code == 1 and "public_key" in err


def test_contacts_pin_raw_key_starting_with_a_brace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A raw key whose first byte is ``{`` (1 in 256) is a key, not broken identity JSON."""
    for _ in range(5000):
        identity = Identity.generate("dave")
        if identity.public_key.startswith(b"{"):
            break
    else:  # pragma: no cover - (255/256)**5000 < 1e-8
        raise AssertionError("no key starting with '{' in 5000")
    raw = tmp_path / "dave.raw"
    raw.write_bytes(identity.public_key)
    code, out, err = run(
        capsys, "--home", str(tmp_path / "alice"), "contacts", "pin", "dave", "--key", str(raw)
    )
    assert code == 0, err
    assert identity.fingerprint in out


def test_contacts_corrupt_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "contacts.json").write_text("[]")
    code, _, err = run(capsys, "--home", str(tmp_path), "contacts", "list")
    assert code == 1 and "corrupt" in err and "contacts.json" in err


def test_help_is_fast_and_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qcall", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "identity" in out.stdout and "contacts" in out.stdout
    assert "cryptography.hazmat.primitives.asymmetric.mlkem" not in out.stderr


@pytest.mark.parametrize("algorithm", ["ML-DSA-44", "ML-DSA-87"])
def test_identity_that_cannot_log_in_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    # The signaling server registers ML-DSA-65 only: such an identity could never call.
    home = str(tmp_path)
    code, _, err = run(capsys, "--home", home, "identity", "new", "--name", "al",
                       "--algorithm", algorithm)  # fmt: skip
    assert code == 1 and "ML-DSA-65" in err and "--seal-only" in err
    assert not Identity.exists(home)
