#!/usr/bin/env python3
"""Client CPU per encrypted message, without a server: where the µs go.

Usage::

    python scripts/micro_messaging.py [--messages 4000] [--window 32] [--rounds 5]
                                      [--profile] [--top 25]

Two :class:`~qcall.messaging.client.MessagingClient` in this process, each with its own
store on disk (``synchronous=FULL``, as in use), over an in-memory mailbox (no
websocket, no signaling server, no JSON): the sender sends ``--messages`` texts in
bursts of ``--window`` with :meth:`MessagingClient.send_texts` (one commit per burst),
the recipient opens each burst with :meth:`MessagingClient.process_batch` (one commit
per batch). It prints, per round and as the median over ``--rounds``, the µs of CPU
(``time.process_time``) per message spent by the sender and by the recipient. With
``--profile`` the rounds run under cProfile and the functions with the most
cumulative time are listed in µs per message (a per-step breakdown: ratchet steps,
AES-GCM, content, SQLite, ...); cProfile slows every Python call, so read its µs for
their proportions, the unprofiled rounds for the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import logging
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.contacts import ContactStore  # noqa: E402
from qcall.identity import Identity  # noqa: E402
from qcall.messaging.api import ClientConfig, Envelope, MessageReceived  # noqa: E402
from qcall.messaging.client import MessagingClient  # noqa: E402
from qcall.messaging.prekeys import PrekeyBundle  # noqa: E402
from qcall.messaging.store import ClientStore  # noqa: E402


class Mailbox:
    """An in-memory server: prekey bundles and envelopes by recipient."""

    def __init__(self) -> None:
        self.bundles: dict[str, PrekeyBundle] = {}
        self.boxes: dict[str, list[Envelope]] = {}
        self.next_id = 0


class MemoryTransport:
    """One client's connection to a :class:`Mailbox` (the client's ``Transport``)."""

    def __init__(self, mailbox: Mailbox, name: str) -> None:
        self.mailbox, self.name = mailbox, name

    async def publish_prekeys(self, bundle: bytes) -> int:
        parsed = PrekeyBundle.parse(bundle)
        old = self.mailbox.bundles.get(self.name)
        kept = old.one_time_prekeys if old is not None else ()
        self.mailbox.bundles[self.name] = PrekeyBundle(
            parsed.owner, parsed.identity_key, parsed.signed_prekey,
            tuple(kept) + tuple(parsed.one_time_prekeys),
        )  # fmt: skip
        return len(self.mailbox.bundles[self.name].one_time_prekeys)

    async def prekey_count(self) -> int:
        bundle = self.mailbox.bundles.get(self.name)
        return len(bundle.one_time_prekeys) if bundle is not None else 0

    async def claim_prekeys(self, peer: str) -> bytes | None:
        bundle = self.mailbox.bundles.get(peer)
        if bundle is None:
            return None
        first, rest = bundle.one_time_prekeys[:1], bundle.one_time_prekeys[1:]
        self.mailbox.bundles[peer] = PrekeyBundle(
            bundle.owner, bundle.identity_key, bundle.signed_prekey, tuple(rest)
        )
        return PrekeyBundle(
            bundle.owner, bundle.identity_key, bundle.signed_prekey, tuple(first)
        ).serialize()

    async def send(self, recipient: str, data: bytes, client_ref: bytes) -> int:
        self.mailbox.next_id += 1
        box = self.mailbox.boxes.setdefault(recipient, [])
        box.append(Envelope(self.mailbox.next_id, self.name, data))
        return self.mailbox.next_id

    async def fetch(self, after: int = 0, limit: int = 100) -> list[Envelope]:
        box = self.mailbox.boxes.get(self.name, [])
        return [e for e in box if e.id > after][:limit]

    async def ack(self, ids: Sequence[int]) -> None:
        gone = set(ids)
        box = self.mailbox.boxes.get(self.name, [])
        self.mailbox.boxes[self.name] = [e for e in box if e.id not in gone]

    def take(self) -> list[Envelope]:
        """Everything waiting for this client (as if pushed), removed from the box."""
        return self.mailbox.boxes.pop(self.name, [])


def make_client(mailbox: Mailbox, directory: Path, name: str) -> MessagingClient:
    seed = hashlib.sha256(b"micro " + name.encode()).digest()
    identity = Identity.from_seed(name, pqc.SignatureScheme.ML_DSA_65, seed)
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    return MessagingClient(
        identity,
        ClientStore(home / "messages.db", identity.signing_key.seed_bytes()),
        MemoryTransport(mailbox, name),
        ContactStore(home / "contacts.json"),
        config=ClientConfig(one_time_prekeys=5, low_water=1),
    )


async def run(
    args: argparse.Namespace, profiler: cProfile.Profile | None
) -> list[tuple[float, float]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="micro-messaging-") as tmp:
        mailbox = Mailbox()
        alice = make_client(mailbox, Path(tmp), "alice")
        bob = make_client(mailbox, Path(tmp), "bob")
        a_link, b_link = alice.transport, bob.transport
        assert isinstance(a_link, MemoryTransport) and isinstance(b_link, MemoryTransport)
        try:
            await alice.ensure_prekeys()
            await bob.ensure_prekeys()
            await alice.send_text("bob", "hello")  # set-up, both ways
            await bob.deliver(b_link.take())
            await bob.send_text("alice", "hello")
            await alice.deliver(a_link.take())
            for _ in range(args.rounds):
                send_cpu = recv_cpu = 0.0
                got = 0
                if profiler is not None:
                    profiler.enable()
                for i in range(0, args.messages, args.window):
                    texts = [f"{j}:{time.perf_counter():.9f}:" + "x" * 40
                             for j in range(i, min(args.messages, i + args.window))]  # fmt: skip
                    t0 = time.process_time()
                    await alice.send_texts("bob", texts)
                    t1 = time.process_time()
                    pushed = b_link.take()
                    events = await bob.process_batch(pushed)
                    await b_link.ack([e.id for e in pushed])
                    t2 = time.process_time()
                    send_cpu, recv_cpu = send_cpu + t1 - t0, recv_cpu + t2 - t1
                    got += sum(isinstance(e, MessageReceived) for e in events)
                if profiler is not None:
                    profiler.disable()
                assert got == args.messages, f"{got} of {args.messages} messages received"
                n = args.messages
                out.append((send_cpu / n * 1e6, recv_cpu / n * 1e6))
                print(f"  round: sender {out[-1][0]:6.1f} µs, recipient {out[-1][1]:6.1f} µs, "
                      f"both {sum(out[-1]):6.1f} µs per message", flush=True)  # fmt: skip
        finally:
            alice.store.close()
            bob.store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=4000, help="per round")
    parser.add_argument("--window", type=int, default=32, help="burst size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile the rounds")
    parser.add_argument("--top", type=int, default=25, help="functions listed (--profile)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    result = asyncio.run(run(args, profiler))
    send = statistics.median(s for s, _ in result)
    recv = statistics.median(r for _, r in result)
    both = statistics.median(s + r for s, r in result)
    print(f"client CPU per encrypted message, {args.messages} messages, window {args.window}, "
          f"medians of {args.rounds} rounds: sender {send:.1f} µs, recipient {recv:.1f} µs, "
          f"both {both:.1f} µs")  # fmt: skip
    if profiler is not None:
        total = args.messages * args.rounds
        stats = pstats.Stats(profiler)
        rows = []
        for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((cumtime, tottime, calls, f"{Path(file).name}:{line}({func})"))
        rows.sort(reverse=True)
        print("profile (cProfile, µs per message; slowed by the profiler): "
              "cumulative, own, calls/message")  # fmt: skip
        for cum, own, calls, where in rows[: args.top]:
            per = total / 1e6
            print(f"  {cum / per:8.1f} {own / per:8.1f} {calls / total:7.2f}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
