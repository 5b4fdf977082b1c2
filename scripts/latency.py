#!/usr/bin/env python3
"""The latency harness: plain vs pqc vs hybrid call setup, one-way audio latency, jitter, loss.

Usage: ``python scripts/latency.py --calls N --profile loopback|beijing-hefei|lossy --out DIR``
(the same as ``qcall bench``; see docs/performance.md and :mod:`qcall.bench`).
"""

from __future__ import annotations

import sys

from qcall.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
