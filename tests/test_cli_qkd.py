"""``qcall qkd`` and ``qcall pki`` against a real mutual-TLS KME on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcall.cli import main
from qcall.qkd.client import ETSI014Client
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.kmestore import DurableKME
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki, server_ssl_context
from qcall.qkd.server import KMEServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return create_pki(tmp_path_factory.mktemp("pki"), ["kme-a"], ["alice", "bob"])


class ThreadedKME:
    """A KME server running in its own thread and event loop."""

    def __init__(self, kme: KME, pki: PKIPaths) -> None:
        self.kme = kme
        self.ctx = server_ssl_context(pki.kmes["kme-a"].cert, pki.kmes["kme-a"].key, pki.ca_cert)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.url = ""
        self.secrets: list[bytes] = []
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        async with KMEServer(self.kme, "127.0.0.1", 0, self.ctx) as server:
            self.url = server.url
            self.ready.set()
            await self.stop.wait()


@pytest.fixture
def kme(pki: PKIPaths) -> Iterator[ThreadedKME]:
    state = KME("kme-a")
    keys = random_keys(5)
    state.supply("alice", "bob", keys, role="local")
    srv = ThreadedKME(state, pki)
    srv.secrets = [k for _, k in keys]
    srv.thread.start()
    assert srv.ready.wait(10)
    yield srv
    srv.loop.call_soon_threadsafe(srv.stop.set)
    srv.thread.join(10)
    srv.loop.close()


def args(pki: PKIPaths, url: str, sae: str, peer: str, *rest: str) -> list[str]:
    paths = pki.saes[sae]
    return [
        "qkd",
        *rest[:1],
        "--kme",
        url,
        "--cert",
        str(paths.cert),
        "--key",
        str(paths.key),
        "--ca",
        str(pki.ca_cert),
        "--peer",
        peer,
        *rest[1:],
    ]


def test_status(kme: ThreadedKME, pki: PKIPaths, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(pki, kme.url, "alice", "bob", "status")) == 0
    out = capsys.readouterr().out
    assert "stored_key_count     5" in out and "source_KME_ID        kme-a" in out
    kme.kme.set_alarm("alice", "bob", "eavesdropper on L2", qber=0.3)
    assert main(args(pki, kme.url, "alice", "bob", "status", "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status_extension"] == {"alarm": "eavesdropper on L2", "qber": 0.3}
    assert main(args(pki, kme.url, "alice", "bob", "status")) == 0
    assert "ALARM: eavesdropper on L2 (QBER 0.3)" in capsys.readouterr().out


def test_get_and_get_by_id_never_print_keys(
    kme: ThreadedKME, pki: PKIPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(pki, kme.url, "alice", "bob", "get", "--number", "2", "--json")) == 0
    got = json.loads(capsys.readouterr().out)["keys"]
    assert [set(k) for k in got] == [{"key_ID", "size", "sha256"}] * 2
    ids = [k["key_ID"] for k in got]
    rest = [x for i in ids for x in ("--key-id", i)]
    assert main(args(pki, kme.url, "bob", "alice", "get-by-id", *rest)) == 0
    out = capsys.readouterr().out
    for k in got:
        assert f"{k['key_ID']}  256 bits  sha256:{k['sha256']}" in out
    for secret in kme.secrets:
        assert base64.b64encode(secret).decode() not in out
        assert secret.hex() not in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["get", "--size", "8192"], "answered 400 to enc_keys: size 8192 is not supported"),
        (["get", "--number", "6"], "answered 503 to enc_keys: not enough keys"),
        (["get", "--number", "0"], "--number must be at least 1"),
        (["get-by-id", "--key-id", "x"], "is not a UUID"),
    ],
)
def test_errors(
    kme: ThreadedKME,
    pki: PKIPaths,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    assert main(args(pki, kme.url, "alice", "bob", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("qcall: error: ") and message in err


def test_connection_errors(pki: PKIPaths, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(args(pki, f"https://127.0.0.1:{port}", "alice", "bob", "status")) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert main(args(pki, "http://127.0.0.1:1", "alice", "bob", "status")) == 1
    assert "must be an https:// URL" in capsys.readouterr().err
    bad = args(pki, "https://127.0.0.1:1", "alice", "bob", "status")
    bad[bad.index("--ca") + 1] = "/nonexistent/ca.pem"
    assert main(bad) == 1
    assert "CA file not found" in capsys.readouterr().err


def test_refused_certificate_is_named(
    kme: ThreadedKME, pki: PKIPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate from another CA: the KME refused it, this file, and why it may."""
    rogue = create_pki(tmp_path / "rogue", ["kme-x"], ["alice"], ca_name="rogue")
    cmd = args(pki, kme.url, "alice", "bob", "status")
    cmd[cmd.index("--cert") + 1] = str(rogue.saes["alice"].cert)
    cmd[cmd.index("--key") + 1] = str(rogue.saes["alice"].key)
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"qcall: error: KME {kme.url} refused our client certificate "
        f"{rogue.saes['alice'].cert} in the TLS handshake: "
    ), err
    assert "CA the KME does not trust" in err and "Server disconnected" not in err


def test_unknown_peer(kme: ThreadedKME, pki: PKIPaths, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(pki, kme.url, "alice", "carol", "status")) == 1
    assert "slave_SAE_ID carol is not known" in capsys.readouterr().err


