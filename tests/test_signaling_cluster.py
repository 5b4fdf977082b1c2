"""Several signaling instances sharing a real Redis (signaling/cluster.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qcall import pqc
from qcall.exceptions import SignalingAuthError, SignalingError
from qcall.signaling import messages as m
from qcall.signaling.client import Disconnected, SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.cluster import Cluster
from signaling.local_services import LocalRedis, free_port
from signaling.server import SignalingServer
from signaling.store import MessageStore
from tests.utils import TIMEOUT_FACTOR

ROOT = Path(__file__).resolve().parent.parent
T = 5.0 * TIMEOUT_FACTOR
SERVER_ID = "test-cluster"
E = TypeVar("E")


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in "abcdm"}


async def instance(
    redis: LocalRedis,
    name: str,
    mailbox: MessageStore | None = None,
    config: ServerConfig | None = None,
    **options: Any,
) -> tuple[SignalingServer, Cluster]:
    """A server in this process joined to the cluster (``options``: of :class:`Cluster`)."""
    server = SignalingServer(config or ServerConfig(server_id=SERVER_ID), mailbox=mailbox)
    await server.start("127.0.0.1", 0)
    cluster = Cluster(redis.url, name, **options)
    await cluster.start(server)
    return server, cluster


@pytest.fixture
async def pair(redis_server: LocalRedis) -> AsyncIterator[list[tuple[SignalingServer, Cluster]]]:
    made = [await instance(redis_server, "A"), await instance(redis_server, "B")]
    yield made
    for server, cluster in made:
        await cluster.close()
        await server.close()


def url(server: SignalingServer | int) -> str:
    return f"ws://127.0.0.1:{server if isinstance(server, int) else server.port}"


async def next_of(client: SignalingClient, cls: type[E]) -> E:
    while True:
        event = await client.next_event(T)
        if isinstance(event, cls):
            return event
        assert isinstance(event, m.Presence | m.Registered | Disconnected), event
        assert not (isinstance(event, Disconnected) and event.final), event


async def place_call(caller: SignalingClient, callee: SignalingClient) -> str:
    """invite → ringing → accept → offer → answer, checked at each end; returns the call id."""
    call_id = await caller.invite(callee.name)
    invite = await next_of(callee, m.Invite)
    assert (invite.peer, invite.fingerprint) == (caller.name, caller.fingerprint)
    await callee.ringing(call_id)
    assert isinstance(await next_of(caller, m.Ringing), m.Ringing)
    await callee.accept(call_id)
    accept = await next_of(caller, m.Accept)
    assert (accept.peer, accept.fingerprint) == (callee.name, callee.fingerprint)
    await caller.send_offer(call_id, "offer " + "x" * 8000)
    assert (await next_of(callee, m.Offer)).payload == "offer " + "x" * 8000
    await callee.send_answer(call_id, "answer")
    assert (await next_of(caller, m.Answer)).payload == "answer"
    return call_id


async def test_a_call_crosses_instances_like_a_local_one(
    pair: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey]
) -> None:
    (a, _), (b, _) = pair
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        call_id = await place_call(alice, bob)
        await bob.send_ice(call_id, "candidate")
        assert (await next_of(alice, m.ICECandidate)).payload == "candidate"
        await alice.hangup(call_id, "bye")
        hangup = await next_of(bob, m.Hangup)
        assert (hangup.call_id, hangup.peer, hangup.reason) == (call_id, "alice", "bye")
        # Both state machines agree: a second call works, and a bad one is refused.
        call_id = await place_call(bob, alice)
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)
        await alice.invite("nobody")
        error = await next_of(alice, m.ErrorMessage)
        assert (error.code, error.message) == ("unavailable", "nobody is offline")


async def test_same_name_on_two_instances_at_once_one_wins(
    pair: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey]
) -> None:
    (a, _), (b, _) = pair
    for _ in range(3):
        clients = [
            SignalingClient(url(s), keys["c"], "carol", watch=[], reconnect=False) for s in (a, b)
        ]
        await asyncio.gather(*(c.connect() for c in clients))
        # The later claim wins; the other connection is told "replaced" and closed.
        deadline = time.monotonic() + T
        while sum(c.connected for c in clients) != 1:
            assert time.monotonic() < deadline, "both stayed online"
            await asyncio.sleep(0.02)
        loser = next(c for c in clients if not c.connected)
        codes = [e.code async for e in loser if isinstance(e, m.ErrorMessage)]
        assert codes == ["replaced"]
        for c in clients:
            await c.close()
        await asyncio.sleep(0.2)  # the winner's release reaches Redis
    # Another key for a name pinned in the cluster: refused on any instance.
    async with SignalingClient(url(a), keys["c"], "carol", watch=[]):
        pass
    with pytest.raises(SignalingAuthError) as refused:
        await SignalingClient(url(b), keys["m"], "carol", watch=[], reconnect=False).connect()
    assert refused.value.code == "name_taken"


async def spawn_instance(
    redis: LocalRedis, port: int, name: str, *more: str
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "--port", str(port), "--server-id", SERVER_ID,
        "--redis", redis.url, "--instance-id", name, *more,
        stdout=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30 * TIMEOUT_FACTOR)
    assert b"listening" in line, line
    return proc


@pytest.fixture
async def a_and_b_process(
    redis_server: LocalRedis,
) -> AsyncIterator[tuple[SignalingServer, int, asyncio.subprocess.Process]]:
    """Instance A in this process, instance B a real ``python -m signaling`` process."""
    port_b = free_port()
    a, cluster_a = await instance(redis_server, "A")
    proc = await spawn_instance(redis_server, port_b, "B")
    yield a, port_b, proc
    if proc.returncode is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        await proc.wait()
    await cluster_a.close()
    await a.close()


async def test_kill_9_an_instance_users_fail_over_and_calls_go_on(
    a_and_b_process: tuple[SignalingServer, int, asyncio.subprocess.Process],
    keys: dict[str, pqc.SigningKey],
) -> None:
    """B is a real process killed with SIGKILL mid-call: bob is back on A within 2 s."""
    a, port_b, proc = a_and_b_process
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient([url(port_b), url(a)], keys["b"], "bob", watch=[]) as bob,
        SignalingClient(url(a), keys["c"], "carol", watch=[]) as carol,
        SignalingClient(url(a), keys["d"], "dave", watch=[]) as dave,
    ):
        call_id = await place_call(alice, bob)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await proc.wait()
        # A dead instance blocks nobody: carol and dave, both on A, still talk.
        carol_call = await carol.invite("dave")
        assert (await next_of(dave, m.Invite)).call_id == carol_call
        await carol.cancel(carol_call)
        await next_of(dave, m.Cancel)
        # bob reconnects to A by himself; the accepted call is still listed.
        registered = await next_of(bob, m.Registered)
        recovered = time.monotonic() - killed
        assert bob.url == url(a) and recovered <= 2.0 * TIMEOUT_FACTOR, recovered
        assert call_id in registered.calls
        await bob.send_ice(call_id, "after failover")  # relaying resumes
        assert (await next_of(alice, m.ICECandidate)).payload == "after failover"
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)


async def test_redis_restart_instances_recover(
    pair: list[tuple[SignalingServer, Cluster]],
    redis_server: LocalRedis,
    keys: dict[str, pqc.SigningKey],
) -> None:
    (a, cluster_a), (b, cluster_b) = pair
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        redis_server.kill()
        await asyncio.sleep(0.3)
        redis_server.start()  # empty: no persistence
        deadline = time.monotonic() + T
        while not (cluster_a.recoveries and cluster_b.recoveries):
            assert time.monotonic() < deadline, "instances did not notice the restart"
            await asyncio.sleep(0.05)
        for _ in range(int(T / 0.1)):  # the subscriptions come back too
            try:
                call_id = await place_call(alice, bob)
                break
            except (SignalingError, TimeoutError):
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no call across instances after the Redis restart")
        await bob.hangup(call_id)
        await next_of(alice, m.Hangup)


async def test_a_hung_instance_blocks_nobody(
    a_and_b_process: tuple[SignalingServer, int, asyncio.subprocess.Process],
    keys: dict[str, pqc.SigningKey],
) -> None:
    """B stopped with SIGSTOP (hung, sockets open): A's users are served as before."""
    a, port_b, proc = a_and_b_process
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(port_b), keys["b"], "bob", watch=[], reconnect=False) as bob,
        SignalingClient(url(a), keys["c"], "carol", watch=["bob"]) as carol,
    ):
        assert bob.connected and carol.online == {"bob": bob.fingerprint}
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.5)  # B's liveness key expires: bob counts as offline
        assert carol.online == {}  # by itself: nobody told A that B died
        start = time.monotonic()
        await alice.invite("bob")
        error = await next_of(alice, m.ErrorMessage)
        assert (error.code, error.message) == ("unavailable", "bob is offline")
        await place_call(carol, alice)  # between users of A: as fast as ever
        assert time.monotonic() - start < 1.0 * TIMEOUT_FACTOR
        proc.kill()  # before bob's client closes (a hung server never answers its close)
        await proc.wait()


