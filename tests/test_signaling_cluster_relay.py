"""The relay fast path between linked instances (docs/signaling.md, "Relay fast path").

A relayed ``offer``/``answer``/``ice`` that the sender's instance validated and
serialized is delivered by the recipient's instance after its own checks
(:meth:`SignalingProtocol.forwarded_relay`) without being parsed again; the
feature is negotiated in the link handshake, so an instance that does not offer
it is sent client frames as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qcall import pqc
from qcall.exceptions import ClusterLinkError
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import RELAYED_HEADROOM, ConnectionId, ServerConfig
from qcall.typing import PeerId
from signaling.cluster import Cluster
from signaling.cluster_link import NONCE_LEN, Hello, LinkKind, Welcome, link_macs, transcript
from signaling.cluster_links import Links, _Outbound
from signaling.local_services import LocalRedis
from signaling.server import SignalingServer, _Outbox
from tests.test_signaling_cluster import next_of, place_call, url
from tests.test_signaling_cluster_links import (
    ice_stream,
    instance,
    link_up,
    register_link_keys,
    wait_for,
)
from tests.test_signaling_protocol import Server, fp

CALL = "relay-call-0001"


# --- the check at the receiving instance (Sans-I/O) ----------------------------------------


@pytest.fixture(scope="module")
def pkeys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in ("alice", "bob")}


def accepted_call(pkeys: dict[str, pqc.SigningKey]) -> tuple[Server, ConnectionId, ConnectionId]:
    """bob registered here, alice a stand-in (another instance's user), in an accepted call."""
    server = Server(pkeys)
    bob = server.register("bob")
    alice, out = server.proto.attach_remote(PeerId("alice"), fp(pkeys["alice"]), server.now)
    assert alice is not None and out == []
    [(to, invite)] = server.send(alice, m.Invite(CALL, peer="bob"))
    assert to == bob and isinstance(invite, m.Invite)
    [(to, _)] = server.send(bob, m.Accept(CALL))
    assert to == alice
    return server, alice, bob


def relayed_text(server: Server, alice: ConnectionId, msg: m.CallMessage) -> tuple[Any, str]:
    """What the full protocol pass makes of ``msg`` from stand-in ``alice``: (target, text)."""
    [(target, relayed)] = server.proto.receive(alice, msg.serialize(), server.now)
    assert isinstance(relayed, m.Message)  # for mypy: not a CloseConnection
    return target, relayed.serialize()


def test_a_relay_frame_goes_where_the_full_pass_would_send_it(
    pkeys: dict[str, pqc.SigningKey]
) -> None:
    server, alice, bob = accepted_call(pkeys)
    for msg in (m.ICECandidate(CALL, payload="c" * 8192), m.Offer(CALL, payload="o"),
                m.Answer(CALL, payload="a")):  # fmt: skip
        target, text = relayed_text(server, alice, msg)
        assert target == bob
        assert server.proto.forwarded_relay(alice, CALL, msg.TYPE, text) == bob
    assert server.proto.call_state(CALL) is not None  # nothing changed: still up


def test_a_relay_frame_is_checked_against_this_instance_state(
    pkeys: dict[str, pqc.SigningKey]
) -> None:
    server, alice, bob = accepted_call(pkeys)
    _, text = relayed_text(server, alice, m.ICECandidate(CALL, payload="x"))
    check = server.proto.forwarded_relay
    assert check(alice, CALL, "ice", text) == bob
    # The header's type and call must be the body's, and the body's sender and
    # fingerprint this instance's.
    assert check(alice, CALL, "offer", text) is None
    assert check(alice, "another-call-01", "ice", text) is None
    forged = text.replace(fp(pkeys["alice"]), fp(pkeys["bob"]))
    assert forged != text and check(alice, CALL, "ice", forged) is None
    assert check(alice, CALL, "ice", text.replace('"peer":"alice"', '"peer":"bob"')) is None
    assert check(alice, CALL, "ice", text[:-1]) is None  # cut short
    # Only relay messages (no state change); only from a stand-in; within the size limit.
    hangup = m.Hangup(CALL, peer="alice", fingerprint=fp(pkeys["alice"])).serialize()
    assert check(alice, CALL, "hangup", hangup) is None
    assert check(bob, CALL, "ice", text) is None
    size = server.proto.config.max_message_size + RELAYED_HEADROOM
    big = text[:-1] + ',"pad":"' + "y" * (size - len(text)) + '"}'
    assert len(big) > size and check(alice, CALL, "ice", big) is None
    assert check(alice, CALL, "ice", big[: size - 2] + '"}') == bob
    assert server.proto.call_state(CALL) is not None


def test_a_relay_frame_needs_an_accepted_call_and_the_recipient_here(
    pkeys: dict[str, pqc.SigningKey]
) -> None:
    server = Server(pkeys)
    bob = server.register("bob")
    alice, _ = server.proto.attach_remote(PeerId("alice"), fp(pkeys["alice"]), server.now)
    assert alice is not None
    server.send(alice, m.Invite(CALL, peer="bob"))
    text = m.ICECandidate(CALL, peer="alice", fingerprint=fp(pkeys["alice"]), payload="x")
    assert server.proto.forwarded_relay(alice, CALL, "ice", text.serialize()) is None  # ringing
    server.send(bob, m.Accept(CALL))
    assert server.proto.forwarded_relay(alice, CALL, "ice", text.serialize()) == bob
    # bob moved to another instance: the call waits for him (grace), but not here.
    server.proto.disconnect(bob, server.now)
    assert server.proto.forwarded_relay(alice, CALL, "ice", text.serialize()) is None
    standin, _ = server.proto.attach_remote(PeerId("bob"), fp(pkeys["bob"]), server.now)
    assert standin is not None
    assert server.proto.forwarded_relay(alice, CALL, "ice", text.serialize()) is None


# --- the handshake: negotiated, bound to the transcript ------------------------------------


def test_relay_is_offered_in_the_handshake_and_bound_to_it() -> None:
    hello = Hello("A", "B", 1, b"n" * NONCE_LEN, relay=True)
    assert Hello.parse(hello.body()).relay
    old = Hello("A", "B", 1, b"n" * NONCE_LEN)
    assert "relay" not in json.loads(old.body())  # what instances before it send
    assert not Hello.parse(old.body()).relay
    welcome = Welcome(b"w" * NONCE_LEN, 2, 0, b"m" * 32, relay=True)
    assert Welcome.parse(welcome.body()).relay
    assert "relay" not in json.loads(Welcome(b"w" * NONCE_LEN, 2, 0, b"m" * 32).body())
    for bad in (2, True, "1"):
        body = json.loads(hello.body()) | {"relay": bad}
        with pytest.raises(ClusterLinkError, match="relay"):
            Hello.parse(json.dumps(body).encode())
    # Stripping the feature from either message changes every MAC and the session key.
    secret = b"s" * 32
    both = link_macs(secret, transcript(hello, b"w" * NONCE_LEN, 2, 0, True))
    plain = link_macs(secret, transcript(hello, b"w" * NONCE_LEN, 2, 0, False))
    assert all(x != y for x, y in zip(both, plain, strict=True))
    assert transcript(old, b"w" * NONCE_LEN, 2, 0) == transcript(old, b"w" * NONCE_LEN, 2, 0, False)


# --- over real links ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in "ab"}


@pytest.fixture
async def linked(redis_server: LocalRedis) -> AsyncIterator[list[tuple[SignalingServer, Cluster]]]:
    made = [await instance(redis_server, "A"), await instance(redis_server, "B")]
    yield made
    register_link_keys(*(cluster for _, cluster in made))
    for server, cluster in made:
        await cluster.close()
        await server.close()


async def test_relay_frames_cross_the_link_and_arrive_as_on_one_instance(
    linked: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey]
) -> None:
    """offer, answer and ice go as relay frames once the link is up; bob gets them
    with alice's name and fingerprint, in order, once each; the state-changing
    messages still go as client frames (both instances run the call's state)."""
    (a, ca), (b, cb) = linked
    assert ca.links is not None and cb.links is not None
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        call_id = await place_call(alice, bob)  # the first frames may go over Redis
        await wait_for(lambda: ca.links is not None and ca.links.relays("B"), "no relay link")
        await wait_for(lambda: cb.links is not None and cb.links.relays("A"), "no relay link")
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)
        relayed_a, relayed_b = ca.relayed, cb.relayed
        call_id = await place_call(alice, bob)  # offer A → B, answer B → A
        assert (cb.relayed - relayed_b, ca.relayed - relayed_a) == (1, 1)
        got = await ice_stream(alice, bob, call_id, 50)
        assert got == [f"{i:04d}" for i in range(50)]
        assert cb.relayed - relayed_b == 51
        await bob.send_ice(call_id, "back")
        ice = await next_of(alice, m.ICECandidate)
        assert (ice.peer, ice.fingerprint, ice.payload) == ("bob", bob.fingerprint, "back")
        await alice.send_ice(call_id, "to bob")
        ice = await next_of(bob, m.ICECandidate)
        assert (ice.peer, ice.fingerprint, ice.payload) == ("alice", alice.fingerprint, "to bob")
        await bob.hangup(call_id)
        await next_of(alice, m.Hangup)
        await alice.send_ice(call_id, "after the call")  # refused at A, as on one instance
        error = await next_of(alice, m.ErrorMessage)
        assert error.code == "unknown_call"
        assert ca.links.failovers == cb.links.failovers == 0


