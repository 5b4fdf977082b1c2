"""Key hygiene of the whole suite: no key bytes in any log, exception or repr; 0600 files.

The work is done by the plugin :mod:`tests.hygiene` during the whole run; the
``run_last`` tests here run after every other test and fail on what it found.
The first tests check that the plugin really sees what it claims to see.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from qcall import config, pqc
from qcall.contacts import ContactStore
from qcall.exceptions import KMEError
from qcall.identity import Identity
from qcall.qkd.etsi014 import QKDKey
from qcall.qkd.pki import create_pki
from tests.hygiene import STATE, Hygiene, redact, secret_file_problems

logger = logging.getLogger("qcall.tests.hygiene")


def test_scanner_finds_every_encoding_and_nothing_else() -> None:
    hygiene = Hygiene()
    secret = os.urandom(32)
    hygiene.register("a test secret", secret)
    blob = os.urandom(7) + secret + os.urandom(5)  # inside a longer blob
    cases = {
        "hex": secret.hex(),
        "hex upper": secret.hex().upper(),
        "hex of the tail only": secret[-16:].hex(),
        "base64": base64.b64encode(secret).decode(),
        "urlsafe base64 in a blob": base64.urlsafe_b64encode(blob).decode(),
        "blob offset 1": base64.b64encode(os.urandom(1) + blob).decode(),
        "blob offset 2": base64.b64encode(os.urandom(2) + blob).decode(),
        "bytes repr": f"Key(key={secret!r})",
    }
    for name, text in cases.items():
        hygiene.capture(name, f"something {text} happened")
    found = hygiene.scan_pending()
    assert {f.where for f in found} == set(cases)
    assert all(f.kind == "a test secret" for f in found)
    assert {f.encoding for f in found} == {"hex", "base64", "a bytes repr"}
    # Unrelated key material, short prefixes and hashes are not findings.
    hygiene.capture("other", os.urandom(32).hex() + base64.b64encode(os.urandom(64)).decode())
    hygiene.capture("short", secret[:8].hex())
    hygiene.capture("hash", pqc.sha384(secret).hex())
    assert hygiene.scan_pending() == []
    # A finding never carries the secret.
    assert all(secret.hex() not in str(f) for f in found)
    assert "…" in redact(f"key {secret.hex()}") and secret.hex()[:12] not in redact(secret.hex())


def test_the_plugin_sees_logs_exceptions_and_reprs_of_real_objects() -> None:
    STATE.scan_pending()  # start clean
    before = STATE.secrets
    key = QKDKey("0b0f7a7e-6c4e-4c63-9b1f-2a7c3f0e9d11", os.urandom(32))  # type: ignore[arg-type]
    assert STATE.secrets == before + 1  # registered by the wrapped constructor
    shared, _ = pqc.get_backend().kem_encapsulate(
        pqc.KEM.ML_KEM_768, pqc.get_backend().kem_generate(pqc.KEM.ML_KEM_768).public_bytes()
    )
    logger.debug("the key is %s", key.key.hex())  # a DEBUG record of any logger
    KMEError("bad", details=[base64.b64encode(shared).decode()])  # never even raised
    try:
        raise ValueError("plain") from None
    except ValueError:
        logger.exception("a traceback with %r", shared)
    found = STATE.scan_pending()
    kinds = {(f.kind, f.encoding) for f in found}
    assert ("a QKD key", "hex") in kinds
    assert ("an ML-KEM shared secret", "base64") in kinds
    assert ("an ML-KEM shared secret", "a bytes repr") in kinds
    assert any("KMEError" in f.where for f in found)
    assert any("qcall.tests.hygiene" in f.where for f in found)
    assert all(f.test.endswith("test_the_plugin_sees_logs_exceptions_and_reprs_of_real_objects")
               for f in found)  # fmt: skip
    for f in found:  # planted on purpose: not a leak of the suite
        STATE.findings.remove(f)


def test_the_plugin_sees_secret_files(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir(mode=0o700)
    Identity.generate("alice").save(tmp_path / "home")
    ContactStore.in_home(tmp_path / "home").pin("bob", Identity.generate("bob").public_key)
    pki = create_pki(tmp_path / "pki", ["KME-A"], ["alice"])
    written = {p for p in STATE.private_files if tmp_path in p.parents}
    names = {p.name for p in written}
    assert {"identity.key", "contacts.json", "alice.key", "KME-A.key"} <= names
    assert pki.saes["alice"].key.resolve() in written
    assert not [p for p in secret_file_problems() if str(tmp_path) in p]
    # A private file written world-readable by qcall code is reported ...
    loose = tmp_path / "loose.key"
    config.atomic_write(loose, b"x", mode=0o644)
    assert [p for p in secret_file_problems() if "loose.key" in p]
    # ... one a test loosens on purpose (to test a refusal) is not.
    loose.chmod(0o644)
    assert not [p for p in secret_file_problems() if "loose.key" in p]


@pytest.mark.run_last
def test_no_key_bytes_in_any_log_exception_or_repr_of_the_suite() -> None:
    STATE.scan_pending()
    assert STATE.scanned_texts > 0
    leaks = [str(f) for f in STATE.findings]  # test, kind of secret, where: never the bytes
    assert not leaks, (
        f"{len(leaks)} leak(s) of key bytes ({STATE.secrets} secrets registered, "
        f"{STATE.scanned_texts} texts scanned):\n" + "\n".join(leaks)
    )


@pytest.mark.run_last
def test_identity_and_key_files_are_0600() -> None:
    problems = secret_file_problems()
    assert not problems, "secret files readable by others:\n" + "\n".join(problems)
