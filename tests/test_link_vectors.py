"""Vectors of the links between instances (tests/vectors/cluster_link.json).

(a) qcall's code reproduces them byte for byte and refuses every invalid input
with the :class:`~qcall.exceptions.ClusterLinkError` and ``ERROR`` frame listed;
(b) an independent implementation written from docs/signaling.md alone
(``tests/independent_link.py``) makes the same bytes, refuses the same inputs,
and talks to the real links in both directions.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from qcall.exceptions import ClusterLinkError
from scripts import gen_link_vectors as gen
from signaling.cluster_link import (
    Auth,
    Hello,
    LinkKind,
    LinkReceiver,
    Tagger,
    Welcome,
    client_message,
    encode,
    header_start,
    link_macs,
    relay_message,
    transcript,
)
from signaling.cluster_links import Links, _Inbound, _Outbound
from tests import independent_link as ind
from tests.hygiene import STATE
from tests.utils import VECTORS, load_vectors

V = load_vectors("cluster_link.json")
SECRET = bytes.fromhex(V["secret"])
STATE.register("a cluster secret", SECRET)  # public here, but never in a log or a repr
HANDSHAKES = V["handshakes"]


def h(x: str) -> bytes:
    return bytes.fromhex(x)


def split(message: bytes) -> tuple[dict[str, Any], bytes]:
    line, _, body = message.partition(b"\n")
    return json.loads(line), body


# --- (a) the code -------------------------------------------------------------------------------


def test_the_file_is_what_the_code_makes_byte_for_byte() -> None:
    text = json.dumps(gen.build(), indent=1, ensure_ascii=False) + "\n"
    assert (VECTORS / "cluster_link.json").read_text() == text


@pytest.mark.parametrize("v", HANDSHAKES, ids=lambda v: v["name"])
def test_the_code_makes_and_reads_the_handshake(v: dict[str, Any]) -> None:
    hello = Hello(v["dialer"], v["listener"], v["dialer_epoch"], h(v["dialer_nonce"]),
                  v["dialer_offers_relay"])  # fmt: skip
    assert hello.body().decode() == v["hello_body"] and Hello.parse(hello.body()) == hello
    t = transcript(hello, h(v["listener_nonce"]), v["listener_epoch"], v["acked"], v["relay"])
    assert t.hex() == v["transcript"]
    welcome_mac, auth_mac, session = link_macs(SECRET, t)
    assert [welcome_mac.hex(), auth_mac.hex(), session.hex()] == [
        v["welcome_mac"], v["auth_mac"], v["session_key"]
    ]  # fmt: skip
    welcome = Welcome(h(v["listener_nonce"]), v["listener_epoch"], v["acked"], welcome_mac,
                      v["relay"])  # fmt: skip
    assert Welcome.parse(welcome.body()) == welcome
    assert encode(LinkKind.WELCOME, welcome.body()).hex() == v["welcome"]
    assert encode(LinkKind.AUTH, Auth(auth_mac).body()).hex() == v["auth"]
    tagger = Tagger(session)
    for f in v["frames"]:
        if f["kind"] == "ACK":
            assert tagger.frame(LinkKind.ACK, f["seq"].to_bytes(8, "big")).hex() == f["frame"]
            continue
        message = f["message"].encode()
        header, body = split(message)
        relay = "relay" in header
        start = header_start(header["relay" if relay else "from"], header["fp"],
                             header["inst"], header["epoch"], relay=relay)  # fmt: skip
        if relay:
            again = relay_message(start, header["call"], header["type"], header["seq"], body)
        else:
            again = client_message(start, header["seq"], body)
        assert again == message
        assert tagger.frame(LinkKind.FRAME, message).hex() == f["frame"]
        assert bytes(tagger.check(LinkKind.FRAME, h(f["frame"])[5:])) == message


@pytest.mark.parametrize("v", V["invalid"], ids=lambda v: v["note"])
async def test_the_code_refuses_the_invalid_inputs(v: dict[str, Any]) -> None:
    case = gen.CASES_BY_NAME[v["handshake"]]
    link, _ = await gen.at_stage(case, v["stage"])
    if v["error"] is None:
        gen.feed(link, h(v["input"]))
    else:
        assert v["error"] == "ClusterLinkError"
        with pytest.raises(ClusterLinkError, match=f"^{re.escape(v['reason'])}$"):
            gen.feed(link, h(v["input"]))
    link, wire = await gen.at_stage(case, v["stage"])
    wire.take()
    with gen.nonce(case.listener_nonce):
        link.data_received(h(v["input"]))
    assert wire.take().hex() == v["answer"] and link.closed == v["closed"]


def test_the_code_delivers_as_listed() -> None:
    receiver = LinkReceiver()
    for a in V["delivery"]["arrivals"]:
        assert receiver.fresh(a["inst"], a["epoch"], a["seq"]) == a["delivered"], a
    for inst, last in V["delivery"]["acked_after"].items():
        assert receiver.delivered(inst, last["epoch"]) == last["acked"]


# --- (b) the independent implementation ---------------------------------------------------------


def test_independent_secret_and_constants() -> None:
    assert ind.secret_of_file(h(V["secret_file"])) == SECRET
    c = V["constants"]
    assert (c["max_body"], c["tag_len"], c["nonce_len"]) == (ind.MAX_BODY, ind.TAG_LEN, 32)
    assert [c["kinds"][k] for k in ("HELLO", "WELCOME", "AUTH", "FRAME", "ACK", "ERROR")] == [
        ind.HELLO, ind.WELCOME, ind.AUTH, ind.FRAME, ind.ACK, ind.ERROR
    ]  # fmt: skip


def _ends(v: dict[str, Any]) -> tuple[ind.Dialer, ind.Listener]:
    delivery = ind.Delivery()
    for seq in range(1, v["acked"] + 1):  # what went over Redis before the link
        assert delivery.fresh(v["dialer"], v["dialer_epoch"], seq)
    dialer = ind.Dialer(
        v["dialer"], v["listener"], SECRET, v["dialer_epoch"], h(v["dialer_nonce"]),
        v["dialer_offers_relay"], numbered=v["acked"],
    )  # fmt: skip
    listener = ind.Listener(
        v["listener"], SECRET, v["listener_epoch"], h(v["listener_nonce"]), delivery,
        v["listener_takes_relay"],
    )  # fmt: skip
    return dialer, listener


@pytest.mark.parametrize("v", HANDSHAKES, ids=lambda v: v["name"])
def test_independent_ends_make_the_same_bytes(v: dict[str, Any]) -> None:
    dialer, listener = _ends(v)
    assert dialer.hello().hex() == v["hello"]
    assert listener.receive(dialer.hello()).hex() == v["welcome"]
    assert dialer.receive(h(v["welcome"])).hex() == v["auth"]
    assert listener.receive(h(v["auth"])) == b"" and dialer.up and listener.state == "up"
    assert dialer.relay == v["relay"]
    t = ind.transcript(
        v["dialer"], v["listener"], v["dialer_epoch"], h(v["dialer_nonce"]),
        h(v["listener_nonce"]), v["listener_epoch"], v["acked"], v["relay"],
    )  # fmt: skip
    assert t.hex() == v["transcript"]
    assert [k.hex() for k in ind.keys(SECRET, t)] == [
        v["welcome_mac"], v["auth_mac"], v["session_key"]
    ]  # fmt: skip
    assert dialer.k == listener.k == h(v["session_key"])
    for f in v["frames"]:
        if f["kind"] == "ACK":
            ack = listener.ack()
            assert ack.hex() == f["frame"]
            assert dialer.receive(ack) == b"" and dialer.acked == f["seq"]
            continue
        message = f["message"].encode()
        header, body = split(message)
        assert dialer.next_seq() == f["seq"] == header["seq"]
        if "relay" in header:
            r = f["relayed"]
            assert dialer.relay and (header["relay"], header["call"], header["type"]) == (
                r["peer"], r["call"], r["type"]
            )  # fmt: skip
            payload = json.loads(body)["payload"]
            assert ind.relayed_body(r["type"], r["call"], r["peer"], r["fingerprint"],
                                    payload) == body  # fmt: skip
            assert ind.relay_head_ok(body.decode(), r["type"], r["call"], r["peer"],
                                     r["fingerprint"])  # fmt: skip
            again = ind.relay_message(header["relay"], header["fp"], header["inst"],
                                      header["epoch"], header["call"], header["type"],
                                      header["seq"], body)  # fmt: skip
        else:
            again = ind.client_message(header["from"], header["fp"], header["inst"],
                                       header["epoch"], header["seq"], body)  # fmt: skip
        assert again == message
        wire = dialer.send(message)
        assert wire.hex() == f["frame"] and wire[5:21].hex() == f["tag"]
        assert listener.receive(wire) == b""
        assert listener.delivered[-1] == (header, body.decode())
    if "not_sent" in v:  # a relayed message with non-ASCII text, as the code serialized it
        text = v["not_sent"]["relayed"]
        d = json.loads(text)
        again = ind.relayed_body(d["type"], d["call_id"], d["peer"], d["fingerprint"],
                                 d["payload"])  # fmt: skip
        assert again == text.encode() and text.isascii()


def _independent_at(v: dict[str, Any], stage: str) -> ind.Dialer | ind.Listener:
    """The independent end of handshake ``v`` at ``stage``, from the vectors' bytes."""
    dialer, listener = _ends(v)
    if stage == "listener, new":
        return listener
    if stage.startswith("listener"):
        listener.receive(h(v["hello"]))
        if stage == "listener, up":
            listener.receive(h(v["auth"]))
            for f in v["frames"]:
                if f["kind"] == "FRAME":
                    listener.receive(h(f["frame"]))
        return listener
    if stage == "dialer, up":
        dialer.receive(h(v["welcome"]))
        for f in v["frames"]:
            if f["kind"] == "FRAME":
                dialer.next_seq()
            else:
                dialer.receive(h(f["frame"]))
    return dialer


