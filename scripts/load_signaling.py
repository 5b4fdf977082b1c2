#!/usr/bin/env python3
"""Load test of the signaling server (loopback only, bounded in size and time).

Starts ``python -m signaling`` as its own process on 127.0.0.1 and 1-4 client
processes (``--workers``), each holding its share of N authenticated
connections (ML-DSA-65 registration, each user watching the presence of one
contact: its call partner, docs/signaling.md "Presence"). With every connection
held it places call set-ups (invite → accept → 8 KiB offer → 8 KiB answer →
hangup) at a target rate between disjoint pairs, ``--runs`` times, and reports:

* connections held (the server's ``/healthz``), registrations per second
  (``--watch-all``: without watch lists, every user gets everyone's presence);
* the server's resident memory per connection (RSS delta / N);
* call set-ups per second achieved, set-up time p50/p99;
* routing latency p50/p99 (client send → other client receive) under load;
* against a baseline measured in the same run: a minimal websockets relay (no
  JSON, no validation, same settings: no compression) in its own process, for
  memory per connection (up to 2000 connections) and idle relay latency.

Figures are medians over the runs. The soft ``RLIMIT_NOFILE`` is raised to the
hard limit (inherited by the server and the workers).

Usage::

    python scripts/load_signaling.py --connections 10000 --rate 500 --duration 10 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.signaling import messages as m  # noqa: E402

PAYLOAD = "x" * 8192
MAX_CONNECTIONS = 10_000  # the server's default max_connections

BASELINE_RELAY = """
import asyncio, sys
from websockets.asyncio.server import serve
peers = {}
async def handler(ws):
    name = await ws.recv()
    peers[name] = ws
    try:
        async for text in ws:
            to, _, rest = text.partition("|")
            target = peers.get(to)
            if target is not None:
                await target.send(rest)
    finally:
        peers.pop(name, None)
async def main():
    async with serve(handler, "127.0.0.1", 0, max_size=2**20, compression=None) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- worker process: holds connections, places call set-ups -----------------------------


