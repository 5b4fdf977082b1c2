"""``qcall demo``: the whole Beijing–Hefei call, run as a user runs it.

Two client processes place a call through the real signaling server on
loopback, over keys relayed across the simulated 16-hop QKD chain; the callee's
WAV output must contain the caller's tone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow


def test_demo_json_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qcall", "demo", "--json", "--seconds", "4",
         "--rekey-interval", "1", "--tone", "600", "--state", str(tmp_path)],
        capture_output=True, text=True, timeout=180 * T,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(proc.stdout)  # exactly one JSON object
    assert report["ok"] and report["problems"] == []
    call, sec, qkd, audio = report["call"], report["security"], report["qkd"], report["audio"]
    assert call["connected"] is True and call["setup_ms"] > 0
    assert sec["mode"] == "hybrid"
    assert (sec["kem"], sec["signature"]) == ("ML-KEM-768", "ML-DSA-65")
    assert sec["srtp_profile"] == "AEAD_AES_256_GCM"
    assert sec["sas_match"] and len(sec["sas"].replace(" ", "")) == 6
    assert qkd["route"][0] == "Beijing" and qkd["route"][-1] == "Hefei"
    assert qkd["hops"] == 16 and qkd["key_ids_match"]
    assert all(uuid.UUID(k) for k in qkd["key_ids"])
    assert report["rekeys"] >= 1 and len(qkd["key_ids"]) == report["rekeys"] + 1
    assert report["decrypt_failures"] == {"alice": 0, "bob": 0}
    assert audio["tone_hz"] == 600 and abs(audio["peak_hz"] - 600) <= 5
    assert audio["received_seconds"] > 2 and audio["sent_seconds"] > 2
    assert audio["one_way_ms"] is not None and 0 < audio["one_way_ms"] < 500
    seal = report["seal"]  # Quantum Cloud Seal: a document approved by bob, verified offline
    assert seal["verified"] and seal["inclusion_verified"] and seal["log_size"] == 2
    assert seal["workflow"] == "approved (1 of 1: bob)"
    messages, files = report["messages"], report["files"]  # Quantum Secret
    assert messages["sent"] == messages["received"] == 2 and messages["mode"] == "hybrid"
    assert files["sha256_match"] and files["size"] == 1024 * 1024
    # The callee's own recording, kept in --state, holds the tone.
    assert (tmp_path / "bob.wav").stat().st_size > 48000 * 2
    assert (tmp_path / "alice" / "identity.key").stat().st_mode & 0o777 == 0o600


def test_handshake_only_still_available() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qcall", "demo", "--handshake-only", "--json"],
        capture_output=True, text=True, timeout=60 * T,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sas"]["match"]
