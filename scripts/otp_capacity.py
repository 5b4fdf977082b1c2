#!/usr/bin/env python3
"""OTP call capacity of a metro route: predicted vs measured, and key per call-minute.

Takes a route of a bundled topology (default: alice → bob in ``hefei-metro``), the
analytic decoy-state key rate of each of its links (:mod:`qcall.qkd.sim.model`, at
``--pulse-rate``), and predicts how many simultaneous OTP calls the slowest link
sustains (:func:`qcall.otp.capacity.route_capacity`). Then it measures, in
virtual time with real KMEs and the real key-stream and packet code
(:mod:`qcall.otp.loadsim`; the link's key arrives with a ±``--spread`` random
fluctuation per second into a relay buffer of ``--buffer`` seconds):

1. *held without a dropped packet*: N calls dialled 0.5 s apart, run ``--duration``
   seconds, for N around the prediction; the largest N with no dropped packet and
   no call ended for lack of key;
2. *held before the first refusal*: calls dialled up to 90 % of the prediction,
   then one more every ``--interval`` seconds until a call is refused or ends;
3. key consumed per call-minute (both directions, pad + MAC keys + block-end waste)
   against the nominal figure.

Prints one table and the ratios (measured / predicted). Usage::

    python scripts/otp_capacity.py                       # hefei-metro at 200 MHz
    python scripts/otp_capacity.py --pulse-rate 1e9 --duration 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from qcall.otp.capacity import call_key_rate_bps, route_capacity
from qcall.otp.keystream import OTPPolicy
from qcall.otp.loadsim import LinkSupply, LoadSimulation
from qcall.qkd.sim.model import LinkParams
from qcall.qkd.topology import load_topology


def hold(rate: float, policy: OTPPolicy, calls: int, args: argparse.Namespace) -> LoadSimulation:
    """Dial ``calls`` calls 0.5 s apart and run them for ``args.duration`` seconds."""
    sim = LoadSimulation(LinkSupply(rate, args.buffer, args.spread, args.seed), policy)
    sim.run_until(args.buffer)
    for _ in range(calls):
        sim.add_call()
        sim.run_until(sim.now + 0.5)
    sim.run_until(sim.now + args.duration)
    return sim


def clean(sim: LoadSimulation) -> bool:
    return all(c.dropped == 0 and c.ended_at is None and not c.refused for c in sim.calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="hefei-metro")
    parser.add_argument("--from-sae", default="alice")
    parser.add_argument("--to-sae", default="bob")
    parser.add_argument("--pulse-rate", type=float, default=2e8, help="source rate, Hz (2e8)")
    parser.add_argument("--bitrate", type=int, default=12_000, help="Opus bit/s (12000)")
    parser.add_argument("--duration", type=float, default=60.0, help="hold test, s (60)")
    parser.add_argument("--interval", type=float, default=20.0, help="ramp step, s (20)")
    parser.add_argument("--buffer", type=float, default=1.0, help="relay buffer, s of key (1)")
    parser.add_argument("--spread", type=float, default=0.05, help="rate fluctuation (0.05)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    topo = load_topology(args.topology)
    path = topo.shortest_path(topo.sae_node(args.from_sae), topo.sae_node(args.to_sae))
    if path is None:
        parser.error("no route between the two SAEs")
    policy = OTPPolicy(bitrate=args.bitrate)
    print(f"route {' → '.join(path)} at {args.pulse_rate:.3g} Hz pulse rate")
    rates = []
    for link in topo.path_links(path):
        rate = LinkParams(length_km=link.length_km, pulse_rate_hz=args.pulse_rate)
        rates.append(rate.expected_secret_key_rate())
        print(f"  {link.name:<24} {link.length_km:5.1f} km  {rates[-1] / 1e3:9.1f} kbit/s")
    bottleneck = min(rates)
    per_call = call_key_rate_bps(policy)
    predicted = route_capacity(rates, policy)
    print(f"OTP call at {args.bitrate} bit/s Opus: {per_call / 1e3:.1f} kbit/s of key per link")
    print(f"predicted capacity: {predicted} calls ({bottleneck / 1e3:.1f} kbit/s bottleneck)")

    started = time.perf_counter()
    held_clean = 0
    minute_kib = []
    for calls in range(max(1, predicted - 1), predicted + 3):
        sim = hold(bottleneck, policy, calls, args)
        ok = clean(sim)
        dropped = sum(c.dropped for c in sim.calls)
        ended = sum(c.ended_at is not None for c in sim.calls)
        print(f"  hold {calls:3d} calls {args.duration:.0f} s: dropped {dropped}, ended {ended}")
        if ok:
            held_clean = calls
            for call in sim.calls:
                assert call.sides is not None
                spent = sum(
                    s.sender.stats.key_bytes + s.sender.stats.wasted_bytes for s in call.sides
                )
                seconds = sim.now - call.started
                minute_kib.append(spent / seconds * 60 / 1024)
        elif calls > predicted:
            break
    sim = LoadSimulation(LinkSupply(bottleneck, args.buffer, args.spread, args.seed), policy)
    sim.run_until(args.buffer)
    for _ in range(max(0, int(0.9 * predicted) - 1)):
        sim.add_call()
        sim.run_until(sim.now + 0.5)
    held_ramp = sim.ramp(args.interval, 4 * predicted + 4)
    wall = time.perf_counter() - started

    nominal = per_call * 60 / 8 / 1024
    print()
    print(f"{'figure':<44}{'measured':>10}{'predicted':>11}{'ratio':>8}")
    print(
        f"{'calls held without a dropped packet':<44}{held_clean:>10}{predicted:>11}"
        f"{held_clean / predicted:>8.2f}"
    )
    print(
        f"{'calls held before the first refusal':<44}{held_ramp:>10}{predicted:>11}"
        f"{held_ramp / predicted:>8.2f}"
    )
    if minute_kib:
        median = statistics.median(minute_kib)
        print(
            f"{'key per call-minute, KiB (median)':<44}{median:>10.1f}{nominal:>11.1f}"
            f"{median / nominal:>8.2f}"
        )
    print(f"(virtual-time simulation, {wall:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
