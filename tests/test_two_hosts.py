"""scripts/two_hosts.sh: the two-machine call, each host a network namespace.

The script builds two namespaces joined through a user-space wire that delays
every frame by the beijing-hefei one-way delay, runs the commands of
docs/two-machines.md in each (signaling + Beijing QKD site + alice on A,
Hefei QKD site + bob on B), and prints the call report. It needs root and
iproute2 (``ip netns``), which CI has; elsewhere the test is skipped for that
reason only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import TIMEOUT_FACTOR

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "two_hosts.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root for ip netns"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip netns)"),
]


def test_two_hosts_call(tmp_path: Path) -> None:
    work = tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("QCALL_HOME", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--keep", str(work), "--seconds", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180 * TIMEOUT_FACTOR,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and report["problems"] == []
    assert report["call"]["connected"]
    # Hybrid on both sides: QKD + ML-KEM + DTLS, and the same QKD keys by key_ID.
    assert report["security"]["mode"] == report["security"]["mode_bob"] == "hybrid"
    assert report["security"]["sas_match"]
    qkd = report["qkd"]
    assert qkd["key_ids_alice"] and qkd["key_ids_alice"] == qkd["key_ids_bob"]
    assert len(qkd["key_ids_alice"]) == 1 + report["rekeys"]
    # Each host ran only its side; the split link's BB84 ran between them, and every
    # alice->bob key crossed its relay hop (master at Beijing, slave at Hefei).
    site_a, site_b = qkd["site_A"], qkd["site_B"]
    assert "Beijing" in site_a["nodes"] and "Hefei" not in site_a["nodes"]
    assert "Hefei" in site_b["nodes"] and "Beijing" not in site_b["nodes"]
    assert (site_a["split_end"], site_b["split_end"]) == ("transmitter", "receiver")
    assert site_a["split_blocks"] >= 1 and site_b["split_blocks"] >= 1
    assert site_a["pairs"]["alice->bob"]["role"] == "master"
    assert site_b["pairs"]["alice->bob"]["role"] == "slave"
    assert site_a["pairs"]["alice->bob"]["keys"] >= len(qkd["key_ids_alice"])
    # Bob heard alice's tone, nothing failed to decrypt, and the wire's delay shows.
    audio = report["audio"]
    assert abs(audio["peak_hz"] - audio["tone_hz"]) <= 5
    assert audio["received_seconds"] >= 1
    assert report["decrypt_failures"] == {"alice": 0, "bob": 0}
    assert report["wire_delay_ms"] > 4.7
    assert report["rtcp"]["rtt_ms"] is None or report["rtcp"]["rtt_ms"] >= 2 * 4.7
    # Nothing left behind: the namespaces are gone.
    match = re.search(r"namespaces (qa-\d+)", proc.stderr)
    assert match is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert match.group(1) not in names


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_two_hosts_cleans_up_on_sigterm(tmp_path: Path) -> None:
    # Stopped while its servers run, with --keep: every process it started is gone
    # (before, the signaling server was left running: a subshell's PID was recorded).
    import signal
    import time

    work = tmp_path / "work"
    signaling = f"{sys.executable} -m signaling --host 10.77.0.1"  # ours, not another run's
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--keep", str(work), "--seconds", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60 * TIMEOUT_FACTOR
        while not (work / "b" / "site.log").exists() or not _processes_mentioning(str(work)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        assert _processes_mentioning(signaling)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _processes_mentioning(str(work)) == [], err
    assert _processes_mentioning(signaling) == [], err
