"""Backend behaviour of :mod:`qcall.pqc`, run against every available backend,
plus backend selection, the liboqs probe and the start-up self-test."""

from __future__ import annotations

import ctypes.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import UnsupportedAlgorithm

from qcall import _oqs, pqc
from qcall.cli import main
from qcall.exceptions import (
    BackendUnavailableError,
    ConfigError,
    InvalidKeyError,
    UnsupportedAlgorithmError,
)
from scripts import bench_handshake
from tests.oqs_standin import needs_liboqs

ALL_KEMS = list(pqc.KEM)
ALL_SCHEMES = list(pqc.SignatureScheme)


@pytest.fixture(scope="module", params=pqc.available_backends())
def backend(request: pytest.FixtureRequest) -> pqc.Backend:
    return pqc.get_backend(request.param)


# --- ML-KEM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kem", ALL_KEMS, ids=lambda k: k.value)
def test_kem_roundtrip_and_sizes(backend: pqc.Backend, kem: pqc.KEM) -> None:
    key = backend.kem_generate(kem)
    assert key.algorithm is kem
    assert len(key.public_bytes()) == kem.sizes.encapsulation_key
    shared, ct = backend.kem_encapsulate(kem, key.public_bytes())
    assert len(shared) == kem.sizes.shared_secret
    assert len(ct) == kem.sizes.ciphertext
    assert key.decapsulate(ct) == shared
    # Fresh randomness every time.
    shared2, ct2 = backend.kem_encapsulate(kem, key.public_bytes())
    assert ct2 != ct and shared2 != shared
    assert backend.kem_generate(kem).public_bytes() != key.public_bytes()


@pytest.mark.parametrize("kem", ALL_KEMS, ids=lambda k: k.value)
def test_kem_implicit_rejection(backend: pqc.Backend, kem: pqc.KEM) -> None:
    """FIPS 203 6.3: a modified ciphertext gives a different secret, not an error."""
    key = backend.kem_generate(kem)
    shared, ct = backend.kem_encapsulate(kem, key.public_bytes())
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    wrong = key.decapsulate(tampered)
    assert len(wrong) == 32 and wrong != shared
    assert key.decapsulate(tampered) == wrong  # deterministic


def test_kem_from_seed_is_deterministic(backend: pqc.Backend) -> None:
    seed = bytes(range(64))
    a = backend.kem_from_seed(pqc.KEM.ML_KEM_768, seed)
    b = backend.kem_from_seed(pqc.KEM.ML_KEM_768, seed)
    assert a.public_bytes() == b.public_bytes()
    other = backend.kem_from_seed(pqc.KEM.ML_KEM_768, bytes(64))
    assert other.public_bytes() != a.public_bytes()


def test_kem_bad_inputs_are_typed(backend: pqc.Backend) -> None:
    kem = pqc.KEM.ML_KEM_768
    key = backend.kem_generate(kem)
    with pytest.raises(InvalidKeyError, match="1184 bytes, got 10"):
        backend.kem_encapsulate(kem, b"\x00" * 10)
    with pytest.raises(InvalidKeyError, match="1088 bytes"):
        key.decapsulate(b"\x00" * 1087)
    with pytest.raises(InvalidKeyError, match="seed must be 64 bytes"):
        backend.kem_from_seed(kem, b"\x00" * 32)
    with pytest.raises(InvalidKeyError, match="must be bytes"):
        backend.kem_encapsulate(kem, "text")  # type: ignore[arg-type]
    # FIPS 203 7.2 encapsulation key check: coefficients ≥ q are rejected.
    with pytest.raises(InvalidKeyError, match="not valid"):
        backend.kem_encapsulate(kem, b"\xff" * 1184)


def test_kem_key_repr_has_no_secret(backend: pqc.Backend) -> None:
    key = backend.kem_from_seed(pqc.KEM.ML_KEM_768, bytes(range(64)))
    text = repr(key)
    assert "ML-KEM-768" in text
    assert key.public_bytes()[:8].hex() not in text
    assert bytes(range(64))[:8].hex() not in text


