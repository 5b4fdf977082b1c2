#!/usr/bin/env python3
"""Messaging through one signaling server on loopback: throughput, latency, files, QKD use.

Usage::

    python scripts/bench_messaging.py [--runs 3] [--rounds 5] [--warmup 1]
                                      [--messages 4000] [--pairs 8] [--rate 500]
                                      [--seconds 4] [--file-mb 100] [--json]

The server is a real ``python -m signaling`` process with its SQLite mailbox in a
temporary directory (``synchronous=FULL``: every acknowledged envelope is on
disk). Clients run in this process, each with its own store and signaling
connection. Every figure is measured twice in the same run, over the same path:

* **encrypted**: :class:`~qcall.messaging.client.MessagingClient` (ratchet, AES-GCM,
  the client store's transactions, receipts not sent), recipients online, pushed
  envelopes processed and acknowledged;
* **plain** (the baseline): the same bytes' worth of unencrypted messages through
  the same :class:`~qcall.messaging.transport.SignalingTransport` calls and the same
  server, recipients acknowledging what is pushed.

Throughput: ``--pairs`` senders each send ``--messages / pairs`` messages to their
own recipient in bursts of ``--window`` (encrypted: :meth:`MessagingClient.send_texts`,
one client commit per burst, the envelopes pipelined; plain: the same ``mail_put``
requests pipelined the same way; ``--window 1``: each send waits for the server); the time
runs from the first send to the last message processed. Latency: the same pairs
paced at ``--rate`` messages/s in all for ``--seconds``, from the send call to
the moment the recipient has the message (encrypted: decrypted and committed to its
store by :meth:`MessagingClient.process_batch`; plain: received), both before the
recipient's acknowledgement to the server. Files: one ``--file-mb`` MB file, encrypted
(:meth:`MessagingClient.send_file` to the ``FileReceived`` event, SHA-256
checked) vs the same chunks sent plain. QKD: keys taken from a counting key
source under the default policy, and the messages/s one Beijing–Hefei route of
the simulated network sustains from its modelled key rate.

Paired rounds (the encrypted ÷ plain time). Each run starts its own server and pair
processes, sets up the sessions, then does ``--warmup`` unrecorded rounds and ``--rounds``
recorded ones. A round is one plain and one encrypted throughput measurement back to back
over the same server and clients, the order alternating from round to round (recorded
round 1: plain first, round 2: encrypted first, ...), so that a swing of the machine's
load hits both halves of a pair alike and favours neither kind on average. Each round
gives its own ratio, encrypted time ÷ plain time; the headline figure is the **median
of the paired ratios** of all runs' recorded rounds, printed with their quartiles (25 %
and 75 %) and their count. The figure printed before this method, the **ratio of
medians** (median over the runs of plain msg/s ÷ median of encrypted msg/s; a run's
throughput being the median of its rounds), is still printed, labelled: on a shared
machine its two medians are taken up to minutes apart and load swings move it. The
latency phase (both kinds) runs once per run, in the first recorded round, right after
each kind's throughput measurement; ``--rounds 1 --warmup 0`` is exactly the previous
method (per run: plain throughput, plain latency, encrypted throughput, encrypted
latency), its one paired ratio per run being that run's own ratio.

Medians of ``--runs`` runs are printed, with the ratios encrypted/plain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.contacts import ContactStore  # noqa: E402
from qcall.identity import Identity  # noqa: E402
from qcall.messaging.api import ClientConfig, FileReceived, MessageReceived  # noqa: E402
from qcall.messaging.client import MessagingClient  # noqa: E402
from qcall.messaging.ratchet import QKDPolicy  # noqa: E402
from qcall.messaging.store import ClientStore  # noqa: E402
from qcall.messaging.transport import SignalingTransport  # noqa: E402
from qcall.qkd.client import KeySource  # noqa: E402
from qcall.qkd.etsi014 import QKDKey  # noqa: E402
from qcall.qkd.keyfile import KeyFileSource, create_key_files  # noqa: E402
from qcall.signaling.client import SignalingClient  # noqa: E402

CHUNK = 256 * 1024


# --- set-up ----------------------------------------------------------------------------------


@contextlib.contextmanager
def server_process(directory: Path) -> Any:
    """``python -m signaling`` on a free loopback port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling", "--port", "0", "--mailbox",
         str(directory / "server.db"), "--rate", "1000000", "--burst", "1000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield "ws://" + line.rsplit("ws://", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait()