def test_pki_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    cmd = ["pki", "init", "--out", str(out), "--kme", "K1", "--sae", "a", "--sae", "b", "--json"]
    assert main(cmd) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["saes"]) == {"a", "b"} and set(data["kmes"]) == {"K1"}
    assert (out / "sae" / "a.key").stat().st_mode & 0o777 == 0o600
    assert main(["pki", "init", "--out", str(out)]) == 1
    assert "nothing to do" in capsys.readouterr().err
    assert main(["pki", "init", "--out", str(out), "--sae", "a/b"]) == 1
    assert "not a valid ID" in capsys.readouterr().err


def test_pki_init_topology(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "init", "--out", str(tmp_path), "--topology", "beijing-hefei"]) == 0
    out = capsys.readouterr().out
    assert "KME KME-Beijing" in out and "SAE " in out


def test_serve_subprocess(pki: PKIPaths, tmp_path: Path) -> None:
    kme = pki.kmes["kme-a"]
    serve = ["qkd", "serve", "--id", "kme-a", "--port", "0", "--pair", "alice:bob"]
    files = ["--cert", str(kme.cert), "--key", str(kme.key), "--ca", str(pki.ca_cert)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcall", *serve, *files, "--fill", "3"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("KME kme-a serving https://127.0.0.1:"), line
        url = line.split()[-1]
        result = subprocess.run(
            [sys.executable, "-m", "qcall", *args(pki, url, "alice", "bob", "get", "--json")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["keys"]) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def serve(pki: PKIPaths, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """``qcall qkd serve`` for alice:bob in its own process; return it and its URL."""
    kme = pki.kmes["kme-a"]
    files = ["--cert", str(kme.cert), "--key", str(kme.key), "--ca", str(pki.ca_cert)]
    command = ["qkd", "serve", "--id", "kme-a", "--port", "0", *files, "--pair", "alice:bob"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcall", *command, *extra],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("KME kme-a serving https://127.0.0.1:"), line
    return proc, line.split()[-1]


def sae(pki: PKIPaths, name: str, url: str) -> ETSI014Client:
    paths = pki.saes[name]
    return ETSI014Client(url, client_ssl_context(paths.cert, paths.key, pki.ca_cert), timeout=10)


async def fetch_both(pki: PKIPaths, url: str, number: int, bits: int) -> list[bytes]:
    """alice gets ``number`` keys, bob fetches them: both copies consumed; return the keys."""
    async with sae(pki, "alice", url) as alice, sae(pki, "bob", url) as bob:
        got = await alice.get_keys("bob", number, bits)
        back = await bob.get_keys_by_id("alice", [k.key_id for k in got])
    assert [k.key for k in back] == [k.key for k in got]
    return [k.key for k in got]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_serve_state_stops_cleanly_on_signals(
    pki: PKIPaths, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM and SIGHUP stop the KME like Ctrl-C: consumed keys leave the disk (faults §4.1)."""
    state = tmp_path / "kme.state"
    proc, url = serve(pki, "--fill", "20", "--state", str(state))
    try:
        consumed = asyncio.run(fetch_both(pki, url, 10, 256))
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    on_disk = state.read_bytes() + state.with_name("kme.state.journal").read_bytes()
    left = sum(base64.b64encode(k) in on_disk for k in consumed)
    assert left == 0, f"{left} of 10 consumed keys still on disk after {sig.name}"
    assert proc.returncode == 0, err
    assert f"KME kme-a stopped ({sig.name})" in err
    again = DurableKME.open(state, "kme-a")
    assert again.stored_key_count("alice", "bob") == 10
    again.close()


def test_serve_key_size_flags(pki: PKIPaths, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["qkd", "serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--key-size BITS default key size (Status key_size) and size of each --fill key" in (
        help_text
    )
    assert "--min-key-size BITS smallest key an SAE may ask for, a multiple of 8 (default 64" in (
        help_text
    )
    assert "--max-key-size BITS largest key an SAE may ask for, a multiple of 8 (default 4096" in (
        help_text
    )
    proc, url = serve(pki, "--fill", "8", "--min-key-size", "128", "--max-key-size", "1024")
    try:
        cmd = args(pki, url, "alice", "bob", "status", "--json")
        assert main(cmd) == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["key_size"], status["min_key_size"], status["max_key_size"]) == (
            256,
            128,
            1024,
        )
        assert main(args(pki, url, "alice", "bob", "get", "--size", "512", "--json")) == 0
        assert json.loads(capsys.readouterr().out)["keys"][0]["size"] == 512
        assert main(args(pki, url, "alice", "bob", "get", "--size", "64")) == 1
        assert "size 64 is not supported: min_key_size is 128" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    kme = pki.kmes["kme-a"]
    files = ["--cert", str(kme.cert), "--key", str(kme.key), "--ca", str(pki.ca_cert)]
    for sizes, message in [
        (["--max-key-size", "100"], "max_key_size must be a positive multiple of 8"),
        (["--min-key-size", "512"], "min_key_size (512) <= key_size (256)"),
    ]:
        assert main(["qkd", "serve", "--id", "kme-a", *files, "--pair", "a:b", *sizes]) == 1
        assert message in capsys.readouterr().err
