#!/usr/bin/env python3
"""Longer fuzzing campaigns against the signaling server (loopback only).

Runs the harness of tests/test_fuzz_signaling.py (a running server, seeded
hostile frames from several connections, real calls between two users during
the barrage) for several seeds and many frames, and prints per-seed figures.
A failing seed is reproduced with::

    QCALL_FUZZ_SEED=<seed> QCALL_FUZZ_FRAMES=<frames> python -m pytest tests/test_fuzz_signaling.py

Usage::

    python scripts/fuzz_signaling.py --frames 1000000 --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds to run")
    args = parser.parse_args()
    if not 1 <= args.frames <= 100_000_000:
        parser.error("--frames must be 1..100000000")
    failed = []
    for seed in args.seeds:
        env = dict(os.environ, QCALL_FUZZ_SEED=str(seed), QCALL_FUZZ_FRAMES=str(args.frames))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
             "tests/test_fuzz_signaling.py"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        summary = [line for line in proc.stdout.splitlines() if " frames in " in line]
        status = "ok" if proc.returncode == 0 else "FAILED"
        print(f"seed {seed}: {status} in {time.perf_counter() - start:.0f} s")
        for line in summary:
            print("   ", line.strip())
        if proc.returncode:
            failed.append(seed)
            print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    print(f"{len(args.seeds) - len(failed)}/{len(args.seeds)} seeds passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