# --- ML-DSA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.value)
def test_sign_verify_roundtrip(backend: pqc.Backend, scheme: pqc.SignatureScheme) -> None:
    key = backend.signing_generate(scheme)
    assert key.algorithm is scheme
    pk = key.public_bytes()
    assert len(pk) == scheme.sizes.public_key
    for context in (b"", b"qcall/handshake", bytes(255)):
        sig = key.sign(b"transcript", context)
        assert len(sig) == scheme.sizes.signature
        assert backend.verify(scheme, pk, sig, b"transcript", context)
        assert not backend.verify(scheme, pk, sig, b"transcript!", context)
        assert not backend.verify(scheme, pk, sig, b"transcript", context + b"x")
        assert not backend.verify(scheme, pk, sig[:-1], b"transcript", context)
        assert not backend.verify(scheme, pk, sig + b"\x00", b"transcript", context)
    other = backend.signing_generate(scheme)
    assert not backend.verify(scheme, other.public_bytes(), key.sign(b"m"), b"m")


def test_sign_context_too_long(backend: pqc.Backend) -> None:
    key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
    with pytest.raises(ValueError, match="255"):
        key.sign(b"m", bytes(256))
    sig = key.sign(b"m")
    pk = key.public_bytes()
    assert not backend.verify(pqc.SignatureScheme.ML_DSA_65, pk, sig, b"m", bytes(256))


def test_verify_bad_public_key(backend: pqc.Backend) -> None:
    scheme = pqc.SignatureScheme.ML_DSA_65
    with pytest.raises(InvalidKeyError, match="1952 bytes, got 1312"):
        backend.verify(scheme, bytes(1312), bytes(scheme.sizes.signature), b"m")


def test_signing_key_seed_roundtrip() -> None:
    backend = pqc.get_backend("cryptography")
    for scheme in ALL_SCHEMES:
        key = backend.signing_generate(scheme)
        seed = key.seed_bytes()
        assert len(seed) == scheme.sizes.seed
        again = backend.signing_from_seed(scheme, seed)
        assert again.public_bytes() == key.public_bytes()
        assert seed.hex() not in repr(key)
    with pytest.raises(InvalidKeyError, match="ML-DSA seed must be 32 bytes"):
        backend.signing_from_seed(pqc.SignatureScheme.ML_DSA_65, bytes(31))


def test_kyber_py_interoperates() -> None:
    """An independent ML-KEM implementation agrees with the default backend."""
    from kyber_py.ml_kem import ML_KEM_768

    backend = pqc.get_backend("cryptography")
    key = backend.kem_generate(pqc.KEM.ML_KEM_768)
    k, c = ML_KEM_768.encaps(key.public_bytes())
    assert key.decapsulate(c) == k
    ek, dk = ML_KEM_768.keygen()
    shared, ct = backend.kem_encapsulate(pqc.KEM.ML_KEM_768, ek)
    assert ML_KEM_768.decaps(dk, ct) == shared


# --- HKDF-SHA-384 (RFC 5869) -----------------------------------------------------------------


def test_hkdf_sha384_matches_pyca_one_shot() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    salt, ikm, info = b"salt" * 5, b"input keying material", b"qcall info"
    expected = HKDF(algorithm=hashes.SHA384(), length=80, salt=salt, info=info).derive(ikm)
    assert pqc.hkdf_expand(pqc.hkdf_extract(salt, ikm), info, 80) == expected
    with pytest.raises(ValueError, match="length"):
        pqc.hkdf_expand(bytes(48), b"", 255 * 48 + 1)
    assert pqc.constant_time_eq(b"abc", b"abc") and not pqc.constant_time_eq(b"abc", b"abd")


# --- backend selection ------------------------------------------------------------------------


def test_get_backend_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCALL_PQC_BACKEND", "auto")
    assert pqc.get_backend().name == "cryptography"
    monkeypatch.setenv("QCALL_PQC_BACKEND", "rot13")
    with pytest.raises(ConfigError, match="rot13"):
        pqc.get_backend()