@dataclass
class Peer:
    name: str
    ws: ClientConnection
    waiters: dict[tuple[str, str], asyncio.Future[float]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    def expect(self, call_id: str, kind: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[(call_id, kind)] = fut
        return fut

    async def read(self) -> None:
        with contextlib.suppress(Exception):
            async for text in self.ws:
                now = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
                obj = json.loads(text)
                fut = self.waiters.pop((obj.get("call_id", ""), obj["type"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(now)


async def register(url: str, key: pqc.SigningKey, name: str, partner: str | None) -> Peer:
    ws = await connect(url, max_size=2**24, compression=None, ping_interval=None)
    challenge = m.Challenge.parse(await ws.recv())
    watch = None if partner is None else [partner]
    await ws.send(m.Register.create(key, name, challenge, watch=watch).serialize())
    while True:
        msg = m.parse_server_message(await ws.recv())
        if isinstance(msg, m.Registered):
            break
        if isinstance(msg, m.ErrorMessage):
            raise msg.exception()
    peer = Peer(name, ws)
    peer.reader = asyncio.create_task(peer.read())
    return peer


async def relay(sender: Peer, receiver: Peer, msg: m.Message, latencies: list[float]) -> None:
    fut = receiver.expect(getattr(msg, "call_id", ""), msg.TYPE)
    text = msg.serialize()
    sent = time.perf_counter()
    await sender.ws.send(text)
    latencies.append(await asyncio.wait_for(fut, 30) - sent)


async def call_setup(a: Peer, b: Peer, call_id: str, latencies: list[float]) -> float:
    start = time.perf_counter()
    await relay(a, b, m.Invite(call_id, peer=b.name), latencies)
    await relay(b, a, m.Accept(call_id), latencies)
    await relay(a, b, m.Offer(call_id, payload=PAYLOAD), latencies)
    await relay(b, a, m.Answer(call_id, payload=PAYLOAD), latencies)
    setup = time.perf_counter() - start
    await relay(a, b, m.Hangup(call_id), latencies)
    return setup


async def load_run(
    pairs: list[tuple[Peer, Peer]], rate: float, duration: float, tag: str
) -> dict[str, Any]:
    locks = [asyncio.Lock() for _ in pairs]
    latencies: list[float] = []
    setups: list[float] = []
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        k = n % len(pairs)
        async with locks[k]:
            try:
                setups.append(await call_setup(*pairs[k], f"{tag}-{n:08d}", latencies))
            except (TimeoutError, OSError):
                failures += 1

    total = int(rate * duration)
    start = time.perf_counter()
    tasks = []
    for n in range(total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
        if n % int(rate) == 0:
            gc.freeze()  # what survived is long-lived: keep it out of collections
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {"setups": setups, "latencies": latencies, "elapsed": elapsed, "failures": failures}


async def idle_relay(a: Peer, b: Peer, rounds: int) -> list[float]:
    """ICE inside one accepted call, nothing else running, measured as the baseline."""
    await relay(a, b, m.Invite("call-idle-1", peer=b.name), [])
    await relay(b, a, m.Accept("call-idle-1"), [])
    assert b.reader is not None
    b.reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await b.reader
    text = m.ICECandidate("call-idle-1", payload=PAYLOAD).serialize()
    out: list[float] = []
    for _ in range(rounds):
        sent = time.perf_counter()
        await a.ws.send(text)
        await b.ws.recv()
        out.append(time.perf_counter() - sent)
    b.reader = asyncio.create_task(b.read())
    await relay(a, b, m.Hangup("call-idle-1"), [])
    return out


class GCPauses:
    """The load generator's own garbage-collection pauses (they would count as latency)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._start)

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def worker(url: str, first: int, count: int, index: int, watch_all: bool) -> None:
    """Hold ``count`` connections (users ``first``..); obey commands read from stdin."""
    backend = pqc.get_backend()
    keys = [backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for _ in range(2)]
    names = [f"user{i:05d}" for i in range(first, first + count)]
    partners = [None if watch_all else f"user{i ^ 1:05d}" for i in range(first, first + count)]
    start = time.perf_counter()
    peers: list[Peer] = []
    for lo in range(0, count, 32):
        batch = range(lo, min(lo + 32, count))
        # Two keys suffice: the server pins per name, and signatures are per challenge.
        peers += await asyncio.gather(
            *(register(url, keys[i % 2], names[i], partners[i]) for i in batch)
        )
    gc.collect()
    gc.freeze()  # 5,000 connections' objects: out of the collector's sight, as in the server
    pauses = GCPauses()
    emit({"registered": len(peers), "seconds": time.perf_counter() - start})
    pairs = [(peers[i], peers[i + 1]) for i in range(0, len(peers) - 1, 2)]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "run":
            pauses.take()
            result = await load_run(pairs, float(line[1]), float(line[2]), f"w{index}r{line[3]}")
            emit(result | {"gc_pause": pauses.take()})
        elif line[0] == "idle":
            emit({"idle": await idle_relay(*pairs[0], int(line[1]))})
        elif line[0] == "quit":
            break
    for peer in peers:
        await peer.ws.close()


# --- the baseline: a plain websockets relay ------------------------------------------------


async def start_process(*argv: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=ROOT, limit=2**26,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 600)).decode().strip()
    return proc, line


async def baseline(rounds: int, connections: int) -> tuple[list[float], float]:
    """Relay latencies and RSS KiB per held connection of a minimal websockets relay."""
    proc, line = await start_process("-c", BASELINE_RELAY)
    url = f"ws://127.0.0.1:{int(line)}"
    try:
        await asyncio.sleep(0.2)
        rss0 = rss_kib(proc.pid)

        async def hold(i: int) -> ClientConnection:
            ws = await connect(url, compression=None, ping_interval=None)
            await ws.send(f"held{i}")
            return ws

        held: list[ClientConnection] = []
        for lo in range(0, connections, 100):
            held += await asyncio.gather(*(hold(i) for i in range(lo, min(lo + 100, connections))))
        await asyncio.sleep(0.5)
        per_connection = (rss_kib(proc.pid) - rss0) / connections
        for ws in held:
            await ws.close()
        a, b = await connect(url, compression=None), await connect(url, compression=None)
        await a.send("a")
        await b.send("b")
        await asyncio.sleep(0.05)
        text = m.ICECandidate("call-base", "a", "0" * 96, payload=PAYLOAD).serialize()
        out = []
        for _ in range(rounds):
            sent = time.perf_counter()
            await a.send("b|" + text)
            await b.recv()
            out.append(time.perf_counter() - sent)
        await a.close()
        await b.close()
        return out, per_connection
    finally:
        proc.terminate()
        await proc.wait()


# --- the driver ----------------------------------------------------------------------------


async def command(proc: asyncio.subprocess.Process, line: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line.encode() + b"\n")
    await proc.stdin.drain()
    result: dict[str, Any] = json.loads(await proc.stdout.readline())
    return result


def healthz(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.replace("ws://", "http://") + "/healthz", timeout=30) as r:
        result: dict[str, Any] = json.loads(r.read())
        return result


async def run(args: argparse.Namespace) -> None:
    # Every user comes from 127.0.0.1 with one of two keys: lift the per-address and
    # per-key limits that exist to stop exactly that (docs/signaling.md, "Limits").
    server, line = await start_process(
        "-m", "signaling", "--port", "0", "--rate", "100000", "--burst", "100000",
        "--auth-timeout", "120", "--server-id", "load-test",
        "--max-unauthenticated-per-address", "1000", "--max-names-per-key", "10000",
        "--max-new-names-per-address", "10000",
    )  # fmt: skip
    url = line.rsplit(" ", 1)[1]
    workers: list[asyncio.subprocess.Process] = []
    try:
        await asyncio.sleep(0.3)
        rss0 = rss_kib(server.pid)
        share = [args.connections // args.workers // 2 * 2] * args.workers
        share[-1] += args.connections - sum(share)
        start = time.perf_counter()
        firsts = [sum(share[:i]) for i in range(args.workers)]
        started = await asyncio.gather(
            *(
                start_process(
                    __file__, "--worker", url, str(first), str(n), str(i), str(args.watch_all)
                )
                for i, (first, n) in enumerate(zip(firsts, share, strict=True))
            )
        )
        workers = [proc for proc, _ in started]
        reg_time = time.perf_counter() - start
        held = sum(json.loads(line)["registered"] for _, line in started)
        await asyncio.sleep(1.0)
        health = healthz(url)
        rss1 = rss_kib(server.pid)
        kib = (rss1 - rss0) / held
        base, base_kib = await baseline(args.idle_rounds, min(held, 2000))
        print(
            f"connections held: {health['registered']} registered / {health['connections']} "
            f"open (server /healthz), {held} clients in {args.workers} processes, registered "
            f"in {reg_time:.1f} s ({held / reg_time:.0f}/s); server RSS {rss0 / 1024:.1f} -> "
            f"{rss1 / 1024:.1f} MiB = {kib:.1f} KiB/connection (plain websockets relay "
            f"{base_kib:.1f} KiB, ratio {kib / base_kib:.2f})"
        )
        idle = (await command(workers[0], f"idle {args.idle_rounds}"))["idle"]
        med, base_med = statistics.median(idle), statistics.median(base)
        print(
            f"idle relay latency (8 KiB payload): signaling p50 {med * 1e3:.3f} ms, "
            f"plain websockets relay p50 {base_med * 1e3:.3f} ms, ratio {med / base_med:.2f}"
        )
        figures: list[tuple[float, float, float, float, float]] = []
        for r in range(args.runs):
            rate = args.rate / args.workers
            cpu0 = [cpu_seconds(p.pid) for p in (server, *workers)]
            wall0 = time.perf_counter()
            results = await asyncio.gather(
                *(command(w, f"run {rate} {args.duration} {r}") for w in workers)
            )
            setups = [s for res in results for s in res["setups"]]
            lat = [x for res in results for x in res["latencies"]]
            failures = sum(res["failures"] for res in results)
            gc_pause = max(res["gc_pause"] for res in results)
            wall = time.perf_counter() - wall0
            cpu = [cpu_seconds(p.pid) - c for p, c in zip((server, *workers), cpu0, strict=True)]
            per_s = len(setups) / max(res["elapsed"] for res in results)
            row = (per_s, pct(setups, 0.5), pct(setups, 0.99), pct(lat, 0.5), pct(lat, 0.99))
            figures.append(row)
            print(
                f"run {r + 1}: {len(setups)} set-ups ({failures} failed) = {per_s:.0f}/s "
                f"(target {args.rate:g}/s); set-up p50 {row[1] * 1e3:.2f} ms p99 "
                f"{row[2] * 1e3:.2f} ms; routing ({len(lat)} messages) p50 {row[3] * 1e3:.3f} ms "
                f"p99 {row[4] * 1e3:.3f} ms; server RSS {rss_kib(server.pid) / 1024:.1f} MiB; "
                f"CPU server {cpu[0] / wall:.0%}, clients {sum(cpu[1:]) / wall:.0%} of a core; "
                f"load average {os.getloadavg()[0]:.1f}; longest client GC pause "
                f"{gc_pause * 1e3:.0f} ms"
            )
        med_row = [statistics.median(col) for col in zip(*figures, strict=True)]
        print(
            f"median of {args.runs} runs: {med_row[0]:.0f} set-ups/s, set-up p50 "
            f"{med_row[1] * 1e3:.2f} ms p99 {med_row[2] * 1e3:.2f} ms, routing p50 "
            f"{med_row[3] * 1e3:.3f} ms p99 {med_row[4] * 1e3:.3f} ms "
            f"(with {health['registered']} connections held)"
        )
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(b"quit\n")
            await w.stdin.drain()
        await asyncio.gather(*(w.wait() for w in workers))
    finally:
        for proc in [*workers, server]:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise_nofile()
        url, first, count, index = sys.argv[2], *map(int, sys.argv[3:6])
        asyncio.run(worker(url, first, count, index, sys.argv[6] == "True"))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="2..10000 (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0, help="call set-ups/s (default 100)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run, max 60")
    parser.add_argument("--runs", type=int, default=3, help="load runs (medians, default 3)")
    parser.add_argument("--workers", type=int, default=2, help="client processes 1..4 (default 2)")
    parser.add_argument("--idle-rounds", type=int, default=200, help="idle relay samples")
    parser.add_argument(
        "--instances",
        metavar="N,N,...",
        help="several instances on one Redis instead (e.g. 1,2,4): scripts/load_cluster.py",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=30,
        help="--instances: routing rounds over 20 pairs of each kind (raised to 600 samples)",
    )
    parser.add_argument("--concurrency", type=int, default=10, help="--instances: set-ups at once")
    parser.add_argument(
        "--client-processes", type=int, default=2, help="--instances: set-up client processes"
    )
    parser.add_argument(
        "--no-links",
        action="store_true",
        help="--instances: call frames between instances over Redis only (no direct links)",
    )
    parser.add_argument(
        "--watch-all",
        action="store_true",
        help="register without a watch list (everyone's presence, O(N) per registration)",
    )
    args = parser.parse_args()
    if args.instances:
        from scripts.load_cluster import run as run_cluster

        raise_nofile()
        asyncio.run(run_cluster(args))
        return
    if not 4 <= args.connections <= MAX_CONNECTIONS or not 1 <= args.workers <= 4:
        parser.error(f"bounds: 4 <= --connections <= {MAX_CONNECTIONS}, 1 <= --workers <= 4")
    if not 0 < args.duration <= 60 or args.rate <= 0 or not 1 <= args.runs <= 10:
        parser.error("bounds: 0 < --duration <= 60, --rate > 0, 1 <= --runs <= 10")
    if args.connections // args.workers < 2:
        parser.error("each worker needs at least one pair of connections")
    limit = raise_nofile()
    if limit < args.connections + 100:
        parser.error(f"RLIMIT_NOFILE hard limit {limit} is too low for {args.connections}")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
