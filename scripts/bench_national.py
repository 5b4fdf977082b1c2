#!/usr/bin/env python3
"""Wall time to start the bundled ``national`` QKD network, at each fidelity. Prints medians.

For ``--fidelity model`` (every link ModelLink) and ``auto`` (the demo route at
protocol fidelity, the rest at model), measures: PKI + 18 KME servers up
(``open``), every one of the 306 ordered SAE pairs holding a key
(``ready``), and every pool full (``full``: 32 keys each), from the moment
``SimulatedNetwork.start`` is called. Baseline in the same run: the bundled
``beijing-hefei`` chain (one pair each way, protocol fidelity).

Usage: python scripts/bench_national.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from qcall.qkd.network import SimulatedNetwork, default_link_factory


async def start_once(topology: str, fidelity: str | None) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        factory = default_link_factory(fidelity=fidelity)
        async with SimulatedNetwork.start(topology, state, seed=1, link_factory=factory) as net:
            opened = time.perf_counter() - t0
            await net.wait_ready(600)
            ready = time.perf_counter() - t0
            await net.wait_for(
                lambda: all(p["stored_keys"] >= net.pool_target for p in net.status()["pairs"]),
                600,
            )
            full = time.perf_counter() - t0
    return opened, ready, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"{'network':<16} {'fidelity':<9} {'open s':>7} {'ready s':>8} {'full s':>7}")
    baseline = None
    for topology, fidelity in (("beijing-hefei", None), ("national", "model"),
                               ("national", None)):
        rows = [asyncio.run(start_once(topology, fidelity)) for _ in range(args.runs)]
        o, r, f = (statistics.median(x[i] for x in rows) for i in range(3))
        baseline = baseline or r
        print(f"{topology:<16} {fidelity or 'auto':<9} {o:>7.2f} {r:>8.2f} {f:>7.2f}"
              f"   ready/baseline {r / baseline:.2f}")


if __name__ == "__main__":
    main()
