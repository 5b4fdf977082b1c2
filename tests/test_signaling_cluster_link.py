"""The pure core of the links between instances (signaling/cluster_link.py)."""

from __future__ import annotations

import itertools
import random

import pytest

from qcall.exceptions import ClusterLinkError
from signaling.cluster_link import (
    MAX_BODY,
    Auth,
    FrameReader,
    Hello,
    LinkKind,
    LinkReceiver,
    LinkSender,
    Tagger,
    Welcome,
    encode,
    frame_tag,
    link_macs,
    transcript,
)


def test_frames_split_anywhere_come_out_whole() -> None:
    frames = [encode(LinkKind.FRAME, bytes([i]) * i * 7) for i in range(30)]
    data = b"".join(frames)
    reader = FrameReader()
    got = []
    at = 0
    rng = random.Random(1)
    while at < len(data):
        step = rng.randint(1, 40)
        got += reader.feed(data[at : at + step])
        at += step
    assert got == [(LinkKind.FRAME, bytes([i]) * i * 7) for i in range(30)]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x09\x00\x00\x00\x00", "frame kind 9 unknown"),
        (bytes([LinkKind.FRAME]) + (MAX_BODY + 1).to_bytes(4, "big"), "above"),
    ],
)
def test_bad_frames_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(ClusterLinkError, match=error):
        FrameReader().feed(data)


def test_handshake_messages_round_trip_and_check_themselves() -> None:
    hello = Hello("A", "B", 7, b"n" * 32)
    assert Hello.parse(hello.body()) == hello
    welcome = Welcome(b"m" * 32, 9, 3, b"t" * 32)
    assert Welcome.parse(welcome.body()) == welcome
    assert Auth.parse(Auth(b"a" * 32).body()) == Auth(b"a" * 32)
    assert "nnnn" not in repr(hello) and "tttt" not in repr(welcome)
    for body, error in [
        (b"[]", "hello: not an object"),
        (b"\xff", "hello: not JSON"),
        (b'{"v":2}', "hello.v: version 2 not spoken"),
        (b'{"v":1,"from":"A","to":"B","epoch":-1,"nonce":""}', "hello.epoch: out of range"),
        (b'{"v":1,"from":"","to":"B","epoch":1,"nonce":""}', "hello.from: empty"),
        (b'{"v":1,"from":"A","to":"B","epoch":true,"nonce":""}', "hello.epoch: missing"),
        (b'{"v":1,"from":"A","to":"B","epoch":1,"nonce":"!"}', "hello.nonce: not base64"),
        (b'{"v":1,"from":"A","to":"B","epoch":1,"nonce":"AAAA"}', "hello.nonce: 3 bytes"),
    ]:
        with pytest.raises(ClusterLinkError, match=error):
            Hello.parse(body)


def test_every_field_of_the_transcript_changes_every_key() -> None:
    secret = b"s" * 32
    hello = Hello("A", "B", 7, b"n" * 32)
    base = link_macs(secret, transcript(hello, b"m" * 32, 9, 3))
    assert len(set(base)) == 3  # welcome mac, auth mac, session key all differ
    variants = [
        transcript(Hello("a", "B", 7, b"n" * 32), b"m" * 32, 9, 3),
        transcript(Hello("A", "b", 7, b"n" * 32), b"m" * 32, 9, 3),
        transcript(Hello("A", "B", 8, b"n" * 32), b"m" * 32, 9, 3),
        transcript(Hello("A", "B", 7, b"N" * 32), b"m" * 32, 9, 3),
        transcript(hello, b"M" * 32, 9, 3),
        transcript(hello, b"m" * 32, 10, 3),
        transcript(hello, b"m" * 32, 9, 4),
    ]
    for t in variants:
        assert not set(link_macs(secret, t)) & set(base)
    assert not set(link_macs(b"S" * 32, transcript(hello, b"m" * 32, 9, 3))) & set(base)
    session = base[2]
    assert frame_tag(session, LinkKind.FRAME, b"x") != frame_tag(session, LinkKind.ACK, b"x")


def test_sender_switches_paths_without_overtaking() -> None:
    sender = LinkSender(catch_up=1.0)
    now = 0.0
    assert [sender.route(sender.next_seq(), b"m", now) for _ in range(2)] == [False, False]
    sender.on_up(acked=1)  # frame 2 is still on its way over Redis
    assert sender.route(sender.next_seq(), b"3", now) is None  # 3 waits for it
    assert sender.release(now) == []
    sender.on_ack(2)
    assert sender.release(now) == [b"3"]  # now over the link, in order
    assert sender.route(sender.next_seq(), b"4", now) is True
    assert sender.route(sender.next_seq(), b"5", now) is True
    sender.on_ack(4)
    assert sender.on_down(now) == [b"5"]  # what the link did not acknowledge
    assert sender.route(sender.next_seq(), b"6", now) is False
    sender.on_up(acked=4)  # 5 and 6 not delivered yet: held until they are, or 1 s
    assert sender.route(sender.next_seq(), b"7", now + 0.5) is None
    assert sender.route(sender.next_seq(), b"8", now + 0.6) is None  # behind 7
    assert sender.release(now + 0.5) == []
    assert sender.release(now + 1.6) == [b"7", b"8"]  # Redis lost 5 or 6
    assert sender.route(sender.next_seq(), b"9", now + 1.6) is True
    assert sender.on_down(now + 1.7) == [b"7", b"8", b"9"]  # none acknowledged
    held = LinkSender(catch_up=1.0)
    assert held.route(held.next_seq(), b"1", now) is False
    held.on_up(acked=0)
    assert held.route(held.next_seq(), b"2", now) is None
    assert held.on_down(now) == [b"2"]  # a held frame goes over Redis with the rest
    with pytest.raises(ClusterLinkError, match="ack 99 for a frame never sent"):
        sender.on_ack(99)


