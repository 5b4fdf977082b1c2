"""Availability of the signaling server under abuse: each attack against the real server.

One test per point 6-9 of the hardening issue ("what independent audits
found"). Each starts the real :class:`~signaling.server.SignalingServer` on a
loopback port, runs the attack, and shows that legitimate users still
register and call (docs/signaling.md, "Limits"; docs/threat-model.md, 4.9).
Attackers connect from other loopback addresses (127.0.0.2 and up: Linux
routes all of 127/8 to ``lo``), legitimate users from 127.0.0.1, so the
per-address limits see them apart, as they would on a real network.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import socket
import sys
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qcall import pqc
from qcall.exceptions import QCallError
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.server import SignalingServer
from tests import test_signaling_protocol
from tests.utils import TIMEOUT_FACTOR

T = 10.0 * TIMEOUT_FACTOR
ROOT = Path(__file__).resolve().parent.parent
E = TypeVar("E")

keys = test_signaling_protocol.keys  # the fixture: five ML-DSA-65 identities

#: The figure docs/signaling.md promises ("Limits"): memory the server holds
#: for one registered connection with the largest watch list, traced by
#: tracemalloc (scripts/signaling_memory.py measures 129-173 KiB).
MAX_KIB_PER_CONNECTION = 200


@contextlib.asynccontextmanager
async def running(**limits: Any) -> AsyncIterator[SignalingServer]:
    server = SignalingServer(ServerConfig(server_id="abuse-test", **limits))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def url(server: SignalingServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


async def attacker_socket(server: SignalingServer, source: str) -> ClientConnection:
    """A raw WebSocket from ``source`` (a loopback address) that has read its challenge."""
    ws = await connect(url(server), compression=None, ping_interval=None, local_addr=(source, 0))
    m.Challenge.parse(await asyncio.wait_for(ws.recv(), T))
    return ws


async def raw_register(
    server: SignalingServer, key: pqc.SigningKey, name: str, source: str
) -> tuple[ClientConnection, m.ServerMessage]:
    """Register ``name`` on a raw WebSocket from ``source``; return it and the answer."""
    ws = await connect(url(server), compression=None, ping_interval=None, local_addr=(source, 0))
    challenge = m.Challenge.parse(await asyncio.wait_for(ws.recv(), T))
    await ws.send(m.Register.create(key, name, challenge).serialize())
    return ws, m.parse_server_message(await asyncio.wait_for(ws.recv(), T))


async def event(client: SignalingClient, cls: type[E], check: Callable[[E], bool] = bool) -> E:
    """The next event of type ``cls`` passing ``check``, skipping everything else."""
    while True:
        got = await client.next_event(T)
        if isinstance(got, cls) and check(got):
            return got


async def legitimate_call(caller: SignalingClient, callee: SignalingClient) -> None:
    """A complete call set-up and hang-up between two legitimate users."""
    call_id = await caller.invite(callee.name)
    await event(callee, m.Invite, lambda e: e.call_id == call_id)
    await callee.accept(call_id)
    await event(caller, m.Accept, lambda e: e.call_id == call_id)
    await caller.send_offer(call_id, "offer " * 100)
    assert (await event(callee, m.Offer, lambda e: e.call_id == call_id)).peer == caller.name
    await callee.send_answer(call_id, "answer")
    assert (await event(caller, m.Answer, lambda e: e.call_id == call_id)).payload == "answer"
    await caller.hangup(call_id)
    await event(callee, m.Hangup, lambda e: e.call_id == call_id)


@contextlib.asynccontextmanager
async def users(
    server: SignalingServer, keys: dict[str, pqc.SigningKey], *names: str
) -> AsyncIterator[list[SignalingClient]]:
    clients = [SignalingClient(url(server), keys[n], n, reconnect=False) for n in names]
    try:
        for client in clients:
            await client.connect()
        yield clients
    finally:
        for client in clients:
            await client.close()


# --- 6. memory a client makes the server hold ------------------------------------------


#: Allocations of the test harness, not of the server: the log records that pytest
#: and tests/hygiene.py keep.
HARNESS = [
    tracemalloc.Filter(False, logging.__file__),
    tracemalloc.Filter(False, str(ROOT / "tests" / "hygiene.py")),
    tracemalloc.Filter(False, "*/_pytest/*"),
]


def server_bytes() -> int:
    """Memory traced in this process, except the test harness's log records."""
    gc.collect()
    return sum(
        s.size for s in tracemalloc.take_snapshot().filter_traces(HARNESS).statistics("filename")
    )


