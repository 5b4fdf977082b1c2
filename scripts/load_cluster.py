#!/usr/bin/env python3
"""Load test of several signaling instances on one Redis (``load_signaling.py --instances``).

For each instance count in ``--instances`` (default ``1,2,4``), in one run:
starts a ``redis-server`` (and, for the store figure, PostgreSQL) on loopback
ports in temporary folders, then N ``python -m signaling --redis`` processes,
and one client process side (this one) holding ``--connections`` registered
users spread round-robin over the instances (each with the full URL list,
its own instance first). It measures:

* connections held (sum of the instances' ``/healthz`` ``registered``);
* memory per connection (the instances' RSS delta / connections);
* routing latency p50/p99 of an 8 KiB ``ice`` payload between the parties of
  accepted calls (client send → other client receive), for pairs on the
  **same** instance and on **different** instances (with N = 1 all pairs are
  same-instance), and their ratio. The two kinds are measured in turns, pair by
  pair, in the same time window (:func:`schedule`), at least
  :data:`MIN_SAMPLES` samples each after two rounds of warm-up; the ratio is
  also given for five consecutive slices of the samples, and each kind's
  quartiles, so that its spread shows;
* call set-ups per second (invite → ringing → accept → 8 KiB offer → answer
  → hangup, ``--concurrency`` at once, for ``--duration`` seconds) for pairs
  on the same instance and (N > 1) pairs on different instances, placed by
  ``--client-processes`` client processes of their own (started together, so
  one Python client is not the bottleneck), and the scaling against N = 1;
* server CPU per set-up: CPU seconds of the instances and of ``redis-server``
  (``/proc``) during the set-up phase, per 1000 set-ups, so that scaling can
  be judged apart from the cores this machine has;
* recovery: one instance is killed with SIGKILL; the time until every one of
  its users is registered again on another instance (max over the users).

* messages per second: 8 senders, each with 4 ``mail_put`` of 1 KiB in flight,
  to a recipient on another instance (N > 1), through the instances and the
  shared PostgreSQL store (every instance runs with ``--database``), and the
  fraction of them pushed to the recipients (1.0: all);

Besides, once per run: envelopes per second through the shared PostgreSQL
store (``signaling/pgstore.py``, 16 concurrent writers) against the embedded
SQLite store measured in the same run (the baseline). The test PostgreSQL runs
with ``fsync=off``, SQLite with ``synchronous=FULL``: the store line compares
the code paths, not the disks.

The instances share a cluster secret and send call frames to each other
over direct links (docs/signaling.md, "Direct links between instances");
``--no-links`` runs them on Redis alone, as before the links.

Loopback only, bounded in size (``--connections`` <= 2000) and time.

Usage::

    python scripts/load_signaling.py --instances 1,2,4 --connections 400
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.messaging.transport import SignalingTransport  # noqa: E402
from qcall.signaling import messages as m  # noqa: E402
from qcall.signaling.client import SignalingClient  # noqa: E402
from signaling.local_services import LocalPostgres, LocalRedis, free_port  # noqa: E402

PAYLOAD = "x" * 8192
SERVER_ID = "load-cluster"
#: Routing samples per kind of pair at least (``--rounds`` is raised to reach it):
#: with 200, the p50 ratio moved by ±0.35 from run to run on the shared machine.
MIN_SAMPLES = 600


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def registered(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return int(json.load(answer)["registered"])


async def spawn(redis_url: str, port: int, name: str, *more: str) -> asyncio.subprocess.Process:
    """Start ``python -m signaling --redis`` (``more``: further flags, e.g. ``--database``)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "--port", str(port), "--server-id", SERVER_ID,
        "--redis", redis_url, "--instance-id", name, "--rate", "1000", "--burst", "2000",
        "--max-unauthenticated-per-address", "1000", "--max-new-names-per-address", "100000",
        *more, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if b"listening" not in line:
        raise SystemExit(f"instance {name} did not start: {line!r}")
    return proc


async def next_of(client: SignalingClient, cls: type[Any], timeout: float = 10.0) -> Any:
    while True:
        event = await client.next_event(timeout)
        if isinstance(event, cls):
            return event


async def setup_call(a: SignalingClient, b: SignalingClient) -> str:
    call_id = await a.invite(b.name)
    await next_of(b, m.Invite)
    await b.ringing(call_id)
    await next_of(a, m.Ringing)
    await b.accept(call_id)
    await next_of(a, m.Accept)
    await a.send_offer(call_id, PAYLOAD)
    await next_of(b, m.Offer)
    await b.send_answer(call_id, PAYLOAD)
    await next_of(a, m.Answer)
    return call_id


async def hangup(a: SignalingClient, b: SignalingClient, call_id: str) -> None:
    await a.hangup(call_id)
    await next_of(b, m.Hangup)