async def test_an_instance_that_does_not_offer_relay_frames_gets_client_frames(
    linked: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey]
) -> None:
    """Mixed versions: B offers no relay frames (as an instance before them): both
    ways the links carry client frames, re-validated by the receiver, and all arrive."""
    (a, ca), (b, cb) = linked
    assert ca.links is not None and cb.links is not None
    cb.links.relay = False  # before any link is up
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
    ):
        call_id = await place_call(alice, bob)
        await wait_for(lambda: link_up(ca, "B"), "A→B")
        await wait_for(lambda: link_up(cb, "A"), "B→A")
        assert not ca.links.relays("B") and not cb.links.relays("A")
        sent = ca.links.sent
        got = await ice_stream(alice, bob, call_id, 20)
        assert got == [f"{i:04d}" for i in range(20)]
        assert ca.links.sent - sent == 20  # over the link, as client frames
        await bob.send_ice(call_id, "back")
        assert (await next_of(alice, m.ICECandidate)).payload == "back"
        assert ca.relayed == cb.relayed == 0
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)


# --- the recipient's own limits -----------------------------------------------------------


class _Socket:
    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


async def test_relay_frames_respect_the_recipient_outbox_limits() -> None:
    """A recipient that does not read is closed as too slow, as for any message;
    the others' outboxes are not touched."""
    server = SignalingServer(ServerConfig(server_id="s", max_outbox_bytes=20_000))
    slow, other = _Socket(), _Socket()
    server._outboxes[ConnectionId(1)] = _Outbox(slow, 8)  # type: ignore[arg-type]
    server._outboxes[ConnectionId(2)] = _Outbox(other, 8)  # type: ignore[arg-type]
    frame = "x" * 8192
    server.queue_text(ConnectionId(1), frame)
    server.queue_text(ConnectionId(1), frame)
    server.queue_text(ConnectionId(2), frame)
    assert server._outboxes[ConnectionId(1)].size == 2 * 8192
    server.queue_text(ConnectionId(1), frame)  # over 20,000 bytes
    await asyncio.sleep(0)
    assert ConnectionId(1) not in server._outboxes and slow.closed == (1008, "too slow")
    assert server._outboxes[ConnectionId(2)].queue.qsize() == 1 and other.closed is None
    server.queue_text(ConnectionId(1), frame)  # gone: nothing queued, no error


