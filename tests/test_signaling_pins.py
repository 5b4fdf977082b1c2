"""Registration limits of the signaling protocol, Sans-I/O with a manual clock.

Pins (:mod:`qcall.signaling.pins`): names per key, new names per address and
window, expiry of unused pins; the watch-list limit; the pool of connections
waiting to register and its per-address share (docs/signaling.md, "Limits").
"""

from __future__ import annotations

import pytest

from qcall import pqc
from qcall.signaling import messages as m
from qcall.signaling.protocol import CloseConnection, ConnectionId, Output, address_key
from tests.test_signaling_protocol import Server, error, fp

NAMES = ["alice", "bob", "carol", "mallory", "k1", "k2", "k3"]


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in NAMES}


def refused(out: list[Output], cid: ConnectionId, code: str, close: int) -> None:
    assert error(out, cid).code == code
    assert out[-1][0] == cid and isinstance(out[-1][1], CloseConnection)
    assert out[-1][1].code == close


# --- names per key ----------------------------------------------------------------------


def test_one_key_pins_at_most_max_names_per_key(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_names_per_key=2)
    first = server.register("mallory")
    server.register("mallory-2", "mallory")
    cid = server.connect()
    refused(server.try_register(cid, "mallory-3", "mallory"), cid, "too_many_names", 1008)
    assert server.proto.identities == 2
    # Names already pinned to the key still register (a reconnection is not a new name).
    server.proto.disconnect(first, server.now)
    server.register("mallory")
    server.register("alice")  # other keys are not concerned


# --- new names per address and window -----------------------------------------------------


def test_new_names_per_address_in_a_fixed_window(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_new_names_per_address=2, new_names_window=60.0)
    server.register("k1", address="192.0.2.1")
    server.register("k2", address="192.0.2.1")
    cid = server.connect("192.0.2.1")
    out = server.try_register(cid, "k3")
    refused(out, cid, "too_many_identities", 1013)
    assert "try again later" in error(out, cid).message
    # Another address, an unknown one, and names pinned before are not concerned.
    server.register("alice", address="198.51.100.7")
    server.register("bob")
    server.register("k1", address="192.0.2.1")
    server.now += 60.0  # a new window
    server.register("k3", address="192.0.2.1")


# --- expiry of unused pins ----------------------------------------------------------------


def test_a_pin_unused_for_pin_ttl_expires(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, pin_ttl=100.0)
    a = server.register("alice")
    server.register("bob")  # online throughout: never expires
    gone = server.now
    server.proto.disconnect(a, gone)
    assert server.advance(99.0) == []  # the authentication timers ran meanwhile
    assert server.proto.get_timer() == pytest.approx(gone + 100.0)
    cid = server.connect()
    refused(server.try_register(cid, "alice", "mallory"), cid, "name_taken", 1008)
    server.now = gone + 100.0
    assert server.proto.handle_timer(server.now) == []
    assert server.proto.identities == 1
    # The name is free: another key may take it.
    out = server.try_register(server.connect(), "alice", "mallory")
    assert out[-1][1] == m.Registered(
        "alice", fp(keys["mallory"]), (m.OnlinePeer("bob", fp(keys["bob"])),)
    )
    assert server.advance(10_000.0) == []
    assert server.proto.identities == 2 and server.proto.get_timer() is None


def test_using_a_name_again_restarts_its_ttl(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, pin_ttl=100.0)
    server.proto.disconnect(server.register("alice"), server.now)
    server.advance(50.0)
    server.proto.disconnect(server.register("alice"), server.now)
    back = server.now
    server.advance(60.0)  # the first timer fired: nothing expired
    assert server.proto.identities == 1
    assert server.proto.get_timer() == pytest.approx(back + 100.0)
    server.now = back + 100.0
    server.proto.handle_timer(server.now)
    assert server.proto.identities == 0


