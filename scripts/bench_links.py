#!/usr/bin/env python3
"""Routing latency between signaling instances: direct links against Redis, interleaved.

Starts one ``redis-server`` and four ``python -m signaling --redis`` instances on
loopback: two sharing a cluster secret (call frames over a direct link,
docs/signaling.md "Direct links between instances") and two without (frames
over Redis pub/sub, the baseline), and three pairs of users in accepted calls:
both on one instance (``same``), across the linked pair (``link``), across the
Redis-only pair (``redis``). Then, ``--rounds`` times, each pair relays one
8 KiB ``ice`` payload (client send → other client receive), the three pairs
taking turns (the one going first rotating) so that all see the same machine
load. Prints the p50 of each, the ratios against ``same`` (link/same also for
five consecutive slices of the samples), and the instances' CPU microseconds per frame
(``/proc``, 500 frames per pair, one pair at a time).

``--link-tls`` runs the linked pair's link inside mutual TLS (a test CA made
for the run, docs/signaling.md "TLS (optional)").

Usage::

    python scripts/bench_links.py --rounds 400 [--link-tls]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.signaling import messages as m  # noqa: E402
from qcall.signaling.client import SignalingClient  # noqa: E402
from scripts.load_cluster import (  # noqa: E402
    PAYLOAD,
    cpu_seconds,
    next_of,
    schedule,
    setup_call,
    spawn,
    spread,
)
from signaling.local_services import LocalRedis, free_port  # noqa: E402


async def run(rounds: int, link_tls: bool = False) -> None:
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with LocalRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        assert isinstance(redis, LocalRedis)
        secret = Path(tmp) / "cluster.secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        link: tuple[str, ...] = ("--cluster-secret-file", str(secret))
        tls: list[tuple[str, ...]] = [(), ()]
        if link_tls:  # each linked instance with its own certificate of one test CA
            from qcall.qkd.pki import create_pki

            pki = create_pki(Path(tmp) / "pki", ["link-0", "link-1"], [])
            tls = [
                ("--cluster-tls-cert", str(pki.kmes[n].cert), "--cluster-tls-key",
                 str(pki.kmes[n].key), "--cluster-ca", str(pki.ca_cert))
                for n in ("link-0", "link-1")
            ]  # fmt: skip
        ports = [free_port() for _ in range(4)]
        procs = [
            await spawn(redis.url, ports[0], "L0", *link, *tls[0]),
            await spawn(redis.url, ports[1], "L1", *link, *tls[1]),
            await spawn(redis.url, ports[2], "R0"),
            await spawn(redis.url, ports[3], "R1"),
        ]
        backend = pqc.get_backend()

        async def user(port: int, name: str) -> SignalingClient:
            key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
            client = SignalingClient(f"ws://127.0.0.1:{port}", key, name, watch=[])
            await client.connect()
            return client

        try:
            pairs = {
                "same": (await user(ports[0], "s1"), await user(ports[0], "s2")),
                "link": (await user(ports[0], "l1"), await user(ports[1], "l2")),
                "redis": (await user(ports[2], "r1"), await user(ports[3], "r2")),
            }
            servers = {"same": procs[:1], "link": procs[:2], "redis": procs[2:]}
            calls = {k: await setup_call(a, b) for k, (a, b) in pairs.items()}

            async def relay(k: str) -> float:
                a, b = pairs[k]
                start = time.perf_counter()
                await a.send_ice(calls[k], PAYLOAD)
                try:
                    await next_of(b, m.ICECandidate)
                except TimeoutError:
                    raise SystemExit(f"a {k!r} frame did not arrive within 10 s") from None
                return (time.perf_counter() - start) * 1e3

            for k in pairs:  # warm up (the link opens on first use)
                for _ in range(20):
                    await relay(k)
            samples: dict[str, list[float]] = {k: [] for k in pairs}
            for _, k, _ in schedule(list(pairs), 1, rounds):  # the first kind rotates
                samples[k].append(await relay(k))
            cpu: dict[str, list[int]] = {}
            for k in pairs:
                before = [cpu_seconds(p.pid) for p in servers[k]]
                for _ in range(500):
                    await relay(k)
                cpu[k] = [
                    round((cpu_seconds(p.pid) - c) / 500 * 1e6)
                    for p, c in zip(servers[k], before, strict=True)
                ]
            p50 = {k: statistics.median(v) for k, v in samples.items()}
            print(json.dumps({
                "p50_ms": {k: round(v, 3) for k, v in p50.items()},
                "ratio_link_same": round(p50["link"] / p50["same"], 2),
                "ratio_redis_same": round(p50["redis"] / p50["same"], 2),
                "samples_per_kind": rounds,
                "ratio_link_same_blocks": spread(samples["same"], samples["link"])["ratio_blocks"],
                "server_cpu_us_per_frame": cpu,
                "link_tls": link_tls,
                "load_average": os.getloadavg()[0],
            }), flush=True)  # fmt: skip
        finally:
            for proc in procs:
                proc.terminate()
                await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400, help="samples per pair (default 400)")
    parser.add_argument(
        "--link-tls", action="store_true", help="the linked pair's link runs over mutual TLS"
    )
    args = parser.parse_args()
    if not 10 <= args.rounds <= 10_000:
        parser.error("bounds: 10 <= --rounds <= 10000")
    asyncio.run(run(args.rounds, args.link_tls))


if __name__ == "__main__":
    main()
