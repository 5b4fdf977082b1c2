#!/usr/bin/env python3
"""The call report of scripts/two_hosts.sh, from the files each host left behind.

Reads alice's and bob's ``qcall call/listen --report`` JSON, bob's WAV and the
last ``qcall network-site run --json-status`` line of each site, checks what a
good two-host call must show, and prints one JSON report (``ok``, ``problems``).
Both hosts are namespaces of one machine, so their monotonic clocks agree and
the one-way latency from the marker chirps is meaningful.

Usage::

    python scripts/two_hosts_report.py WORKDIR --tone 440 --delay-ms 5.53
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_status(path: Path) -> dict[str, Any]:
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return {}


def _site(status: dict[str, Any]) -> dict[str, Any]:
    split = status.get("split_link", {})
    return {
        "nodes": status.get("site"),
        "local_links": len(status.get("links", {})),
        "split_link": split.get("name"),
        "split_end": split.get("end"),
        "split_blocks": split.get("blocks"),
        "split_qber": split.get("qber"),
        "relay_hop_bits": split.get("consumed_bits"),
        "pairs": {
            f"{p['master']}->{p['slave']}": {"role": p.get("role"), "keys": p["delivered"]}
            for p in status.get("pairs", [])
        },
    }


def _wire(path: Path) -> dict[str, int] | None:
    """The wire's counts: ``wire: N frames forwarded, D dropped (receive buffer)``."""
    try:
        words = path.read_text(encoding="utf-8").strip().splitlines()[-1].split()
        return {"frames": int(words[1]), "dropped": int(words[4])}
    except (OSError, IndexError, ValueError):
        return None


def build_report(
    work: Path, tone_hz: float, delay_ms: float | None, ready_s: float | None = None
) -> dict[str, Any]:
    """Assemble the report from the files under ``work`` (see scripts/two_hosts.sh)."""
    import numpy as np

    from qcall.call.audio_analysis import FrameArrival, received_audio_summary
    from qcall.call.media import read_wav

    alice = _load(work / "a" / "alice.json")
    bob = _load(work / "b" / "bob.json")
    try:
        samples, rate = read_wav(work / "b" / "bob.wav")
    except Exception:  # no recording: reported below as 0 s
        samples, rate = np.zeros(0, dtype=np.int16), 48000
    arrivals = [FrameArrival(*row) for row in bob.get("arrivals", [])]
    audio = received_audio_summary(
        samples, rate, arrivals, alice.get("chirp_send_times", []), tone_hz,
        alice.get("sent_seconds"),
    )  # fmt: skip
    a_ids, b_ids = alice.get("all_key_ids", []), bob.get("all_key_ids", [])
    report: dict[str, Any] = {
        "hosts": {
            "A": "10.77.0.1 (signaling, Beijing site, alice)",
            "B": "10.77.0.2 (Hefei site, bob)",
        },
        "wire_delay_ms": delay_ms,
        "sites_ready_s": ready_s,
        "wire": _wire(work / "wire.log"),
        "call": {
            "connected": bool(alice.get("connected")) and bool(bob.get("connected")),
            "setup_ms": alice.get("setup_ms"),
            "setup_breakdown_ms": alice.get("timings_ms", {}),
            "ended": alice.get("ended"),
            "error": alice.get("error") or bob.get("error"),
        },
        "security": {
            "mode": alice.get("policy"),
            "mode_bob": bob.get("policy"),
            "kem": alice.get("kem"),
            "signature": alice.get("signature"),
            "srtp_profile": alice.get("srtp_profile"),
            "sas": alice.get("sas"),
            "sas_match": alice.get("sas") is not None and alice.get("sas") == bob.get("sas"),
        },
        "qkd": {
            "key_ids_alice": a_ids,
            "key_ids_bob": b_ids,
            "key_ids_match": bool(a_ids) and a_ids == b_ids,
            "site_A": _site(_last_status(work / "a" / "site.jsonl")),
            "site_B": _site(_last_status(work / "b" / "site.jsonl")),
        },
        "rekeys": alice.get("rekeys", 0),
        "decrypt_failures": {
            "alice": alice.get("decrypt_failures"),
            "bob": bob.get("decrypt_failures"),
        },
        "rtcp": {"rtt_ms": alice.get("rtt_ms"), "packets_lost": alice.get("packets_lost")},
        "audio": audio,
    }
    report["problems"] = check(report)
    report["ok"] = not report["problems"]
    return report


def check(report: dict[str, Any]) -> list[str]:
    """What a good two-host call shows; returns the failed checks."""
    problems = []
    if not report["call"]["connected"]:
        problems.append(f"the call did not connect ({report['call']['error']})")
    if report["security"]["mode"] != "hybrid" or report["security"]["mode_bob"] != "hybrid":
        problems.append("the call was not hybrid (QKD + ML-KEM + DTLS) on both sides")
    if not report["security"]["sas_match"]:
        problems.append("the two SAS differ")
    if not report["qkd"]["key_ids_match"]:
        problems.append("alice and bob did not use the same QKD key_IDs")
    audio = report["audio"]
    if abs(audio["peak_hz"] - audio["tone_hz"]) > 5:
        problems.append(f"bob heard {audio['peak_hz']} Hz, not the {audio['tone_hz']} Hz tone")
    if audio["received_seconds"] < 1:
        problems.append(f"bob received only {audio['received_seconds']} s of audio")
    if any(report["decrypt_failures"].values()):
        problems.append(f"SRTP decrypt failures: {report['decrypt_failures']}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description="report of scripts/two_hosts.sh")
    parser.add_argument("work", type=Path, help="the script's work directory")
    parser.add_argument("--tone", type=float, default=440.0)
    parser.add_argument("--delay-ms", type=float)
    parser.add_argument("--sites-ready-s", type=float, help="site start -> both ready")
    args = parser.parse_args()
    report = build_report(args.work, args.tone, args.delay_ms, args.sites_ready_s)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