class CountingSource:
    """A key source that counts the QKD keys and bytes it hands out."""

    def __init__(self, inner: KeySource) -> None:
        self.inner, self.keys, self.bytes = inner, 0, 0

    async def get_key(
        self, peer_sae_id: str, size_bits: int | None = None, **options: Any
    ) -> QKDKey:
        key = await self.inner.get_key(peer_sae_id, size_bits, **options)
        self.keys, self.bytes = self.keys + 1, self.bytes + len(key.key)
        return key

    async def get_key_by_id(self, peer_sae_id: str, key_id: str, **options: Any) -> QKDKey:
        return await self.inner.get_key_by_id(peer_sae_id, key_id, **options)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Peer:
    client: MessagingClient
    link: SignalingClient
    transport: SignalingTransport


async def make_peer(
    url: str, directory: Path, name: str, source: Any = None, **config: Any
) -> Peer:
    seed = hashlib.sha256(b"bench " + name.encode()).digest()
    identity = Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    link = SignalingClient(url, identity.signing_key, name, timeout=60)
    transport = SignalingTransport(link, timeout=120)
    client = MessagingClient(
        identity,
        ClientStore(home / "messages.db", identity.signing_key.seed_bytes()),
        transport,
        ContactStore(home / "contacts.json"),
        key_source=source,
        config=ClientConfig(one_time_prekeys=5, low_water=1, **config),
    )
    await link.connect()
    await client.ensure_prekeys()
    return Peer(client, link, transport)


@contextlib.asynccontextmanager
async def peers(url: str, directory: Path, pairs: int, tag: str) -> AsyncIterator[list[Peer]]:
    made = []
    try:
        for i in range(pairs):
            made.append(await make_peer(url, directory, f"{tag}s{i}"))
            made.append(await make_peer(url, directory, f"{tag}r{i}"))
        yield made
    finally:
        for p in made:
            await p.link.close()
            p.client.store.close()


# --- receivers ----------------------------------------------------------------------------


async def receive_loop(
    peer: Peer, encrypted: bool, expected: int, seen: Callable[[bytes], None]
) -> None:
    """Process what is pushed until ``expected`` messages arrived; ``seen(payload)`` each."""
    got = 0
    ids: set[int] = set()
    transport = peer.transport
    while got < expected:
        await transport.wake.wait()
        pushed = transport.take_pushed()
        if encrypted:
            # Processed and committed (shown) first, acknowledged after: as plain does.
            events = await peer.client.process_batch(pushed)
            if transport.fetch_needed:
                events += await peer.client.receive()
            for e in events:
                if isinstance(e, MessageReceived):
                    seen(e.content.text.encode())
                    got += 1
            if pushed:
                await transport.ack([e.id for e in pushed])
        else:
            if transport.fetch_needed:
                pushed += await transport.fetch(0, 500)
            fresh = {env.id: env for env in pushed if env.id not in ids}
            ids.update(fresh)
            for env in fresh.values():
                seen(env.data)
            got += len(fresh)
            if fresh:
                await transport.ack(list(fresh))


def stamp(i: int) -> bytes:
    return f"{i}:{time.perf_counter():.9f}:".encode() + b"x" * 40


async def send_one(peer: Peer, to: str, encrypted: bool, payload: bytes, i: int) -> None:
    if encrypted:
        await peer.client.send_text(to, payload.decode())
    else:
        await peer.transport.send(to, payload, hashlib.sha256(payload).digest()[:16])


async def send_burst(peer: Peer, to: str, encrypted: bool, payloads: list[bytes]) -> None:
    """A window of messages sent without waiting for each answer.

    Encrypted: :meth:`MessagingClient.send_texts` (one client commit for the burst, the
    envelopes pipelined); plain: the same ``mail_put`` requests pipelined the same way.
    """
    if encrypted:
        await peer.client.send_texts(to, [p.decode() for p in payloads])
    else:
        await asyncio.gather(
            *(peer.transport.send(to, p, hashlib.sha256(p).digest()[:16]) for p in payloads)
        )


async def warm_up(pairs: list[Peer]) -> None:
    """Set up every session (a prekey message each way) so runs measure the ratchet."""
    for s, r in zip(pairs[::2], pairs[1::2], strict=True):
        await s.client.send_text(r.client.me.name, "hello")
        await r.client.receive()
        await r.client.send_text(s.client.me.name, "hello")
        await s.client.receive()