@pytest.fixture
def no_liboqs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Simulate a machine without liboqs: empty OQS_INSTALL_PATH, no system library."""
    prefix = tmp_path / "oqs-prefix"
    (prefix / "lib").mkdir(parents=True)
    monkeypatch.setenv("OQS_INSTALL_PATH", str(prefix))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.delitem(pqc._BACKENDS, "oqs", raising=False)
    return prefix


def test_oqs_requested_but_absent_is_clear(no_liboqs: Path) -> None:
    had_oqs = "oqs" in sys.modules
    assert pqc.available_backends() == ["cryptography"]
    assert _oqs.liboqs_library_path() is None
    with pytest.raises(BackendUnavailableError) as info:
        pqc.get_backend("oqs")
    message = str(info.value)
    assert "liboqs" in message and "OQS_INSTALL_PATH" in message and "qcall[oqs]" in message
    # It says where it looked, and that nothing will be downloaded or built.
    assert str(no_liboqs / "lib" / "liboqs.so") in message
    assert str(no_liboqs / "lib64" / "liboqs.so") in message
    assert "never lets liboqs-python download or build it" in message
    assert ("oqs" in sys.modules) == had_oqs  # the probe never imported liboqs-python


def test_oqs_probe_tries_libraries_in_liboqs_python_order(
    no_liboqs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe checks the library that ``import oqs`` would load, not another one.

    liboqs-python's ``_load_shared_obj`` tries ``find_library("liboqs")``, then
    ``find_library("oqs")``, then ``$OQS_INSTALL_PATH/lib``, then ``lib64``.
    """
    hits = {"oqs": "/found/by/oqs.so", "liboqs": "/found/by/liboqs.so"}
    monkeypatch.setattr(ctypes.util, "find_library", hits.get)
    assert _oqs._candidates() == [
        "/found/by/liboqs.so",
        "/found/by/oqs.so",
        str(no_liboqs / "lib" / "liboqs.so"),
        str(no_liboqs / "lib64" / "liboqs.so"),
    ]


def test_oqs_probe_skips_unloadable_file(no_liboqs: Path) -> None:
    (no_liboqs / "lib" / "liboqs.so").write_bytes(b"\x7fELF not really a library")
    result = _oqs.probe()
    assert result.path is None and result.problem is not None
    assert "not installed" in result.problem


def test_oqs_probe_rejects_foreign_library(no_liboqs: Path) -> None:
    """A loadable shared library that is not liboqs is refused before ``import oqs``."""
    import _ctypes  # any real shared object without liboqs symbols will do

    shutil.copy(_ctypes.__file__, no_liboqs / "lib" / "liboqs.so")
    result = _oqs.probe()
    assert result.path == str(no_liboqs / "lib" / "liboqs.so")
    assert result.problem is not None and "is not a liboqs library" in result.problem
    assert _oqs.liboqs_library_path() is None
    with pytest.raises(BackendUnavailableError, match="not a liboqs library"):
        _oqs.OQSBackend()


