"""What scripts/load_signaling.py needed for 10,000 connections.

Presence subscriptions (``register.watch``, docs/signaling.md "Presence"):
O(watchers) presence instead of O(users), Sans-I/O with a manual clock plus a
real server; and the server's garbage-collector management (``manage_gc``).
"""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
from websockets.asyncio.client import connect

import signaling.server as server_module
from qcall import pqc
from qcall.exceptions import SignalingProtocolError
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ConnectionId, Output, ServerConfig, SignalingProtocol
from signaling.server import SignalingServer
from tests.utils import TIMEOUT_FACTOR

NAMES = ("alice", "bob", "carol", "dave")


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in NAMES}


class Server:
    def __init__(self, keys: dict[str, pqc.SigningKey]) -> None:
        self.keys = keys
        self.now = 0.0
        self.proto = SignalingProtocol(ServerConfig(server_id="test-server"))

    def register(
        self, name: str, watch: tuple[str, ...] | None = None
    ) -> tuple[ConnectionId, list[Output]]:
        cid, [(_, challenge)] = self.proto.connect(self.now)
        assert isinstance(challenge, m.Challenge)
        register = m.Register.create(self.keys[name], name, challenge, watch)
        assert m.parse_client_message(register.serialize()) == register
        self.now += 0.01
        return cid, self.proto.receive(cid, register.serialize(), self.now)


def presence_to(out: list[Output]) -> dict[ConnectionId, list[tuple[str, bool]]]:
    got: dict[ConnectionId, list[tuple[str, bool]]] = {}
    for cid, msg in out:
        if isinstance(msg, m.Presence):
            got.setdefault(cid, []).append((msg.name, msg.online))
    return got


def registered(out: list[Output], cid: ConnectionId) -> m.Registered:
    [msg] = [msg for to, msg in out if to == cid and isinstance(msg, m.Registered)]
    return msg


def test_watchers_get_only_the_presence_they_asked_for(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys)
    a, _ = server.register("alice", watch=("bob",))
    c, _ = server.register("carol")  # no watch list: everyone, as in version 1
    d, out = server.register("dave", watch=())
    assert presence_to(out) == {c: [("dave", True)]}  # alice does not watch dave
    assert registered(out, d).online == ()
    b, out = server.register("bob", watch=("alice", "nobody"))
    assert presence_to(out) == {a: [("bob", True)], c: [("bob", True)]}
    assert [p.name for p in registered(out, b).online] == ["alice"]
    out = server.proto.disconnect(a, server.now)
    assert presence_to(out) == {c: [("alice", False)], b: [("alice", False)]}
    # A closed watcher is forgotten: nothing is sent to it afterwards.
    out = server.proto.disconnect(b, server.now)
    assert presence_to(out) == {c: [("bob", False)]}
    assert server.proto._watchers == {}
    assert server.proto._watch_all == {c}


def test_replaced_connection_stops_watching(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys)
    old, _ = server.register("alice", watch=("bob",))
    _, out = server.register("alice", watch=())
    assert any(to == old and isinstance(msg, m.ErrorMessage) for to, msg in out)
    _, out = server.register("bob")
    assert presence_to(out) == {}  # neither alice connection watches bob now
    server.proto.disconnect(old, server.now)
    assert server.proto._watchers == {}


@pytest.mark.parametrize(
    ("watch", "field"),
    [("alice", "watch"), (["ok", 5], "watch"), (["x"] * 1001, "watch"), ([" bad"], "watch")],
)
def test_bad_watch_lists_are_named(
    keys: dict[str, pqc.SigningKey], watch: object, field: str
) -> None:
    challenge = m.Challenge(b"\0" * m.NONCE_SIZE, "s", 0)
    obj = m.Register.create(keys["alice"], "alice", challenge).to_dict()
    obj["watch"] = watch
    with pytest.raises(SignalingProtocolError, match=f"'{field}'"):
        m.parse_client_message(json.dumps(obj))


async def test_clients_with_watch_lists(keys: dict[str, pqc.SigningKey]) -> None:
    async with SignalingServer(ServerConfig(server_id="watch-test")) as server:
        await server.start("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}"
        carol = SignalingClient(url, keys["carol"], "carol", reconnect=False)
        alice = SignalingClient(url, keys["alice"], "alice", watch=["bob"], reconnect=False)
        async with carol, alice:
            assert alice.online == {}
            async with SignalingClient(url, keys["bob"], "bob", watch=[]) as bob:
                assert bob.online == {}
                event = await alice.next_event(5 * TIMEOUT_FACTOR)
                while not isinstance(event, m.Presence):
                    event = await alice.next_event(5 * TIMEOUT_FACTOR)
                assert (event.name, event.online) == ("bob", True)
                assert alice.online == {"bob": bob.fingerprint}
                assert set(carol.online) <= {"alice", "bob"}


async def test_managed_gc_freezes_big_servers_and_reclaims_after_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: full collections paused a 10,000-connection server for 0.5-0.9 s."""
    monkeypatch.setattr(server_module, "GC_INTERVAL", 0.02)
    assert gc.get_freeze_count() == 0
    config = ServerConfig(server_id="gc-test")
    async with SignalingServer(config, manage_gc=True, gc_min_connections=2) as server:
        await server.start("127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}"
        sockets = [await connect(url) for _ in range(5)]
        async with asyncio.timeout(5 * TIMEOUT_FACTOR):
            while not gc.get_freeze_count():
                await asyncio.sleep(0.01)
        for ws in sockets[:3]:  # 3 closes > max(2, 2 // 2): one full collection
            await ws.close()
        async with asyncio.timeout(5 * TIMEOUT_FACTOR):
            while server._closed_since_collect or not gc.get_freeze_count():
                await asyncio.sleep(0.01)
        for ws in sockets[3:]:
            await ws.close()
    assert gc.get_freeze_count() == 0  # the process's collector is back to normal