def schedule(kinds: list[str], pairs: int, rounds: int) -> list[tuple[int, str, int]]:
    """``(round, kind, pair)`` in measuring order: in every round each pair of each
    kind relays once, the kinds taking turns pair by pair (same, cross, same,
    cross, ...) and the kind that goes first rotating from round to round, so
    that every kind sees the same machine load at the same moments."""
    order = []
    for r in range(rounds):
        turn = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        order += [(r, kind, i) for i in range(pairs) for kind in turn]
    return order


def spread(same: list[float], cross: list[float], blocks: int = 5) -> dict[str, Any]:
    """The cross/same p50 ratio and how much it moves: the samples (taken in
    turns, so ``same[j]`` and ``cross[j]`` are close in time) are cut into
    ``blocks`` consecutive slices, and the ratio of each slice is given too."""
    n = min(len(same), len(cross))
    cuts = [n * b // blocks for b in range(blocks + 1)]
    per_block = [
        statistics.median(cross[lo:hi]) / statistics.median(same[lo:hi])
        for lo, hi in itertools.pairwise(cuts)
        if hi > lo
    ]
    return {
        "samples_per_kind": n,
        "cross_same_ratio_p50": round(statistics.median(cross) / statistics.median(same), 2),
        "ratio_blocks": [round(r, 2) for r in per_block],
        "same_p25_p50_p75_ms": [round(pct(same, q), 3) for q in (0.25, 0.5, 0.75)],
        "cross_p25_p50_p75_ms": [round(pct(cross, q), 3) for q in (0.25, 0.5, 0.75)],
    }


async def routing(
    kinds: dict[str, list[tuple[SignalingClient, SignalingClient]]], rounds: int, warmup: int = 2
) -> dict[str, list[float]]:
    """One-way latencies (ms) of an 8 KiB ice payload inside accepted calls, for
    each kind of pair, measured in turns (:func:`schedule`); ``warmup`` rounds
    first, not counted (the links open on first use)."""
    calls = {k: [await setup_call(a, b) for a, b in pairs] for k, pairs in kinds.items()}
    count = min(len(pairs) for pairs in kinds.values())
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for r, kind, i in schedule(list(kinds), count, warmup + rounds):
        (a, b), call_id = kinds[kind][i], calls[kind][i]
        start = time.perf_counter()
        await a.send_ice(call_id, PAYLOAD)
        try:
            await next_of(b, m.ICECandidate)
        except TimeoutError:
            raise SystemExit(f"routing: a {kind} frame (round {r}) did not arrive") from None
        if r >= warmup:
            samples[kind].append((time.perf_counter() - start) * 1e3)
    for kind, pairs in kinds.items():
        for (a, b), call_id in zip(pairs, calls[kind], strict=True):
            await hangup(a, b, call_id)
    return samples


async def setups_per_second(
    pairs: list[tuple[SignalingClient, SignalingClient]], duration: float
) -> tuple[int, float]:
    done = 0
    stop = time.perf_counter() + duration

    async def loop(a: SignalingClient, b: SignalingClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await hangup(a, b, await setup_call(a, b))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(a, b) for a, b in pairs))
    return done, time.perf_counter() - start


async def setup_worker(urls: list[str], mode: str, pairs: int, duration: float, tag: str) -> None:
    """``--setup-worker``: ``pairs`` pairs of new users place set-ups; prints the count."""
    backend = pqc.get_backend()
    n = len(urls)
    clients = []
    for i in range(2 * n * pairs + 1):
        home = i % n
        key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
        client = SignalingClient(urls[home:] + urls[:home], key, f"{tag}x{i}", watch=[])
        await client.connect()
        clients.append(client)
    # same: i and i + n share an instance; cross: i and i + 1 do not (n > 1).
    step = n if mode == "same" else 1
    chosen = [(clients[i], clients[i + step]) for i in range(0, 2 * n * pairs, 2 * n)][:pairs]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # go
    done, elapsed = await setups_per_second(chosen, duration)
    print(json.dumps({"setups": done / elapsed, "count": done}), flush=True)
    for client in clients:
        await client.close()


