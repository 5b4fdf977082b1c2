#!/usr/bin/env python3
"""Generate (or check) ``tests/vectors/cluster_link.json``: the links between instances.

The protocol is docs/signaling.md, "Direct links between instances". Every value
comes from qcall's own code driven with fixed inputs: a fixed cluster secret,
instance ids, epochs and nonces (``os.urandom`` of :mod:`signaling.cluster_links`
replaced by the listed nonces), the real dialer and listener links
(``_Outbound``/``_Inbound``) over in-memory transports that record every byte
they write, the real frame headers (:func:`signaling.cluster_link.header_start`,
``client_message``, ``relay_message``) and relayed messages
(:class:`qcall.signaling.messages.Offer` …). Invalid inputs are fed to fresh real
links at the stated stage; the file records the ``ERROR`` frame each one
answers and the reason of its :class:`~qcall.exceptions.ClusterLinkError`.

Nothing is random, so the file regenerates byte for byte:
``python scripts/gen_link_vectors.py --check`` exits 1 on any difference.
``tests/test_link_vectors.py`` checks it against the code and against an
independent re-implementation written from docs/signaling.md
(``tests/independent_link.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall.exceptions import ClusterLinkError  # noqa: E402
from qcall.identity import fingerprint  # noqa: E402
from qcall.signaling.messages import Answer, ICECandidate, Offer  # noqa: E402
from signaling import cluster_links  # noqa: E402
from signaling.cluster_link import (  # noqa: E402
    MAX_BODY,
    MIN_SECRET,
    NONCE_LEN,
    TAG_LEN,
    Hello,
    LinkKind,
    LinkReceiver,
    Tagger,
    client_message,
    encode,
    header_start,
    link_macs,
    relay_message,
    transcript,
)
from signaling.cluster_links import Links, _Inbound, _Link, _Outbound  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "cluster_link.json"
EPOCH = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds


def material(label: str, length: int) -> bytes:
    """Deterministic bytes: SHA-256 chained from ``label`` until long enough."""
    out, block = b"", label.encode()
    while len(out) < length:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:length]


#: What ``--cluster-secret-file`` holds (64 hex digits, white space around them);
#: the key is the stripped text's bytes as they are, not the bytes the hex spells.
SECRET_FILE = b"  " + material("qcall-link vector secret", 32).hex().encode() + b"\n"
SECRET = SECRET_FILE.strip()
OTHER_SECRET = b"another cluster's secret, 38 bytes long"


class Wire(asyncio.Transport):
    """An in-memory transport: records what the link writes."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.is_closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def close(self) -> None:
        self.is_closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


@contextmanager
def nonce(value: bytes) -> Iterator[None]:
    """``os.urandom`` of the link shell gives ``value`` (one handshake's nonce)."""
    saved = vars(cluster_links)["os"]
    setattr(cluster_links, "os", SimpleNamespace(urandom=lambda n: value[:n]))
    try:
        yield
    finally:
        setattr(cluster_links, "os", saved)


@dataclass(frozen=True)
class Case:
    """One handshake: who dials whom, their epochs, nonces and relay settings."""

    name: str
    dialer: str
    listener: str
    dialer_epoch: int
    listener_epoch: int
    dialer_relay: bool
    listener_relay: bool
    over_redis: int  # frames the dialer sent over Redis before the link, all delivered

    @property
    def dialer_nonce(self) -> bytes:
        return material(f"{self.name} dialer nonce", NONCE_LEN)

    @property
    def listener_nonce(self) -> bytes:
        return material(f"{self.name} listener nonce", NONCE_LEN)


CASES = [
    Case("relay offered and taken", "bj-1", "hf-2", EPOCH + 1, EPOCH + 2, True, True, 0),
    Case(
        "relay offered, not taken; 3 frames went over Redis first",
        "bj-1", "hf-3", EPOCH + 11, EPOCH + 12, True, False, 3,
    ),
    Case(
        "relay neither offered nor taken (the version before it); non-ASCII listener id",
        "bj-1", "合肥-4", EPOCH + 21, EPOCH + 22, False, True, 0,
    ),
]  # fmt: skip
CASES_BY_NAME = {case.name: case for case in CASES}