async def _nowhere(inst: str) -> str | None:
    return None


def test_a_welcome_may_not_add_relay_frames_the_hello_did_not_offer() -> None:
    links = Links(
        "A", b"s" * 32, deliver=lambda *_: None, resolve=_nowhere,
        republish=lambda *_: None, epoch=1, relay=False,
    )  # fmt: skip
    link = _Outbound(links, "B")
    assert not link._hello.relay and "relay" not in json.loads(link._hello.body())
    welcome = Welcome(b"w" * NONCE_LEN, 2, 0, b"m" * 32, relay=True)
    with pytest.raises(ClusterLinkError, match=r"welcome\.relay: not offered"):
        link.handle(LinkKind.WELCOME, welcome.body())
    assert not link.up and not link.relay


@pytest.mark.parametrize("asked", [True, False], ids=["callee-asked", "older-callee"])
async def test_the_offer_while_ringing_crosses_instances(
    linked: list[tuple[SignalingServer, Cluster]], keys: dict[str, pqc.SigningKey], asked: bool
) -> None:
    """early_offer across instances: A relays alice's offer (sent while ringing) to
    bob's stand-in at once, on the relay link; B, where bob is, applies bob's own
    choice: delivered now if he asked for it, else held and delivered right behind
    his accept. A second one before the accept is refused at A."""
    (a, ca), (b, cb) = linked
    features = (m.EARLY_OFFER,) if asked else ()
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[], features=features) as bob,
    ):
        assert m.EARLY_OFFER in alice.server_features
        call_id = await place_call(alice, bob)  # brings the relay link up
        await wait_for(lambda: ca.links is not None and ca.links.relays("B"), "no relay link")
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)
        relayed = cb.relayed
        call_id = await alice.invite("bob")
        await next_of(bob, m.Invite)
        await alice.send_offer(call_id, "early offer", reason="sent while ringing")
        await alice.send_offer(call_id, "second")
        assert (await next_of(alice, m.ErrorMessage)).code == "bad_state"
        if asked:
            offer = await next_of(bob, m.Offer)
            assert (offer.peer, offer.fingerprint, offer.payload) == (
                "alice", alice.fingerprint, "early offer"
            )
            assert cb.relayed == relayed + 1  # delivered on the relay fast path
        await bob.accept(call_id, "qcall-sdp:x")
        assert (await next_of(alice, m.Accept)).reason is None
        if not asked:
            offer = await next_of(bob, m.Offer)  # right behind his accept
            assert (offer.peer, offer.payload) == ("alice", "early offer")
        await bob.send_answer(call_id, "answer")
        assert (await next_of(alice, m.Answer)).payload == "answer"
        await alice.hangup(call_id)
