"""Instances of one cluster that differ in a feature (docs/signaling.md, "Several instances").

An instance run with ``--no-early-offer`` (or one that predates the feature) refuses an
early offer relayed from another instance. The caller's instance therefore relays it at
once only to an instance that advertises the feature in Redis; for any other it holds the
offer and relays it right behind the callee's accept, as for a callee that did not ask.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from qcall import pqc
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig
from signaling.cluster import Cluster
from signaling.local_services import LocalRedis
from signaling.server import SignalingServer
from tests.test_signaling_cluster import SERVER_ID, instance, keys, next_of, url
from tests.test_signaling_cluster_links import SECRET, register_link_keys

__all__ = ["keys"]  # (the fixture)

Instances = list[tuple[SignalingServer, Cluster]]


@pytest.fixture(params=["redis", "links"])
async def mixed(
    redis_server: LocalRedis, request: pytest.FixtureRequest
) -> AsyncIterator[Instances]:
    """A with early offers (the default), B without (``--no-early-offer``); frames
    between them on Redis only, or on direct links (``--cluster-secret-file``)."""
    secret = SECRET if request.param == "links" else None
    made = [
        await instance(redis_server, "A", link_secret=secret),
        await instance(
            redis_server, "B", config=ServerConfig(SERVER_ID, early_offer=False), link_secret=secret
        ),
    ]
    yield made
    if secret is not None:
        register_link_keys(*(cluster for _, cluster in made))
    for server, cluster in made:
        await cluster.close()
        await server.close()


@pytest.mark.parametrize("asked", [True, False], ids=["callee-asked", "callee-did-not"])
async def test_an_instance_without_early_offer_gets_the_offer_behind_the_accept(
    mixed: Instances, keys: dict[str, pqc.SigningKey], asked: bool
) -> None:
    (a, _), (b, _) = mixed
    features = (m.EARLY_OFFER,) if asked else ()  # B does not offer it: bob never gets it
    async with (
        SignalingClient(url(a), keys["a"], "alice", watch=[]) as alice,
        SignalingClient(url(b), keys["b"], "bob", watch=[], features=features) as bob,
    ):
        assert m.EARLY_OFFER in alice.server_features
        assert m.EARLY_OFFER not in bob.server_features
        call_id = await alice.invite("bob")
        await next_of(bob, m.Invite)
        await alice.send_offer(call_id, "early offer", reason="sent while ringing")
        await bob.ringing(call_id)
        assert isinstance(await next_of(alice, m.Ringing), m.Ringing)  # no error before it
        await bob.accept(call_id, "qcall-sdp:x")
        accept = await next_of(alice, m.Accept)
        assert (accept.peer, accept.reason) == ("bob", None)
        offer = await next_of(bob, m.Offer)  # right behind his accept
        assert (offer.peer, offer.fingerprint, offer.payload) == (
            "alice", alice.fingerprint, "early offer"
        )  # fmt: skip
        await bob.send_answer(call_id, "answer")
        assert (await next_of(alice, m.Answer)).payload == "answer"
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)


async def test_a_caller_on_the_instance_without_it_calls_as_before(
    mixed: Instances, keys: dict[str, pqc.SigningKey]
) -> None:
    (a, _), (b, _) = mixed
    async with (
        SignalingClient(url(b), keys["b"], "bob", watch=[]) as bob,
        SignalingClient(url(a), keys["a"], "alice", watch=[], features=(m.EARLY_OFFER,)) as alice,
    ):
        call_id = await bob.invite("alice")
        await next_of(alice, m.Invite)
        await alice.accept(call_id)
        assert (await next_of(bob, m.Accept)).peer == "alice"
        await bob.send_offer(call_id, "offer")
        assert (await next_of(alice, m.Offer)).payload == "offer"
        await alice.hangup(call_id)
        await next_of(bob, m.Hangup)