@pytest.mark.parametrize("v", V["invalid"], ids=lambda v: v["note"])
def test_independent_ends_refuse_the_same_inputs(v: dict[str, Any]) -> None:
    end = _independent_at(next(x for x in HANDSHAKES if x["name"] == v["handshake"]), v["stage"])
    if v["error"] is not None:
        with pytest.raises(ind.LinkRefusedError):
            end.receive(h(v["input"]))
    else:  # not refused: the same answer (nothing, or the WELCOME to an accepted HELLO)
        assert end.receive(h(v["input"])).hex() == v["answer"]
        assert end.closed == v["closed"]


def test_independent_delivery_rule() -> None:
    delivery = ind.Delivery()
    for a in V["delivery"]["arrivals"]:
        assert delivery.fresh(a["inst"], a["epoch"], a["seq"]) == a["delivered"], a
    for inst, last in V["delivery"]["acked_after"].items():
        assert delivery.acked(inst, last["epoch"]) == last["acked"]


def test_independent_json_strings_are_jsons() -> None:
    """The spec's escaping rule is what JSON parsers read back (and json.dumps writes)."""
    for text in ["plain", 'q"uote\\', "\b\t\n\f\r\x00\x1f\x7f", "é王芳", "\U0001f600", "/"]:
        assert json.loads(ind.jstr(text)) == text
        assert ind.jstr(text) == json.dumps(text)


