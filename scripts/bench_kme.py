#!/usr/bin/env python3
"""Benchmark the ETSI GS QKD 014 KME: ``enc_keys`` over mutual TLS on loopback.

The KME server runs in a child process (its own core), the SAE client
(:class:`qcall.qkd.client.ETSI014Client`, one kept-alive connection) in this
one. Each run measures, for HTTPS with mutual TLS and for a plain-HTTP
baseline served by the same KME in the same run:

* ``number=1``: sequential requests; p50/p90/p99 latency and keys/s;
* batched: ``number=B`` per request; keys/s;
* parallel: C concurrent ``number=1`` requests; keys/s.

It prints the median over the runs of each figure, and the ratio
HTTPS / plain HTTP. Targets (issue 3): p50 ≤ 2 ms and ≥ 2,000 keys/s.

``--state`` adds a third server in the same child and the same runs: mTLS to a
:class:`~qcall.qkd.kmestore.DurableKME` (state file in the temporary directory,
``fdatasync`` before each answer, group commit), and its ratio to the in-memory
KME: the cost of crash safety per ``enc_keys`` (issue 6, docs/faults.md).

    python scripts/bench_kme.py [--runs 5] [--requests 2000] [--batch 100] [--state]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from qcall.qkd.client import ETSI014Client
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.kmestore import DurableKME
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki, server_ssl_context
from qcall.qkd.server import KMEServer
from qcall.typing import SAEId

BENCH_HEADER = "X-Bench-SAE"


def _plain_identify(request: web.Request) -> SAEId | None:
    # Only for the plain-HTTP baseline: no TLS, so the caller names itself.
    value = request.headers.get(BENCH_HEADER)
    return SAEId(value) if value else None


def _serve(pki_dir: str, keys: int, conn: Any, state: bool) -> None:
    async def run() -> None:
        pki = Path(pki_dir)
        kme = KME("kme-bench", max_key_count=keys + 1, max_key_per_request=1024)
        kmes = [kme]
        if state:
            durable = DurableKME.open(
                pki / "kme.state", "kme-bench", max_key_count=keys + 1, max_key_per_request=1024
            )
            kmes.append(durable)
        for k in kmes:
            for start in range(0, keys, 50_000):
                k.supply("alice", "bob", random_keys(min(50_000, keys - start)), role="master")
        if state:
            durable.store.flush()
        ctx = server_ssl_context(
            pki / "kme/kme-bench.pem", pki / "kme/kme-bench.key", pki / "ca.pem"
        )
        async with (
            KMEServer(kme, "127.0.0.1", 0, ctx) as tls,
            KMEServer(kme, "127.0.0.1", 0, None, identify=_plain_identify) as plain,
            KMEServer(kmes[-1], "127.0.0.1", 0, ctx) as tls_state,
        ):
            conn.send((tls.url, plain.url, tls_state.url if state else None))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        if state:
            durable.close()

    asyncio.run(run())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _measure(
    client: ETSI014Client, requests: int, batch: int, parallel: int
) -> dict[str, float]:
    for _ in range(50):  # warm-up: connection, TLS session, caches
        await client.get_key("bob")
    latencies: list[float] = []
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        await client.get_key("bob")
        latencies.append(time.perf_counter() - t0)
    single = requests / (time.perf_counter() - start)

    batches = max(1, requests // batch // 2)
    start = time.perf_counter()
    for _ in range(batches):
        await client.get_keys("bob", batch)
    batched = batches * batch / (time.perf_counter() - start)

    async def worker(n: int) -> None:
        for _ in range(n):
            await client.get_key("bob")

    per = max(1, requests // parallel)
    start = time.perf_counter()
    await asyncio.gather(*(worker(per) for _ in range(parallel)))
    par = per * parallel / (time.perf_counter() - start)
    return {
        "p50_ms": 1e3 * _percentile(latencies, 0.50),
        "p90_ms": 1e3 * _percentile(latencies, 0.90),
        "p99_ms": 1e3 * _percentile(latencies, 0.99),
        "keys_s_n1": single,
        "keys_s_batch": batched,
        "keys_s_parallel": par,
    }


async def _run_once(
    pki: PKIPaths, tls_url: str, plain_url: str, state_url: str | None, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    ctx = client_ssl_context(pki.saes["alice"].cert, pki.saes["alice"].key, pki.ca_cert)
    out = {}
    async with ETSI014Client(plain_url, headers={BENCH_HEADER: "alice"}) as plain:
        out["plain"] = await _measure(plain, args.requests, args.batch, args.parallel)
    async with ETSI014Client(tls_url, ctx) as tls:
        out["mtls"] = await _measure(tls, args.requests, args.batch, args.parallel)
    if state_url is not None:
        async with ETSI014Client(state_url, ctx) as durable:
            out["state"] = await _measure(durable, args.requests, args.batch, args.parallel)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument(
        "--state", action="store_true", help="also measure a durable KME (state file, fsync)"
    )
    args = parser.parse_args()

    per_run = 2 * (
        50 + args.requests + (args.requests // args.batch // 2) * args.batch + args.requests
    )
    keys = per_run * args.runs
    with tempfile.TemporaryDirectory() as tmp:
        pki = create_pki(tmp, ["kme-bench"], ["alice", "bob"])
        parent, child = mp.Pipe()
        server = mp.get_context("spawn").Process(target=_serve, args=(tmp, keys, child, args.state))
        server.start()
        try:
            tls_url, plain_url, state_url = parent.recv()
            results = [
                asyncio.run(_run_once(pki, tls_url, plain_url, state_url, args))
                for _ in range(args.runs)
            ]
        finally:
            parent.send("stop")
            server.join(30)

    print(
        f"KME enc_keys on loopback, {args.runs} runs x {args.requests} requests "
        f"(batch {args.batch}, {args.parallel} parallel); medians"
    )
    extra = f" {'mTLS+state':>11} {'state/mTLS':>11}" if args.state else ""
    print(f"{'metric':18} {'mTLS':>10} {'plain HTTP':>11} {'mTLS/plain':>11}{extra}")
    for metric in ("p50_ms", "p90_ms", "p99_ms", "keys_s_n1", "keys_s_batch", "keys_s_parallel"):
        tls = statistics.median(r["mtls"][metric] for r in results)
        plain = statistics.median(r["plain"][metric] for r in results)
        fmt = "{:10.3f}" if metric.endswith("ms") else "{:10.0f}"
        line = f"{metric:18} {fmt.format(tls)} {fmt.format(plain):>11} {tls / plain:11.2f}"
        if args.state:
            durable = statistics.median(r["state"][metric] for r in results)
            line += f" {fmt.format(durable):>11} {durable / tls:11.2f}"
        print(line)
    p50 = statistics.median(r["mtls"]["p50_ms"] for r in results)
    rate = statistics.median(r["mtls"]["keys_s_n1"] for r in results)
    ok = p50 <= 2.0 and rate >= 2000
    print(f"target p50 <= 2 ms and >= 2000 keys/s (number=1, mTLS): {'met' if ok else 'NOT met'}")
    if args.state:
        p50 = statistics.median(r["state"]["p50_ms"] for r in results)
        print(f"target p50 <= 2 ms with the state file: {'met' if p50 <= 2.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
