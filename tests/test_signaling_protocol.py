"""Sans-I/O tests of the signaling server's state machine, with a manual clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall import pqc
from qcall.exceptions import PeerUnavailableError
from qcall.signaling import messages as m
from qcall.signaling.protocol import (
    CallState,
    CloseConnection,
    ConnectionId,
    Output,
    ServerConfig,
    SignalingProtocol,
)

TICK = 0.01


@pytest.fixture(scope="module")
def keys() -> dict[str, pqc.SigningKey]:
    backend = pqc.get_backend()
    names = ["alice", "bob", "carol", "dave", "mallory"]
    return {n: backend.signing_generate(pqc.SignatureScheme.ML_DSA_65) for n in names}


class Server:
    """A protocol, a manual clock, and helpers to drive both."""

    def __init__(self, keys: dict[str, pqc.SigningKey], **config: Any) -> None:
        self.keys = keys
        self.now = 0.0
        self.proto = SignalingProtocol(ServerConfig(server_id="test-server", **config))
        self.challenges: dict[ConnectionId, m.Challenge] = {}

    def connect(self, address: str | None = None) -> ConnectionId:
        cid, out = self.proto.connect(self.now, address)
        [(to, challenge)] = out
        assert to == cid and isinstance(challenge, m.Challenge)
        assert challenge.server_id == "test-server"
        self.challenges[cid] = challenge
        return cid

    def send(self, cid: ConnectionId, msg: m.Message | str) -> list[Output]:
        self.now += TICK
        text = msg if isinstance(msg, str) else msg.serialize()
        out = self.proto.receive(cid, text, self.now)
        for _, item in out:  # every output serializes and parses back
            if not isinstance(item, CloseConnection):
                assert m.parse_server_message(item.serialize()) == item
        return out

    def register(
        self, name: str, key_name: str | None = None, address: str | None = None
    ) -> ConnectionId:
        cid = self.connect(address)
        out = self.try_register(cid, name, key_name)
        mine = [msg for to, msg in out if to == cid]
        assert isinstance(mine[-1], m.Registered), out
        return cid

    def try_register(
        self, cid: ConnectionId, name: str, key_name: str | None = None, **kwargs: Any
    ) -> list[Output]:
        key = self.keys[key_name or name]
        return self.send(cid, m.Register.create(key, name, self.challenges[cid], **kwargs))

    def advance(self, seconds: float) -> list[Output]:
        self.now += seconds
        return self.proto.handle_timer(self.now)


def fp(key: pqc.SigningKey) -> str:
    return m.fingerprint(key.public_bytes())


def error(out: list[Output], cid: ConnectionId) -> m.ErrorMessage:
    [(to, msg)] = [(to, msg) for to, msg in out if isinstance(msg, m.ErrorMessage)]
    assert to == cid
    return msg


@pytest.fixture
def server(keys: dict[str, pqc.SigningKey]) -> Server:
    return Server(keys)


# --- registration --------------------------------------------------------------------


def test_registration_and_presence(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    a = server.register("alice")
    b = server.connect()
    out = server.send(b, m.Register.create(keys["bob"], "bob", server.challenges[b]))
    assert out == [
        (a, m.Presence("bob", fp(keys["bob"]), True)),
        (b, m.Registered("bob", fp(keys["bob"]), (m.OnlinePeer("alice", fp(keys["alice"])),))),
    ]
    assert server.proto.registered == 2
    assert server.proto.name_of(b) == "bob"
    assert server.proto.disconnect(b, server.now) == [
        (a, m.Presence("bob", fp(keys["bob"]), False))
    ]
    assert server.proto.registered == 1 and server.proto.connections == 1


def test_nonces_are_fresh(server: Server) -> None:
    nonces = {server.challenges[server.connect()].nonce for _ in range(5)}
    assert len(nonces) == 5


@pytest.mark.parametrize("tamper", ["server_id", "nonce", "name", "key"])
def test_bad_signature_is_refused_and_closed(
    server: Server, keys: dict[str, pqc.SigningKey], tamper: str
) -> None:
    cid = server.connect()
    ch = server.challenges[cid]
    if tamper == "server_id":
        ch = m.Challenge(ch.nonce, "other-server", ch.time)
    elif tamper == "nonce":
        ch = m.Challenge(bytes(32), ch.server_id, ch.time)
    reg = m.Register.create(keys["alice"], "alice", ch)
    if tamper == "name":
        reg = m.Register("alicf", reg.public_key, reg.signature)
    elif tamper == "key":
        reg = m.Register("alice", keys["bob"].public_bytes(), reg.signature)
    out = server.send(cid, reg)
    assert out[0] == (
        cid,
        m.ErrorMessage("auth_failed", "signature does not verify", ref="register"),
    )
    assert out[1] == (cid, CloseConnection(1008, "authentication failed"))
    assert server.proto.registered == 0
    assert server.send(cid, reg) == []  # closed: ignored


def test_nonce_is_single_use(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    a = server.register("alice")
    reg = m.Register.create(keys["alice"], "alice", server.challenges[a])
    assert error(server.send(a, reg), a).code == "bad_state"


def test_unregistered_connections_can_do_nothing(server: Server) -> None:
    server.register("bob")
    cid = server.connect()
    for msg in [m.Invite("call-0001", peer="bob"), m.Hangup("call-0001")]:
        err = error(server.send(cid, msg), cid)
        assert (err.code, err.ref) == ("auth_required", msg.TYPE)
    assert server.proto.calls == 0


def test_auth_timeout(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, auth_timeout=5.0)
    slow = server.connect()
    server.register("alice")
    assert server.proto.get_timer() == pytest.approx(5.0)
    assert server.advance(4.0) == []
    out = server.advance(1.0)
    assert out == [
        (slow, m.ErrorMessage("auth_timeout", "no registration in time")),
        (slow, CloseConnection(1008, "registration timeout")),
    ]
    assert server.advance(10.0) == []  # the registered connection stays


def test_name_is_pinned_to_its_first_key(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    a = server.register("alice")
    assert server.proto.disconnect(a, server.now) == []
    cid = server.connect()
    out = server.send(cid, m.Register.create(keys["mallory"], "alice", server.challenges[cid]))
    assert error(out, cid).code == "name_taken"
    assert out[-1] == (cid, CloseConnection(1008, "name taken"))
    server.register("alice")  # the pinned key still works


def test_second_login_replaces_the_first(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    b = server.register("bob")
    a1 = server.register("alice")
    a2 = server.connect()
    out = server.send(a2, m.Register.create(keys["alice"], "alice", server.challenges[a2]))
    assert out[0] == (a1, m.ErrorMessage("replaced", "registered again on another connection"))
    assert out[1] == (a1, CloseConnection(1008, "replaced by a new connection"))
    assert isinstance(out[2][1], m.Registered) and out[2][0] == a2
    assert len(out) == 3  # bob is not told anything: alice never went offline
    assert server.proto.disconnect(a1, server.now) == []
    assert server.send(a1, m.Invite("call-0001", peer="bob")) == []
    out = server.send(a2, m.Invite("call-0001", peer="bob"))
    assert out == [(b, m.Invite("call-0001", "alice", fp(keys["alice"])))]


def test_identity_limit(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_identities=1)
    server.register("alice")
    cid = server.connect()
    out = server.send(cid, m.Register.create(keys["bob"], "bob", server.challenges[cid]))
    assert error(out, cid).code == "server_full"


def test_connection_limit(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_connections=1)
    a = server.register("alice")
    cid = server.connect()  # waiting to register: not counted
    out = server.send(cid, m.Register.create(keys["bob"], "bob", server.challenges[cid]))
    assert out == [
        (cid, m.ErrorMessage("server_full", "too many connections", ref="register")),
        (cid, CloseConnection(1013, "too many connections")),
    ]
    assert server.proto.receive(cid, "{}", server.now) == []
    assert server.proto.disconnect(cid, server.now) == []
    # A second login of a registered name replaces its connection: no extra room needed.
    a2 = server.connect()
    out = server.send(a2, m.Register.create(keys["alice"], "alice", server.challenges[a2]))
    assert out[0] == (a, m.ErrorMessage("replaced", "registered again on another connection"))
    assert isinstance(out[-1][1], m.Registered)


# --- calls --------------------------------------------------------------------------------


def relayed(out: list[Output], to: ConnectionId) -> m.Message:
    [(target, msg)] = out
    assert target == to and isinstance(msg, m.Message)
    return msg


def test_complete_call(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    a, b = server.register("alice"), server.register("bob")
    fa, fb = fp(keys["alice"]), fp(keys["bob"])
    cid = "call-0001"
    ice = m.ICECandidate
    steps: list[tuple[ConnectionId, m.Message, ConnectionId, m.Message, CallState | None]] = [
        (a, m.Invite(cid, peer="bob"), b, m.Invite(cid, "alice", fa), CallState.INVITED),
        (b, m.Ringing(cid), a, m.Ringing(cid, "bob", fb), CallState.RINGING),
        (b, m.Accept(cid), a, m.Accept(cid, "bob", fb), CallState.ACCEPTED),
        (a, m.Offer(cid, payload="O"), b, m.Offer(cid, "alice", fa, payload="O"), None),
        (b, m.Answer(cid, payload="A"), a, m.Answer(cid, "bob", fb, payload="A"), None),
        (a, ice(cid, payload="i1"), b, ice(cid, "alice", fa, payload="i1"), None),
        (b, ice(cid, payload="i2"), a, ice(cid, "bob", fb, payload="i2"), None),
        (b, m.Offer(cid, payload="re"), a, m.Offer(cid, "bob", fb, payload="re"), None),
    ]  # fmt: skip
    for sender, msg, receiver, expected, state in steps:
        assert relayed(server.send(sender, msg), receiver) == expected
        assert server.proto.call_state(cid) == (state or CallState.ACCEPTED)
    out = server.send(a, m.Hangup(cid, reason="bye"))
    assert relayed(out, b) == m.Hangup(cid, "alice", fa, "bye")
    assert server.proto.calls == 0
    assert error(server.send(b, m.Hangup(cid)), b).code == "unknown_call"


def test_invite_and_accept_carry_a_payload_verbatim(
    server: Server, keys: dict[str, pqc.SigningKey]
) -> None:
    # The SDP in the invite and the accept (docs/signaling.md): relayed unchanged,
    # absent when not sent; at most MAX_PAYLOAD_SIZE bytes like any payload.
    a, b = server.register("alice"), server.register("bob")
    fa, fb = fp(keys["alice"]), fp(keys["bob"])
    sdp = "qcall-sdp:v=0\r\n" + "a=x\r\n" * 4000  # ≈ 24 KiB, bigger than an SDP
    out = server.send(a, m.Invite("call-0001", peer="bob", payload=sdp))
    assert relayed(out, b) == m.Invite("call-0001", "alice", fa, payload=sdp)
    out = server.send(b, m.Accept("call-0001", payload="qcall-sdp:answer"))
    assert relayed(out, a) == m.Accept("call-0001", "bob", fb, payload="qcall-sdp:answer")
    assert server.proto.call_state("call-0001") is CallState.ACCEPTED
    bare = relayed(server.send(a, m.Hangup("call-0001")), b)
    assert "payload" not in m.Invite("call-0002", peer="bob").to_dict()
    assert bare.TYPE == "hangup"
    big = {"type": "invite", "call_id": "call-0003", "peer": "bob",
           "payload": "x" * (m.MAX_PAYLOAD_SIZE + 1)}  # fmt: skip
    err = error(server.send(a, json.dumps(big)), a)
    assert err.code == "bad_message" and "payload" in err.message
    assert server.proto.calls == 0  # refused: no invitation held
    assert "x" * 8 not in repr(m.Invite("call-0004", peer="bob", payload="x" * 64))


def test_invitations_with_payloads_still_count_against_max_pending_invites(
    keys: dict[str, pqc.SigningKey],
) -> None:
    server = Server(keys, max_pending_invites=1)
    a, b, c = server.register("alice"), server.register("bob"), server.register("carol")
    sdp = "qcall-sdp:" + "s" * 40_000
    assert relayed(server.send(b, m.Invite("call-0001", peer="alice", payload=sdp)), a).TYPE == (
        "invite"
    )
    err = error(server.send(c, m.Invite("call-0002", peer="alice", payload=sdp)), c)
    assert err.code == "too_many_invites"


@pytest.mark.parametrize(
    ("ender", "msg_type", "state"),
    [
        ("callee", m.Reject, CallState.INVITED),
        ("callee", m.Busy, CallState.RINGING),
        ("caller", m.Cancel, CallState.RINGING),
        ("callee", m.Hangup, CallState.INVITED),
        ("caller", m.Hangup, CallState.ACCEPTED),
    ],
)
def test_call_endings(
    server: Server, ender: str, msg_type: type[m.CallMessage], state: CallState
) -> None:
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    if state >= CallState.RINGING:
        server.send(b, m.Ringing("call-0001"))
    if state >= CallState.ACCEPTED:
        server.send(b, m.Accept("call-0001"))
    sender, receiver = (b, a) if ender == "callee" else (a, b)
    msg = relayed(server.send(sender, msg_type("call-0001", reason="why")), receiver)
    assert type(msg) is msg_type and msg.reason == "why"
    assert server.proto.calls == 0
    # Both are free again.
    assert relayed(server.send(b, m.Invite("call-0002", peer="alice")), a).TYPE == "invite"


@pytest.mark.parametrize(
    ("sender", "msg"),
    [
        ("caller", m.Accept("call-0001")),
        ("caller", m.Ringing("call-0001")),
        ("callee", m.Cancel("call-0001")),
        ("callee", m.Offer("call-0001", payload="too early")),  # the caller's: early_offer
        ("caller", m.Answer("call-0001", payload="too early")),
        ("callee", m.ICECandidate("call-0001", payload="too early")),
    ],
)
def test_state_rules(server: Server, sender: str, msg: m.CallMessage) -> None:
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    cid = a if sender == "caller" else b
    err = error(server.send(cid, msg), cid)
    assert (err.code, err.call_id, err.ref) == ("bad_state", "call-0001", msg.TYPE)
    assert server.proto.call_state("call-0001") is CallState.INVITED


def test_invite_errors(server: Server, keys: dict[str, pqc.SigningKey]) -> None:
    a, b, c = server.register("alice"), server.register("bob"), server.register("carol")
    assert error(server.send(a, m.Invite("call-0001", peer="dave")), a).code == "unavailable"
    assert error(server.send(a, m.Invite("call-0001", peer="alice")), a).code == "bad_message"
    server.send(a, m.Invite("call-0001", peer="bob"))
    # The call id is taken; alice is calling already.
    assert error(server.send(c, m.Invite("call-0001", peer="bob")), c).code == "bad_state"
    assert error(server.send(a, m.Invite("call-0002", peer="carol")), a).code == "bad_state"
    # A third party cannot touch the call.
    assert error(server.send(c, m.Hangup("call-0001")), c).code == "unknown_call"
    assert server.proto.call_state("call-0001") is CallState.INVITED
    # Once bob is in an accepted call, the server answers busy for him.
    server.send(b, m.Accept("call-0001"))
    out = server.send(c, m.Invite("call-0003", peer="bob"))
    assert out == [(c, m.Busy("call-0003", "bob", fp(keys["bob"]), "in another call"))]
    assert server.proto.calls == 1


def test_disconnect_before_accept_ends_the_call(
    server: Server, keys: dict[str, pqc.SigningKey]
) -> None:
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    out = server.proto.disconnect(b, server.now)
    assert out == [
        (a, m.Presence("bob", fp(keys["bob"]), False)),
        (a, m.Hangup("call-0001", "bob", fp(keys["bob"]), "disconnected")),
    ]
    assert server.proto.calls == 0


def test_accepted_call_survives_a_reconnection(
    server: Server, keys: dict[str, pqc.SigningKey]
) -> None:
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    server.send(b, m.Accept("call-0001"))
    server.proto.disconnect(b, server.now)
    assert error(server.send(a, m.ICECandidate("call-0001", payload="c")), a).code == "unavailable"
    assert server.advance(10.0) == []
    b2 = server.connect()
    out = server.send(b2, m.Register.create(keys["bob"], "bob", server.challenges[b2]))
    assert out[-1][1] == m.Registered(
        "bob", fp(keys["bob"]), (m.OnlinePeer("alice", fp(keys["alice"])),), ("call-0001",)
    )
    assert server.advance(60.0) == []  # grace cancelled
    out = server.send(a, m.ICECandidate("call-0001", payload="c"))
    assert relayed(out, b2) == m.ICECandidate("call-0001", "alice", fp(keys["alice"]), payload="c")


def test_accepted_call_ends_after_the_grace_period(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, call_grace=30.0)
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    server.send(b, m.Accept("call-0001"))
    server.proto.disconnect(a, server.now)
    assert server.advance(29.0) == []
    assert server.advance(1.0) == [
        (b, m.Hangup("call-0001", "alice", fp(keys["alice"]), "peer lost"))
    ]
    assert server.proto.calls == 0


# --- ring timeouts, invitations per callee, call time limit ----------------------------------


@pytest.mark.parametrize("ringing", [False, True])
def test_an_unanswered_invitation_ends_after_ring_timeout(
    keys: dict[str, pqc.SigningKey], ringing: bool
) -> None:
    server = Server(keys, ring_timeout=60.0)
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    if ringing:
        server.send(b, m.Ringing("call-0001"))
    assert server.advance(59.9) == []
    assert server.advance(0.1) == [
        (a, m.Hangup("call-0001", "bob", fp(keys["bob"]), "ring timeout")),
        (b, m.Hangup("call-0001", "alice", fp(keys["alice"]), "ring timeout")),
    ]
    assert server.proto.calls == 0
    assert relayed(server.send(a, m.Invite("call-0002", peer="bob")), b).TYPE == "invite"


def test_an_unanswered_invitation_does_not_make_the_callee_busy(
    server: Server, keys: dict[str, pqc.SigningKey]
) -> None:
    a, b, c = server.register("alice"), server.register("bob"), server.register("carol")
    mallory = server.register("mallory")
    server.send(mallory, m.Invite("call-evil", peer="alice"))  # never cancelled
    assert relayed(server.send(b, m.Invite("call-0001", peer="alice")), a).TYPE == "invite"
    out = server.send(a, m.Accept("call-0001"))
    assert out == [(b, m.Accept("call-0001", "alice", fp(keys["alice"])))]
    # One accepted call at a time: the other invitation cannot be accepted now...
    err = error(server.send(a, m.Accept("call-evil")), a)
    assert (err.code, err.call_id) == ("bad_state", "call-evil")
    # ...and alice, in a call, is busy for newcomers.
    out = server.send(c, m.Invite("call-0002", peer="alice"))
    assert out == [(c, m.Busy("call-0002", "alice", fp(keys["alice"]), "in another call"))]
    # She may still decline the pending one.
    out = server.send(a, m.Reject("call-evil"))
    assert out == [(mallory, m.Reject("call-evil", "alice", fp(keys["alice"])))]
    assert server.proto.calls == 1


def test_a_callee_holds_at_most_max_pending_invites(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_pending_invites=2)
    a, b = server.register("alice"), server.register("bob")
    c, mallory = server.register("carol"), server.register("mallory")
    server.send(mallory, m.Invite("call-evil", peer="alice"))
    server.send(c, m.Invite("call-0001", peer="alice"))
    err = error(server.send(b, m.Invite("call-0002", peer="alice")), b)
    assert (err.code, err.call_id, err.ref) == ("too_many_invites", "call-0002", "invite")
    assert isinstance(err.exception(), PeerUnavailableError)
    server.send(mallory, m.Cancel("call-evil"))
    assert relayed(server.send(b, m.Invite("call-0002", peer="alice")), a).TYPE == "invite"
    # Replaced on another connection, alice finds every live invitation.
    a2 = server.connect()
    out = server.try_register(a2, "alice")
    assert isinstance(out[-1][1], m.Registered)
    assert out[-1][1].calls == ("call-0001", "call-0002")


def test_a_caller_cannot_accept_while_calling(server: Server) -> None:
    a, b, c = server.register("alice"), server.register("bob"), server.register("carol")
    server.send(a, m.Invite("call-0001", peer="bob"))
    assert relayed(server.send(c, m.Invite("call-0002", peer="alice")), a).TYPE == "invite"
    assert error(server.send(a, m.Accept("call-0002")), a).code == "bad_state"
    server.send(a, m.Cancel("call-0001"))
    assert relayed(server.send(a, m.Accept("call-0002")), c).TYPE == "accept"
    assert b


def test_an_accepted_call_ends_after_max_call_duration(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, max_call_duration=3600.0, ring_timeout=60.0)
    a, b = server.register("alice"), server.register("bob")
    server.send(a, m.Invite("call-0001", peer="bob"))
    server.advance(59.0)
    server.send(b, m.Accept("call-0001"))
    assert server.advance(61.0) == []  # no ring timeout once accepted
    assert server.advance(3600.0 - 61.0 - 0.02) == []
    assert server.advance(0.02) == [
        (a, m.Hangup("call-0001", "bob", fp(keys["bob"]), "call time limit")),
        (b, m.Hangup("call-0001", "alice", fp(keys["alice"]), "call time limit")),
    ]
    assert server.proto.calls == 0


def test_disconnect_ends_every_unanswered_invitation(
    server: Server, keys: dict[str, pqc.SigningKey]
) -> None:
    a, b, c = server.register("alice"), server.register("bob"), server.register("carol")
    d = server.register("dave")
    server.send(b, m.Invite("call-0001", peer="alice"))
    server.send(c, m.Invite("call-0002", peer="alice"))
    server.send(a, m.Invite("call-0003", peer="dave"))  # alice calls out meanwhile
    out = server.proto.disconnect(a, server.now)
    fa = fp(keys["alice"])
    hangups = sorted((to, msg.call_id) for to, msg in out if isinstance(msg, m.Hangup))
    assert hangups == [(b, "call-0001"), (c, "call-0002"), (d, "call-0003")]
    assert all(msg == m.Hangup(msg.call_id, "alice", fa, "disconnected")
               for _, msg in out if isinstance(msg, m.Hangup))  # fmt: skip
    assert server.proto.calls == 0
    check_invariants(server.proto)


# --- limits and bad input ------------------------------------------------------------------


def test_rate_limit_token_bucket(keys: dict[str, pqc.SigningKey]) -> None:
    server = Server(keys, rate=10.0, burst=5.0)
    a = server.register("alice")  # spends one token
    server.register("bob")
    codes = []
    for _ in range(6):
        out = server.proto.receive(a, m.Hangup("call-0001").serialize(), server.now)
        codes.append(error(out, a).code)
    assert codes == ["unknown_call"] * 4 + ["rate_limited"] * 2
    server.now += 0.1  # one token back
    out = server.proto.receive(a, m.Hangup("call-0001").serialize(), server.now)
    assert error(out, a).code == "unknown_call"
    out = server.proto.receive(a, m.Hangup("call-0001").serialize(), server.now)
    assert error(out, a).code == "rate_limited"
    server.now += 100.0  # refills up to the burst only
    codes = [error(server.proto.receive(a, "{}", server.now), a).code for _ in range(6)]
    assert codes == ["bad_message"] * 5 + ["rate_limited"]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", "bad_message"),
        ('{"type":"teleport"}', "bad_message"),
        ('{"type":"invite","peer":"bob"}', "bad_message"),
        ('{"type":"invite","call_id":"call-0001","peer":"bob","fingerprint":"' + "0" * 96 + '"}',
         "bad_message"),
        ('{"type":"offer","call_id":"call-0001","payload":"' + "x" * 70_000 + '"}', "too_big"),
        ('{"type":"invite","call_id":"call-0001","peer":"dave"}', "unavailable"),
        ('{"type":"register","name":"x"}', "bad_message"),
    ],
)  # fmt: skip
def test_bad_input_is_answered_and_others_are_served(
    server: Server, keys: dict[str, pqc.SigningKey], text: str, code: str
) -> None:
    a, b = server.register("alice"), server.register("bob")
    mallory = server.register("mallory")
    err = error(server.send(mallory, text), mallory)
    assert err.code == code and err.code in m.ERROR_CODES
    assert relayed(server.send(a, m.Invite("call-0001", peer="bob")), b).TYPE == "invite"
    assert server.proto.name_of(mallory) == "mallory"  # still connected


def test_error_text_is_sanitized(server: Server) -> None:
    a = server.register("alice")
    err = error(server.send(a, json.dumps({"type": "\u202e\x00évil" * 10})), a)
    assert err.message.isascii() and err.message.isprintable()


def test_binary_frames_are_refused(server: Server) -> None:
    a = server.register("alice")
    out = server.proto.receive(a, b'{"type":"hangup","call_id":"call-0001"}', server.now)
    assert error(out, a).code == "bad_message"


def test_timer_survives_stale_entries(server: Server) -> None:
    for _ in range(3):
        server.proto.disconnect(server.connect(), server.now)
    assert server.proto.get_timer() is not None
    assert server.advance(100.0) == []
    assert server.proto.get_timer() is None


# --- fuzzing the state machine ---------------------------------------------------------------

_CALL_IDS = ["call-0001", "call-0002"]
_NAMES = ["alice", "bob", "carol"]
_actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("send"),
            st.sampled_from(_NAMES),
            st.sampled_from(sorted(m.CALL_MESSAGES)),
            st.sampled_from(_CALL_IDS),
            st.sampled_from([*_NAMES, "dave"]),
        ),
        st.tuples(st.just("reconnect"), st.sampled_from(_NAMES)),
        st.tuples(st.just("wait"), st.floats(0, 40)),
        st.tuples(st.just("raw"), st.sampled_from(_NAMES), st.text(max_size=30)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_actions)
def test_fuzz_state_machine(keys: dict[str, pqc.SigningKey], actions: list[Any]) -> None:
    server = Server(keys, burst=1000.0, ring_timeout=30.0, max_call_duration=90.0, pin_ttl=50.0)
    conns = {name: server.register(name) for name in _NAMES}
    for action in actions:
        if action[0] == "send":
            _, sender, kind, call_id, peer = action
            cls = m.CALL_MESSAGES[kind]
            if issubclass(cls, m.PayloadMessage):
                msg: m.Message = cls(call_id, peer=peer, payload="p")
            else:
                msg = cls(call_id, peer=peer)
            out = server.send(conns[sender], msg)
            for to, item in out:
                assert to in conns.values()
                if isinstance(item, m.CallMessage) and item.TYPE == kind and to != conns[sender]:
                    assert (item.peer, item.fingerprint) == (sender, fp(keys[sender]))
        elif action[0] == "reconnect":
            server.proto.disconnect(conns[action[1]], server.now)
            conns[action[1]] = server.register(action[1])
        elif action[0] == "wait":
            for to, _ in server.advance(action[1]):
                assert to in conns.values()
        else:
            server.send(conns[action[1]], action[2])
        check_invariants(server.proto)
        assert server.proto.registered == 3


def check_invariants(proto: SignalingProtocol) -> None:
    """Each peer has at most one accepted call and one outgoing invitation, and the
    indexes of calls by party hold exactly the live calls."""
    listed = []
    for call_id, call in proto._calls.items():
        if call.state is CallState.ACCEPTED:
            assert proto._active[call.caller] == call_id == proto._active[call.callee]
            listed += [call_id, call_id]
        else:
            assert proto._outgoing[call.caller] == call_id
            assert call_id in proto._incoming[call.callee]
            listed += [call_id, call_id]
        assert call.caller in proto._online or call.state is CallState.ACCEPTED
    indexed = [*proto._active.values(), *proto._outgoing.values()]
    indexed += [c for calls in proto._incoming.values() for c in calls]
    assert sorted(indexed) == sorted(listed)
    assert all(proto._incoming.values())  # no empty entries left behind
