"""The caller's signed offer relayed while the call rings (feature ``early_offer``).

docs/signaling.md, "The offer while ringing"; docs/calls.md. The server relays
the caller's one ``offer`` before the accept to a callee that asked for it, holds
it for one that did not (relayed right behind its accept, or dropped when too
old: the relayed accept then asks for a fresh one); the callee verifies it while
its phone rings and refuses a call whose signed SDP is not the invite's.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from qcall import pqc
from qcall.call.session import CallOptions
from qcall.exceptions import (
    CallError,
    CallRejectedError,
    InvalidMessageError,
    QCallError,
    SignalingProtocolError,
)
from qcall.handshake.protocol import State
from qcall.signaling import messages as m
from qcall.signaling.protocol import CallState, ConnectionId, Output, ServerConfig
from qcall.signaling.state import EARLY_OFFER_EXPIRED, EARLY_OFFER_MAX_HOLD, EARLY_OFFER_SENT
from qcall.typing import PeerId
from tests.test_call_session import (
    Lab,
    _other_fingerprint,
    connect,
    lab,  # noqa: F401 (the lab fixture)
)
from tests.test_signaling_protocol import Server, error, fp
from tests.utils import TIMEOUT_FACTOR as T


def types_of(out: list[Output]) -> list[tuple[ConnectionId, str]]:
    """Each output's target and message type (every one a message here)."""
    result = []
    for to, msg in out:
        assert isinstance(msg, m.Message)  # for mypy: not a CloseConnection
        result.append((to, msg.TYPE))
    return result


CALL = "call-0001"
OFFER = m.Offer(CALL, payload="signed offer", reason=EARLY_OFFER_SENT)


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in ("alice", "bob")}


def register(server: Server, name: str, features: tuple[str, ...] = ()) -> Any:
    cid = server.connect()
    out = server.try_register(cid, name, features=features)
    assert isinstance(out[-1][1], m.Registered), out
    return cid


# --- the server (Sans-I/O) ---------------------------------------------------------------


def test_the_feature_is_offered_and_only_offered_ones_are_asked(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys)
    cid = server.connect()
    challenge = server.challenges[cid]
    assert challenge.features == (m.EARLY_OFFER,)
    assert m.Challenge.parse(challenge.serialize()) == challenge
    register_msg = m.Register.create(
        keys["alice"], "alice", challenge, features=["early_offer", "teleport"]
    )
    assert register_msg.features == ("early_offer",)  # what the server did not offer: dropped
    old = Server(keys, early_offer=False)
    challenge = old.challenges[old.connect()]
    assert challenge.features == ()
    asked = m.Register.create(keys["alice"], "alice", challenge, features=["early_offer"])
    assert asked.features is None


@pytest.mark.parametrize(
    "bad", ['"early_offer"', '["Early"]', "[1]", "[" + ",".join(['"a"'] * 17) + "]"]
)
def test_bad_features_are_refused(bad: str) -> None:
    head = '{"type":"challenge","nonce":"' + "A" * 43 + '=","server_id":"s","time":1'
    text = head + ',"features":' + bad + "}"
    with pytest.raises(SignalingProtocolError, match="features"):
        m.parse_server_message(text)


def test_offer_relayed_while_ringing_once_to_a_callee_that_asked(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys)
    a, b = register(server, "alice"), register(server, "bob", ("early_offer",))
    server.send(a, m.Invite(CALL, peer="bob"))
    [(to, relayed)] = server.send(a, OFFER)
    assert to == b and relayed == m.Offer(
        CALL, "alice", fp(keys["alice"]), EARLY_OFFER_SENT, "signed offer"
    )
    server.send(b, m.Ringing(CALL))
    err = error(server.send(a, OFFER), a)  # a second one before the accept
    assert (err.code, err.ref) == ("bad_state", "offer")
    assert server.proto.call_state(CALL) is CallState.RINGING
    out = server.send(b, m.Accept(CALL, payload="qcall-sdp:x"))
    assert types_of(out) == [(a, "accept")]  # nothing held
    # After the accept, offers flow as before (a fresh one, when asked for).
    assert [to for to, _ in server.send(a, m.Offer(CALL, payload="fresh"))] == [b]


