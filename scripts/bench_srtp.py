#!/usr/bin/env python3
"""Per-packet cost of the hybrid SRTP hook's data path versus plain libsrtp.

aiortc protects and unprotects every packet with one ``pylibsrtp.Session``; the
hook puts :class:`~qcall.call.srtpcore.OutboundSession` and
:class:`~qcall.call.srtpcore.InboundKeyring` in their place. This script times,
for 20 ms Opus-sized RTP packets (12-byte header + 120-byte payload), in the
same run:

* ``baseline``: ``Session.protect`` / ``Session.unprotect`` (aiortc's own path);
* ``steady``: the hook with one key generation installed;
* ``rekey``: two generations installed, packets under the preferred one;
* ``switch``: packets alternating between the old and the new generation (the
  worst case of reordering across a switch: every other packet needs a trial).

Each sample is a batch of ``--batch`` packets (fresh sequence numbers, so the
replay window never rejects); the median over ``--runs`` batches is printed in
microseconds per packet, with the ratio to the baseline.

Usage: ``python scripts/bench_srtp.py [--runs 30] [--batch 500] [--profile NAME]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import time
from collections.abc import Callable

from qcall.call.srtpcore import (
    InboundKeyring,
    OutboundSession,
    SRTPProfile,
    SRTPStats,
    srtp_session,
)

PAYLOAD = b"\x5a" * 120


def packets(first_seq: int, count: int, ssrc: int = 0x51C0) -> list[bytes]:
    return [
        struct.pack("!BBHII", 0x80, 111, (first_seq + n) & 0xFFFF, (first_seq + n) * 960, ssrc)
        + PAYLOAD
        for n in range(count)
    ]


def timed(fn: Callable[[], object], batch: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / batch * 1e6


def bench(profile: SRTPProfile, runs: int, batch: int) -> dict[str, float]:
    k, s = profile.key_length, profile.salt_length
    old, new = os.urandom(k + s), os.urandom(k + s)
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for run in range(runs):
        seq = 1000 + run * batch * 2
        plain = packets(seq, batch)

        # protect: baseline session versus the hook's outbound session
        base_tx = srtp_session(old, profile, inbound=False)
        add("protect baseline", timed(lambda: [base_tx.protect(p) for p in plain], batch))
        hook_tx = OutboundSession(SRTPStats())
        hook_tx.install(0, srtp_session(old, profile, inbound=False))
        add("protect hook", timed(lambda: [hook_tx.protect(p) for p in plain], batch))

        tx_old = srtp_session(old, profile, inbound=False)
        tx_new = srtp_session(new, profile, inbound=False)
        under_old = [tx_old.protect(p) for p in plain]
        mixed = [
            (tx_new if n % 2 else tx_old).protect(p)
            for n, p in enumerate(packets(seq + batch, batch))
        ]

        base_rx = srtp_session(old, profile, inbound=True)
        add("unprotect baseline", timed(lambda: [base_rx.unprotect(c) for c in under_old], batch))

        ring = InboundKeyring(SRTPStats())
        ring.install(0, old, profile)
        add("unprotect steady", timed(lambda: [ring.unprotect(c, 0.0) for c in under_old], batch))

        ring = InboundKeyring(SRTPStats())
        ring.install(0, old, profile)
        ring.install(1, new, profile)
        ring.unprotect(under_old[0], 0.0)  # generation 0 becomes the preferred one
        rest = under_old[1:]
        add("unprotect rekey", timed(lambda: [ring.unprotect(c, 0.0) for c in rest], batch - 1))

        ring = InboundKeyring(SRTPStats())
        ring.install(0, old, profile)
        ring.install(1, new, profile)
        add("unprotect switch", timed(lambda: [ring.unprotect(c, 0.0) for c in mixed], batch))
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--profile",
        choices=[p.name for p in SRTPProfile],
        default=SRTPProfile.AEAD_AES_256_GCM.name,
    )
    args = parser.parse_args()
    profile = SRTPProfile[args.profile]
    medians = bench(profile, args.runs, args.batch)
    print(f"{profile.name}, {args.runs} batches of {args.batch} packets, median µs/packet")
    for name, value in medians.items():
        kind = name.split()[0]
        ratio = value / medians[f"{kind} baseline"]
        print(f"  {name:<20} {value:7.2f} µs   ×{ratio:.2f} of {kind} baseline")


if __name__ == "__main__":
    main()