# --- the independent ends against the real ones ---------------------------------------------------

EPOCH = 1_767_225_600_000_000
FP = V["fingerprints"]["alice"]
CALL = "Zq3Lm0cT-vB7_xYw2nK9aQ"


async def test_an_independent_dialer_talks_to_the_real_listener() -> None:
    got: list[tuple[dict[str, Any], str]] = []

    def deliver(inst: str, epoch: int, header: dict[str, Any], text: str) -> None:
        if links.fresh(inst, epoch, header["seq"]):
            got.append((header, text))

    links = Links("hf-2", SECRET, deliver=deliver, resolve=gen._nowhere,
                  republish=lambda *_: None, epoch=EPOCH + 2)  # fmt: skip
    real = _Inbound(links)
    wire = gen.Wire()
    real.connection_made(wire)  # real nonce, from os.urandom
    dialer = ind.Dialer("bj-1", "hf-2", SECRET, EPOCH + 1, b"\x07" * 32, relay=True)
    real.data_received(dialer.hello())
    auth = dialer.receive(wire.take())
    assert dialer.up and dialer.relay
    real.data_received(auth)
    assert not real.closed and real.tagger is not None
    STATE.register("a cluster link session key", real.session)
    invite = b'{"type":"invite","call_id":"%s","peer":"bob"}' % CALL.encode()
    seq = dialer.next_seq()
    real.data_received(dialer.send(ind.client_message("alice", FP, "bj-1", EPOCH + 1, seq, invite)))
    body = ind.relayed_body("ice", CALL, "alice", FP, '{"candidate":"é"}')
    seq = dialer.next_seq()
    real.data_received(dialer.send(
        ind.relay_message("alice", FP, "bj-1", EPOCH + 1, CALL, "ice", seq, body)))  # fmt: skip
    assert [(hd["seq"], text) for hd, text in got] == [(1, invite.decode()), (2, body.decode())]
    assert got[1][0]["relay"] == "alice" and got[1][0]["call"] == CALL
    real.flush_ack()
    assert dialer.receive(wire.take()) == b"" and dialer.acked == 2
    bad = bytearray(dialer.send(ind.client_message("alice", FP, "bj-1", EPOCH + 1, 3, b"{}")))
    bad[-1] ^= 1
    real.data_received(bytes(bad))
    assert real.closed and wire.take() == ind.frame(ind.ERROR, b"frame: bad tag")


async def test_the_real_dialer_talks_to_an_independent_listener() -> None:
    links = Links("bj-1", SECRET, deliver=lambda *_: None, resolve=gen._nowhere,
                  republish=lambda *_: None, epoch=EPOCH + 1)  # fmt: skip
    real = _Outbound(links, "合肥-4")  # real nonce, relay offered
    wire = gen.Wire()
    listener = ind.Listener("合肥-4", SECRET, EPOCH + 2, b"\x09" * 32, ind.Delivery())
    real.connection_made(wire)
    real.data_received(listener.receive(wire.take()))
    assert real.up and real.relay
    STATE.register("a cluster link session key", real.session)
    assert listener.receive(wire.take()) == b"" and listener.state == "up"
    links._outbound["合肥-4"] = real
    seq = links.next_seq("合肥-4")
    start = header_start("王芳", FP, "bj-1", EPOCH + 1)
    message = client_message(start, seq, b'{"type":"hangup","call_id":"' + CALL.encode() + b'"}')
    assert links.send("合肥-4", seq, message)
    listener.receive(wire.take())
    header, text = listener.delivered[-1]
    assert header == {"from": "王芳", "fp": FP, "inst": "bj-1", "epoch": EPOCH + 1, "seq": 1}
    assert text.encode() == message.split(b"\n", 1)[1]
    real.data_received(listener.ack())
    assert links.senders["合肥-4"].acked == 1 and not real.closed
