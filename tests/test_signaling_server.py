"""A real signaling server on 127.0.0.1 with real clients (loopback only)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from qcall import __version__, pqc
from qcall.exceptions import SignalingAuthError, SignalingError
from qcall.signaling import messages as m
from qcall.signaling.client import Disconnected, SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR

T = 5.0 * TIMEOUT_FACTOR
E = TypeVar("E")


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    names = ["alice", "bob", "carol", "dave", "mallory"]
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in names}


async def start(**config: Any) -> SignalingServer:
    server = SignalingServer(ServerConfig(server_id="test-server", **config))
    await server.start("127.0.0.1", 0)
    return server


@pytest.fixture
async def server() -> AsyncIterator[SignalingServer]:
    srv = await start()
    yield srv
    await srv.close()


def url(server: SignalingServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


async def next_of(client: SignalingClient, cls: type[E]) -> E:
    """The next event of type ``cls``, skipping presence news only."""
    while True:
        event = await client.next_event(T)
        if isinstance(event, cls):
            return event
        assert isinstance(event, m.Presence | m.Registered), event


async def raw_register(server: SignalingServer, key: pqc.SigningKey, name: str) -> ClientConnection:
    ws = await connect(url(server))
    challenge = m.Challenge.parse(await ws.recv())
    await ws.send(m.Register.create(key, name, challenge).serialize())
    assert isinstance(m.parse_server_message(await ws.recv()), m.Registered)
    return ws


async def recv_error(ws: ClientConnection) -> m.ErrorMessage:
    while True:
        msg = m.parse_server_message(await asyncio.wait_for(ws.recv(), T))
        if isinstance(msg, m.ErrorMessage):
            return msg
        assert isinstance(msg, m.Presence), msg


async def clients(
    server: SignalingServer, keys: dict[str, pqc.SigningKey], *names: str
) -> list[SignalingClient]:
    out = []
    for name in names:
        client = SignalingClient(url(server), keys[name], name, backoff_min=0.02)
        await client.connect()
        out.append(client)
    return out


async def set_up_call(a: SignalingClient, b: SignalingClient) -> str:
    call_id = await a.invite(b.name)
    assert (await next_of(b, m.Invite)).call_id == call_id
    await b.accept(call_id)
    assert (await next_of(a, m.Accept)).call_id == call_id
    return call_id


async def ice_roundtrip(a: SignalingClient, b: SignalingClient, call_id: str, n: int) -> None:
    await a.send_ice(call_id, f"candidate {n}")
    assert (await next_of(b, m.ICECandidate)).payload == f"candidate {n}"


# --- the full call -------------------------------------------------------------------------


async def test_complete_call(server: SignalingServer, keys: dict[str, pqc.SigningKey]) -> None:
    alice, bob = await clients(server, keys, "alice", "bob")
    fa, fb = alice.fingerprint, bob.fingerprint
    assert (await next_of(alice, m.Presence)) == m.Presence("bob", fb, True)
    assert alice.online == {"bob": fb} and bob.online == {"alice": fa}

    call_id = await alice.invite("bob")
    assert await next_of(bob, m.Invite) == m.Invite(call_id, "alice", fa)
    await bob.ringing(call_id)
    assert await next_of(alice, m.Ringing) == m.Ringing(call_id, "bob", fb)
    await bob.accept(call_id)
    assert await next_of(alice, m.Accept) == m.Accept(call_id, "bob", fb)
    offer = json.dumps({"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n", "handshake": "A" * 9000})
    await alice.send_offer(call_id, offer)
    got = await next_of(bob, m.Offer)
    assert got.payload == offer and (got.peer, got.fingerprint) == ("alice", fa)
    await bob.send_answer(call_id, "answer ✓")
    assert (await next_of(alice, m.Answer)).payload == "answer ✓"
    await ice_roundtrip(alice, bob, call_id, 1)
    await ice_roundtrip(bob, alice, call_id, 2)
    await alice.hangup(call_id, "bye")
    assert await next_of(bob, m.Hangup) == m.Hangup(call_id, "alice", fa, "bye")
    assert server.protocol.calls == 0

    await bob.close()
    assert await next_of(alice, m.Presence) == m.Presence("bob", fb, False)
    assert alice.online == {}
    events = [e async for e in bob]
    assert events[-1] == Disconnected("closed", final=True)
    await alice.close()


# --- bad input while another pair's call proceeds -------------------------------------------


async def test_bad_input_answered_while_others_call(
    server: SignalingServer, keys: dict[str, pqc.SigningKey]
) -> None:
    alice, bob = await clients(server, keys, "alice", "bob")
    call_id = await set_up_call(alice, bob)
    mallory = await raw_register(server, keys["mallory"], "mallory")
    cases = [
        ("{not json", "bad_message"),
        ('{"type":"teleport"}', "bad_message"),
        ('{"type":"invite","peer":"bob"}', "bad_message"),
        ('{"type":"hangup","call_id":"' + call_id + '"}', "unknown_call"),
        (m.Invite("call-9999", peer="dave").serialize(), "unavailable"),
        (m.Invite("call-9999", peer="bob").serialize(), None),  # server answers busy
        (m.Accept("call-9999").serialize(), "unknown_call"),
    ]
    for n, (text, code) in enumerate(cases):
        await mallory.send(text)
        if code is None:
            busy = m.parse_server_message(await asyncio.wait_for(mallory.recv(), T))
            assert isinstance(busy, m.Busy) and busy.peer == "bob"
        else:
            assert (await recv_error(mallory)).code == code
        await ice_roundtrip(alice, bob, call_id, n)

    # Unauthenticated connections can do nothing; a bad signature is refused and closed.
    anon = await connect(url(server))
    challenge = m.Challenge.parse(await anon.recv())
    await anon.send(m.Invite("call-7777", peer="bob").serialize())
    assert (await recv_error(anon)).code == "auth_required"
    forged = m.Register.create(keys["mallory"], "alice", challenge)
    await anon.send(m.Register("alice", keys["alice"].public_bytes(), forged.signature).serialize())
    assert (await recv_error(anon)).code == "auth_failed"
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(anon.recv(), T)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    await ice_roundtrip(bob, alice, call_id, 100)

    # Somebody else's key for a pinned name.
    with pytest.raises(SignalingAuthError) as auth:
        await SignalingClient(url(server), keys["mallory"], "bob").connect()
    assert auth.value.code == "name_taken"
    await ice_roundtrip(alice, bob, call_id, 101)

    # A second login of bob replaces the first connection; the call goes on with the new one.
    bob2 = SignalingClient(url(server), keys["bob"], "bob")
    registered = await bob2.connect()
    assert registered.calls == (call_id,)
    error = await next_of(bob, m.ErrorMessage)
    assert error.code == "replaced"
    assert await next_of(bob, Disconnected) == Disconnected(
        "signaling server: registered again on another connection (replaced)", final=True
    )
    await ice_roundtrip(alice, bob2, call_id, 102)
    await mallory.close()
    for client in (alice, bob, bob2):
        await client.close()


async def test_auth_timeout() -> None:
    server = await start(auth_timeout=0.2 * TIMEOUT_FACTOR)
    try:
        ws = await connect(url(server))
        m.Challenge.parse(await ws.recv())
        error = await recv_error(ws)
        assert error.code == "auth_timeout"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
        assert ws.close_code == 1008
        for _ in range(100):
            if server.protocol.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert server.protocol.connections == 0
    finally:
        await server.close()


async def test_rate_limit(keys: dict[str, pqc.SigningKey]) -> None:
    server = await start(rate=5.0, burst=5.0)
    try:
        alice, bob = await clients(server, keys, "alice", "bob")
        call_id = await set_up_call(alice, bob)
        mallory = await raw_register(server, keys["mallory"], "mallory")
        for _ in range(20):
            await mallory.send('{"type":"hangup","call_id":"call-0001"}')
        codes = [(await recv_error(mallory)).code for _ in range(20)]
        assert set(codes) == {"unknown_call", "rate_limited"}
        # The burst (5), plus what refilled meanwhile (5/s) on a slow machine.
        assert codes.count("unknown_call") <= 10
        await ice_roundtrip(alice, bob, call_id, 1)
        await asyncio.sleep(0.3)  # refill: mallory may talk again
        await mallory.send('{"type":"hangup","call_id":"call-0001"}')
        assert (await recv_error(mallory)).code == "unknown_call"
        await mallory.close()
        await alice.close()
        await bob.close()
    finally:
        await server.close()


async def test_oversized_frames(server: SignalingServer, keys: dict[str, pqc.SigningKey]) -> None:
    alice, bob = await clients(server, keys, "alice", "bob")
    call_id = await set_up_call(alice, bob)
    mallory = await raw_register(server, keys["mallory"], "mallory")
    await mallory.send(json.dumps({"type": "ice", "call_id": call_id, "payload": "x" * 100_000}))
    assert (await recv_error(mallory)).code == "too_big"
    await ice_roundtrip(alice, bob, call_id, 1)
    await mallory.send("x" * 300_000)  # beyond the hard limit: closed by websockets (1009)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(mallory.recv(), T)
    assert mallory.close_code == 1009
    await ice_roundtrip(bob, alice, call_id, 2)
    with pytest.raises(ValueError, match="payload"):
        await alice.send_offer(call_id, "x" * (m.MAX_PAYLOAD_SIZE + 1))
    await alice.close()
    await bob.close()


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), T)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def test_healthz(server: SignalingServer, keys: dict[str, pqc.SigningKey]) -> None:
    alice, bob = await clients(server, keys, "alice", "bob")
    await set_up_call(alice, bob)
    status, headers, body = await http_get(server.port, "/healthz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "status": "ok",
        "connections": 2,
        "registered": 2,
        "calls": 1,
        "version": __version__,
    }
    status, _, _ = await http_get(server.port, "/")
    assert status == 426  # plain HTTP elsewhere: Upgrade Required
    await alice.close()
    await bob.close()


# --- reconnection ------------------------------------------------------------------------------


async def test_server_restart_during_call(keys: dict[str, pqc.SigningKey]) -> None:
    server = await start(call_grace=5.0)
    port = server.port
    alice, bob = await clients(server, keys, "alice", "bob")
    call_id = await set_up_call(alice, bob)
    await server.close()
    for client in (alice, bob):
        assert not (await next_of(client, Disconnected)).final
        assert not client.connected
    with pytest.raises(SignalingError, match="not connected"):
        await alice.send_ice(call_id, "lost")
    server = SignalingServer(ServerConfig(server_id="test-server"))
    await server.start("127.0.0.1", port)
    try:
        for client in (alice, bob):
            await client.wait_registered(T)
            assert client.registrations == 2
        # The restarted server knows nothing of the call: the clients place signaling anew.
        await alice.hangup(call_id)
        assert (await next_of(alice, m.ErrorMessage)).code == "unknown_call"
        call_id = await set_up_call(bob, alice)
        await ice_roundtrip(alice, bob, call_id, 1)
    finally:
        await alice.close()
        await bob.close()
        await server.close()


async def test_client_reconnects_into_its_call(
    server: SignalingServer, keys: dict[str, pqc.SigningKey]
) -> None:
    alice, bob = await clients(server, keys, "alice", "bob")
    call_id = await set_up_call(alice, bob)
    ws = bob._ws
    assert ws is not None
    ws.transport.abort()  # the network drops bob's connection
    assert not (await next_of(bob, Disconnected)).final
    registered = await next_of(bob, m.Registered)
    assert registered.calls == (call_id,)
    await ice_roundtrip(alice, bob, call_id, 1)
    await ice_roundtrip(bob, alice, call_id, 2)
    await alice.close()
    await bob.close()


async def test_connect_errors(keys: dict[str, pqc.SigningKey]) -> None:
    client = SignalingClient("ws://127.0.0.1:1", keys["alice"], "alice", timeout=T)
    with pytest.raises(SignalingError, match="cannot connect"):
        await client.connect()
    other = pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_44)
    with pytest.raises(SignalingAuthError, match="ML-DSA-65"):
        SignalingClient("ws://127.0.0.1:1", other, "alice")


# --- TLS and the command line ----------------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_cli_serves_wss_and_healthz(tmp_path: Path, keys: dict[str, pqc.SigningKey]) -> None:
    cert, key = make_cert(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "--host", "127.0.0.1", "--port", "0",
        "--tls-cert", str(cert), "--tls-key", str(key), "--server-id", "cli-test",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 4 * T)).decode()
        assert line.startswith("qcall-signaling listening on wss://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        context = ssl.create_default_context(cafile=str(cert))
        wss = f"wss://localhost:{port}"
        alice = SignalingClient(wss, keys["alice"], "alice", ssl=context)
        bob = SignalingClient(wss, keys["bob"], "bob", ssl=context)
        await alice.connect()
        await bob.connect()
        assert alice.server_id == "cli-test"
        call_id = await set_up_call(alice, bob)
        await ice_roundtrip(bob, alice, call_id, 1)
        await alice.close()
        await bob.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), T) == 0


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from signaling.__main__ import main

    with pytest.raises(SystemExit):
        main(["--tls-cert", "only.pem"])
    assert "--tls-key" in capsys.readouterr().err
    assert main(["--tls-cert", "missing.pem", "--tls-key", "missing.pem"]) == 1
    assert "missing.pem" in capsys.readouterr().err


def test_cli_has_a_flag_for_every_limit(capsys: pytest.CaptureFixture[str]) -> None:
    from qcall.signaling.config import LIMITS
    from signaling.__main__ import build_parser, config_from

    flags = {"server_id", "early_offer"}  # --server-id, --no-early-offer
    assert set(LIMITS) == {f.name for f in dataclasses.fields(ServerConfig)} - flags
    parser = build_parser()
    args = parser.parse_args(
        ["--max-watch", "10", "--ring-timeout", "5.5", "--max-unauthenticated-per-address", "3"]
    )
    config = config_from(parser, args)
    assert (config.max_watch, config.ring_timeout) == (10, 5.5)
    assert config.max_unauthenticated_per_address == 3
    assert config.pin_ttl == ServerConfig().pin_ttl  # the others keep their defaults
    assert config.early_offer
    assert not config_from(parser, parser.parse_args(["--no-early-offer"])).early_offer
    with pytest.raises(SystemExit):
        config_from(parser, parser.parse_args(["--max-watch", "1001"]))
    assert "--max-watch must be at most 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from(parser, parser.parse_args(["--max-pending-invites", "0"]))
    assert "--max-pending-invites must be at least 1" in capsys.readouterr().err


async def test_slow_reader_is_dropped(keys: dict[str, pqc.SigningKey]) -> None:
    # The outbox's message count is the limit here (its byte limit: test_signaling_abuse.py).
    config = ServerConfig(server_id="test-server", rate=1e6, burst=1e6, max_outbox_bytes=2**30)
    server = SignalingServer(config, outbox_size=64)
    await server.start("127.0.0.1", 0)
    try:
        alice, bob = await clients(server, keys, "alice", "bob")
        mallory = await raw_register(server, keys["mallory"], "mallory")
        await mallory.send(m.Invite("call-slow", peer="alice").serialize())
        assert (await next_of(alice, m.Invite)).call_id == "call-slow"
        await alice.accept("call-slow")
        # mallory does not read; alice sends it 16 MB of candidates.
        for n in range(400):
            await alice.send_ice("call-slow", f"{n:05d}" + "x" * 40_000)
        # The server gave up on mallory: what was queued, then a close frame (1008).
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(mallory.recv(), T)
        assert mallory.close_code == 1008 and mallory.close_reason == "too slow"
        # Everyone else is served as before.
        await alice.hangup("call-slow")
        call_id = await set_up_call(alice, bob)
        await ice_roundtrip(bob, alice, call_id, 1)
        await alice.close()
        await bob.close()
    finally:
        await server.close()


async def test_release_ping_waits_until_the_client_is_quiet(
    keys: dict[str, pqc.SigningKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a frame above 4 KiB the server pings (so that the pong frees the frame
    websockets keeps) only once the client has been quiet for RELEASE_DELAY: not
    while frames keep coming, each freeing the one before, and not in the middle
    of relaying."""
    from websockets.asyncio.server import ServerConnection

    import signaling.server as shell

    monkeypatch.setattr(shell, "RELEASE_DELAY", 0.5)
    loop = asyncio.get_running_loop()
    pings: list[float] = []
    ping = ServerConnection.ping

    async def spy(self: ServerConnection, data: Any = None) -> Any:
        pings.append(loop.time())
        return await ping(self, data)

    monkeypatch.setattr(ServerConnection, "ping", spy)
    srv = await start()
    try:
        ws = await raw_register(srv, keys["alice"], "alice")
        big = m.ICECandidate("no-such-call", payload="x" * 5000).serialize()
        for _ in range(4):  # 0.1 s apart: the delay never runs out
            await ws.send(big)
            assert (await recv_error(ws)).code == "unknown_call"
            await asyncio.sleep(0.1)
        last = loop.time()
        assert pings == []  # the server used to ping right after the first
        while not pings:
            assert loop.time() - last < T, "no release ping"
            await asyncio.sleep(0.02)
        assert pings[0] - last > 0.3  # 0.5 s after the last big frame was handled
        await ws.send(m.ICECandidate("no-such-call", payload="small").serialize())
        await recv_error(ws)
        await asyncio.sleep(0.7)
        assert len(pings) == 1  # small frames arm nothing
        await ws.close()
    finally:
        await srv.close()