def test_expired_pins_free_the_identity_and_key_limits(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, pin_ttl=10.0, max_identities=2, max_names_per_key=1)
    for name in ("alice", "bob"):
        server.proto.disconnect(server.register(name), server.now)
    cid = server.connect()
    refused(server.try_register(cid, "carol"), cid, "server_full", 1013)
    cid = server.connect()
    refused(server.try_register(cid, "alice-2", "alice"), cid, "server_full", 1013)
    server.advance(10.0)
    server.register("carol")
    server.register("alice-2", "alice")  # alice's key holds no name any more


def test_pin_expiry_ends_a_call_waiting_for_its_party(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, pin_ttl=5.0, call_grace=30.0)
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    server.send(b, m.Accept("call-0001"))
    server.proto.disconnect(b, server.now)
    out = server.advance(5.0)
    assert out == [(a, m.Hangup("call-0001", "bob", fp(keys["bob"]), "peer lost"))]
    assert server.proto.calls == 0
    # Whoever takes the name now finds no call of the old owner.
    cid = server.connect()
    out = server.try_register(cid, "bob", "mallory")
    assert isinstance(out[-1][1], m.Registered) and out[-1][1].calls == ()


# --- watch lists --------------------------------------------------------------------------


def test_watch_list_limit(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_watch=3)
    cid = server.connect()
    out = server.try_register(cid, "alice", watch=["bob", "carol", "dave", "erin"])
    refused(out, cid, "too_many_watched", 1008)
    assert server.proto.identities == 0
    cid = server.connect()
    out = server.try_register(cid, "alice", watch=["bob", "carol", "bob"])
    assert isinstance(out[-1][1], m.Registered)
    assert server.proto._connections[cid].watch == ("bob", "carol")  # once each


# --- connections waiting to register ------------------------------------------------------


def test_full_pool_closes_the_oldest_unregistered_connection(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys, max_unauthenticated=3)
    first, second, third = server.connect(), server.connect(), server.connect()
    cid, out = server.proto.connect(server.now)
    assert out[:2] == [
        (first, m.ErrorMessage("too_many_connections", "too many connections waiting to register")),
        (first, CloseConnection(1013, "too many connections")),
    ]
    assert out[2][0] == cid and isinstance(out[2][1], m.Challenge) and len(out) == 3
    server.challenges[cid] = out[2][1]
    assert server.proto.receive(first, "{}", server.now) == []  # closed
    assert server.proto.unauthenticated == 3
    # Registered connections leave the pool; closed ones at once (the shell's
    # disconnect comes later).
    assert isinstance(server.try_register(cid, "alice")[-1][1], m.Registered)
    assert server.proto.unauthenticated == 2
    assert server.proto.disconnect(first, server.now) == []
    assert server.proto.unauthenticated == 2 and server.proto.connections == 3
    for alive in (second, third):
        assert error(server.send(alive, m.Hangup("call-0001")), alive).code == "auth_required"


def test_per_address_share_of_the_pool(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_unauthenticated_per_address=2)
    a1, a2 = server.connect("192.0.2.1"), server.connect("192.0.2.1")
    others = [server.connect("198.51.100.7"), server.connect(), server.connect(), server.connect()]
    cid, out = server.proto.connect(server.now, "192.0.2.1")
    assert [(to, type(msg)) for to, msg in out] == [
        (a1, m.ErrorMessage),
        (a1, CloseConnection),
        (cid, m.Challenge),
    ]
    assert error(out, a1).code == "too_many_connections"
    # The other connections of that address, and of other addresses, stay.
    for alive in (a2, *others):
        assert error(server.send(alive, m.Hangup("call-0001")), alive).code == "auth_required"
    # A registered connection leaves the pool: it makes room for its address.
    assert isinstance(server.try_register(a2, "alice")[-1][1], m.Registered)
    _, out = server.proto.connect(server.now, "192.0.2.1")
    assert len(out) == 1


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("/run/qcall.sock", "/run/qcall.sock"),
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key
