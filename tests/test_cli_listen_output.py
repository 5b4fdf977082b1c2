"""``qcall listen --output``: one recording per call, and none for a refused call."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcall.cli.call import recording_path
from qcall.exceptions import ConfigError
from qcall.identity import Identity
from qcall.qkd.keyfile import create_key_files

ROOT = Path(__file__).resolve().parent.parent
WHEN = time.mktime((2026, 12, 5, 13, 4, 55, 0, 0, -1))


def test_recording_path(tmp_path: Path) -> None:
    plain = str(tmp_path / "rec.wav")
    first = recording_path(plain, "bob", WHEN, 1)
    assert first == tmp_path / "rec-20261205-130455-bob.wav"
    first.write_bytes(b"good")
    assert recording_path(plain, "bob", WHEN, 2) == tmp_path / "rec-20261205-130455-bob-2.wav"
    assert recording_path(plain, "bob", WHEN, 1, once=True) == tmp_path / "rec.wav"
    template = str(tmp_path / "{n}-{peer}-{time}.wav")
    assert recording_path(template, "a/../b", WHEN, 7).name == "7-a_.._b-20261205-130455.wav"
    with pytest.raises(ConfigError, match="colour"):
        recording_path(str(tmp_path / "{colour}.wav"), "bob", WHEN, 1)


@pytest.fixture
def server() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling", "--port", "0"], stdout=subprocess.PIPE, text=True,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield "ws://127.0.0.1:" + proc.stdout.readline().rsplit(":", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def registered(url: str) -> int:
    with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=5) as r:
        return int(json.load(r)["registered"])


def qcall(home: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "qcall", "--home", str(home), *argv]


def make_users(tmp_path: Path) -> None:
    for name in ("alice", "bob"):
        (tmp_path / name).mkdir()
        Identity.generate(name).save(tmp_path / name)


def start_listener(server: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` (a ``qcall listen``); return once it registered."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while registered(server) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"listen did not register: {proc.communicate()[1]!r}")
        time.sleep(0.1)
    return proc


def test_one_file_per_call_none_for_a_refused_call(tmp_path: Path, server: str) -> None:
    make_users(tmp_path)
    # Key files from two different deliveries: a hybrid call finds no matching key.
    create_key_files("alice", tmp_path / "alice.keys", "bob", tmp_path / "unused.keys", 4)
    create_key_files("alice", tmp_path / "other.keys", "bob", tmp_path / "bob.keys", 4)
    calls = tmp_path / "calls"
    calls.mkdir()
    good = calls / "rec.wav"
    good.write_bytes(b"a good recording")
    common = ["--signaling", server, "--quiet"]
    bob = start_listener(server, qcall(
        tmp_path / "bob", "listen", "--auto-answer", "--output", str(good), *common,
        "--key-source", f"keyfile:{tmp_path / 'bob.keys'}", "--allow-pqc-only"))  # fmt: skip
    try:
        alice = tmp_path / "alice"
        pqc_call = qcall(alice, "call", "bob", *common, "--policy", "pqc", "--tone", "440",
                         "--seconds", "1.5")  # fmt: skip
        refused = qcall(alice, "call", "bob", *common, "--tone", "440", "--seconds", "1.5",
                        "--key-source", f"keyfile:{tmp_path / 'alice.keys'}")  # fmt: skip
        for argv, code in ((pqc_call, 0), (refused, 1), (pqc_call, 0)):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == code, done.stderr
            if code:  # the caller is told what bob's refusal means for it, not only a code
                assert "qkd_unavailable" in done.stderr
                assert "both KMEs must share keys" in done.stderr
    finally:
        bob.terminate()
        try:
            _, err = bob.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            bob.kill()
            _, err = bob.communicate()
            raise AssertionError(f"listen did not stop on SIGTERM:\n{err.decode()}") from None
    assert "qcall: interrupted: " in err.decode() and "stopped listening" in err.decode()
    assert good.read_bytes() == b"a good recording", err
    recordings = sorted(calls.glob("rec-*-alice*.wav"))
    assert len(recordings) == 2, (sorted(p.name for p in calls.iterdir()), err)
    for path in recordings:
        with wave.open(str(path)) as wav:
            assert wav.getnframes() > 24000  # half a second of alice's tone at least
    assert not list(calls.glob(".*")), "a temporary recording was left behind"


def test_quiet_shows_sas_and_audio_warnings_once(tmp_path: Path, server: str) -> None:
    make_users(tmp_path)
    common = ["--signaling", server, "--quiet", "--policy", "pqc"]
    bob = start_listener(server, qcall(tmp_path / "bob", "listen", "--auto-answer", *common))
    try:
        outputs = []
        for extra in ([], ["--no-speaker"]):
            argv = qcall(tmp_path / "alice", "call", "bob", *common, "--tone", "440",
                         "--seconds", "1", *extra)  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stderr)
    finally:
        bob.terminate()
        _, raw = bob.communicate(timeout=20)
    err = raw.decode()
    # --quiet: no live status, but both sides still show the SAS to compare by voice.
    assert all(re.search(r"SAS \d{3} \d{3}", out) for out in outputs)
    assert len(re.findall(r"SAS \d{3} \d{3}", err)) == 2
    # Without a sound card, the missing speaker/microphone is said once, not every call
    # (with one, not at all); --no-speaker asks for none, so no warning about it.
    assert err.count("no audio output") <= 1 and err.count("no microphone") <= 1
    assert "no audio output" not in outputs[1]


def test_changed_identity_warned_once_without_sas_advice(tmp_path: Path, server: str) -> None:
    make_users(tmp_path)
    # bob pinned alice's old key; alice made a new identity since.
    old = tmp_path / "alice-old.json"
    old.write_text(json.dumps(Identity.load(tmp_path / "alice").to_public_dict()))
    pin = qcall(tmp_path / "bob", "contacts", "pin", "alice", "--key", str(old))
    assert subprocess.run(pin, capture_output=True, timeout=60).returncode == 0
    Identity.generate("alice").save(tmp_path / "alice", overwrite=True)
    common = ["--signaling", server, "--policy", "pqc"]
    listen = ["listen", "--auto-answer", "--once", "--no-speaker", *common]
    bob = start_listener(server, qcall(tmp_path / "bob", *listen))
    try:
        argv = qcall(tmp_path / "alice", "call", "bob", *common, "--tone", "440",
                     "--seconds", "1", "--no-speaker")  # fmt: skip
        caller = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert bob.wait(30) == 1
    finally:
        if bob.poll() is None:
            bob.kill()
        _, raw = bob.communicate(timeout=20)
    err = raw.decode()
    assert err.count("HAS CHANGED") == 1, err  # printed once
    assert "SAS" not in err  # no call took place: nothing to compare by voice
    assert "qcall contacts forget alice" in err
    # The caller learns why: bob's phone refused its key, and what bob must do.
    assert caller.returncode == 1
    assert "identity_rejected" in caller.stderr and "contacts forget" in caller.stderr