# --- measurements -------------------------------------------------------------------------


async def throughput(
    pair: list[Peer], encrypted: bool, per: int, window: int
) -> tuple[float, float]:
    """One pair: ``per`` messages in bursts of ``window`` (1: each send waits for the
    server's answer); returns (start, end) on the shared clock."""
    s, r = pair
    receiving = asyncio.create_task(receive_loop(r, encrypted, per, lambda _: None))
    t0 = time.perf_counter()
    for i in range(0, per, window):
        payloads = [stamp(j) for j in range(i, min(per, i + window))]
        if window == 1:
            await send_one(s, r.client.me.name, encrypted, payloads[0], i)
        else:
            await send_burst(s, r.client.me.name, encrypted, payloads)
    await receiving
    return t0, time.perf_counter()


async def latency(pair: list[Peer], encrypted: bool, rate: float, per: int) -> list[float]:
    """One pair paced at ``rate`` messages/s: delivery latencies in ms."""
    s, r = pair
    out: list[float] = []

    def seen(payload: bytes) -> None:
        out.append((time.perf_counter() - float(payload.split(b":")[1])) * 1000)

    receiving = asyncio.create_task(receive_loop(r, encrypted, per, seen))
    start = time.perf_counter()
    for i in range(per):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await send_one(s, r.client.me.name, encrypted, stamp(i), i)
    await receiving
    return out


def pair_worker(url: str, directory: str, index: int, args: argparse.Namespace,
                barrier: Any, results: Any) -> None:  # fmt: skip
    """One process per sender/recipient pair (each user is its own process, as in life)."""
    logging.disable(logging.WARNING)

    async def run() -> dict[str, Any]:
        async with peers(url, Path(directory), 1, f"w{index}") as pair:
            await warm_up(pair)
            out: dict[str, Any] = {"span_plain": [], "span_encrypted": []}
            per = args.messages // args.pairs
            lat_per = int(args.rate * args.seconds / args.pairs)
            for r in range(args.warmup + args.rounds):
                recorded = r - args.warmup  # < 0: a warm-up round
                for encrypted in round_order(recorded):
                    kind = "encrypted" if encrypted else "plain"
                    await asyncio.to_thread(barrier.wait)
                    span = await throughput(pair, encrypted, per, args.window)
                    if recorded >= 0:
                        out[f"span_{kind}"].append(span)
                    if recorded == 0:  # latency: once per run, as before
                        await asyncio.to_thread(barrier.wait)
                        await asyncio.sleep(index / args.rate)  # spread the pairs' sends
                        out[f"lat_{kind}"] = await latency(
                            pair, encrypted, args.rate / args.pairs, lat_per
                        )
            return out

    results.put((index, asyncio.run(run())))


