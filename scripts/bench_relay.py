#!/usr/bin/env python3
"""Benchmark the trusted-node relay and the simulated network's start-up.

Prints medians over repeated runs:

* relaying one 256-bit key end to end (route choice + per-hop OTP + accounting)
  on ``beijing-hefei`` (16 hops) and ``hefei-metro`` (4 hops, only serving links
  filled, as in the running network), with the ratio to a baseline measured in
  the same run: the bare one-time pads alone (two XORs per hop);
* time from ``SimulatedNetwork.start`` to the first end-to-end keys in every
  KME pool (``wait_ready``), with the default BB84 blocks, at speed-up 1.

Usage: ``python scripts/bench_relay.py [--repeat N] [--no-network]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from qcall.qkd.relay import TrustedNodeRelay, xor_bytes
from qcall.qkd.topology import load_topology

KEY = 32


def bench_relay(name: str, repeat: int, keys: int = 500) -> None:
    topo = load_topology(name)
    source, target = (topo.sae_node(s) for s in sorted(topo.sae_ids)[:2])
    relay = TrustedNodeRelay(topo)
    for link in topo.serving_links():
        block = os.urandom(KEY * keys * repeat * 2)
        relay.deposit(link, block, block)
    hops = len(relay.relay(source, target, KEY).hops)
    relay_runs, base_runs = [], []
    pad = os.urandom(KEY)
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(keys):
            relay.relay(source, target, KEY)
        relay_runs.append((time.perf_counter() - start) / keys)
        start = time.perf_counter()
        for _ in range(keys):
            held = os.urandom(KEY)
            for _ in range(hops):
                held = xor_bytes(xor_bytes(held, pad), pad)
        base_runs.append((time.perf_counter() - start) / keys)
    relay_us = statistics.median(relay_runs) * 1e6
    base_us = statistics.median(base_runs) * 1e6
    print(
        f"relay {name:14s} {hops:2d} hops: median {relay_us:7.1f} µs/key "
        f"(bare OTP baseline {base_us:5.1f} µs, ratio {relay_us / base_us:4.1f}x)"
    )


async def bench_ready(name: str, repeat: int) -> None:
    from qcall.qkd.network import SimulatedNetwork

    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as state:
            start = time.perf_counter()
            async with SimulatedNetwork.start(name, state) as net:
                await net.wait_ready(120)
                runs.append(time.perf_counter() - start)
    median = statistics.median(runs)
    print(f"network {name:14s} start → first keys in every pool: median {median:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-network", action="store_true", help="skip the start-up benchmark")
    args = parser.parse_args()
    for name in ("beijing-hefei", "hefei-metro"):
        bench_relay(name, args.repeat)
    if not args.no_network:
        for name in ("beijing-hefei", "hefei-metro"):
            asyncio.run(bench_ready(name, max(1, args.repeat // 2)))


if __name__ == "__main__":
    main()
