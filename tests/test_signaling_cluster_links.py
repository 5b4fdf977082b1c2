"""Direct links between signaling instances over a real Redis (signaling/cluster_links.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from qcall import pqc
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki, server_ssl_context
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.cluster import Cluster
from signaling.cluster_link import (
    NONCE_LEN,
    Auth,
    FrameReader,
    Hello,
    LinkKind,
    Welcome,
    encode,
    frame_tag,
    link_macs,
    transcript,
)
from signaling.cluster_links import Links, parse_endpoint
from signaling.local_services import LocalRedis, free_port
from signaling.server import SignalingServer
from tests.hygiene import STATE
from tests.test_signaling_cluster import (
    SERVER_ID,
    instance as cluster_instance,
    next_of,
    place_call,
    run_main,
    spawn_instance,
    url,
)
from tests.utils import TIMEOUT_FACTOR

T = 5.0 * TIMEOUT_FACTOR
SECRET = b"cluster secret for the tests 0123456789"


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in "abcd"}


async def instance(
    redis: LocalRedis,
    name: str,
    secret: bytes | None = SECRET,
    timeout: float = 1.0,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
) -> tuple[SignalingServer, Cluster]:
    # Streams of frames: no rate limit in the way.
    config = ServerConfig(server_id=SERVER_ID, rate=1e4, burst=1e4)
    return await cluster_instance(
        redis, name, config=config, link_secret=secret, link_timeout=timeout, link_tls=tls
    )


def secret_flags(tmp_path: Path, mode: int = 0o600) -> list[str]:
    """Command-line flags of an instance with :data:`SECRET` in a file of ``mode``."""
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(SECRET)
    secret.chmod(mode)
    return ["--cluster-secret-file", str(secret), "--rate", "10000", "--burst", "10000"]


@pytest.fixture
async def linked(redis_server: LocalRedis) -> AsyncIterator[list[tuple[SignalingServer, Cluster]]]:
    made = [await instance(redis_server, "A"), await instance(redis_server, "B")]
    yield made
    register_link_keys(*(cluster for _, cluster in made))
    for server, cluster in made:
        await cluster.close()
        await server.close()


STATE.register("a cluster secret", SECRET)


def register_link_keys(*clusters: Cluster) -> None:
    """The links' session keys, for the hygiene scan after the test (never in a text)."""
    for cluster in clusters:
        assert cluster.links is not None
        for link in [*cluster.links._outbound.values(), *cluster.links._inbound.values()]:
            STATE.register("a cluster link session key", link.session)


def link_up(cluster: Cluster, peer: str) -> bool:
    """Whether ``cluster``'s link to ``peer`` is up (a cluster with links)."""
    assert cluster.links is not None
    return peer in cluster.links._outbound and cluster.links._outbound[peer].up


async def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + T
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def ice_stream(
    alice: SignalingClient,
    bob: SignalingClient,
    call_id: str,
    count: int,
    *,
    during: Callable[[int], Awaitable[object]] | None = None,
) -> list[str]:
    """alice sends ``count`` numbered ice frames (``during(i)`` before each); bob's payloads."""
    got: list[str] = []

    async def receive() -> None:
        while len(got) < count:
            got.append((await next_of(bob, m.ICECandidate)).payload)

    receiver = asyncio.create_task(receive())
    for i in range(count):
        if during is not None:
            await during(i)
        await alice.send_ice(call_id, f"{i:04d}")
    await asyncio.wait_for(receiver, T)
    await no_more_ice(bob)
    return got


async def no_more_ice(bob: SignalingClient) -> None:
    """Nothing more for bob within 0.3 s (a duplicate would arrive now)."""
    with pytest.raises(TimeoutError):
        while True:
            event = await bob.next_event(0.3)
            assert not isinstance(event, m.ICECandidate), f"duplicate {event.payload}"