async def test_without_redis_registration_is_refused_clearly(
    redis_server: LocalRedis, keys: dict[str, pqc.SigningKey]
) -> None:
    """Redis down: new registrations get cluster_unavailable; registered users still call."""
    a, cluster_a = await instance(redis_server, "A")
    try:
        async with (
            SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
            SignalingClient(url(a), keys["b"], "bob", watch=[]) as bob,
        ):
            redis_server.kill()
            with pytest.raises(SignalingError) as refused:
                await SignalingClient(url(a), keys["c"], "carol", reconnect=False).connect()
            assert refused.value.code == "cluster_unavailable"
            call_id = await place_call(alice, bob)
            await alice.hangup(call_id)
            await next_of(bob, m.Hangup)
    finally:
        await cluster_a.close()
        await a.close()


async def run_main(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "--port", "0", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30 * TIMEOUT_FACTOR)
    if b"listening" in line:
        proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 30 * TIMEOUT_FACTOR)
    return proc.returncode or 0, (line + await proc.stderr.read()).decode()


async def test_command_line_with_redis_postgres_and_turn(
    redis_server: LocalRedis, pg_url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "turn.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    turn = ("--turn-url", "turn:127.0.0.1:3478", "--turn-secret-file", str(secret))
    code, out = await run_main("--redis", redis_server.url, "--database", pg_url, *turn)
    assert code == 0 and "listening" in out, out
    secret.chmod(0o644)
    code, out = await run_main(*turn)
    assert code == 1 and "readable by others" in out
    code, out = await run_main("--database", "postgresql://qcall@127.0.0.1:1/none")
    assert code == 1 and "postgresql://127.0.0.1:1/none is unavailable" in out, out
    redis_server.kill()
    code, out = await run_main("--redis", redis_server.url)
    assert code == 1 and "cannot reach Redis" in out, out


async def test_presence_crosses_instances(
    pair: list[tuple[SignalingServer, Cluster]],
    keys: dict[str, pqc.SigningKey],
    redis_server: LocalRedis,
) -> None:
    (a, _), (b, _) = pair
    async with SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob:
        await asyncio.sleep(0.1)
        async with SignalingClient(url(a), keys["a"], "alice", watch=["bob", "carol"]) as alice:
            assert alice.online == {"bob": bob.fingerprint}  # the snapshot covers B
            async with SignalingClient(url(b), keys["c"], "carol", watch=[]) as carol:
                news = await next_of(alice, m.Presence)
                assert (news.name, news.fingerprint, news.online) == (
                    "carol",
                    carol.fingerprint,
                    True,
                )
            news = await next_of(alice, m.Presence)
            assert (news.name, news.online) == ("carol", False)
            assert alice.online == {"bob": bob.fingerprint}


async def test_closing_while_users_leave_releases_every_name(
    redis_server: LocalRedis, keys: dict[str, pqc.SigningKey]
) -> None:
    """Users leaving while the instance shuts down: every name is released in Redis."""
    import redis as sync_redis

    a, cluster_a = await instance(redis_server, "A")
    names = [f"user{i}" for i in range(20)]  # 4 names per key at most
    clients = [
        SignalingClient(url(a), keys["abcdm"[i // 4]], n, watch=[], reconnect=False)
        for i, n in enumerate(names)
    ]
    for c in clients:
        await c.connect()
    closing = [asyncio.create_task(c.close()) for c in clients]
    await asyncio.sleep(0.005)  # their departures are in progress when the instance stops
    await cluster_a.close()
    await asyncio.gather(*closing)
    await a.close()
    db = sync_redis.Redis.from_url(redis_server.url)
    assert [n for n in names if db.exists(f"qcall:name:{n}")] == []
    db.close()
