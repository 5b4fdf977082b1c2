"""Messages between signaling instances, and the cluster's faults under message load.

Real ``redis-server`` and PostgreSQL (tests/services.py); instance C of the
kill test is a real ``python -m signaling`` process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from qcall import pqc
from qcall.exceptions import MessagingError, SignalingError
from qcall.messaging.api import Envelope
from qcall.messaging.transport import SignalingTransport
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from signaling.cluster import MAIL_INLINE, Cluster
from signaling.local_services import LocalPostgres, LocalRedis, free_port
from signaling.pgstore import PostgresMessageStore
from signaling.server import SignalingServer
from tests.test_signaling_cluster import T, instance, next_of, place_call, spawn_instance, url

Instances = list[tuple[SignalingServer, Cluster]]


@pytest.fixture(scope="module")
def keys() -> list[pqc.SigningKey]:
    backend = pqc.get_backend()
    return [backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for _ in range(10)]


async def instances(redis: LocalRedis, pg: str, names: str) -> Instances:
    return [await instance(redis, n, await PostgresMessageStore.connect(pg)) for n in names]


async def close_all(made: Instances) -> None:
    for server, cluster in made:
        await cluster.close()
        await server.close()


@pytest.fixture
async def mail_pair(redis_server: LocalRedis, pg_url: str) -> AsyncIterator[Instances]:
    made = await instances(redis_server, pg_url, "AB")
    yield made
    await close_all(made)


class User:
    """A signaling client with the mailbox transport of the messaging client."""

    def __init__(self, urls: str | list[str], key: pqc.SigningKey, name: str) -> None:
        self.client = SignalingClient(urls, key, name, watch=[])
        self.mail = SignalingTransport(self.client, timeout=T)
        self.name = name

    async def __aenter__(self) -> User:
        await self.client.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.client.close()

    async def pushed(self, count: int, quiet: float = 0.3) -> list[Envelope]:
        """The next ``count`` pushed envelopes, and any more within ``quiet`` seconds."""
        got: list[Envelope] = []
        while len(got) < count:
            await asyncio.wait_for(self.mail.wake.wait(), T)
            got += self.mail.take_pushed()
        await asyncio.sleep(quiet)
        return got + self.mail.take_pushed()


async def test_mail_for_a_user_on_another_instance_is_pushed_at_once(
    mail_pair: Instances, keys: list[pqc.SigningKey]
) -> None:
    """alice on A sends, bob on B gets the push without fetching, exactly once."""
    (a, _), (b, _) = mail_pair
    async with User(url(a), keys[0], "alice") as alice, User(url(b), keys[1], "bob") as bob:
        small = await alice.mail.send("bob", b"\x02hello", b"r" * 16)
        big_data = os.urandom(MAIL_INLINE)  # base64 in the push: read back from the store
        started = time.monotonic()
        big = await alice.mail.send("bob", big_data, b"s" * 16)
        got = await bob.pushed(2)
        assert [(e.id, e.sender, e.data) for e in got] == [
            (small, "alice", b"\x02hello"),
            (big, "alice", big_data),
        ]
        assert time.monotonic() - started < 1.0 + 0.3  # at once, not at the next fetch
        # In a call across instances A holds a stand-in for bob: mail still goes to B.
        call_id = await place_call(alice.client, bob.client)
        third = await alice.mail.send("bob", b"\x02in call", b"t" * 16)
        assert [(e.id, e.data) for e in await bob.pushed(1)] == [(third, b"\x02in call")]
        await alice.client.hangup(call_id)
        await next_of(bob.client, m.Hangup)
        # Nobody fetched: all three wait in the shared store until bob acknowledges them.
        assert b.mailbox is not None
        assert (await b.mailbox.store.mailbox("bob"))[0] == 3
        # A user offline everywhere gets nothing pushed; it is stored for a later fetch.
        await alice.mail.send("carol", b"\x02later", b"u" * 16)
        assert (await b.mailbox.store.mailbox("carol"))[0] == 1


def tag(sender: str, seq: int) -> bytes:
    return f"\x02{sender}:{seq}".encode()


async def send_all(
    user: User,
    recipients: list[str],
    count: int,
    acked: dict[bytes, int],
    resent: list[bytes],
    stop: asyncio.Event,
) -> None:
    """Send ``count`` messages, each resent (same ``client_ref``) until acknowledged."""

    async def one(seq: int) -> None:
        data = tag(user.name, seq)
        ref = hashlib.sha256(data).digest()[:16]
        while not stop.is_set():
            try:
                await user.client.wait_registered(T)
                acked[data] = await user.mail.send(recipients[seq % len(recipients)], data, ref)
                return
            except (SignalingError, TimeoutError):
                resent.append(data)
                await asyncio.sleep(0.05)  # our instance died: resent on the next one

    for start in range(0, count, 4):  # 4 in flight at once
        await asyncio.gather(*(one(s) for s in range(start, min(count, start + 4))))


async def receive_all(user: User, got: dict[int, list[bytes]], stop: asyncio.Event) -> None:
    """Take pushes; fetch when told (reconnection, ``mail_waiting``); acknowledge."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(user.mail.wake.wait(), 0.2)
        try:
            await user.client.wait_registered(T)
            envelopes = user.mail.take_pushed()
            if user.mail.fetch_needed:
                after = 0
                while page := await user.mail.fetch(after):
                    envelopes += page
                    after = page[-1].id
            for e in envelopes:
                got.setdefault(e.id, []).append(e.data)
            if envelopes:
                await user.mail.ack(sorted({e.id for e in envelopes}))
        except (SignalingError, TimeoutError):
            await asyncio.sleep(0.05)