def test_importing_qcall_never_imports_oqs() -> None:
    code = (
        "import sys, qcall.pqc, qcall._oqs, qcall.identity, qcall.contacts;"
        "qcall.pqc.available_backends(); print('oqs' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if "oqs" in pqc.available_backends():
        return  # liboqs present: importing oqs would be allowed (but still isn't done)
    assert out.stdout.strip() == "False"


# --- the oqs backend's own code, over the stand-in liboqs-python (tests/oqs_standin) ---


def test_oqs_import_prints_nothing(
    oqs_standin: None, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """liboqs-python's import-time "faulthandler" line goes to the debug log, not stdout."""
    caplog.set_level(logging.DEBUG, logger="qcall._oqs")
    backend = pqc.get_backend("oqs")
    assert backend.name == "oqs" and "oqs" in sys.modules
    assert capfd.readouterr() == ("", "")  # neither stdout nor (through root) stderr
    said = [r.getMessage() for r in caplog.records if r.name == "qcall._oqs"]
    assert "= liboqs-python: liboqs-python faulthandler is disabled" in said
    # liboqs-python is left without a handler of its own: it logs through the root logger.
    assert not logging.getLogger("oqs.oqs").handlers
    logging.getLogger("oqs.oqs").warning("later")
    assert capfd.readouterr().out == ""


def test_oqs_backend_keeps_json_output_clean(
    oqs_standin: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``QCALL_PQC_BACKEND=oqs qcall … --json`` prints one JSON document and nothing else."""
    home = str(tmp_path / "home")
    assert main(["--home", home, "identity", "new", "--name", "alice"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("QCALL_PQC_BACKEND", "oqs")
    assert "oqs" not in sys.modules  # the next command is the one that imports it
    assert main(["--home", home, "identity", "show", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["name"] == "alice" and err == ""
    assert "oqs" in pqc._BACKENDS  # the start-up self-test ran on the oqs backend
    logging.getLogger().handlers.clear()  # main() called logging.basicConfig


def test_oqs_key_secret_parts_are_the_secret_fields(oqs_standin: None) -> None:
    """FIPS 203 dk = dk_PKE ‖ ek ‖ H(ek) ‖ z and FIPS 204 sk = ρ ‖ K ‖ tr ‖ s1 ‖ s2 ‖ t0:
    the parts given to leak checks hold no public byte."""
    backend = pqc.get_backend("oqs")
    seed = bytes(range(64))  # d ‖ z
    kem_key = backend.kem_from_seed(pqc.KEM.ML_KEM_768, seed)
    assert (
        kem_key.public_bytes()
        == pqc.get_backend("cryptography").kem_from_seed(pqc.KEM.ML_KEM_768, seed).public_bytes()
    )
    dk_pke, z = kem_key.secret_parts()
    assert len(dk_pke) == 1152 and z == seed[32:]
    assert kem_key.public_bytes()[:12] not in dk_pke + z
    sig_key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
    k, rest = sig_key.secret_parts()
    assert (len(k), len(rest)) == (32, 4032 - 128)
    rho = sig_key.public_bytes()[:32]
    assert rho not in k + rest
    with pytest.raises(UnsupportedAlgorithmError, match="no exportable seed"):
        sig_key.seed_bytes()


@needs_liboqs
def test_real_liboqs_import_prints_nothing() -> None:
    """With liboqs installed: a fresh process selecting the backend prints nothing."""
    code = "from qcall import pqc; pqc.check_support(pqc.get_backend('oqs'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (done.stdout, done.stderr) == ("", "")


# --- scripts/bench_handshake.py --backend --------------------------------------------------


def test_bench_handshake_unavailable_backend_is_an_error(
    no_liboqs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_handshake.main(["--backend", "oqs", "--runs", "1", "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("bench_handshake: error: the 'oqs' backend is unavailable")
    assert "OQS_INSTALL_PATH" in err


def test_bench_handshake_runs_on_the_selected_backend(
    oqs_standin: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench_handshake.main(["--runs", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "cryptography"
    assert bench_handshake.main(["--backend", "oqs", "--runs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert (result["backend"], result["backend_library"]) == ("oqs", "0.16.0")
    assert result["handshake_us"] > 0


# --- start-up self-test --------------------------------------------------------------------


def test_check_support_passes() -> None:
    for name in pqc.available_backends():
        pqc.check_support(pqc.get_backend(name))


def test_check_support_turns_unsupported_algorithm_into_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unsupported(self: object, algorithm: pqc.KEM) -> pqc.KEMPrivateKey:
        raise UnsupportedAlgorithm("ML-KEM-768 is not supported by this backend")

    monkeypatch.setattr(pqc.PycaBackend, "kem_generate", unsupported)
    with pytest.raises(UnsupportedAlgorithmError) as info:
        pqc.check_support(pqc.PycaBackend())
    message = str(info.value)
    assert "OpenSSL" in message and "cryptography>=48" in message
    assert isinstance(info.value.__cause__, UnsupportedAlgorithm)


def test_old_cryptography_without_mlkem_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives import asymmetric

    # As if cryptography < 47: the submodule does not exist.
    monkeypatch.delattr(asymmetric, "mlkem")
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.mlkem", None)
    with pytest.raises(UnsupportedAlgorithmError, match="cryptography>=48"):
        pqc.PycaBackend()
