"""TURN credentials from the signaling server, checked by a real coturn (qcall.signaling.turn)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import aioice
import pytest

from qcall import pqc
from qcall.exceptions import SignalingProtocolError
from qcall.signaling import messages as m
from qcall.signaling.client import SignalingClient
from qcall.signaling.protocol import ServerConfig, SignalingProtocol
from qcall.signaling.turn import rest_credentials, turn_issuer
from signaling.local_services import LocalTurn
from signaling.server import SignalingServer
from tests.test_call_session import Lab, lab  # noqa: F401 (the lab fixture)

SECRET = b"turn-secret-for-tests-0123456789"


@pytest.fixture
def turn() -> Iterator[LocalTurn]:
    if shutil.which("turnserver") is None:
        pytest.skip("turnserver is not installed here (apt-get install coturn)")
    with LocalTurn(SECRET.decode()) as server:
        yield server


async def relay_candidates(turn: LocalTurn, username: str, password: str) -> list[str]:
    conn = aioice.Connection(
        ice_controlling=True,
        components=1,
        turn_server=(turn.host, turn.port),
        turn_username=username,
        turn_password=password,
        turn_transport="udp",
    )
    try:
        await conn.gather_candidates()
        return [c.type for c in conn.local_candidates if c.type == "relay"]
    finally:
        await conn.close()


async def test_registered_users_get_credentials_that_coturn_accepts(turn: LocalTurn) -> None:
    key = pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_65)
    protocol = SignalingProtocol(
        ServerConfig(server_id="turn-test"), turn=turn_issuer(SECRET, [turn.url], ttl=600)
    )
    async with SignalingServer(protocol=protocol) as server:
        await server.start("127.0.0.1", 0)
        async with SignalingClient(f"ws://127.0.0.1:{server.port}", key, "alice") as alice:
            creds = alice.turn
            assert creds is not None and creds.urls == (turn.url,)
            assert creds.username.endswith(":alice")
            assert 590 <= creds.expires - time.time() <= 600
            assert creds.credential not in repr(creds)  # a password never reaches a log
            assert await relay_candidates(turn, creds.username, creds.credential) == ["relay"]
            # Anything else is refused by the TURN server.
            assert await relay_candidates(turn, creds.username, "d3Jvbmc=") == []
            forged = rest_credentials(b"another secret", "alice", [turn.url], time.time())
            assert await relay_candidates(turn, forged.username, forged.credential) == []
            expired = rest_credentials(SECRET, "alice", [turn.url], time.time() - 7200, ttl=60)
            assert await relay_candidates(turn, expired.username, expired.credential) == []


def test_turn_member_round_trips_and_is_checked() -> None:
    creds = rest_credentials(SECRET, "bob", ["turn:192.0.2.1:3478"], 1_767_225_600, ttl=60)
    assert creds.username == "1767225660:bob"
    msg = m.Registered("bob", "A" * 20, turn=creds)
    assert m.Registered.parse(msg.serialize()) == msg
    assert m.Registered.parse(m.Registered("bob", "A" * 20).serialize()).turn is None
    for bad in (
        '"turn":{"urls":["http://x"],"username":"u","credential":"c","expires":1}',
        '"turn":{"urls":["turn:x"],"username":"u","expires":1}',
        '"turn":"turn:x"',
    ):
        with pytest.raises(SignalingProtocolError, match="turn"):
            m.Registered.parse(
                '{"type":"registered","name":"bob","fingerprint":"' + "A" * 20 + '",' + bad + "}"
            )


@pytest.fixture
def turn_issuing(monkeypatch: pytest.MonkeyPatch, turn: LocalTurn) -> LocalTurn:
    """Signaling servers made from now on issue TURN credentials for ``turn``.

    Requested before ``lab`` (tests/test_call_session.py), it makes the lab's server do so.
    """
    import functools

    import signaling.server

    issuer = turn_issuer(SECRET, [turn.url], ttl=600)
    monkeypatch.setattr(
        signaling.server, "SignalingProtocol", functools.partial(SignalingProtocol, turn=issuer)
    )
    return turn


@pytest.mark.slow
async def test_a_hybrid_call_uses_the_issued_turn_server(turn_issuing: LocalTurn, lab: Lab) -> None:  # noqa: F811
    from qcall.call.session import CallOptions
    from tests.test_call_session import connect

    alice = await lab.phone("alice", tone=440, options=CallOptions(rekey_interval=None))
    bob = await lab.phone("bob", options=CallOptions(rekey_interval=None))
    assert alice.signaling.turn is not None and bob.signaling.turn is not None
    caller, callee = await connect(alice, bob)
    assert caller.status.policy == callee.status.policy == "hybrid"
    for session in (caller, callee):
        assert session.pc is not None
        gatherer = session.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
        types = {c.type for c in gatherer.getLocalCandidates()}
        assert "relay" in types, types  # an allocation on coturn with the issued credentials
    await caller.hangup()


@pytest.mark.slow
async def test_relay_policy_sends_media_through_turn_and_the_report_says_so(
    turn_issuing: LocalTurn,
    lab: Lab,  # noqa: F811
) -> None:
    from qcall.call.session import CallOptions
    from tests.test_call_session import connect

    options = CallOptions(rekey_interval=None, ice_policy="relay")
    alice = await lab.phone("alice", tone=440, options=options)
    bob = await lab.phone("bob", options=options)
    caller, callee = await connect(alice, bob)
    for session in (caller, callee):
        await session.refresh_stats()
        ice = session.status.as_dict()["ice"]
        assert ice["local_candidate_type"] == ice["remote_candidate_type"] == "relay", ice
        assert session.status.ice is not None and session.pc is not None  # for mypy
        assert ice["policy"] == "relay" and session.status.ice.relayed
        gatherer = session.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
        assert {c.type for c in gatherer.getLocalCandidates()} == {"relay"}  # nothing else
    # Each side sends to the other's allocation on the TURN server.
    assert caller.status.ice is not None and callee.status.ice is not None  # for mypy
    assert caller.status.ice.remote_address == callee.status.ice.local_address
    assert caller.status.ice.local_address == callee.status.ice.remote_address
    await caller.hangup()