@contextlib.asynccontextmanager
async def attacker_process(server: SignalingServer, mode: str, count: int) -> AsyncIterator[int]:
    """``tests/signaling_attacker.py`` holding ``count`` connections from 127.0.0.2."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.signaling_attacker", url(server), mode, str(count),
        "--source", "127.0.0.2",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 6 * T))
        await asyncio.sleep(0.3)  # the last frames, and the pongs to the release pings
        yield report["held"]
    finally:
        proc.stdin.close()
        await proc.wait()


@pytest.mark.parametrize("mode", ["watch", "watch-same"])
async def test_6_watch_lists_cost_the_documented_memory(
    keys: dict[str, pqc.SigningKey], mode: str
) -> None:
    """20 connections each registering the largest watch list (1000 names, a 64 KiB frame).

    ``watch``: other names on each connection; ``watch-same``: the same names.
    """
    count = 20
    # Under the test suite every logger runs at DEBUG and the harness keeps each
    # record, with its arguments: the frames and messages logged would stay alive
    # and count as the server's. A server runs at INFO.
    loggers = [logging.getLogger(name) for name in ("websockets", "qcall.signaling")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    tracemalloc.start()
    try:
        async with running() as server:
            async with attacker_process(server, mode, 2):
                pass  # warm-up: imports and caches filled on first use
            await asyncio.sleep(0.3)
            before = server_bytes()
            async with attacker_process(server, mode, count) as held:
                assert held == count
                per_connection = (server_bytes() - before) / count / 1024
                async with users(server, keys, "alice", "bob") as (alice, bob):
                    await legitimate_call(alice, bob)
    finally:
        tracemalloc.stop()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    print(f"\n{per_connection:.1f} KiB traced per connection with a 1000-name watch list ({mode})")
    assert per_connection <= MAX_KIB_PER_CONNECTION


async def test_6_a_client_that_does_not_read_is_closed_at_max_outbox_bytes(
    keys: dict[str, pqc.SigningKey],
) -> None:
    """Two connections of one attacker: one floods their call, the other never reads."""
    async with running(rate=1000.0, burst=1000.0) as server:
        sender, _ = await raw_register(server, keys["mallory"], "mallory", "127.0.0.2")
        sink = socket.socket()
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # full at once
        sink.bind(("127.0.0.3", 0))
        sink.connect(("127.0.0.1", server.port))
        reader = await connect(url(server), sock=sink, compression=None, ping_interval=None)
        challenge = m.Challenge.parse(await reader.recv())
        await reader.send(m.Register.create(keys["carol"], "carol", challenge).serialize())
        assert isinstance(m.parse_server_message(await reader.recv()), m.Registered)
        await sender.send(m.Invite("flood-call", peer="carol").serialize())
        await reader.send(m.Accept("flood-call").serialize())  # it knows the id: no reading
        await asyncio.sleep(0.1)
        sent = 200  # 200 x 48 KiB: 9.6 MB for a client that reads nothing
        for n in range(sent):
            payload = f"{n:04d}".ljust(m.MAX_PAYLOAD_SIZE, "x")
            await sender.send(m.ICECandidate("flood-call", payload=payload).serialize())
        await sender.send(m.Hangup("no-such-call").serialize())  # answered once all are handled
        while True:
            answer = m.parse_server_message(await asyncio.wait_for(sender.recv(), T))
            if isinstance(answer, m.ErrorMessage) and answer.call_id == "no-such-call":
                break
        async with users(server, keys, "alice", "bob") as (alice, bob):
            await legitimate_call(alice, bob)
        received = 0
        with pytest.raises(ConnectionClosed):
            while True:
                got = m.parse_server_message(await asyncio.wait_for(reader.recv(), T))
                received += isinstance(got, m.ICECandidate)
        assert (reader.close_code, reader.close_reason) == (1008, "too slow")
        assert received < sent
        await sender.close()


# --- 7. connections that never register ---------------------------------------------------


async def test_7_idle_sockets_from_many_addresses_lock_nobody_out(
    keys: dict[str, pqc.SigningKey],
) -> None:
    """20 addresses keep opening sockets that never register, before and during real calls."""
    limits = {"max_connections": 50, "max_unauthenticated": 40,
              "max_unauthenticated_per_address": 4}  # fmt: skip
    async with running(**limits) as server:
        held: list[ClientConnection] = []
        stop = asyncio.Event()

        async def flood() -> None:
            n = 0
            while not stop.is_set():
                with contextlib.suppress(OSError, ConnectionClosed, TimeoutError, QCallError):
                    held.append(await attacker_socket(server, f"127.0.0.{2 + n % 20}"))
                n += 1
                if n % 10 == 0:
                    await asyncio.sleep(0.01)

        flooding = asyncio.create_task(flood())
        async with asyncio.timeout(6 * T):
            while len(held) < 200:  # more sockets than max_connections
                await asyncio.sleep(0.05)
        async with users(server, keys, "alice", "bob") as (alice, bob):
            await legitimate_call(alice, bob)
            await legitimate_call(bob, alice)
        stop.set()
        await flooding
        assert server.protocol.unauthenticated <= 40
        codes = set()
        for ws in held[:100]:  # the oldest were closed to make room
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                answer = m.parse_server_message(await asyncio.wait_for(ws.recv(), T))
                codes.add(getattr(answer, "code", answer.TYPE))
        assert codes == {"too_many_connections"}
        for ws in held:
            ws.transport.abort()


# --- 8. pins ------------------------------------------------------------------------------


async def test_8_pins_per_key_per_address_and_their_expiry(
    keys: dict[str, pqc.SigningKey],
) -> None:
    """One address pins names with one key, then with fresh keys; then it leaves."""
    limits = {"max_identities": 12, "max_new_names_per_address": 8,
              "pin_ttl": 1.0 * TIMEOUT_FACTOR}  # fmt: skip
    async with running(**limits) as server:
        backend = pqc.get_backend()
        held: list[ClientConnection] = []
        codes: list[str] = []
        key = keys["mallory"]
        for n in range(16):
            if n >= 10:  # a fresh key for each further name
                key = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
            ws, answer = await raw_register(server, key, f"squat{n}", "127.0.0.2")
            codes.append(getattr(answer, "code", answer.TYPE))
            held.append(ws)
        assert codes == ["registered"] * 4 + ["too_many_names"] * 6 + (
            ["registered"] * 4 + ["too_many_identities"] * 2
        )
        async with users(server, keys, "alice", "bob") as (alice, bob):
            await legitimate_call(alice, bob)
            assert server.protocol.identities == 8 + 2
            for ws in held:
                await ws.close()
            # The squatted names expire; the legitimate ones, online, stay.
            async with asyncio.timeout(10 * T):
                while server.protocol.identities > 2:
                    await asyncio.sleep(0.05)
            await legitimate_call(bob, alice)
        # A squatted name is free again, for anybody.
        async with users(server, keys, "carol") as (carol,):
            assert carol.connected
        ws, answer = await raw_register(server, keys["dave"], "squat0", "127.0.0.4")
        assert isinstance(answer, m.Registered)
        await ws.close()


# --- 9. invitations -----------------------------------------------------------------------


async def test_9_invitations_ring_out_and_never_block_the_callee(
    keys: dict[str, pqc.SigningKey],
) -> None:
    ring, duration = 1.0 * TIMEOUT_FACTOR, 2.0 * TIMEOUT_FACTOR
    limits = {"ring_timeout": ring, "max_call_duration": duration, "max_pending_invites": 2}
    async with running(**limits) as server:
        mallory, _ = await raw_register(server, keys["mallory"], "mallory", "127.0.0.2")
        carol, _ = await raw_register(server, keys["carol"], "carol", "127.0.0.2")
        async with users(server, keys, "alice", "bob", "dave") as (alice, bob, dave):
            # An invitation that is never cancelled: alice still takes bob's call...
            await mallory.send(m.Invite("evil-0001", peer="alice").serialize())
            await event(alice, m.Invite, lambda e: e.call_id == "evil-0001")
            await legitimate_call(bob, alice)
            # ...and it ends after the ring timeout, for both of its parties.
            hangup = await event(alice, m.Hangup, lambda e: e.call_id == "evil-0001")
            assert (hangup.peer, hangup.reason) == ("mallory", "ring timeout")

            # Two pending invitations fill alice's share: the third caller is told so.
            await mallory.send(m.Invite("evil-0002", peer="alice").serialize())
            await carol.send(m.Invite("evil-0003", peer="alice").serialize())
            await event(alice, m.Invite, lambda e: e.call_id == "evil-0003")
            await dave.invite("alice", "dave-0001")
            error = await event(dave, m.ErrorMessage)
            assert (error.code, error.call_id) == ("too_many_invites", "dave-0001")
            await event(alice, m.Hangup, lambda e: e.call_id == "evil-0003")  # rang out
            await legitimate_call(dave, alice)

            # An accepted call nobody hangs up: alice is busy until the time limit.
            await mallory.send(m.Invite("evil-0004", peer="alice").serialize())
            await event(alice, m.Invite, lambda e: e.call_id == "evil-0004")
            await alice.accept("evil-0004")
            call_id = await bob.invite("alice")
            assert (await event(bob, m.Busy)).call_id == call_id
            hangup = await event(alice, m.Hangup, lambda e: e.call_id == "evil-0004")
            assert hangup.reason == "call time limit"
            await legitimate_call(bob, alice)
        await mallory.close()
        await carol.close()
