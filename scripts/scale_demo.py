#!/usr/bin/env python3
"""Scale-out demo: several signaling instances behind one URL list (docs/signaling.md).

Starts a ``redis-server`` and a PostgreSQL server on loopback ports in
temporary folders and ``--instances`` (default 3) ``python -m signaling --redis
--database --cluster-secret-file`` processes (call frames between instances over
direct links), puts alice, bob and carol on different instances (each
client holding the whole URL list), then shows:

1. a call set up between alice and bob across instances (invite, ringing,
   accept, offer, answer), and ice messages crossing both ways;
2. messages across instances: alice's message, stored in the shared PostgreSQL
   store by her instance, is pushed to bob by his instance at once (no fetch);
3. bob's instance killed with SIGKILL mid-call: bob is registered again on
   another instance within a fraction of a second, his call is still listed,
   the messages of the call go on (his URL list names alice's instance
   next: an instance that is party to neither end does not know the call —
   docs/signaling.md, "Limits of this version"), and a message sent to him
   now is pushed on his new instance;
4. carol, on an instance that stayed up, calls alice: the dead instance blocks
   nobody.

Everything stops at the end (loopback only, a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.messaging.api import Envelope  # noqa: E402
from qcall.messaging.transport import SignalingTransport  # noqa: E402
from qcall.signaling import messages as m  # noqa: E402
from qcall.signaling.client import SignalingClient  # noqa: E402
from scripts.load_cluster import hangup, next_of, setup_call, spawn  # noqa: E402
from signaling.local_services import LocalPostgres, LocalRedis, free_port  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def demo(instances: int) -> None:
    backend = pqc.get_backend()
    with LocalRedis() as redis, LocalPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        assert isinstance(redis, LocalRedis) and isinstance(pg, LocalPostgres)
        say(f"redis-server on {redis.url}, PostgreSQL on {pg.url}")
        ports = [free_port() for _ in range(instances)]
        secret = Path(tmp) / "cluster.secret"  # call frames over direct links between instances
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        flags = ("--database", pg.url, "--cluster-secret-file", str(secret))
        procs = [await spawn(redis.url, p, f"inst{k}", *flags) for k, p in enumerate(ports)]
        urls = [f"ws://127.0.0.1:{p}" for p in ports]
        say(f"{instances} instances: {' '.join(urls)}")
        clients: dict[str, SignalingClient] = {}
        mail: dict[str, SignalingTransport] = {}
        try:
            for k, name in enumerate(["alice", "bob", "carol"]):
                home = k % instances
                order = urls[home:] + urls[:home]
                if name == "bob":  # next: alice's instance, which knows the call (see below)
                    order = [urls[home], urls[0]] + [
                        u for u in urls if u not in (urls[home], urls[0])
                    ]
                key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
                clients[name] = SignalingClient(order, key, name, watch=[])
                mail[name] = SignalingTransport(clients[name], timeout=10)
                await clients[name].connect()
                say(f"{name} registered on {clients[name].url}")
            alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
            call_id = await setup_call(alice, bob)
            say(f"call {call_id[:8]}… alice ({alice.url}) ↔ bob ({bob.url}): accepted")
            await alice.send_ice(call_id, "hello bob")
            say(f"bob got: {(await next_of(bob, m.ICECandidate)).payload!r} (across instances)")
            await message(mail["alice"], mail["bob"], b"see you at nine", b"m1" * 8)
            victim = urls.index(bob.url)
            say(f"kill -9 the instance of bob ({bob.url}) mid-call")
            procs[victim].send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            registered = await next_of(bob, m.Registered)
            say(
                f"bob registered again on {bob.url} after {time.perf_counter() - killed:.2f} s; "
                f"his call is listed: {call_id in registered.calls}"
            )
            await bob.send_ice(call_id, "still here")
            say(f"alice got: {(await next_of(alice, m.ICECandidate)).payload!r}")
            await message(mail["carol"], mail["bob"], b"are you still there?", b"m2" * 8)
            await hangup(alice, bob, call_id)
            say("alice hung up; bob was told")
            if instances > 2:
                carol_call = await setup_call(carol, alice)
                say(f"carol ({carol.url}) called alice: accepted; the dead instance blocks nobody")
                await hangup(carol, alice, carol_call)
        finally:
            for client in clients.values():
                await client.close()
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await proc.wait()
    say("done: every server stopped")


async def message(
    sender: SignalingTransport, recipient: SignalingTransport, text: bytes, ref: bytes
) -> None:
    """``sender`` stores a message for ``recipient``; its instance pushes it at once."""
    start = time.perf_counter()
    envelope_id = await sender.send(recipient.client.name, text, ref)
    say(
        f"{sender.client.name} ({sender.client.url}) sent envelope #{envelope_id} to "
        f"{recipient.client.name}: stored in PostgreSQL, acknowledged"
    )
    got: list[Envelope] = []
    while not got:  # (a reconnection wakes it too, with nothing pushed)
        await asyncio.wait_for(recipient.wake.wait(), 10)
        got = recipient.take_pushed()
    say(
        f"{recipient.client.name} ({recipient.client.url}) got it pushed after "
        f"{(time.perf_counter() - start) * 1e3:.1f} ms without fetching: "
        f"{[(e.id, e.sender, e.data.decode()) for e in got]}"
    )
    await recipient.ack([e.id for e in got])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3, help="2..6 (default 3)")
    args = parser.parse_args()
    if not 2 <= args.instances <= 6:
        parser.error("--instances must be 2..6")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(demo(args.instances))


if __name__ == "__main__":
    main()
