"""``qcall network-site init`` and ``run``: the commands docs/two-machines.md gives each host."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcall.cli import main

from .utils import TIMEOUT_FACTOR


def test_init_writes_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert main(["network-site", "init", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "split at Jinan-Taian (66 km)" in text and "SAEs alice" in text and "SAEs bob" in text
    assert json.loads((out / "site.json").read_text()) == {
        "topology": "beijing-hefei",
        "split": "Jinan-Taian",
    }
    psk = out / "split.psk"
    assert psk.stat().st_size == 32 + 4096 and stat.S_IMODE(psk.stat().st_mode) == 0o600
    for name in ("ca.pem", "kme/KME-Beijing.pem", "kme/KME-Hefei.key", "sae/alice.pem"):
        assert (out / "pki" / name).is_file()
    assert stat.S_IMODE((out / "pki" / "kme" / "KME-Hefei.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["init", "--topology", "hefei-metro", "--out", "X"], "--split LINK is required"),
        (["init", "--split", "Nowhere-Else", "--out", "X"], "unknown link"),
        (
            [
                "run",
                "--bundle",
                "nope",
                "--site",
                "Beijing",
                "--listen",
                "127.0.0.1:1",
                "--state",
                "X",
            ],
            "not a site bundle",
        ),
    ],
)
def test_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(tmp_path / a) if a in ("X", "nope") else a for a in argv]
    assert main(["network-site", *argv]) == 1
    assert message in capsys.readouterr().err


def test_bad_address_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert main(["network-site", "init", "--out", str(out)]) == 0
    argv = ["network-site", "run", "--bundle", str(out), "--site", "Hefei",
            "--connect", "10.77.0.1", "--state", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 1
    assert "expected HOST:PORT" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_two_site_processes_become_ready(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert main(["network-site", "init", "--out", str(bundle)]) == 0
    port = _free_port()
    common = ["--bundle", str(bundle), "--speedup", "1000", "--block-pulses", "20000000",
              "--pool", "2", "--duration", str(20 * TIMEOUT_FACTOR), "--json-status"]  # fmt: skip
    env = dict(os.environ)
    env.pop("QCALL_HOME", None)

    def site(name: str, *where: str) -> subprocess.Popen[str]:
        # Files, not pipes: an unread pipe would block the site's status lines.
        out = (tmp_path / f"{name}.out").open("w")
        err = (tmp_path / f"{name}.err").open("w")
        return subprocess.Popen(
            [sys.executable, "-m", "qcall", "network-site", "run", "--site", name, *where,
             "--state", str(tmp_path / name), *common],
            stdout=out, stderr=err, text=True, env=env,
        )  # fmt: skip

    procs = [site("Beijing", "--listen", f"127.0.0.1:{port}")]
    procs.append(site("Hefei", "--connect", f"127.0.0.1:{port}"))
    try:
        deadline = time.monotonic() + 30 * TIMEOUT_FACTOR
        while not all((tmp_path / n / "ready").exists() for n in ("Beijing", "Hefei")):
            assert time.monotonic() < deadline, "the sites did not become ready"
            assert all(p.poll() is None for p in procs)
            time.sleep(0.2)
        doc = json.loads((tmp_path / "Hefei" / "network.json").read_text())
        assert list(doc["saes"]) == ["bob"] and doc["split_link"] == "Jinan-Taian"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    assert [proc.returncode for proc in procs] == [0, 0]  # SIGTERM: a clean exit
    for name in ("Beijing", "Hefei"):  # and a quiet one: no task left behind
        assert "Traceback" not in (tmp_path / f"{name}.err").read_text()
    last = json.loads((tmp_path / "Beijing.out").read_text().strip().splitlines()[-1])
    assert last["split_link"]["end"] == "transmitter" and last["split_link"]["blocks"] >= 1


@pytest.mark.parametrize(
    ("site", "eve", "message"),
    [
        ("Hefei", "Jinan-Taian", "the split link's optics run at Jinan"),
        ("Hefei", "Beijing-Langfang", "not a link of this site"),
    ],
)
def test_eve_is_checked_before_the_site_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], site: str, eve: str, message: str
) -> None:
    bundle = tmp_path / "bundle"
    assert main(["network-site", "init", "--out", str(bundle)]) == 0
    argv = ["network-site", "run", "--bundle", str(bundle), "--site", site, "--connect",
            f"127.0.0.1:{_free_port()}", "--state", str(tmp_path / "s"), "--eve", eve,
            "--eve-delay", "100", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    assert message in capsys.readouterr().err