ALICE, BOB, WANG = "alice", "bob", "王芳"
FP = {name: fingerprint(material(f"{name} public key", 1952)) for name in (ALICE, BOB, WANG)}
CALL = "Zq3Lm0cT-vB7_xYw2nK9aQ"  # 16 bytes, base64url, as new_call_id() makes them


class Pair:
    """A real dialer link and listener link of :data:`CASES` ``case``, wired by hand."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.delivered: list[tuple[dict[str, Any], str]] = []
        self.a = Links(
            case.dialer, SECRET, deliver=lambda *_: None, resolve=_nowhere,
            republish=lambda *_: None, epoch=case.dialer_epoch, relay=case.dialer_relay,
        )  # fmt: skip
        self.b = Links(
            case.listener, SECRET, deliver=self._deliver, resolve=_nowhere,
            republish=lambda *_: None, epoch=case.listener_epoch, relay=case.listener_relay,
        )  # fmt: skip
        for _ in range(case.over_redis):  # sent over Redis (no link yet), delivered
            seq = self.a.next_seq(case.listener)
            self.a.senders[case.listener].over_redis(seq, 0.0)
            assert self.b.fresh(case.dialer, case.dialer_epoch, seq)
        with nonce(case.dialer_nonce):
            self.out = _Outbound(self.a, case.listener)
        self.out_wire, self.in_wire = Wire(), Wire()
        self.inb = _Inbound(self.b)
        self.hello = self.welcome = self.auth = b""

    def _deliver(self, inst: str, epoch: int, header: dict[str, Any], text: str) -> None:
        """What :meth:`signaling.cluster.Cluster._on_frame` does first: deliver once."""
        if self.b.fresh(inst, epoch, int(header["seq"])):
            self.delivered.append((header, text))

    def dial(self) -> None:
        """The dialer connects: its ``HELLO`` is written."""
        self.out.connection_made(self.out_wire)
        self.hello = self.out_wire.take()
        self.inb.connection_made(self.in_wire)

    def hello_in(self) -> None:
        """The listener reads the ``HELLO``, writes its ``WELCOME``."""
        with nonce(self.case.listener_nonce):
            self.inb.data_received(self.hello)
        self.welcome = self.in_wire.take()

    def handshake(self) -> None:
        self.dial()
        self.hello_in()
        self.out.data_received(self.welcome)
        self.auth = self.out_wire.take()
        self.inb.data_received(self.auth)
        assert self.out.up and self.inb.tagger is not None and not self.inb._auth_mac
        self.a._outbound[self.case.listener] = self.out

    async def send(self, message: bytes, seq: int) -> bytes:
        """The dialer sends ``message`` (numbered ``seq``) over the link; the listener
        reads it. Returns the link frame."""
        assert self.a.send(self.case.listener, seq, message) is True
        await asyncio.sleep(0)  # the end of the loop tick: anything batched is written
        frame = self.out_wire.take()
        self.inb.data_received(frame)
        return frame

    def ack(self) -> bytes:
        """The listener acknowledges now (not 10 ms later); the dialer reads it."""
        self.inb.flush_ack()
        frame = self.in_wire.take()
        self.out.data_received(frame)
        return frame

    def next_seq(self) -> int:
        return self.a.next_seq(self.case.listener)

    def start(self, name: str, relay: bool = False) -> bytes:
        return header_start(name, FP[name], self.case.dialer, self.case.dialer_epoch, relay=relay)

    @property
    def session(self) -> bytes:
        return self.inb.session


async def _nowhere(inst: str) -> str | None:
    return None


async def handshake_vector(case: Case) -> tuple[dict[str, Any], Pair]:
    """Run ``case`` on the real links; its handshake and frames as a vector."""
    pair = Pair(case)
    pair.handshake()
    relay = case.dialer_relay and case.listener_relay
    acked = case.over_redis
    t = _t(case)
    welcome_mac, auth_mac, session = link_macs(SECRET, t)
    assert session == pair.session == pair.out.session
    assert pair.a.senders[case.listener].acked == acked and pair.out.relay == relay
    out: dict[str, Any] = {
        "name": case.name,
        "dialer": case.dialer,
        "listener": case.listener,
        "dialer_epoch": case.dialer_epoch,
        "listener_epoch": case.listener_epoch,
        "dialer_nonce": case.dialer_nonce.hex(),
        "listener_nonce": case.listener_nonce.hex(),
        "dialer_offers_relay": case.dialer_relay,
        "listener_takes_relay": case.listener_relay,
        "relay": relay,
        "acked": acked,
        "hello": pair.hello.hex(),
        "hello_body": pair.hello[5:].decode(),
        "welcome": pair.welcome.hex(),
        "welcome_body": pair.welcome[5:].decode(),
        "auth": pair.auth.hex(),
        "auth_body": pair.auth[5:].decode(),
        "transcript": t.hex(),
        "welcome_mac": welcome_mac.hex(),
        "auth_mac": auth_mac.hex(),
        "session_key": session.hex(),
        "frames": [],
    }
    frames: list[dict[str, Any]] = out["frames"]

    async def frame(note: str, message: bytes, seq: int, relayed: dict[str, str] | None) -> None:
        wire = await pair.send(message, seq)
        header, text = pair.delivered[-1]
        assert header["seq"] == seq and text.encode() == message.split(b"\n", 1)[1]
        entry: dict[str, Any] = {"note": note, "kind": "FRAME", "seq": seq}
        entry |= {"message": message.decode(), "tag": wire[5 : 5 + TAG_LEN].hex()}
        entry["frame"] = wire.hex()
        if relayed is not None:
            entry["relayed"] = relayed
        frames.append(entry)

    def ack(note: str) -> None:
        wire = pair.ack()
        (seq,) = struct.unpack(">Q", wire[5 + TAG_LEN :])
        assert pair.a.senders[case.listener].acked == seq
        frames.append(
            {"note": note, "kind": "ACK", "seq": seq, "tag": wire[5 : 5 + TAG_LEN].hex(),
             "frame": wire.hex()}
        )  # fmt: skip

    if case is CASES[0]:
        invite = b'{"type": "invite", "call_id": "%s", "peer": "bob"}' % CALL.encode()
        seq = pair.next_seq()
        await frame("alice's invite, a client frame as she sent it", client_message(
            pair.start(ALICE), seq, invite), seq, None)  # fmt: skip
        assert pair.a.relays(case.listener)
        offer = Offer(CALL, ALICE, FP[ALICE], payload="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n")
        seq = pair.next_seq()
        body = offer.serialize().encode()
        await frame("alice's offer as bob gets it, a relay frame", relay_message(
            pair.start(ALICE, relay=True), CALL, "offer", seq, body), seq,
            {"type": "offer", "call": CALL, "peer": ALICE, "fingerprint": FP[ALICE]})  # fmt: skip
        ack("the listener delivered 1 and 2")
        ice = ICECandidate(CALL, ALICE, FP[ALICE], payload='{"candidate":"","sdpMid":"0"}')
        seq = pair.next_seq()
        await frame("an ice relay frame; the payload's JSON escaped", relay_message(
            pair.start(ALICE, relay=True), CALL, "ice", seq, ice.serialize().encode()), seq,
            {"type": "ice", "call": CALL, "peer": ALICE, "fingerprint": FP[ALICE]})  # fmt: skip
        ack("the listener delivered 3")
    elif case is CASES[1]:
        answer = b'{"type":"answer","call_id":"%s","payload":"v=0\\r\\n"}' % CALL.encode()
        seq = pair.next_seq()
        assert not pair.a.relays(case.listener)
        await frame("bob's answer as a client frame (no relay frames on this link), seq 4", (
            client_message(pair.start(BOB), seq, answer)), seq, None)  # fmt: skip
        ack("the listener delivered 4")
    else:
        relayed = Answer(CALL, WANG, FP[WANG], payload="v=0 王芳")
        text = '{"type":"answer","call_id":"' + CALL + '","payload":"v=0 王芳"}'
        seq = pair.next_seq()
        await frame("a client frame from a non-ASCII name, with raw UTF-8 in its body", (
            client_message(pair.start(WANG), seq, text.encode())), seq, None)  # fmt: skip
        out["not_sent"] = {
            "note": "what would be relayed; this link agreed on no relay frames",
            "relayed": relayed.serialize(),
        }
        ack("the listener delivered 1")
    return out, pair


# --- invalid inputs -------------------------------------------------------------------------

STAGES = {
    "listener, new": "a fresh listener link, nothing read yet",
    "listener, welcomed": "the listener read the HELLO and wrote its WELCOME",
    "listener, up": "the listener link after the whole handshake case, frames and acks",
    "dialer, hello sent": "the dialer wrote its HELLO",
    "dialer, up": "the dialer link after the whole handshake case, frames and acks",
}


async def at_stage(case: Case, stage: str) -> tuple[_Link, Wire]:
    """A fresh real link of ``case`` at ``stage`` (:data:`STAGES`)."""
    if stage.endswith(", up"):
        _, pair = await handshake_vector(case)  # the whole case again: the same bytes
        return (pair.inb, pair.in_wire) if stage == "listener, up" else (pair.out, pair.out_wire)
    pair = Pair(case)
    if stage == "listener, new":
        pair.dial()
        return pair.inb, pair.in_wire
    if stage == "listener, welcomed":
        pair.dial()
        pair.hello_in()
        return pair.inb, pair.in_wire
    assert stage == "dialer, hello sent"
    pair.dial()
    return pair.out, pair.out_wire


def feed(link: _Link, data: bytes) -> None:
    """What ``data_received`` does, letting the :class:`ClusterLinkError` out (an
    ``ERROR`` frame from the peer ends the link, unanswered)."""
    for kind, body in link.reader.feed(data):
        if kind is LinkKind.ERROR:
            return
        link.handle(kind, body)


def _json_body(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def invalid_inputs() -> list[tuple[str, str, str, bytes]]:
    """``(description, case name, stage, bytes fed)``."""
    c0, c1, c2 = CASES
    t0 = Tagger(link_macs(SECRET, _t(c0))[2])
    t2 = Tagger(link_macs(SECRET, _t(c2))[2])
    hello = json.loads(Hello(c0.dialer, c0.listener, c0.dialer_epoch, c0.dialer_nonce, True).body())

    def hello_with(**members: Any) -> bytes:
        return encode(LinkKind.HELLO, _json_body(hello | members))

    def frame(start: bytes, seq: int, rest: bytes = b"{}", tagger: Tagger = t0) -> bytes:
        return tagger.frame(LinkKind.FRAME, client_message(start, seq, rest))

    a0 = header_start(ALICE, FP[ALICE], c0.dialer, c0.dialer_epoch)
    good = frame(a0, 4)
    welcome_mac = link_macs(SECRET, _t(c0))[0]
    welcome = {"v": 1, "nonce": _b64(c0.listener_nonce), "epoch": c0.listener_epoch, "acked": 0}
    return [
        ("unknown kind 9", c0.name, "listener, new", b"\x09\x00\x00\x00\x00"),
        ("kind 0", c0.name, "listener, new", b"\x00\x00\x00\x00\x00"),
        ("a body above 4 MiB: refused on its 5-byte head", c0.name, "listener, new",
         bytes([LinkKind.FRAME]) + struct.pack(">I", MAX_BODY + 1)),
        ("a head announcing exactly 4 MiB: accepted, waits for the body", c0.name,
         "listener, new", bytes([LinkKind.HELLO]) + struct.pack(">I", MAX_BODY)),
        ("a FRAME before the HELLO", c0.name, "listener, new", good),
        ("an AUTH before the HELLO", c0.name, "listener, new", encode(LinkKind.AUTH, b"{}")),
        ("a HELLO to another instance", c0.name, "listener, new", hello_with(to="hf-9")),
        ("a HELLO from the listener itself", c0.name, "listener, new",
         hello_with(**{"from": c0.listener})),
        ("a HELLO of version 2", c0.name, "listener, new", hello_with(v=2)),
        ("a HELLO with relay 2", c0.name, "listener, new", hello_with(relay=2)),
        ("a HELLO with relay true", c0.name, "listener, new", hello_with(relay=True)),
        ("a HELLO with relay 1.0", c0.name, "listener, new", hello_with(relay=1.0)),
        ("a HELLO with a 31-byte nonce", c0.name, "listener, new",
         hello_with(nonce=_b64(c0.dialer_nonce[:31]))),
        ("a HELLO with an epoch of 2^64", c0.name, "listener, new", hello_with(epoch=1 << 64)),
        ("a HELLO with an epoch of 1.5", c0.name, "listener, new", hello_with(epoch=1.5)),
        ("a HELLO with an empty from", c0.name, "listener, new", hello_with(**{"from": ""})),
        ("a HELLO with a from of 257 characters", c0.name, "listener, new",
         hello_with(**{"from": "x" * 257})),
        ("a HELLO whose from is a lone surrogate (no UTF-8)", c0.name, "listener, new",
         encode(LinkKind.HELLO, _json_body(hello).replace(b'"bj-1"', b'"\\ud800"'))),
        ("a HELLO that is not JSON", c0.name, "listener, new", encode(LinkKind.HELLO, b"{")),
        ("a HELLO with NaN in an unknown member (not JSON)", c0.name, "listener, new",
         encode(LinkKind.HELLO, _json_body(hello)[:-1] + b',"x":NaN}')),
        ("a HELLO with an unknown member: accepted", c0.name, "listener, new",
         encode(LinkKind.HELLO, _json_body(hello)[:-1] + b',"x":[1,{"y":null}]}')),
        ("a HELLO that is a JSON array", c0.name, "listener, new", encode(LinkKind.HELLO, b"[]")),
        ("a HELLO that is not UTF-8", c0.name, "listener, new", encode(LinkKind.HELLO, b"\xff")),
        ("an AUTH with the mac of another secret", c0.name, "listener, welcomed",
         encode(LinkKind.AUTH, _json_body({"mac": _b64(link_macs(OTHER_SECRET, _t(c0))[1])}))),
        ("an AUTH with the welcome mac", c0.name, "listener, welcomed",
         encode(LinkKind.AUTH, _json_body({"mac": _b64(welcome_mac)}))),
        ("a FRAME instead of the AUTH", c0.name, "listener, welcomed", good),
        ("a second HELLO instead of the AUTH", c0.name, "listener, welcomed", hello_with()),
        ("a FRAME whose tag is wrong (last bit flipped)", c0.name, "listener, up",
         good[:20] + bytes([good[20] ^ 1]) + good[21:]),
        ("a FRAME whose message was cut (the tag of the whole message)", c0.name,
         "listener, up", encode(LinkKind.FRAME, good[5:-1])),
        ("a FRAME shorter than a tag", c0.name, "listener, up", encode(LinkKind.FRAME, b"x" * 15)),
        ("a FRAME tagged with another secret's session key", c0.name, "listener, up",
         Tagger(link_macs(OTHER_SECRET, _t(c0))[2]).frame(
             LinkKind.FRAME, client_message(a0, 4, b"{}"))),
        ("a FRAME replayed (seq 3 again)", c0.name, "listener, up", frame(a0, 3)),
        ("a FRAME older than the last (seq 1)", c0.name, "listener, up", frame(a0, 1)),
        ("a FRAME with seq true", c0.name, "listener, up",
         t0.frame(LinkKind.FRAME, a0 + b', "seq": true}\n{}')),
        ("a FRAME with seq 4.0", c0.name, "listener, up",
         t0.frame(LinkKind.FRAME, a0 + b', "seq": 4.0}\n{}')),
        ("a FRAME of another epoch of the dialer", c0.name, "listener, up",
         frame(header_start(ALICE, FP[ALICE], c0.dialer, c0.dialer_epoch + 1), 4)),
        ("a FRAME naming another instance", c0.name, "listener, up",
         frame(header_start(ALICE, FP[ALICE], "bj-7", c0.dialer_epoch), 4)),
        ("a FRAME without a header line", c0.name, "listener, up",
         t0.frame(LinkKind.FRAME, b'{"inst": "bj-1"}')),
        ("a FRAME whose header has no seq", c0.name, "listener, up",
         t0.frame(LinkKind.FRAME, a0 + b"}\n{}")),
        ("a FRAME whose client frame is not UTF-8", c0.name, "listener, up",
         frame(a0, 4, b"\xff")),
        ("an ACK sent to the listener", c0.name, "listener, up",
         t0.frame(LinkKind.ACK, struct.pack(">Q", 3))),
        ("a HELLO on an open link", c0.name, "listener, up", hello_with()),
        ("an ERROR from the peer: closed, not answered", c0.name, "listener, up",
         encode(LinkKind.ERROR, b"authentication failed (another cluster secret?)")),
        ("a FRAME cut short by the end of the data: waits for the rest", c0.name,
         "listener, up", good[:-1]),
        ("a WELCOME made with another secret", c0.name, "dialer, hello sent",
         encode(LinkKind.WELCOME, _json_body(
             welcome | {"mac": _b64(link_macs(OTHER_SECRET, _t(c0))[0]), "relay": 1}))),
        ("a WELCOME without relay when both offered it (relay stripped on the way)",
         c0.name, "dialer, hello sent",
         encode(LinkKind.WELCOME, _json_body(welcome | {"mac": _b64(welcome_mac)}))),
        ("a WELCOME with relay to a HELLO without it", c2.name, "dialer, hello sent",
         encode(LinkKind.WELCOME, _json_body({
             "v": 1, "nonce": _b64(c2.listener_nonce), "epoch": c2.listener_epoch, "acked": 0,
             "mac": _b64(link_macs(SECRET, _t(c2, relay=True))[0]), "relay": 1}))),
        ("a WELCOME with a 31-byte mac", c0.name, "dialer, hello sent",
         encode(LinkKind.WELCOME, _json_body(welcome | {"mac": _b64(welcome_mac[:31])}))),
        ("an ACK before the WELCOME", c0.name, "dialer, hello sent",
         t0.frame(LinkKind.ACK, struct.pack(">Q", 0))),
        ("an ACK whose tag is wrong", c0.name, "dialer, up",
         encode(LinkKind.ACK, bytes(TAG_LEN) + struct.pack(">Q", 3))),
        ("an ACK tagged as a FRAME", c0.name, "dialer, up",
         encode(LinkKind.ACK, t0.tag(LinkKind.FRAME, struct.pack(">Q", 3))
                + struct.pack(">Q", 3))),
        ("an ACK of 7 bytes", c0.name, "dialer, up", t0.frame(LinkKind.ACK, b"\0" * 7)),
        ("an ACK for a frame never sent", c0.name, "dialer, up",
         t0.frame(LinkKind.ACK, struct.pack(">Q", 4))),
        ("a FRAME sent to the dialer", c0.name, "dialer, up", good),
        ("an ACK of another link's session key", c0.name, "dialer, up",
         t2.frame(LinkKind.ACK, struct.pack(">Q", 3))),
        ("a non-ASCII listener: a FRAME of another epoch", c2.name, "listener, up",
         frame(header_start(WANG, FP[WANG], c2.dialer, c2.dialer_epoch - 1), 2, tagger=t2)),
        ("an ACK repeating an older one: accepted, nothing changes", c1.name, "dialer, up",
         Tagger(link_macs(SECRET, _t(c1))[2]).frame(LinkKind.ACK, struct.pack(">Q", 2))),
    ]  # fmt: skip


def _t(case: Case, relay: bool | None = None) -> bytes:
    hello = Hello(
        case.dialer, case.listener, case.dialer_epoch, case.dialer_nonce, case.dialer_relay
    )
    both = case.dialer_relay and case.listener_relay if relay is None else relay
    return transcript(hello, case.listener_nonce, case.listener_epoch, case.over_redis, both)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


async def invalid_vector(note: str, case_name: str, stage: str, data: bytes) -> dict[str, Any]:
    case = CASES_BY_NAME[case_name]
    link, _ = await at_stage(case, stage)
    try:
        feed(link, data)
        reason = None
    except ClusterLinkError as exc:
        reason = str(exc)
    link, wire = await at_stage(case, stage)  # again, through data_received: the ERROR frame
    wire.take()
    with nonce(case.listener_nonce):  # a HELLO accepted is answered with the listed WELCOME
        link.data_received(data)
    answer = wire.take()
    if reason is not None:
        assert answer == encode(LinkKind.ERROR, reason.encode()[:512]) and link.closed
    out: dict[str, Any] = {"note": note, "handshake": case_name, "stage": stage}
    out |= {"input": data.hex(), "error": "ClusterLinkError" if reason else None}
    out |= {"reason": reason, "answer": answer.hex(), "closed": link.closed}
    return out


# --- delivery -------------------------------------------------------------------------------


def delivery_vector() -> dict[str, Any]:
    """Frames of two dialers arriving by either path: which the receiver delivers."""
    receiver = LinkReceiver()
    arrivals = [
        ("bj-1", EPOCH + 1, 1, "redis"),
        ("bj-1", EPOCH + 1, 2, "link"),
        ("bj-1", EPOCH + 1, 2, "redis"),
        ("bj-1", EPOCH + 1, 4, "link"),
        ("bj-1", EPOCH + 1, 3, "redis"),
        ("sh-5", EPOCH + 7, 9, "redis"),
        ("bj-1", EPOCH + 1, 5, "redis"),
        ("bj-1", EPOCH + 31, 1, "redis"),
        ("bj-1", EPOCH + 1, 6, "redis"),
        ("bj-1", EPOCH + 31, 2, "link"),
        ("sh-5", EPOCH + 7, 9, "link"),
    ]
    out = []
    for inst, epoch, seq, path in arrivals:
        fresh = receiver.fresh(inst, epoch, seq)
        out.append({"inst": inst, "epoch": epoch, "seq": seq, "path": path, "delivered": fresh})
    last = {
        "bj-1": {"epoch": EPOCH + 31, "acked": receiver.delivered("bj-1", EPOCH + 31)},
        "sh-5": {"epoch": EPOCH + 7, "acked": receiver.delivered("sh-5", EPOCH + 7)},
    }
    assert receiver.delivered("bj-1", EPOCH + 1) == 0
    return {"arrivals": out, "acked_after": last}


# --- the file -------------------------------------------------------------------------------


async def _build() -> dict[str, Any]:
    handshakes = [(await handshake_vector(case))[0] for case in CASES]
    invalid = [await invalid_vector(*args) for args in invalid_inputs()]
    return {
        "source": (
            "generated by scripts/gen_link_vectors.py from qcall's real links "
            "(signaling/cluster_link.py, signaling/cluster_links.py) with fixed secret, ids, "
            "epochs and nonces; checked by tests/test_link_vectors.py against the code and "
            "against an independent re-implementation written from the spec "
            "(tests/independent_link.py)"
        ),
        "spec": 'docs/signaling.md, "Direct links between instances"',
        "encoding": (
            "byte strings in lowercase hex; *_body, message and reason are text; frame is a "
            "whole link frame: kind (u8) | length (u32, big endian) | body"
        ),
        "constants": {
            "kinds": {kind.name: int(kind) for kind in LinkKind},
            "max_body": MAX_BODY,
            "tag_len": TAG_LEN,
            "nonce_len": NONCE_LEN,
            "min_secret": MIN_SECRET,
            "labels": {
                "welcome": "qcall-link-v1 welcome",
                "auth": "qcall-link-v1 auth",
                "session": "qcall-link-v1 session",
            },
        },
        "secret_file": SECRET_FILE.hex(),
        "secret": SECRET.hex(),
        "fingerprints": FP,
        "handshakes": handshakes,
        "stages": STAGES,
        "invalid": invalid,
        "delivery": delivery_vector(),
    }


def build() -> dict[str, Any]:
    """The vectors (deterministic)."""
    logging.disable(logging.WARNING)  # each invalid input logs its warning
    try:
        return asyncio.run(_build())
    finally:
        logging.disable(logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = json.dumps(build(), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        if args.output.read_text() != text:
            print(f"{args.output} is out of date", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
