#!/usr/bin/env python3
"""Load test of the signaling server (loopback only, bounded in size and time).

Starts ``python -m signaling`` as a subprocess on 127.0.0.1, opens N
authenticated connections (ML-DSA-65 registration), then places call set-ups
(invite → accept → offer → answer → hangup, 8 KiB offer/answer payloads) at a
target rate between disjoint pairs, and reports:

* connections held and the server's resident memory per connection;
* call set-ups per second achieved, set-up time p50/p99;
* routing latency p50/p99 (client send → other client receive) under load;
* idle relay latency of one pair and memory per connection, against a baseline
  measured in the same run: a minimal websockets relay (no JSON, no validation,
  same settings: no compression) in its own process.

Usage::

    python scripts/load_signaling.py --connections 200 --rate 50 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.signaling import messages as m  # noqa: E402

PAYLOAD = "x" * 8192

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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
        async for text in self.ws:
            now = time.perf_counter()
            obj = json.loads(text)
            fut = self.waiters.pop((obj.get("call_id", ""), obj["type"]), None)
            if fut is not None and not fut.done():
                fut.set_result(now)


async def start_process(*argv: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    return proc, line


async def register(url: str, key: pqc.SigningKey, name: str) -> Peer:
    ws = await connect(url, max_size=2**24, compression=None)
    challenge = m.Challenge.parse(await ws.recv())
    await ws.send(m.Register.create(key, name, challenge).serialize())
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
    call_id = getattr(msg, "call_id", "")
    fut = receiver.expect(call_id, msg.TYPE)
    text = msg.serialize()
    sent = time.perf_counter()
    await sender.ws.send(text)
    latencies.append(await asyncio.wait_for(fut, 30) - sent)


async def call_setup(a: Peer, b: Peer, n: int, latencies: list[float]) -> float:
    call_id = f"load-{n:08d}"
    start = time.perf_counter()
    await relay(a, b, m.Invite(call_id, peer=b.name), latencies)
    await relay(b, a, m.Accept(call_id), latencies)
    await relay(a, b, m.Offer(call_id, payload=PAYLOAD), latencies)
    await relay(b, a, m.Answer(call_id, payload=PAYLOAD), latencies)
    setup = time.perf_counter() - start
    await relay(a, b, m.Hangup(call_id), latencies)
    return setup


async def baseline(rounds: int, connections: int) -> tuple[list[float], float]:
    """Relay latencies and RSS KiB per held connection of a minimal websockets relay."""
    proc, line = await start_process("-c", BASELINE_RELAY)
    url = f"ws://127.0.0.1:{int(line)}"
    try:
        await asyncio.sleep(0.2)
        rss0 = rss_kib(proc.pid)
        held = []
        for i in range(connections):
            held.append(await connect(url, compression=None))
            await held[-1].send(f"held{i}")
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


async def run(args: argparse.Namespace) -> None:
    backend = pqc.get_backend()
    proc, line = await start_process(
        "-m", "signaling", "--port", "0", "--rate", "100000", "--burst", "100000",
        "--server-id", "load-test",
    )  # fmt: skip
    url = line.rsplit(" ", 1)[1]
    try:
        await asyncio.sleep(0.2)
        rss0 = rss_kib(proc.pid)
        keys = [backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for _ in range(2)]
        start = time.perf_counter()
        peers: list[Peer] = []
        for first in range(0, args.connections, 20):
            batch = range(first, min(first + 20, args.connections))
            # Two keys suffice: the server pins per name, and signs are per challenge.
            peers += await asyncio.gather(
                *(register(url, keys[i % 2], f"user{i:05d}") for i in batch)
            )
        reg_time = time.perf_counter() - start
        await asyncio.sleep(0.5)  # let presence broadcasts drain
        rss1 = rss_kib(proc.pid)
        base, base_kib = await baseline(args.idle_rounds, len(peers))
        kib = (rss1 - rss0) / len(peers)
        print(
            f"connections held: {len(peers)} in {reg_time:.2f} s "
            f"({len(peers) / reg_time:.0f} registrations/s); server RSS "
            f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB = {kib:.1f} KiB/connection "
            f"(plain websockets relay {base_kib:.1f} KiB, ratio {kib / base_kib:.2f})"
        )

        # Idle: ICE relayed inside one accepted call, nothing else running, measured
        # exactly as the baseline (pre-serialized text, receiver awaiting recv()).
        a, b = peers[0], peers[1]
        await relay(a, b, m.Invite("call-idle-1", peer=b.name), [])
        await relay(b, a, m.Accept("call-idle-1"), [])
        assert b.reader is not None
        b.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await b.reader
        text = m.ICECandidate("call-idle-1", payload=PAYLOAD).serialize()
        idle: list[float] = []
        for _ in range(args.idle_rounds):
            sent = time.perf_counter()
            await a.ws.send(text)
            await b.ws.recv()
            idle.append(time.perf_counter() - sent)
        b.reader = asyncio.create_task(b.read())
        await relay(a, b, m.Hangup("call-idle-1"), [])
        med, base_med = statistics.median(idle), statistics.median(base)
        print(
            f"idle relay latency (8 KiB payload): signaling p50 {med * 1e3:.3f} ms, "
            f"plain websockets relay p50 {base_med * 1e3:.3f} ms, ratio {med / base_med:.2f}"
        )

        pairs = [(peers[i], peers[i + 1]) for i in range(0, len(peers) - 1, 2)]
        locks = [asyncio.Lock() for _ in pairs]
        latencies: list[float] = []
        setups: list[float] = []

        async def one(n: int) -> None:
            k = n % len(pairs)
            async with locks[k]:
                setups.append(await call_setup(*pairs[k], n, latencies))

        total = int(args.rate * args.duration)
        start = time.perf_counter()
        tasks = []
        for n in range(total):
            delay = start + n / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        print(
            f"call set-ups: {len(setups)} in {elapsed:.2f} s = {len(setups) / elapsed:.1f}/s "
            f"(target {args.rate:g}/s); set-up time p50 {pct(setups, 0.5) * 1e3:.2f} ms, "
            f"p99 {pct(setups, 0.99) * 1e3:.2f} ms"
        )
        print(
            f"routing latency under load ({len(latencies)} messages): "
            f"p50 {pct(latencies, 0.5) * 1e3:.3f} ms, p99 {pct(latencies, 0.99) * 1e3:.3f} ms"
        )
        for peer in peers:
            await peer.ws.close()
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200, help="2..2000 (default 200)")
    parser.add_argument("--rate", type=float, default=50.0, help="call set-ups/s (default 50)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds, max 60 (default 5)")
    parser.add_argument("--idle-rounds", type=int, default=200, help="idle relay samples")
    args = parser.parse_args()
    if not 2 <= args.connections <= 2000 or not 0 < args.duration <= 60 or args.rate <= 0:
        parser.error("bounds: 2 <= --connections <= 2000, 0 < --duration <= 60, --rate > 0")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
