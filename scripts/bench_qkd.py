#!/usr/bin/env python3
"""Benchmarks of the simulated QKD links (qcall.qkd.sim). Prints medians.

1. Cascade efficiency ``f = leaked bits / (n * H2(QBER))`` at QBER 1, 2, 5 %,
   for qcall's schedule and, as the baseline measured in the same run, the
   original Brassard-Salvail schedule (k1 = 0.73/Q, doubling, 4 passes).
2. Post-processing throughput: final key bits per second of wall time spent
   in the protocol (both ends, one core, sifting to privacy amplification),
   and the FFT Toeplitz hash against the O(n m) matrix product.
3. Simulated secret key rate at 10, 50, 100 km against the analytic model.
4. Fidelity: ``protocol`` (full BB84) against ``model`` (ModelLink) on the same
   links: delivered key rate, the model's error (block-to-block spread and the
   error-correction efficiency gap), and links one core simulates in real time
   at each fidelity (simulated seconds per wall second of one core).

Usage: python scripts/bench_qkd.py [--runs N] [--quick] [--fidelity-only]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np

from qcall.qkd.sim import LinkParams, SimulatedLink
from qcall.qkd.sim.cascade import CascadeAlice, CascadeBob, block_schedule
from qcall.qkd.sim.model import binary_entropy
from qcall.qkd.sim.privacy import toeplitz_hash, toeplitz_hash_reference


def original_schedule(qber: float, n: int) -> list[int]:
    """Brassard & Salvail 1993: k1 = 0.73/Q, k_i = 2 k_(i-1), four passes."""
    k = max(4, round(0.73 / qber))
    return [min(n, k << i) for i in range(4)]


def cascade_once(n: int, qber: float, seed: int, schedule: list[int]) -> tuple[float, bool, float]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n, dtype=np.uint8)
    err = (rng.random(n) < qber).astype(np.uint8)
    alice = CascadeAlice(a, np.random.default_rng([seed, 1]))
    bob = CascadeBob(a ^ err, schedule)
    start = time.perf_counter()
    gen = bob.run()
    try:
        msg = next(gen)
        while True:
            msg = gen.send(alice.handle(msg))
    except StopIteration:
        pass
    elapsed = time.perf_counter() - start
    f = alice.leaked_bits / (n * binary_entropy(float(err.mean())))
    return f, bool(np.array_equal(a, bob.key)), elapsed


def bench_cascade(runs: int, sizes: list[int]) -> None:
    print("== Cascade efficiency f = leak / (n H2(Q)), median of", runs, "runs ==")
    print(f"{'n':>8} {'QBER':>5} {'f qcall':>8} {'f orig':>7} {'ratio':>6} "
          f"{'fail q/o':>8} {'ms':>7}")
    for n in sizes:
        for q in (0.01, 0.02, 0.05):
            ours = [cascade_once(n, q, s, block_schedule(q, n)) for s in range(runs)]
            orig = [cascade_once(n, q, s, original_schedule(q, n)) for s in range(runs)]
            f1 = statistics.median(x[0] for x in ours)
            f0 = statistics.median(x[0] for x in orig)
            fails = f"{sum(not x[1] for x in ours)}/{sum(not x[1] for x in orig)}"
            ms = 1e3 * statistics.median(x[2] for x in ours)
            print(f"{n:>8} {q:>5.0%} {f1:>8.3f} {f0:>7.3f} {f1 / f0:>6.3f} {fails:>8} {ms:>7.1f}")


def bench_throughput(runs: int, sifted: int) -> None:
    print(f"\n== Post-processing throughput, 10 km, {sifted} sifted bits/block, "
          f"median of {runs} ==")
    link = SimulatedLink("bench", LinkParams(10.0, block_sifted_bits=sifted), seed=1)
    link.run_block()  # warm-up
    rows = [link.run_block() for _ in range(runs)]
    pp = statistics.median(r.postprocessing_s for r in rows)
    per_end = statistics.median(
        max(r.alice_s, r.bob_s) + (r.postprocessing_s - r.alice_s - r.bob_s) / 2 for r in rows)
    wall = statistics.median(r.wall_s for r in rows)
    final = statistics.median(r.final_bits for r in rows)
    print(f"final bits/block {final:,.0f}; protocol {pp * 1e3:.0f} ms, whole block "
          f"{wall * 1e3:.0f} ms")
    print(f"throughput: {final / pp / 1e6:.2f} Mbit/s final key with both ends on one core; "
          f"{final / per_end / 1e6:.2f} Mbit/s per end (busier end + half the channel work); "
          f"{final / wall / 1e6:.2f} Mbit/s including the optical simulation")
    print(f"time split (median ms): Alice {statistics.median(r.alice_s for r in rows) * 1e3:.0f},"
          f" Bob {statistics.median(r.bob_s for r in rows) * 1e3:.0f}, channel "
          f"{statistics.median(r.postprocessing_s - r.alice_s - r.bob_s for r in rows) * 1e3:.0f}")
    print(f"messages/block {statistics.median(r.messages for r in rows):.0f}, "
          f"classical bytes/block {statistics.median(r.channel_bytes for r in rows):,.0f}")
    rng = np.random.default_rng(0)
    n, m = 4096, 2048
    x = rng.integers(0, 2, n, dtype=np.uint8)
    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)

    def timed(fn: object, reps: int) -> float:
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    t_fft = timed(lambda: toeplitz_hash(x, s, m), 7)
    t_ref = timed(lambda: toeplitz_hash_reference(x, s, m), 3)
    print(f"Toeplitz {n}->{m}: FFT {t_fft * 1e3:.2f} ms, matrix product (baseline) "
          f"{t_ref * 1e3:.1f} ms, speed-up x{t_ref / t_fft:.0f}")
    big = 1 << 20
    xb = rng.integers(0, 2, big, dtype=np.uint8)
    sb = rng.integers(0, 2, big + big // 2 - 1, dtype=np.uint8)
    t_big = timed(lambda: toeplitz_hash(xb, sb, big // 2), 3)
    print(f"Toeplitz 2^20->2^19: {t_big * 1e3:.0f} ms ({big / t_big / 1e6:.1f} Mbit/s input)")


def bench_rates(runs: int, sifted: int) -> None:
    print(f"\n== Secret key rate, simulated vs analytic (median of {runs} blocks of "
          f"{sifted} sifted bits) ==")
    print(f"{'km':>5} {'model bit/s':>12} {'sim bit/s':>12} {'ratio':>6} {'QBER':>6} "
          f"{'sim s/block':>11} {'speed-up':>8}")
    for km in (10.0, 50.0, 100.0):
        link = SimulatedLink(f"{km:g}km", LinkParams(km, block_sifted_bits=sifted), seed=3)
        rows = [link.run_block() for _ in range(runs)]
        rate = statistics.median(r.secret_bits / r.duration_s for r in rows)
        model = link.expected_secret_key_rate()
        qber = statistics.median(r.qber_corrected for r in rows)
        dur = rows[0].duration_s
        print(f"{km:>5.0f} {model:>12,.0f} {rate:>12,.0f} {rate / model:>6.3f} {qber:>6.2%} "
              f"{dur:>11.4f} {link.stats.speedup:>8.2f}")
    print("(sim rate: privacy amplification output; the delivered key is that minus the "
          "256 bits per block that repay the authentication pad)")


def bench_fidelity(runs: int, sifted: int) -> None:
    from qcall.qkd.sim import ModelLink

    print(f"\n== Fidelity: protocol vs model, {sifted} sifted bits/block, {runs} protocol "
          f"blocks, {20 * runs} model blocks ==")
    print(f"{'km':>5} {'protocol bit/s':>14} {'model bit/s':>12} {'ratio':>6} {'model err':>9} "
          f"{'links/core prot':>15} {'links/core model':>16}")
    for km in (25.0, 60.0, 80.0):
        params = LinkParams(km, block_sifted_bits=sifted)
        prot = SimulatedLink(f"p{km:g}", params, seed=5)
        prows = [prot.run_block() for _ in range(runs)]
        p_rate = sum(r.final_bits for r in prows) / sum(r.duration_s for r in prows)
        model = ModelLink(f"m{km:g}", params, seed=6)
        mrows = [model.run_block() for _ in range(20 * runs)]
        per = [r.final_bits / r.duration_s for r in mrows]
        m_rate = statistics.mean(per)
        # The model's error: spread of one protocol-sized sample of blocks plus the
        # EC gap (model f = 1.1 against Cascade's measured f, leak ~ f n H2(E)).
        spread = statistics.stdev(per) / math.sqrt(runs) / m_rate
        print(f"{km:>5.0f} {p_rate:>14,.0f} {m_rate:>12,.0f} {p_rate / m_rate:>6.3f} "
              f"{spread:>8.1%}+ {prot.stats.speedup:>15.2f} {model.stats.speedup:>16,.0f}")
    print("(links/core: simulated seconds per wall second on one core, i.e. how many such "
          "links one core keeps at device speed; model err: 1 sigma of the protocol sample "
          "plus the EC-efficiency gap, see docs/qkd-simulation.md)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    ap.add_argument("--fidelity-only", action="store_true", help="only the fidelity section")
    args = ap.parse_args()
    if args.fidelity_only:
        bench_fidelity(args.runs, (1 << 16) if args.quick else (1 << 18))
        return
    if args.quick:
        bench_cascade(args.runs, [1 << 14])
        bench_throughput(args.runs, 1 << 16)
        bench_rates(args.runs, 1 << 16)
        bench_fidelity(args.runs, 1 << 16)
    else:
        bench_cascade(args.runs, [1 << 14, 1 << 18])
        bench_throughput(args.runs, 1 << 20)
        bench_rates(args.runs, 1 << 18)
        bench_fidelity(args.runs, 1 << 18)
    _ = math  # keep import for readers computing extra figures


if __name__ == "__main__":
    main()