async def test_kill_9_an_instance_under_message_load(
    redis_server: LocalRedis, pg_url: str, keys: list[pqc.SigningKey]
) -> None:
    """C dies mid-load: every acknowledged message arrives once; none is stored twice."""
    made = await instances(redis_server, pg_url, "AB")
    port_c = free_port()
    proc = await spawn_instance(redis_server, port_c, "C", "--database", pg_url)
    urls = [url(made[0][0]), url(made[1][0]), url(port_c)]
    names = [f"s{i}" for i in range(6)] + [f"r{i}" for i in range(3)]
    users = [User(urls[i % 3 :] + urls[: i % 3], keys[i], n) for i, n in enumerate(names)]
    acked: dict[bytes, int] = {}
    resent: list[bytes] = []  # requests lost with C, sent again
    got: dict[str, dict[int, list[bytes]]] = {n: {} for n in names[6:]}
    stop = asyncio.Event()
    try:
        for user in users:
            await user.__aenter__()
        assert {u.client.url for u in users[:3]} == set(urls)  # spread over A, B, C
        receivers = [asyncio.create_task(receive_all(u, got[u.name], stop)) for u in users[6:]]
        senders = [
            asyncio.create_task(send_all(u, names[6:], 24, acked, resent, stop)) for u in users[:6]
        ]
        # C is stopped as soon as it acknowledged one message of its senders (s2, s5:
        # 20 or more of theirs still to send, whatever the machine's speed), killed once
        # one of them waits for C's answer: messages in flight to and from C's users.
        on_c = (tag("s2", 0)[:4], tag("s5", 0)[:4])
        deadline = time.monotonic() + 3 * T
        while not any(d.startswith(on_c) for d in acked) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)  # C's senders send their next ones and wait
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await asyncio.wait_for(asyncio.gather(*senders), 30 * T)
        assert len(acked) == 6 * 24 and resent  # some were in flight through C
        deadline = time.monotonic() + 3 * T
        while sum(len(g) for g in got.values()) < len(acked):
            assert time.monotonic() < deadline, "acknowledged messages were not delivered"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*receivers)
        for r in range(3):  # C's users came back elsewhere
            assert users[6 + r].client.url != urls[2]
        delivered = {i: d for g in got.values() for i, d in g.items()}
        # One envelope per message (client_ref), and exactly the acknowledged ones.
        assert sorted(delivered) == sorted(acked.values())
        assert {i: {d[0]} for i, d in delivered.items()} == {
            i: set(d) for i, d in delivered.items()
        }
        assert {d[0]: i for i, d in delivered.items()} == acked
        for name, g in got.items():  # each at its own recipient
            seqs = [int(d[0].decode().split(":")[1]) for d in g.values()]
            assert {names[6 + seq % 3] for seq in seqs} == {name}
        assert made[0][0].mailbox is not None
        for name in names[6:]:
            assert await made[0][0].mailbox.store.mailbox(name) == (0, 0)
    finally:
        stop.set()
        for user in users:
            await user.__aexit__()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await close_all(made)


async def test_postgres_down_messages_refused_calls_go_on(
    redis_server: LocalRedis, own_postgres: LocalPostgres, keys: list[pqc.SigningKey]
) -> None:
    made = await instances(redis_server, own_postgres.url, "AB")
    (a, _), (b, _) = made
    try:
        async with User(url(a), keys[0], "alice") as alice, User(url(b), keys[1], "bob") as bob:
            first = await alice.mail.send("bob", b"\x02before", b"1" * 16)
            own_postgres.stop()
            with pytest.raises(MessagingError) as refused:
                await alice.mail.send("bob", b"\x02during", b"2" * 16)
            assert "(store_error)" in str(refused.value)
            assert "message store" in str(refused.value)
            # Calls need no PostgreSQL: set up across instances, and new users register.
            call_id = await place_call(alice.client, bob.client)
            await alice.client.hangup(call_id)
            await next_of(bob.client, m.Hangup)
            async with User(url(b), keys[2], "carol") as carol:
                assert carol.client.connected
            own_postgres.start()
            third = await alice.mail.send("bob", b"\x02after", b"3" * 16)  # the first try
            assert [(e.id, e.data) for e in await bob.pushed(2, quiet=0.1)] == [
                (first, b"\x02before"),
                (third, b"\x02after"),
            ]
            # The refused message was not stored: only the two acknowledged ones wait.
            assert [e.data for e in await bob.mail.fetch()] == [b"\x02before", b"\x02after"]
    finally:
        await close_all(made)
