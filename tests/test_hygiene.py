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

from qcall import _oqs, config, pqc
from qcall.contacts import ContactStore
from qcall.exceptions import KMEError, UnsupportedAlgorithmError
from qcall.identity import Identity
from qcall.qkd.etsi014 import QKDKey
from qcall.qkd.pki import create_pki
from tests.hygiene import STATE, WINDOW, Hygiene, redact, secret_file_problems

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


def _registered(secret: bytes) -> bool:
    return secret[:WINDOW] in STATE.raw_needles and secret[-WINDOW:] in STATE.raw_needles


def test_the_plugin_registers_the_secrets_of_every_backend(oqs_standin: None) -> None:
    """Every backend of ``pqc.BACKENDS`` (oqs over the stand-in liboqs-python) is covered:
    key secrets, seeds and shared secrets are registered, so their leaks are seen."""
    STATE.scan_pending()
    missing: list[str] = []  # what was not registered (never the bytes: they are secrets)
    leaked: list[tuple[str, bytes]] = []
    for name in pqc.BACKENDS:
        backend = pqc.get_backend(name)
        kem_seed, sig_seed = os.urandom(64), os.urandom(32)
        secrets = {"ML-KEM seed": kem_seed}
        kem_keys = [
            backend.kem_generate(pqc.KEM.ML_KEM_768),
            backend.kem_from_seed(pqc.KEM.ML_KEM_1024, kem_seed),
        ]
        sig_keys = [backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)]
        try:
            sig_keys.append(backend.signing_from_seed(pqc.SignatureScheme.ML_DSA_44, sig_seed))
            secrets["ML-DSA seed"] = sig_seed
        except UnsupportedAlgorithmError:  # liboqs-python: no ML-DSA keys from ξ
            assert name == "oqs"
        all_keys: list[pqc.KEMPrivateKey | pqc.SigningKey] = [*kem_keys, *sig_keys]
        for key in all_keys:
            parts = key.secret_parts()
            assert parts, f"{name}: {key!r} has no secret parts"
            secrets.update({f"{key!r} part {i}": part for i, part in enumerate(parts)})
            leaked.append((f"{name} key", parts[-1]))
        shared, ct = backend.kem_encapsulate(pqc.KEM.ML_KEM_768, kem_keys[0].public_bytes())
        wrong = kem_keys[0].decapsulate(bytes([ct[0] ^ 1]) + ct[1:])  # implicit rejection
        secrets.update({"encapsulated secret": shared, "decapsulated secret": wrong})
        leaked.append((f"{name} shared", wrong))
        missing += [f"{name}: {what}" for what, value in secrets.items() if not _registered(value)]
    assert missing == []
    for i, (what, secret) in enumerate(leaked):
        logger.debug(f"leak {i}, {what}: %s", secret.hex())  # one finding per message
    found = STATE.scan_pending()
    assert len(found) == len(leaked)
    kinds = {f.kind for f in found}  # a key made from a seed: either name fits
    keys = {"an ML-KEM private key", "an ML-DSA private key", "an ML-KEM shared secret"}
    assert keys <= kinds <= keys | {"an ML-KEM seed", "an ML-DSA seed"}
    for f in found:  # planted on purpose: not a leak of the suite
        STATE.findings.remove(f)


def test_a_secret_the_plugin_cannot_register_is_a_finding(
    oqs_standin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object) -> tuple[bytes, ...]:
        raise RuntimeError("secret key buffer gone")

    monkeypatch.setattr(_oqs._OQSSigningKey, "secret_parts", broken)
    before = len(STATE.findings)
    key = pqc.get_backend("oqs").signing_generate(pqc.SignatureScheme.ML_DSA_65)
    assert key.sign(b"m")  # the code under test saw nothing
    new = STATE.findings[before:]
    assert [f.kind for f in new] == ["a secret not registered"]
    assert "OQSBackend.signing_generate" in new[0].where and "RuntimeError" in new[0].where
    STATE.findings.remove(new[0])


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