async def setups_in_processes(
    urls: list[str], mode: str, args: Any, servers: list[int]
) -> tuple[float, int, list[float]]:
    """Set-ups/s of ``args.concurrency`` pairs split over ``args.client_processes``
    client processes (so one Python client is not the bottleneck), started together;
    the set-ups done, and the CPU seconds each of ``servers`` (pids) used meanwhile."""
    k = max(1, min(args.client_processes, args.concurrency))
    shares = [args.concurrency // k + (i < args.concurrency % k) for i in range(k)]
    procs = []
    for i, share in enumerate(shares):
        worker = ["--setup-worker", json.dumps(urls), mode, str(share), str(args.duration)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, *worker, f"w{i}{mode[0]}{len(urls)}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        procs.append(proc)
    for proc in procs:
        assert proc.stdout is not None
        if b"ready" not in await asyncio.wait_for(proc.stdout.readline(), 120):
            raise SystemExit("a set-up worker did not start")
    cpu0 = [cpu_seconds(pid) for pid in servers]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    total, count = 0.0, 0
    for proc in procs:
        assert proc.stdout is not None
        answer = json.loads(await proc.stdout.readline())
        total, count = total + answer["setups"], count + answer["count"]
    cpu = [cpu_seconds(pid) - c for pid, c in zip(servers, cpu0, strict=True)]
    for proc in procs:
        await proc.wait()
    return total, count, cpu


async def messages_per_second(
    pairs: list[tuple[SignalingClient, SignalingClient]], duration: float
) -> tuple[float, float]:
    """1 KiB messages sender → recipient through the instances and the shared
    store, 4 in flight per sender: (acknowledged/s, fraction pushed to recipients)."""
    transports = [(SignalingTransport(a), SignalingTransport(b)) for a, b in pairs]
    acked = 0
    stop = time.perf_counter() + duration

    async def loop(sender: SignalingTransport, recipient: str) -> None:
        nonlocal acked
        while time.perf_counter() < stop:
            await sender.send(recipient, os.urandom(1024), os.urandom(16))
            acked += 1

    start = time.perf_counter()
    await asyncio.gather(
        *(loop(a, b.client.name) for a, b in transports for _ in range(4))
    )  # fmt: skip
    rate = acked / (time.perf_counter() - start)
    await asyncio.sleep(1.0)  # the last pushes arrive
    pushed = sum(len(b.take_pushed()) for _, b in transports)
    return rate, pushed / max(1, acked)


async def store_rates(writers: int = 16, per_writer: int = 100) -> dict[str, float]:
    """Envelopes/s through PostgreSQL and (baseline) SQLite, ``writers`` at once."""
    from signaling.pgstore import PostgresMessageStore
    from signaling.store import MessageStore, SQLiteMessageStore

    rates: dict[str, float] = {}
    with LocalPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        assert isinstance(pg, LocalPostgres)
        pg_url = pg.create_database("load")
        for kind in ("sqlite", "postgresql"):
            store: MessageStore = (
                SQLiteMessageStore(Path(tmp) / "s.db")
                if kind == "sqlite"
                else await PostgresMessageStore.connect(pg_url, pool_size=8)
            )

            async def writer(w: int, store: MessageStore = store) -> None:
                for i in range(per_writer):
                    await store.put(f"user{w}", "sender", PAYLOAD.encode()[:1024], time.time())

            start = time.perf_counter()
            await asyncio.gather(*(writer(w) for w in range(writers)))
            rates[kind] = writers * per_writer / (time.perf_counter() - start)
            await store.close()
    return rates


async def one_count(
    n: int, args: Any, keys: list[pqc.SigningKey], pg: LocalPostgres
) -> dict[str, Any]:
    with LocalRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        assert isinstance(redis, LocalRedis) and redis.proc is not None
        ports = [free_port() for _ in range(n)]
        database = pg.create_database(f"count{n}")
        flags = ["--database", database]
        if not args.no_links:
            secret = Path(tmp) / "cluster.secret"
            secret.write_bytes(os.urandom(32).hex().encode())
            secret.chmod(0o600)
            flags += ["--cluster-secret-file", str(secret)]
        procs = [await spawn(redis.url, p, f"i{k}", *flags) for k, p in enumerate(ports)]
        base_rss = sum(rss_kib(p.pid) for p in procs)
        urls = [f"ws://127.0.0.1:{p}" for p in ports]
        clients: list[SignalingClient] = []
        try:
            for i in range(args.connections):
                home = i % n
                order = urls[home:] + urls[:home]
                client = SignalingClient(order, keys[i % len(keys)], f"u{i}", watch=[])
                await client.connect()
                clients.append(client)
            await asyncio.sleep(0.5)
            held = sum(registered(p) for p in ports)
            per_conn = (sum(rss_kib(p.pid) for p in procs) - base_rss) / len(clients)
            # Pairs: client i is on instance i % n; disjoint blocks of 4n clients, each
            # with a same pair (4nk, 4nk + n: instance 0) and a cross pair
            # (4nk + 2n + 1, 4nk + 2n + 2: instances 1 and 2, or 1 and 0 when n = 2).
            count = min(20, len(clients) // (4 * n + 2))
            blocks = [4 * n * k for k in range(count)]
            kinds = {"same": [(clients[b], clients[b + n]) for b in blocks]}
            if n > 1:
                kinds["cross"] = [(clients[b + 2 * n + 1], clients[b + 2 * n + 2]) for b in blocks]
            rounds = max(args.rounds, -(-MIN_SAMPLES // count))
            if rounds > args.rounds:
                print(
                    f"# {n} instances: --rounds {args.rounds} x {count} pairs raised to {rounds} "
                    f"rounds ({rounds * count} samples per kind, at least {MIN_SAMPLES})",
                    flush=True,
                )
            lat = await routing(kinds, rounds)
            same_ms = lat["same"]
            result: dict[str, Any] = {
                "instances": n,
                "connections_held": held,
                "memory_per_connection_kib": round(per_conn, 1),
                "routing_same_p50_ms": round(statistics.median(same_ms), 3),
                "routing_same_p99_ms": round(pct(same_ms, 0.99), 3),
                "samples_per_kind": len(same_ms),
                "routing_load_average": round(os.getloadavg()[0], 2),
            }
            if n > 1:
                cross_ms = lat["cross"]
                result |= {
                    "routing_cross_p50_ms": round(statistics.median(cross_ms), 3),
                    "routing_cross_p99_ms": round(pct(cross_ms, 0.99), 3),
                } | spread(same_ms, cross_ms)
            servers = [p.pid for p in procs] + [redis.proc.pid]
            for mode in ("same", "cross") if n > 1 else ("same",):
                rate, count, cpu = await setups_in_processes(urls, mode, args, servers)
                result[f"setups_per_s_{mode}"] = round(rate, 1)
                # CPU seconds per 1000 set-ups: all instances, and Redis apart.
                per = 1000 / max(1, count)
                result[f"cpu_s_per_1000_setups_{mode}"] = round(sum(cpu[:-1]) * per, 2)
                result[f"redis_cpu_s_per_1000_setups_{mode}"] = round(cpu[-1] * per, 2)
            # Messages: client i sends to i + 1 (another instance when n > 1).
            mail_pairs = [(clients[i], clients[i + 1]) for i in range(0, 16, 2)]
            rate, pushed = await messages_per_second(mail_pairs, args.duration)
            result["messages_per_s"] = round(rate)
            result["messages_pushed_fraction"] = round(pushed, 3)
            if n > 1:
                victims = [c for i, c in enumerate(clients) if i % n == n - 1]
                before = {id(c): c.registrations for c in victims}
                procs[-1].send_signal(signal.SIGKILL)
                killed = time.perf_counter()
                await procs[-1].wait()
                while any(c.registrations == before[id(c)] for c in victims):
                    if time.perf_counter() - killed > 30:
                        break
                    await asyncio.sleep(0.01)
                result["recovery_s"] = round(time.perf_counter() - killed, 3)
                result["recovered"] = sum(c.registrations > before[id(c)] for c in victims)
                result["victims"] = len(victims)
            return result
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 10)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def run(args: Any) -> None:
    counts = [int(x) for x in str(args.instances).split(",")]
    if any(not 1 <= c <= 8 for c in counts) or not 8 <= args.connections <= 2000:
        raise SystemExit("bounds: 1 <= instances <= 8, 8 <= --connections <= 2000")
    backend = pqc.get_backend()
    keys = [
        backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for _ in range(args.connections)
    ]  # one per user: a key may hold only max_names_per_key names
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with LocalPostgres() as pg:
        assert isinstance(pg, LocalPostgres)
        results = [await one_count(n, args, keys, pg) for n in counts]
    print(f"# links between instances: {'off (--no-links)' if args.no_links else 'on'}")
    for result in results:
        print(json.dumps(result), flush=True)
    rates = await store_rates()
    print(json.dumps({
        "store_envelopes_per_s_postgresql": round(rates["postgresql"]),
        "store_envelopes_per_s_sqlite_baseline": round(rates["sqlite"]),
    }), flush=True)  # fmt: skip
    one = results[0]["setups_per_s_same"]
    print(json.dumps({
        f"setups_{mode}_scaling_vs_1": {
            r["instances"]: round(r[f"setups_per_s_{mode}"] / one, 2)
            for r in results if f"setups_per_s_{mode}" in r
        }
        for mode in ("same", "cross")
    }), flush=True)  # fmt: skip
    ratios = [r["cross_same_ratio_p50"] for r in results if "cross_same_ratio_p50" in r]
    if ratios:
        print(f"# cross/same routing p50 ratio, median over counts: {statistics.median(ratios):g}")


if __name__ == "__main__" and sys.argv[1:2] == ["--setup-worker"]:
    urls_, mode_, pairs_, duration_, tag_ = sys.argv[2:7]
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(setup_worker(json.loads(urls_), mode_, int(pairs_), float(duration_), tag_))