def test_sender_knows_a_stuck_or_late_link() -> None:
    sender = LinkSender(max_unacked=3, max_unacked_bytes=100)
    sender.on_up(0)
    for t in range(3):
        sender.route(sender.next_seq(), b"x", float(t))
    assert not sender.stuck and sender.overdue(2.5, 2.0) and not sender.overdue(1.5, 2.0)
    sender.route(sender.next_seq(), b"x", 3.0)
    assert sender.stuck
    sender.on_ack(4)
    assert not sender.stuck and not sender.overdue(100.0, 1.0)
    sender.route(sender.next_seq(), b"x" * 101, 4.0)
    assert sender.stuck


def test_receiver_delivers_each_seq_once_in_order_whatever_the_interleaving() -> None:
    """Model of a failover: 1..acked were delivered and acknowledged; the link still
    delivers acked+1..cut, and Redis gets every frame from acked+1 on (the resent
    ones first). Any interleaving of the two gives every frame once, in order."""
    rng = random.Random(2)
    for cut, acked in itertools.product(range(9), range(9)):
        if acked > cut:
            continue  # acknowledged: delivered already
        for _ in range(50):
            receiver = LinkReceiver()
            delivered = [seq for seq in range(1, acked + 1) if receiver.fresh("A", 5, seq)]
            link, redis = list(range(acked + 1, cut + 1)), list(range(acked + 1, 9))
            while link or redis:
                stream = link if link and (not redis or rng.random() < 0.5) else redis
                seq = stream.pop(0)
                if receiver.fresh("A", 5, seq):
                    delivered.append(seq)
            assert delivered == list(range(1, 9)), (cut, acked)


def test_receiver_epochs() -> None:
    receiver = LinkReceiver(size=2)
    assert receiver.fresh("A", 5, 10) and not receiver.fresh("A", 5, 10)
    assert receiver.delivered("A", 5) == 10 and receiver.delivered("A", 6) == 0
    assert not receiver.fresh("A", 4, 11)  # an older run of A
    assert receiver.fresh("A", 6, 1)  # A restarted
    assert receiver.fresh("B", 1, 1) and receiver.fresh("C", 1, 1)
    assert receiver.delivered("A", 6) == 0  # forgotten: at most 2 instances


def test_tagger_is_frame_tag_and_checks() -> None:
    session = b"k" * 32
    tagger = Tagger(session)
    for kind in (LinkKind.FRAME, LinkKind.ACK):
        data = bytes(range(256)) * 40
        assert tagger.tag(kind, data) == frame_tag(session, kind, data)
        assert tagger.tag(kind, data) == tagger.tag(kind, data)  # the keyed state is not used up
        body = tagger.frame(kind, data)
        assert body == encode(kind, frame_tag(session, kind, data) + data)
        ((got_kind, got_body),) = FrameReader().feed(body)
        assert got_kind is kind and bytes(tagger.check(kind, got_body)) == data
    good = tagger.frame(LinkKind.FRAME, b"hello")[5:]
    with pytest.raises(ClusterLinkError, match="frame: bad tag"):
        tagger.check(LinkKind.FRAME, good[:-1] + b"j")
    with pytest.raises(ClusterLinkError, match="ack: bad tag"):
        tagger.check(LinkKind.ACK, good)  # a frame's tag is not an ack's
    with pytest.raises(ClusterLinkError, match="shorter than its tag"):
        tagger.check(LinkKind.FRAME, b"x" * 15)
    assert "k" * 8 not in repr(tagger)


def test_whole_frames_are_cut_from_the_data_and_a_tail_waits() -> None:
    reader = FrameReader()
    one, two = encode(LinkKind.FRAME, b"a" * 100), encode(LinkKind.ACK, b"b" * 8)
    assert reader.feed(one + two[:3]) == [(LinkKind.FRAME, b"a" * 100)]
    assert reader.feed(two[3:] + one[:1]) == [(LinkKind.ACK, b"b" * 8)]
    assert reader.feed(one[1:]) == [(LinkKind.FRAME, b"a" * 100)]
    assert reader.feed(b"") == []
