#!/usr/bin/env python3
"""Medians of the two-host call (scripts/two_hosts.sh), with and without the emulated delay.

Runs the script ``--runs`` times per setting, interleaved: the baseline is the
same two namespaces with a zero-delay wire, the other the ``beijing-hefei``
one-way delay (qcall.call.netem PROFILES). Prints, per setting, the medians of
the QKD sites' time to ready, call set-up (alice's dial → media), the setup
milestones, RTCP round-trip time and the chirp one-way latency, and the ratio
of the delayed run to the baseline. Needs root (network namespaces). Say in any
report how loaded the machine was: these are wall-clock figures.

Usage::

    sudo .venv/bin/python scripts/bench_two_hosts.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "two_hosts.sh"
FIELDS = {
    "sites_ready_s": ("sites_ready_s",),
    "setup_ms": ("call", "setup_ms"),
    "answer_received_ms": ("call", "setup_breakdown_ms", "answer_received"),
    "ice_connected_ms": ("call", "setup_breakdown_ms", "ice_connected"),
    "media_ms": ("call", "setup_breakdown_ms", "media"),
    "rtt_ms": ("rtcp", "rtt_ms"),
    "one_way_ms": ("audio", "one_way_ms"),
}


def _get(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def run_once(delay_ms: str | None, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHON=sys.executable)
    if delay_ms is not None:
        env["DELAY_MS"] = delay_ms
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--seconds", str(seconds)],
        capture_output=True, text=True, env=env, check=False, timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"two_hosts.sh failed:\n{proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per setting (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="call length (5 s)")
    args = parser.parse_args()
    settings = {"baseline (0 ms wire)": "0", "beijing-hefei": None}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for i in range(args.runs):
        for name, delay in settings.items():
            report = run_once(delay, args.seconds)
            results[name].append(report)
            print(f"run {i + 1}/{args.runs} {name}: setup {report['call']['setup_ms']} ms, "
                  f"rtt {report['rtcp']['rtt_ms']} ms", file=sys.stderr)  # fmt: skip
    medians: dict[str, dict[str, float | None]] = {}
    for name, reports in results.items():
        medians[name] = {}
        for field, path in FIELDS.items():
            values = [v for r in reports if (v := _get(r, path)) is not None]
            medians[name][field] = round(statistics.median(values), 1) if values else None
    base, delayed = medians["baseline (0 ms wire)"], medians["beijing-hefei"]
    delay = results["beijing-hefei"][0]["wire_delay_ms"]
    print(f"two hosts (network namespaces), medians of {args.runs} runs; wire delay {delay} ms")
    print(f"{'':22} {'baseline':>10} {'beijing-hefei':>14} {'ratio':>7}")
    for field in FIELDS:
        b, d = base[field], delayed[field]
        ratio = f"{d / b:.2f}" if b and d is not None else "-"
        print(f"{field:22} {b!s:>10} {d!s:>14} {ratio:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