def test_offer_held_for_a_callee_that_did_not_ask_and_relayed_behind_its_accept(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys)
    a, b = register(server, "alice"), register(server, "bob")  # bob: an older client
    server.send(a, m.Invite(CALL, peer="bob"))
    assert server.send(a, OFFER) == []  # held
    assert error(server.send(a, OFFER), a).code == "bad_state"  # still only one
    out = server.send(b, m.Accept(CALL, payload="qcall-sdp:x"))
    assert types_of(out) == [(a, "accept"), (b, "offer")]
    assert isinstance(out[0][1], m.CallMessage)  # for mypy: the accept
    assert out[0][1].reason is None
    assert out[1][1] == m.Offer(CALL, "alice", fp(keys["alice"]), EARLY_OFFER_SENT, "signed offer")


def test_a_held_offer_too_old_at_the_accept_is_dropped_and_a_fresh_one_asked(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys)
    a, b = register(server, "alice"), register(server, "bob")
    server.send(a, m.Invite(CALL, peer="bob"))
    assert server.send(a, OFFER) == []
    server.advance(EARLY_OFFER_MAX_HOLD + 1)
    [(to, accept)] = server.send(b, m.Accept(CALL, payload="qcall-sdp:x"))
    assert to == a and isinstance(accept, m.Accept) and accept.reason == EARLY_OFFER_EXPIRED


def test_decline_drops_a_held_offer(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys)
    a, b = register(server, "alice"), register(server, "bob")
    server.send(a, m.Invite(CALL, peer="bob"))
    server.send(a, OFFER)
    assert types_of(server.send(b, m.Reject(CALL))) == [(a, "reject")]
    assert server.proto.calls == 0


def test_a_server_without_the_feature_refuses_an_offer_before_the_accept(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys, early_offer=False)
    a = register(server, "alice")
    register(server, "bob", ("early_offer",))
    server.send(a, m.Invite(CALL, peer="bob"))
    assert error(server.send(a, OFFER), a).code == "bad_state"


def test_relay_fast_path_delivers_or_holds_the_early_offer(
    keys: dict[str, pqc.SigningKey],
) -> None:
    # alice is a stand-in (another instance's user): her instance relayed her offer
    # while ringing; here, bob's own choice applies.
    for asked in (True, False):
        server = Server(keys)
        b = register(server, "bob", ("early_offer",) if asked else ())
        alice, _ = server.proto.attach_remote(PeerId("alice"), fp(keys["alice"]), server.now)
        assert alice is not None
        server.send(alice, m.Invite(CALL, peer="bob"))
        text = m.Offer(CALL, "alice", fp(keys["alice"]), EARLY_OFFER_SENT, "x").serialize()
        target = server.proto.forwarded_relay(alice, CALL, "offer", text, server.now)
        assert target == (b if asked else None)
        assert server.proto.forwarded_relay(alice, CALL, "offer", text, server.now) is None
        out = server.send(b, m.Accept(CALL))
        assert types_of(out) == (
            [(alice, "accept")] if asked else [(alice, "accept"), (b, "offer")]
        )


@pytest.mark.parametrize("takes", [True, False], ids=["instance-takes-it", "older-instance"])
def test_the_instance_of_the_caller_relays_the_early_offer_to_a_stand_in(
    keys: dict[str, pqc.SigningKey], takes: bool
) -> None:
    # bob's instance takes early offers: relayed at once (bob's instance decides for
    # him); it does not (older, or --no-early-offer): held here, behind his accept.
    server = Server(keys)
    a = register(server, "alice")
    bob, _ = server.proto.attach_remote(PeerId("bob"), fp(keys["bob"]), server.now, takes)
    assert bob is not None
    server.send(a, m.Invite(CALL, peer="bob"))
    assert [to for to, _ in server.send(a, OFFER)] == ([bob] if takes else [])
    if not takes:
        out = server.send(bob, m.Accept(CALL))
        assert [(to, type(msg)) for to, msg in out] == [(a, m.Accept), (bob, m.Offer)]


# --- calls ----------------------------------------------------------------------------------


async def test_offer_verified_while_ringing_answered_behind_the_accept(lab: Lab) -> None:  # noqa: F811
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    dialled = asyncio.ensure_future(alice.call("bob"))
    session = await asyncio.wait_for(bob.ringing(), 5 * T)
    for _ in range(200):  # the signed offer comes while the phone rings
        if session.hs is not None:
            break
        await asyncio.sleep(0.01)
    assert session.hs is not None and session.hs.state is State.CALLEE_EXPECT_ANSWER_SDP
    assert session.status.peer_fingerprint  # the caller is verified before the pick-up
    await asyncio.sleep(0.05)
    await session.answer()
    caller = await asyncio.wait_for(dialled, 5 * T)
    timings = session.status.timings_ms
    assert timings["offer_verified"] < timings["accepted"] <= timings["answer_sent"]
    assert caller.status.sas == session.status.sas is not None
    await caller.hangup()


