"""``qcall call``/``listen`` over ``wss://``: ``--signaling-ca`` and the ``signaling_ca`` key.

The server is ``python -m signaling --tls-cert/--tls-key`` itself, with a
certificate made here.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcall.cli import main
from qcall.identity import Identity
from tests.test_signaling_server import make_cert

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A wss:// signaling server (its own process); yields its URL and CA file."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(directory)
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling", "--host", "127.0.0.1", "--port", "0",
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "wss://" in line, line
        port = int(line.rsplit(":", 1)[1])
        yield f"wss://localhost:{port}", cert
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    # One server for the module: each test registers its own name.
    Identity.generate(f"user-{secrets.token_hex(4)}").save(home)
    return home


def call(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str]:
    code = main(["--home", str(home), "call", "nobody", "--policy", "pqc", "--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_wss_with_signaling_ca_flag(
    tls_server: tuple[str, Path], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, ca = tls_server
    code, out = call(capsys, home, "--signaling", url, "--signaling-ca", str(ca))
    # Registered over TLS: the server itself answers that nobody is online.
    assert code == 1
    assert "nobody" in out and "Traceback" not in out
    assert "certificate" not in out.lower()


def test_wss_with_signaling_ca_in_config_relative(
    tls_server: tuple[str, Path], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, ca = tls_server
    (home / "server-ca.pem").write_bytes(ca.read_bytes())
    (home / "config.toml").write_text(f'signaling = "{url}"\nsignaling_ca = "server-ca.pem"\n')
    code, out = call(capsys, home)
    assert code == 1 and "nobody" in out and "certificate" not in out.lower()


def test_wss_untrusted_certificate_is_a_clear_error(
    tls_server: tuple[str, Path], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = tls_server
    code, out = call(capsys, home, "--signaling", url)
    assert code == 1 and "Traceback" not in out
    assert "certificate" in out.lower() and "--signaling-ca" in out


def test_signaling_ca_errors_name_the_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = call(capsys, home, "--signaling", "wss://localhost:1",
                     "--signaling-ca", str(tmp_path / "nope.pem"))  # fmt: skip
    assert code == 1 and "nope.pem" in out
    code, out = call(capsys, home, "--signaling", "ws://localhost:1",
                     "--signaling-ca", str(tmp_path / "nope.pem"))  # fmt: skip
    assert code == 1 and "wss://" in out


def test_name_taken_says_what_to_do(
    tls_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A user who made a new identity finds the old key still holds the name.
    url, ca = tls_server
    home = tmp_path / "home"
    home.mkdir()
    name = f"user-{secrets.token_hex(4)}"
    Identity.generate(name).save(home)
    code, out = call(capsys, home, "--signaling", url, "--signaling-ca", str(ca))
    assert code == 1 and "nobody" in out and "another key" not in out
    Identity.generate(name).save(home, overwrite=True)
    code, out = call(capsys, home, "--signaling", url, "--signaling-ca", str(ca))
    assert code == 1 and "another key" in out and "pin_ttl" in out and "operator" in out


def test_identity_new_force_moves_the_name(
    tls_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `identity new --force` keeps the old key, which signs the move on the server.
    url, ca = tls_server
    home = tmp_path / "home"
    name = f"user-{secrets.token_hex(4)}"
    assert main(["--home", str(home), "identity", "new", "--name", name]) == 0
    code, out = call(capsys, home, "--signaling", url, "--signaling-ca", str(ca))
    assert code == 1 and "nobody" in out
    assert main(["--home", str(home), "identity", "new", "--name", name, "--force"]) == 0
    code, out = call(capsys, home, "--signaling", url, "--signaling-ca", str(ca))
    assert code == 1 and "nobody" in out and "another key" not in out