async def test_a_call_crosses_instances_over_the_link(
    linked: list[tuple[SignalingServer, Cluster]],
    keys: dict[str, pqc.SigningKey],
    redis_server: LocalRedis,
) -> None:
    """Set-up and relaying between instances go over the link once it is up, both ways."""
    (a, ca), (b, cb) = linked
    assert ca.links is not None and cb.links is not None
    import redis as sync_redis

    db = sync_redis.Redis.from_url(redis_server.url)
    endpoint = db.get("qcall:instance:B")
    db.close()
    assert isinstance(endpoint, bytes)  # for mypy (redis-py's stubs: an awaitable or Any)
    assert endpoint is not None and parse_endpoint(endpoint.decode()) is not None
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        call_id = await place_call(alice, bob)  # the first frames may go over Redis
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)
        sent_a, sent_b = ca.links.sent, cb.links.sent
        call_id = await place_call(alice, bob)  # invite, offer: A → B; ringing, accept, answer
        assert (ca.links.sent - sent_a, cb.links.sent - sent_b) == (2, 3)
        got = await ice_stream(alice, bob, call_id, 50)
        assert got == [f"{i:04d}" for i in range(50)]
        await bob.hangup(call_id)
        await next_of(alice, m.Hangup)
        assert ca.links.failovers == cb.links.failovers == 0


@pytest.mark.parametrize("side", ["sender", "receiver"])
async def test_link_killed_mid_stream_falls_back_without_loss_or_duplicates(
    linked: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey], side: str
) -> None:
    """The link is reset while frames are in flight: the unacknowledged ones go over
    Redis; bob gets every frame once, in order; later the link is used again."""
    (a, ca), (b, cb) = linked
    assert ca.links is not None and cb.links is not None
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        call_id = await place_call(alice, bob)
        await wait_for(lambda: link_up(ca, "B"), "no link")

        async def cut(i: int) -> None:
            if i == 150:
                assert ca.links is not None and cb.links is not None
                link = ca.links._outbound["B"] if side == "sender" else cb.links._inbound["A"]
                assert link.transport is not None
                link.transport.abort()  # RST: whatever is in its buffers is lost

        got = await ice_stream(alice, bob, call_id, 300, during=cut)
        assert got == [f"{i:04d}" for i in range(300)]
        assert ca.links.failovers == 1
        # The link comes back (after RETRY) and carries the frames again.
        await asyncio.sleep(1.2)
        await alice.send_ice(call_id, "wake")  # starts the new link
        assert (await next_of(bob, m.ICECandidate)).payload == "wake"
        await wait_for(lambda: link_up(ca, "B"), "back")
        sent = ca.links.sent
        got = await ice_stream(alice, bob, call_id, 20)
        assert got == [f"{i:04d}" for i in range(20)]
        assert ca.links.sent > sent
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)


async def read_frame(reader: asyncio.StreamReader) -> tuple[LinkKind, bytes] | None:
    frames = FrameReader()
    data = b""
    while chunk := await asyncio.wait_for(reader.read(65536), T):
        data += chunk
        out = frames.feed(chunk)
        if out:
            return out[0]
    return None