async def test_decline_while_ringing_drops_the_verified_offer(lab: Lab) -> None:  # noqa: F811
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    dialled = asyncio.ensure_future(alice.call("bob"))
    session = await asyncio.wait_for(bob.ringing(), 5 * T)
    for _ in range(200):
        if session.hs is not None:
            break
        await asyncio.sleep(0.01)
    hs = session.hs
    assert hs is not None and hs._k_kem is not None  # the ML-KEM secret of the offer
    await bob.decline(session)
    assert hs.state is State.FAILED and hs._k_kem is None
    with pytest.raises(CallRejectedError):
        await asyncio.wait_for(dialled, 5 * T)
    assert alice.calls == {} or all(s.ended.done() for s in alice.calls.values())


async def test_invite_sdp_differing_from_the_signed_offer_is_refused_while_ringing(
    lab: Lab,  # noqa: F811
) -> None:
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")
    invite = alice.signaling.invite

    async def tamper_invite(peer: str, call_id: str | None = None, payload: Any = None) -> str:
        return await invite(peer, call_id, _other_fingerprint(payload))

    alice.signaling.invite = tamper_invite  # type: ignore[method-assign]
    accepts: list[str] = []
    accept = bob.signaling.accept

    async def record_accept(call_id: str, *args: Any, **kw: Any) -> None:
        accepts.append(call_id)
        await accept(call_id, *args, **kw)

    bob.signaling.accept = record_accept  # type: ignore[method-assign]
    dialled = asyncio.ensure_future(alice.call("bob"))
    session = await asyncio.wait_for(bob.ringing(), 5 * T)
    with pytest.raises(InvalidMessageError, match="differs from the SDP in its invite"):
        await asyncio.wait_for(session.ended, 5 * T)
    assert session.refused is not None and accepts == []  # refused before any accept
    with pytest.raises(QCallError):
        await asyncio.wait_for(dialled, 5 * T)


async def test_new_client_and_a_server_without_the_feature(
    lab: Lab,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An older server: no early_offer in its challenge, so the caller sends its
    # signed offer after the accept, as before.
    import qcall.signaling.protocol as protocol

    monkeypatch.setattr(
        protocol, "ServerConfig", functools.partial(ServerConfig, early_offer=False)
    )
    from signaling.server import SignalingServer

    old = SignalingServer()
    await old.start("127.0.0.1", 0)
    try:
        lab.url = f"ws://127.0.0.1:{old.port}"
        alice = await lab.phone("alice", tone=440)
        bob = await lab.phone("bob")
        assert alice.signaling.server_features == frozenset()
        caller, callee = await connect(alice, bob)
        timings = caller.status.timings_ms
        assert timings["accepted"] < timings["offer_sent"]
        assert caller.status.sas == callee.status.sas is not None
        await caller.hangup()
        for phone in lab.phones:
            await phone.close()
        lab.phones.clear()
    finally:
        await old.close()


async def test_old_callee_gets_the_offer_behind_its_accept(lab: Lab) -> None:  # noqa: F811
    # bob does not ask for the feature (an older client): the server holds alice's
    # early offer and relays it right behind bob's accept.
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob", options=CallOptions(rekey_interval=None, early_offer=False))
    assert bob.signaling.features == ()
    caller, callee = await connect(alice, bob)
    assert caller.status.sas == callee.status.sas is not None
    assert callee.status.timings_ms["accepted"] < callee.status.timings_ms["offer_received"]
    await caller.hangup()


async def test_a_signaling_error_on_the_early_offer_ends_the_call_clearly(lab: Lab) -> None:  # noqa: F811
    alice = await lab.phone("alice", tone=440)
    bob = await lab.phone("bob")

    async def refused(call_id: str, payload: str, reason: str | None = None) -> None:
        raise CallError("signaling refused the offer")

    alice.signaling.send_offer = refused  # type: ignore[method-assign]
    incoming = asyncio.ensure_future(bob.incoming())
    with pytest.raises(CallError, match="refused the offer"):
        await asyncio.wait_for(alice.call("bob"), 5 * T)
    incoming.cancel()
