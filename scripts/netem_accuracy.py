#!/usr/bin/env python3
"""How faithfully the user-space emulator (qcall.call.netem) applies a profile.

Sends ``--count`` 160-byte datagrams, one every ``--interval`` seconds (an audio
packet every 20 ms by default), through an emulated UDP socket to a receiver on
loopback, for each profile, ``--repeat`` times, and prints the medians over the
runs of:

* the achieved one-way delay (p50, p90, max) against the requested mean;
* the timer error: achieved minus planned delay of each datagram (what the
  asyncio shell adds to the Sans-I/O core's decision), p50 / p99 / max;
* the achieved loss rate against the requested one;
* the RFC 3550 §6.4.1 interarrival jitter the receiver would report, and the
  same computed on the planned delays (the model's own figure).

Baseline in the same run: bare loopback (no emulation), whose delay is the
floor every figure above includes.

Usage: ``python scripts/netem_accuracy.py [--count N] [--interval S] [--repeat R]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from typing import Any

import numpy as np

from qcall.call.netem import PROFILES, LinkEmulator, NetworkProfile, _EmulatedTransport, run


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.arrivals[int.from_bytes(data[:4], "big")] = time.monotonic()


def rfc3550_jitter(transit_ms: list[float]) -> float:
    """Interarrival jitter J (RFC 3550 §6.4.1) over transit times in order of sending."""
    j = 0.0
    for a, b in itertools.pairwise(transit_ms):
        j += (abs(b - a) - j) / 16
    return j


async def run_once(
    profile: NetworkProfile, count: int, interval: float, seed: int
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    rx, receiver = await loop.create_datagram_endpoint(_Receiver, local_addr=("127.0.0.1", 0))
    tx, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    addr = rx.get_extra_info("sockname")
    link = LinkEmulator(profile, seed)
    sock: Any = tx if profile.is_null else _EmulatedTransport(tx, link)
    sent: dict[int, float] = {}
    planned: dict[int, float] = {}
    start = time.monotonic()
    for i in range(count):
        now = time.monotonic()
        sent[i] = now
        before = len(link.stats.delays_ms)
        sock.sendto(i.to_bytes(4, "big") + bytes(156), addr)
        planned[i] = link.stats.delays_ms[-1] if len(link.stats.delays_ms) > before else 0.0
        # pace on the schedule, not on the previous sleep (no drift)
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
    await asyncio.sleep(0.3 + (profile.delay_ms + profile.jitter_ms) / 1000)
    tx.close()
    rx.close()
    got = receiver.arrivals
    order = sorted(got)
    delays = [(got[i] - sent[i]) * 1000 for i in order]
    errors = [(got[i] - sent[i]) * 1000 - planned[i] for i in order]
    return {
        "p50": float(np.percentile(delays, 50)),
        "p90": float(np.percentile(delays, 90)),
        "max": max(delays),
        "err_p50": float(np.percentile(errors, 50)),
        "err_p99": float(np.percentile(errors, 99)),
        "err_max": max(errors),
        "loss": 1 - len(got) / count,
        "jitter": rfc3550_jitter(delays),
        "model_jitter": rfc3550_jitter([planned[i] for i in order]),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timers", choices=("precise", "epoll"), default="precise",
                        help="the event loop (qcall.call.netem.run; precise)")  # fmt: skip
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    profiles = [PROFILES["loopback"], PROFILES["beijing-hefei"], PROFILES["lossy"],
                NetworkProfile("lossy-reorder", 30.0, 20.0, 0.05, reorder=True)]  # fmt: skip
    print(f"{args.count} datagrams every {args.interval * 1000:g} ms, median of {args.repeat} runs")
    print(
        f"{'profile':<14} {'req':>6} {'p50':>7} {'p90':>7} {'max':>7} | {'err50':>6} "
        f"{'err99':>6} {'errmax':>6} | {'loss':>6} {'req':>5} | {'jitter':>6} {'model':>6}"
    )
    for profile in profiles:
        runs = [await run_once(profile, args.count, args.interval, s) for s in range(args.repeat)]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{profile.name:<14} {profile.delay_ms:6.2f} {m['p50']:7.2f} {m['p90']:7.2f} "
            f"{m['max']:7.2f} | {m['err_p50']:6.2f} {m['err_p99']:6.2f} {m['err_max']:6.2f} | "
            f"{m['loss']:6.1%} {profile.loss:5.0%} | {m['jitter']:6.2f} {m['model_jitter']:6.2f}"
        )


if __name__ == "__main__":
    arguments = parse_args()
    run(main(arguments), arguments.timers)