async def test_unauthenticated_links_are_refused(
    linked: list[tuple[SignalingServer, Cluster]],
    keys: dict[str, pqc.SigningKey],
    redis_server: LocalRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage, a wrong target, a wrong secret, a forged frame: each gets an ERROR
    naming the cause and the link is closed; the instance serves on."""
    _, (b, cb) = linked
    address = parse_endpoint(cb._endpoint)
    assert address is not None

    async def attempt(*frames: bytes, secret: bytes = SECRET, target: str = "B") -> str:
        reader, writer = await asyncio.open_connection(*address)
        try:
            for frame in frames:
                writer.write(frame)
            if not frames:  # a proper hello, then an auth with ``secret``
                hello = Hello("X", target, 1, os.urandom(NONCE_LEN))
                writer.write(encode(LinkKind.HELLO, hello.body()))
                got = await read_frame(reader)
                if got is None or got[0] is LinkKind.ERROR:
                    return got[1].decode() if got else "closed"
                welcome = Welcome.parse(got[1])
                t = transcript(hello, welcome.nonce, welcome.epoch, welcome.acked)
                _, auth, session = link_macs(secret, t)
                writer.write(encode(LinkKind.AUTH, Auth(auth).body()))
                message = b'{"from":"x","fp":"f","inst":"X","epoch":1,"seq":1}\n{}'
                tag = frame_tag(session[::-1], LinkKind.FRAME, message)  # forged: wrong key
                writer.write(encode(LinkKind.FRAME, tag + message))
            got = await read_frame(reader)
            assert got is not None and got[0] is LinkKind.ERROR, got
            assert await reader.read() == b""  # and closed
            return got[1].decode()
        finally:
            writer.close()

    assert await attempt(b"GET / HTTP/1.1\r\n\r\n") == "frame kind 71 unknown"
    assert await attempt(encode(LinkKind.FRAME, b"x" * 40)) == "hello expected, got frame"
    assert await attempt(encode(LinkKind.HELLO, b"{}")) == "hello.v: missing or wrong type"
    assert await attempt(target="C") == "this is instance B, not C"
    assert "authentication failed" in await attempt(secret=b"another secret, 16 bytes or more")
    assert await attempt() == "frame: bad tag"  # the right secret, a forged frame
    assert cb.links is not None and "X" not in cb.links._inbound
    # An instance with another secret gets no link; its calls go over Redis.
    c, cc = await instance(redis_server, "C", secret=b"not the cluster's secret at all")
    try:
        async with (
            SignalingClient(url(c), keys["c"], "carol", watch=[]) as carol,
            SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
        ):
            for _ in range(2):
                call_id = await place_call(carol, bob)
                await carol.hangup(call_id)
                await next_of(bob, m.Hangup)
            assert cc.links is not None and cc.links.sent == 0
            assert "C" not in cb.links._inbound
    finally:
        await cc.close()
        await c.close()
    assert any("authentication failed" in r.getMessage() for r in caplog.records)


async def test_a_stalled_peer_instance_blocks_nobody(
    redis_server: LocalRedis, keys: dict[str, pqc.SigningKey], tmp_path: Path
) -> None:
    """B (a real process) stops with frames in flight on its link: A's link to it
    fails over by itself, A's and C's users call as fast as ever, and once B
    runs again bob has every frame alice sent, once, in order."""
    port_b = free_port()
    proc = await spawn_instance(redis_server, port_b, "B", *secret_flags(tmp_path))
    a, ca = await instance(redis_server, "A", timeout=0.2)
    c, cc = await instance(redis_server, "C")
    try:
        async with (
            SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
            SignalingClient(url(port_b), keys["b"], "bob", watch=[], reconnect=False) as bob,
            SignalingClient(url(a), keys["c"], "carol", watch=[]) as carol,
            SignalingClient(url(c), keys["d"], "dave", watch=[]) as dave,
        ):
            call_id = await place_call(alice, bob)
            call_cd = await place_call(carol, dave)  # A ↔ C over their link too
            assert ca.links is not None
            await wait_for(lambda: link_up(ca, "B"), "B")
            got: list[str] = []

            async def receive() -> None:
                while len(got) < 40:
                    got.append((await next_of(bob, m.ICECandidate)).payload)

            receiver = asyncio.create_task(receive())
            proc.send_signal(signal.SIGSTOP)
            start = time.monotonic()
            for i in range(40):
                await alice.send_ice(call_id, f"{i:04d}")
            for i in range(5):  # carol (A) ↔ dave (C) meanwhile
                await carol.send_ice(call_cd, f"c{i}")
                assert (await next_of(dave, m.ICECandidate)).payload == f"c{i}"
            await carol.hangup(call_cd)
            await next_of(dave, m.Hangup)
            assert time.monotonic() - start < 1.0 * TIMEOUT_FACTOR  # as fast as ever
            await wait_for(lambda: ca.links is not None and ca.links.failovers == 1, "stuck link")
            proc.send_signal(signal.SIGCONT)
            await asyncio.wait_for(receiver, T)
            await no_more_ice(bob)
            assert got == [f"{i:04d}" for i in range(40)]
            proc.kill()  # before bob's client closes
            await proc.wait()
            register_link_keys(ca, cc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await proc.wait()
        for server, cluster in ((a, ca), (c, cc)):
            await cluster.close()
            await server.close()


async def test_command_line_links(redis_server: LocalRedis, tmp_path: Path) -> None:
    flags = ("--redis", redis_server.url, *secret_flags(tmp_path, 0o644))
    secret = tmp_path / "cluster.secret"
    code, out = await run_main(*flags)
    assert code == 1 and "readable by others" in out, out
    secret.chmod(0o600)
    code, out = await run_main(*flags, "--link", "localhost")
    assert code == 1 and "--link localhost: not HOST:PORT" in out, out
    code, out = await run_main(*flags, "--link", "0.0.0.0:7000")
    assert code == 1 and "an address the other instances reach" in out, out
    code, out = await run_main(
        "--cluster-secret-file", str(secret), "--rate", "10000", "--burst", "10000"
    )
    assert code == 1 and "--cluster-secret-file needs --redis" in out, out
    short = tmp_path / "short.secret"
    short.write_bytes(b"too short")
    short.chmod(0o600)
    code, out = await run_main("--redis", redis_server.url, "--cluster-secret-file", str(short))
    assert code == 1 and "needs >= 16 bytes" in out, out
    code, out = await run_main(*flags, "--link", "127.0.0.1:0")
    assert code == 0 and "listening" in out, out


async def test_frames_sent_over_redis_before_the_link_was_up_are_not_overtaken() -> None:
    """Frames that went over Redis while the link was still connecting hold the
    link back until they are delivered: a link frame that overtook one would make
    the receiver drop it as older (a call's ``accept`` was lost this way under
    ``scripts/load_signaling.py --instances 2,4``)."""
    secret = os.urandom(32)
    b = Links("B", secret, deliver=lambda *_: None, resolve=_never, republish=_none, epoch=1)
    endpoint = await b.start("127.0.0.1", 0)
    go = asyncio.Event()

    async def resolve(inst: str) -> str:
        await go.wait()
        return endpoint

    a = Links("A", secret, deliver=lambda *_: None, resolve=resolve, republish=_none, epoch=1)
    await a.start("127.0.0.1", 0)
    try:
        for _ in range(2):  # the link is connecting: both go over Redis
            assert _send(a) is False
        assert b.fresh("A", 1, 1)  # Redis delivered 1; 2 is still on its way
        go.set()
        deadline = time.monotonic() + 5 * TIMEOUT_FACTOR
        while not a.senders["B"].up:
            assert time.monotonic() < deadline, "the link did not come up"
            await asyncio.sleep(0.01)
        assert _send(a) is True  # 3: for the link, but...
        assert a.sent == 0  # ...held, not written ahead of 2 (still on its way over Redis)
        assert b.fresh("A", 1, 2)  # 2 arrives over Redis and is acknowledged on the link
        while a.sent < 1:  # then 3 goes
            assert time.monotonic() < deadline, "the held frame was not released"
            await asyncio.sleep(0.01)
        assert _send(a) is True
        assert a.sent == 2  # 4 straight over the link
    finally:
        await a.close()
        await b.close()


def _send(a: Links) -> bool:
    seq = a.next_seq("B")
    header = json.dumps({"inst": "A", "epoch": 1, "seq": seq, "from": "alice", "fp": ""})
    return a.send("B", seq, header.encode() + b"\n{}")


async def _never(inst: str) -> str | None:
    return None


def _none(inst: str, frames: list[bytes]) -> None:
    return None


async def test_frames_written_in_one_loop_tick_leave_in_one_write() -> None:
    """The first frame of a tick is written at once; the others of the same tick
    are joined into one write at its end; all arrive whole, in order."""
    secret = os.urandom(32)
    got: list[int] = []
    b = Links(
        "B", secret, deliver=lambda _i, _e, header, _f: got.append(header["seq"]),
        resolve=_never, republish=_none, epoch=1,
    )  # fmt: skip
    endpoint = await b.start("127.0.0.1", 0)

    async def resolve(inst: str) -> str:
        return endpoint

    a = Links("A", secret, deliver=lambda *_: None, resolve=resolve, republish=_none, epoch=1)
    await a.start("127.0.0.1", 0)
    try:
        assert _send(a) is False  # 1: over Redis while the link connects
        assert b.fresh("A", 1, 1)
        deadline = time.monotonic() + 5 * TIMEOUT_FACTOR
        while not (a.senders["B"].up and a.senders["B"].acked == 1):
            assert time.monotonic() < deadline, "the link did not come up"
            await asyncio.sleep(0.01)
        link = a._outbound["B"]
        assert link.transport is not None
        writes: list[int] = []
        write = link.transport.write

        def spy(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            write(data)

        link.transport.write = spy  # type: ignore[method-assign]
        assert [_send(a) for _ in range(3)] == [True] * 3  # 2, 3, 4 in one tick
        assert len(writes) == 1  # 2 went at once
        await asyncio.sleep(0)
        assert len(writes) == 2 and writes[1] == 2 * writes[0]  # 3 and 4 together
        while len(got) < 3:
            assert time.monotonic() < deadline, f"delivered {got}"
            await asyncio.sleep(0.01)
        assert got == [2, 3, 4]
        assert _send(a) is True  # a later tick: at once again
        assert len(writes) == 3
    finally:
        await a.close()
        await b.close()


def link_tls(pki: PKIPaths, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """An instance's (server, client) link contexts from a test PKI (its KME certificate:
    server and client use, naming 127.0.0.1)."""
    paths = pki.kmes[name]
    return (
        server_ssl_context(paths.cert, paths.key, pki.ca_cert),
        client_ssl_context(paths.cert, paths.key, pki.ca_cert),
    )


async def test_links_over_mutual_tls(
    redis_server: LocalRedis,
    keys: dict[str, pqc.SigningKey],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With TLS, links run inside TLS 1.2+ checked against the cluster's CA both
    ways: calls cross over them; plain TCP gets no WELCOME; an instance whose
    certificate another CA signed gets no link (its calls go over Redis)."""
    pki = create_pki(tmp_path / "pki", ["link-a", "link-b"], [])
    stranger = create_pki(tmp_path / "stranger", ["link-c"], [])
    a, ca = await instance(redis_server, "A", tls=link_tls(pki, "link-a"))
    b, cb = await instance(redis_server, "B", tls=link_tls(pki, "link-b"))
    c, cc = await instance(redis_server, "C", tls=link_tls(stranger, "link-c"))
    try:
        assert ca.links is not None and cb.links is not None and cc.links is not None
        async with (
            SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
            SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
            SignalingClient(url(c), keys["c"], "carol", watch=[]) as carol,
        ):
            call_id = await place_call(alice, bob)  # opens the links
            await alice.hangup(call_id)
            await next_of(bob, m.Hangup)
            await wait_for(lambda: link_up(ca, "B"), "B")
            sent = ca.links.sent
            call_id = await place_call(alice, bob)
            assert ca.links.sent > sent  # over the link
            got = await ice_stream(alice, bob, call_id, 20)
            assert got == [f"{i:04d}" for i in range(20)]
            transport = ca.links._outbound["B"].transport
            assert transport is not None
            tls = transport.get_extra_info("ssl_object")
            assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.getpeercert()["subject"] == ((("commonName", "link-b"),),)
            await alice.hangup(call_id)
            await next_of(bob, m.Hangup)
            for _ in range(2):  # carol's CA is not the cluster's: Redis only, both ways
                call_id = await place_call(carol, bob)
                await carol.hangup(call_id)
                await next_of(bob, m.Hangup)
                await asyncio.sleep(0.1)
            assert cc.links.sent == 0 and "C" not in cb.links._inbound
            assert "C" not in cb.links._outbound or not cb.links._outbound["C"].up
        # Plain TCP to a TLS link listener: no WELCOME, whatever it sends.
        address = parse_endpoint(cb._endpoint)
        assert address is not None
        reader, writer = await asyncio.open_connection(*address)
        hello = Hello("X", "B", 1, os.urandom(NONCE_LEN))
        writer.write(encode(LinkKind.HELLO, hello.body()))
        data = await asyncio.wait_for(reader.read(65536), T)
        assert not data.startswith(bytes([LinkKind.WELCOME])), data
        writer.close()
        register_link_keys(ca, cb, cc)
    finally:
        for server, cluster in ((a, ca), (b, cb), (c, cc)):
            await cluster.close()
            await server.close()
    assert any("TLS" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_command_line_link_tls(redis_server: LocalRedis, tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki", ["link-a"], [])
    paths = pki.kmes["link-a"]
    tls = ["--cluster-tls-cert", str(paths.cert), "--cluster-tls-key", str(paths.key)]
    flags = ("--redis", redis_server.url, *secret_flags(tmp_path))
    code, out = await run_main(*flags, *tls)
    assert code == 1 and "go together" in out, out
    code, out = await run_main("--redis", redis_server.url, *tls, "--cluster-ca", str(pki.ca_cert))
    assert code == 1 and "needs --cluster-secret-file" in out, out
    code, out = await run_main(*flags, *tls, "--cluster-ca", str(tmp_path / "missing.pem"))
    assert code == 1 and "missing.pem" in out, out
    code, out = await run_main(*flags, *tls, "--cluster-ca", str(pki.ca_cert))
    assert code == 0 and "listening" in out, out