def round_order(recorded: int) -> tuple[bool, bool]:
    """The kinds of round ``recorded`` in order (False: plain): plain first in even rounds."""
    return (False, True) if recorded % 2 == 0 else (True, False)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25 %, median, 75 %) of ``values`` (one value: itself three times)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def file_transfer(url: str, directory: Path, size_mb: int, tag: str) -> dict[str, float]:
    """MB/s for one file: encrypted (send_file → FileReceived) vs plain chunks."""
    path = directory / f"{tag}.bin"
    with path.open("wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1 << 20))
    max_size = size_mb << 21
    alice = await make_peer(url, directory, f"{tag}fa", max_file_size=max_size)
    bob = await make_peer(url, directory, f"{tag}fb", max_file_size=max_size)
    try:
        await alice.client.send_text(bob.client.me.name, "hello")
        await bob.client.receive()

        async def until_file() -> FileReceived:
            while True:
                await bob.transport.wake.wait()
                pushed = bob.transport.take_pushed()
                events = await bob.client.deliver(pushed, retry=False)
                if bob.transport.fetch_needed:
                    events += await bob.client.receive()
                for e in events:
                    if isinstance(e, FileReceived):
                        return e

        t0 = time.perf_counter()
        receiving = asyncio.create_task(until_file())
        await alice.client.send_file(bob.client.me.name, path)
        received = await receiving
        encrypted = time.perf_counter() - t0
        digest = hashlib.sha256(path.read_bytes()).digest()
        assert hashlib.sha256(received.path.read_bytes()).digest() == digest, "file corrupted"
        received.path.unlink()

        chunks = (path.stat().st_size + CHUNK - 1) // CHUNK
        t0 = time.perf_counter()
        plain = asyncio.create_task(receive_loop(bob, False, chunks, lambda _: None))
        with path.open("rb") as f:
            for i in range(chunks):
                data = f.read(CHUNK)
                await bob_send(alice, bob.client.me.name, data, i)
        await plain
        plain_s = time.perf_counter() - t0
    finally:
        for p in (alice, bob):
            await p.link.close()
            p.client.store.close()
        path.unlink()
    mb = size_mb * 1.048576
    return {"encrypted_MBps": mb / encrypted, "plain_MBps": mb / plain_s,
            "ratio": encrypted / plain_s}  # fmt: skip


async def bob_send(peer: Peer, to: str, data: bytes, i: int) -> None:
    await peer.transport.send(to, data, hashlib.sha256(data + i.to_bytes(4, "big")).digest()[:16])


async def qkd_use(url: str, directory: Path) -> dict[str, float]:
    """QKD bytes per message and per MB of file under the default policy (measured)."""
    create_key_files("qa", directory / "qa.keys", "qb", directory / "qb.keys", 200)
    a_source = CountingSource(KeyFileSource(directory / "qa.keys"))
    b_source = CountingSource(KeyFileSource(directory / "qb.keys"))
    alice = await make_peer(url, directory, "qa", a_source)
    bob = await make_peer(url, directory, "qb", b_source)
    messages = 640
    try:
        for i in range(messages):
            await alice.client.send_text("qb", f"message {i}")
        await bob.client.receive()
        per_message = a_source.bytes / messages
        before = a_source.bytes
        path = directory / "qkd-file.bin"
        path.write_bytes(os.urandom(10 << 20))
        await alice.client.send_file("qb", path)
        per_mb = (a_source.bytes - before) / 10
        await bob.client.receive()
    finally:
        for p in (alice, bob):
            await p.link.close()
            p.client.store.close()
    return {"bytes_per_message": per_message, "bytes_per_MB_file": per_mb,
            "keys_taken": a_source.keys, "messages": messages}  # fmt: skip


def route_capacity(bytes_per_message: float) -> dict[str, Any]:
    """Messages/s one Beijing–Hefei route sustains (trusted relays: the slowest link)."""
    from qcall.qkd.sim import LinkParams
    from qcall.qkd.topology import load_topology

    topo = load_topology("beijing-hefei")
    path = topo.shortest_path("Beijing", "Hefei")
    assert path is not None
    rates = [LinkParams(length_km=link.length_km).expected_secret_key_rate()
             for link in topo.path_links(path)]  # fmt: skip
    route = min(rates)
    steady = QKDPolicy().key_size * 8 / QKDPolicy().every_messages
    return {
        "hops": len(path) - 1,
        "route_key_rate_bps": route,
        "bits_per_message_steady": steady,
        "bits_per_message_measured": bytes_per_message * 8,
        "messages_per_s_steady": route / steady,
        "messages_per_s_measured": route / (bytes_per_message * 8) if bytes_per_message else None,
    }


# --- main ---------------------------------------------------------------------------------------


async def one_run(args: argparse.Namespace, directory: Path, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with server_process(directory) as url:
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(args.pairs), ctx.Queue()
        workers = [
            ctx.Process(target=pair_worker,
                        args=(url, str(directory), i, args, barrier, results))
            for i in range(args.pairs)
        ]  # fmt: skip
        for w in workers:
            w.start()
        got = [results.get(timeout=600)[1] for _ in workers]
        for w in workers:
            w.join()
        per = args.messages // args.pairs * args.pairs
        seconds: dict[str, list[float]] = {}
        for kind in ("plain", "encrypted"):
            # round i's time: from the first pair's first send to the last pair's last message
            seconds[kind] = [
                max(g[f"span_{kind}"][i][1] for g in got)
                - min(g[f"span_{kind}"][i][0] for g in got)
                for i in range(args.rounds)
            ]
            out[f"throughput_{kind}"] = statistics.median(per / t for t in seconds[kind])
            lat = [x for g in got for x in g[f"lat_{kind}"]]
            out[f"p50_ms_{kind}"] = percentile(lat, 0.50)
            out[f"p99_ms_{kind}"] = percentile(lat, 0.99)
        if args.file_mb:
            out.update(await file_transfer(url, directory, args.file_mb, f"f{run}"))
    paired = [e / p for e, p in zip(seconds["encrypted"], seconds["plain"], strict=True)]
    return {**out, "paired_ratios": paired}


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    paired: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-messaging-") as tmp:
        for run in range(args.runs):
            directory = Path(tmp) / f"run{run}"
            directory.mkdir()
            result = await one_run(args, directory, run)
            paired.extend(result.pop("paired_ratios"))
            runs.append(result)
            shown = ", ".join(f"{k} {v:.3g}" for k, v in result.items())
            pairs_shown = " ".join(f"{x:.2f}" for x in paired[-args.rounds :])
            print(f"run {run + 1}/{args.runs}: {shown}, paired ratios {pairs_shown}",
                  file=sys.stderr, flush=True)  # fmt: skip
        directory = Path(tmp) / "qkd"
        directory.mkdir()
        with server_process(directory) as url:
            qkd = await qkd_use(url, directory)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    median["time_ratio_encrypted_plain"] = (
        median["throughput_plain"] / median["throughput_encrypted"]
    )
    q1, q2, q3 = quartiles(paired)
    return {"runs": args.runs, "rounds": args.rounds, "warmup": args.warmup,
            "messages": args.messages, "pairs": args.pairs,
            "window": args.window, "rate": args.rate, "file_mb": args.file_mb,
            "median": median,
            "paired": {"ratios": paired, "median": q2, "q1": q1, "q3": q3},
            "qkd": qkd, "route": route_capacity(qkd["bytes_per_message"])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs (each: its own server)")
    parser.add_argument(
        "--rounds", type=int, default=5,
        help="recorded paired rounds per run: plain and encrypted throughput back to back, "
        "the order alternating (--rounds 1 --warmup 0: the previous method)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds per run")
    parser.add_argument("--messages", type=int, default=4000, help="per throughput run")
    parser.add_argument("--pairs", type=int, default=8, help="sender/recipient pairs")
    parser.add_argument(
        "--window", type=int, default=32,
        help="throughput: messages a sender sends before waiting (1: one at a time)",
    )  # fmt: skip
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s for latency")
    parser.add_argument("--seconds", type=float, default=4.0, help="latency run length")
    parser.add_argument("--file-mb", type=int, default=100, help="file size (0: no file run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--runs and --rounds must be at least 1, --warmup at least 0")
    logging.disable(logging.WARNING)  # "pinned new contact" for every bench user
    report = asyncio.run(amain(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m, q, r, pr = report["median"], report["qkd"], report["route"], report["paired"]
    print(f"messaging through one signaling server, loopback, medians of {args.runs} runs "
          f"({args.rounds} paired rounds each after {args.warmup} warm-up)")  # fmt: skip
    print(
        f"  throughput: encrypted {m['throughput_encrypted']:.0f} msg/s, plain "
        f"{m['throughput_plain']:.0f} msg/s; time encrypted/plain "
        f"{m['time_ratio_encrypted_plain']:.2f} (ratio of medians) ({args.pairs} pairs, "
        f"{args.messages} msgs, window {args.window})"
    )
    print(
        f"  time encrypted/plain, paired rounds: median {pr['median']:.2f} "
        f"(quartiles {pr['q1']:.2f}–{pr['q3']:.2f}, {len(pr['ratios'])} rounds)"
    )
    print(
        f"  latency at {args.rate:g} msg/s: encrypted p50 {m['p50_ms_encrypted']:.1f} ms, "
        f"p99 {m['p99_ms_encrypted']:.1f} ms; plain p50 {m['p50_ms_plain']:.1f} ms, "
        f"p99 {m['p99_ms_plain']:.1f} ms"
    )
    if args.file_mb:
        print(
            f"  file {args.file_mb} MB: encrypted {m['encrypted_MBps']:.1f} MB/s, plain "
            f"{m['plain_MBps']:.1f} MB/s; time ratio {m['ratio']:.2f}"
        )
    print(
        f"  QKD: {q['bytes_per_message']:.2f} bytes/message ({q['keys_taken']} keys for "
        f"{q['messages']} messages incl. set-up), {q['bytes_per_MB_file']:.2f} bytes/MB of file"
    )
    print(f"  Beijing–Hefei route ({r['hops']} hops): {r['route_key_rate_bps']:.0f} bit/s "
          f"→ {r['messages_per_s_steady']:.0f} msg/s at {r['bits_per_message_steady']:g} "
          f"bit/message (policy steady state), {r['messages_per_s_measured']:.0f} msg/s as "
          f"measured")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
