"""Calls in the lab of tests/test_call_session.py: baselines, KME outages, the key
confirmation's path, long ringing, key use on refusal, and either set-up flow.

The lab (a signaling server, two ETSI 014 KMEs over mutual TLS, two phones) and its
helpers are those of tests/test_call_session.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from qcall.call.session import CallOptions
from qcall.exceptions import (
    CallError,
    CallRejectedError,
    DowngradeError,
    KMEConnectionError,
    QCallError,
    QKDError,
    SignalingError,
)
from tests.test_call_session import (
    NO_PREFETCH,
    Lab,
    Opt,
    connect,
    lab as lab,  # the fixture: two KMEs, signaling
)
from tests.utils import TIMEOUT_FACTOR as T

pytestmark = pytest.mark.slow

# --- the harness baseline and the KME grace period ---------------------------------------


async def test_plain_baseline_only_between_plain_peers(lab: Lab) -> None:
    plain = CallOptions(policy="plain", rekey_interval=None)
    alice = await lab.phone("alice", tone=440, options=plain, key_source=None)
    bob = await lab.phone("bob", record=True, options=plain, key_source=None)
    caller, callee = await connect(alice, bob)
    assert caller.status.policy == callee.status.policy == "plain"
    assert caller.hook is None and "baseline" in caller.status.notice
    await asyncio.sleep(0.5)
    assert lab.recorders[0].arrivals  # stock DTLS-SRTP audio flows
    await caller.hangup()

    # A hybrid callee refuses a plain offer: no silent downgrade.
    bob.options = CallOptions(rekey_interval=None)
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(QCallError):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(DowngradeError, match="plain"):
        await asyncio.wait_for(incoming, 5 * T)


async def test_an_accept_with_a_plain_answer_is_refused_as_a_downgrade(lab: Lab) -> None:
    # A signed call's accept must carry the callee's SDP ahead of its signed answer:
    # a bare plain DTLS-SRTP answer there (a malicious server or callee) is refused.
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    accept = bob.signaling.accept

    async def plain_accept(call_id: str, payload: Opt = None, reason: Opt = None) -> None:
        assert payload is not None and payload.startswith("qcall-sdp:")
        await accept(call_id, "plain-sdp:" + payload[len("qcall-sdp:") :], reason)

    bob.signaling.accept = plain_accept  # type: ignore[method-assign]
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(DowngradeError, match="plain"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    with pytest.raises(QCallError):
        await asyncio.wait_for(incoming, 5 * T)
    assert not alice.calls and not bob.calls


async def test_kme_down_mid_call_grace_then_clean_end(lab: Lab) -> None:
    source = lab.key_source("alice")
    real_get_keys = source.get_keys  # every enc_keys: the call's, the reservoir's refill
    calls = 0

    async def flaky(peer_sae: str, *args: Any, **options: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:  # the KME "goes down" after the first key
            raise KMEConnectionError("cannot connect to KME (test: switched off)")
        return await real_get_keys(peer_sae, *args, **options)

    source.get_keys = flaky
    options = CallOptions(rekey_interval=0.3, key_grace=1.0, rekey_retry=0.2)
    alice = await lab.phone("alice", tone=440, options=options, key_source=source)
    bob = await lab.phone("bob", options=options)
    caller, callee = await connect(alice, bob)
    started = time.monotonic()
    await asyncio.sleep(0.6)
    assert caller.status.state.name == "ACTIVE"  # keeps its keys for the grace period...
    notice = caller.status.notice
    assert "postponed" in notice and "keeping the current keys" in notice
    with pytest.raises(QKDError, match="grace period"):  # ... then ends cleanly
        await asyncio.wait_for(caller.wait(), 5 * T)
    assert 1.0 <= time.monotonic() - started + 0.3 < 4 * T
    with pytest.raises(CallError, match="qkd_unavailable"):
        await asyncio.wait_for(callee.wait(), 5 * T)


async def test_initial_confirm_rides_signaling_and_falls_back_to_the_channel(lab: Lab) -> None:
    # Epoch 0: CONFIRM goes through signaling (the SCTP association is not up yet).
    relayed: dict[str, list[str]] = {"alice": [], "bob": []}
    alice = await lab.phone("alice", tone=440)
    # (bob signs in his event loop, the default: with a crypto worker, both phones in
    # this one process, his answer reaches alice after her control channel opened and
    # her CONFIRM takes the channel at once, so the fallback below is not tried.)
    bob = await lab.phone("bob", record=True)
    original = bob.signaling.send_ice

    async def bob_send_ice(call_id: str, payload: str) -> None:
        relayed["bob"].append(payload)
        await original(call_id, payload)

    async def alice_send_ice(call_id: str, payload: str) -> None:
        relayed["alice"].append(payload)
        raise SignalingError("not connected to the signaling server")  # as if it dropped

    bob.signaling.send_ice = bob_send_ice  # type: ignore[method-assign]
    alice.signaling.send_ice = alice_send_ice  # type: ignore[method-assign]
    caller, callee = await connect(alice, bob)
    # bob's SDP rode his signed answer in the accept: at most his CONFIRM went as `ice`
    # (with DTLS on the first check, docs/performance.md round 4, his control channel
    # can be open before his CONFIRM is ready, which then takes the channel)
    assert [p.split(":")[0] for p in relayed["bob"]] in (["qcall-hs"], [])
    confirms = [p for p in relayed["alice"] if p.startswith("qcall-hs:")]
    assert len(confirms) == 1  # alice's could not go: it took the control channel
    assert caller.status.timings_ms["confirmed"] > 0 and callee.status.timings_ms["confirmed"] > 0
    assert caller.status.sas == callee.status.sas is not None


@pytest.mark.parametrize("early", [True, False], ids=["in-invite", "offer-message"])
async def test_offer_built_while_ringing_is_restamped_after_long_ringing(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    import qcall.call.session as session_module

    monkeypatch.setattr(session_module, "OFFER_MAX_AGE", 0.3)
    alice = await lab.phone("alice", tone=440, options=CallOptions(early_offer=early))
    bob = await lab.phone("bob")
    offers: list[str] = []
    invites: list[str | None] = []
    original, invite = alice.signaling.send_offer, alice.signaling.invite

    async def record(call_id: str, payload: str, reason: str | None = None) -> None:
        offers.append(payload)
        await original(call_id, payload, reason)

    async def record_invite(peer: str, call_id: str | None = None, payload: Opt = None) -> str:
        invites.append(payload)
        return await invite(peer, call_id, payload)

    alice.signaling.send_offer = record  # type: ignore[method-assign]
    alice.signaling.invite = record_invite  # type: ignore[method-assign]

    async def slow_pickup(_invite: Any) -> bool:
        await asyncio.sleep(0.6)  # the offer, built at once, is older than 0.3 s now
        return True

    incoming = asyncio.ensure_future(bob.incoming(slow_pickup))
    dialled = time.time()
    caller = await asyncio.wait_for(alice.call("bob"), 15 * T)
    callee = await asyncio.wait_for(incoming, 15 * T)
    # only the fresh offer went out (the early_offer flow: the one sent while ringing
    # first, refused by the callee as too old at its pick-up)
    assert len(offers) == (2 if early else 1)
    import base64

    from qcall.handshake.messages import Offer, parse_message

    sent = parse_message(base64.b64decode(offers[-1]))
    assert isinstance(sent, Offer)
    assert sent.timestamp_ms / 1000 >= dialled + 0.5  # stamped after the pickup
    assert caller.status.sas == callee.status.sas is not None
    # the offer never left before: its QKD key is the one used, and in the invite
    # flow its SDP is the one the invite carried
    assert caller.status.qkd_key_ids == callee.status.qkd_key_ids == list(sent.qkd_key_ids)
    if early:
        assert invites == ["qcall-sdp:" + sent.sdp]
    else:
        assert invites == [None]
    await caller.hangup()


async def test_a_refused_call_consumes_no_key_twice(lab: Lab) -> None:
    # alice fetches her QKD key while bob's phone rings. He declines: that key is
    # discarded — it never left alice (the invite carries only her SDP), bob never
    # fetched it, and her next call gets a fresh one (her KME hands each key once).
    source = lab.key_source("alice")
    fetched: list[str] = []
    get_key = source.get_key

    async def recording(peer_sae: str, size_bits: int | None = None, **options: Any) -> Any:
        key = await get_key(peer_sae, size_bits, **options)
        fetched.append(key.key_id)
        return key

    source.get_key = recording
    alice = await lab.phone("alice", tone=440, key_source=source, prefetch=NO_PREFETCH)
    bob = await lab.phone("bob")

    async def decline(_invite: Any) -> bool:
        await asyncio.sleep(0.3)  # rings: alice's key and signed offer are ready meanwhile
        return False

    declining = asyncio.ensure_future(bob.incoming(decline))
    with pytest.raises(CallRejectedError, match="declined"):
        await asyncio.wait_for(alice.call("bob"), 10 * T)
    declining.cancel()
    refused = list(fetched)
    assert len(refused) == 1
    caller, callee = await connect(alice, bob)
    assert caller.status.qkd_key_ids == callee.status.qkd_key_ids == fetched[1:]
    assert refused[0] not in caller.status.all_key_ids + callee.status.all_key_ids
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    container = lab.kmes["bob"].dec_keys("bob", "alice", refused)  # type: ignore[attr-defined]
    assert [k.key_id for k in container.keys] == refused  # still there: never used


@pytest.mark.parametrize(
    ("caller_early", "callee_early"), [(True, True), (True, False), (False, True)]
)
async def test_peers_of_either_flow_call_each_other(
    lab: Lab, caller_early: bool, callee_early: bool
) -> None:
    # An older peer (or an older server, which drops the member it does not know)
    # leaves the invite's SDP unused: the accept comes bare, and the callee sends
    # its SDP ahead once the signed offer came. Nothing else changes.
    alice = await lab.phone(
        "alice", tone=440, options=CallOptions(rekey_interval=None, early_offer=caller_early)
    )
    bob = await lab.phone("bob", options=CallOptions(rekey_interval=None, early_offer=callee_early))
    caller, callee = await connect(alice, bob)
    assert caller.status.policy == callee.status.policy == "hybrid"
    assert caller.status.sas == callee.status.sas is not None
    assert caller.status.qkd_key_ids == callee.status.qkd_key_ids != []
    timings = caller.status.timings_ms
    if caller_early and callee_early:  # the signed offer while ringing (relayed then)
        assert timings["offer_sent"] < timings["accepted"]
    elif not caller_early:
        assert timings["accepted"] < timings["offer_sent"]  # the signed offer after the accept
    if caller_early and callee_early:  # the SDPs in the invite and in the accept
        assert timings["sdp_sent"] < timings["accepted"] <= timings["answer_received"]
        assert timings["offer_sent"] < timings["answer_received"]
        # auto-answer: the offer (come while ringing) is verified right after the accept
        assert callee.status.timings_ms["accepted"] < callee.status.timings_ms["offer_received"]
    elif caller_early:  # bob, like an older callee, sent his SDP once he had the offer
        assert timings["offer_sent"] < timings["answer_received"]
    else:  # alice, like an older caller, sent her SDP after the accept
        assert timings["accepted"] < timings["sdp_sent"]
    await caller.hangup()


async def test_watching_only_contacts_still_calls_anyone_online(lab: Lab) -> None:
    alice = await lab.phone("alice", tone=440, watch=["carol"])  # bob is not watched
    bob = await lab.phone("bob", watch=["alice"])
    await asyncio.sleep(0.1)
    assert "bob" not in alice.signaling.online  # no presence for unwatched names...
    assert "alice" in bob.signaling.online
    caller, callee = await connect(alice, bob)  # ... but calls are routed all the same
    assert caller.status.policy == callee.status.policy == "hybrid"
    await caller.hangup()
