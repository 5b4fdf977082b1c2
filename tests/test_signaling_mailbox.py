"""The mailbox frames (qcall/signaling/mailbox.py): round trips, and hostile input."""

from __future__ import annotations

import json
import random

import pytest

from qcall.exceptions import SignalingProtocolError
from qcall.signaling import mailbox as mb

FRAMES: list[mb.MailFrame] = [
    mb.PrekeysPublish(1, b"k" * 1952, b"s" * 3000, (mb.OneTimePrekey(7, b"o" * 3000),)),
    mb.PrekeysCount(2),
    mb.PrekeysClaim(3, "bob"),
    mb.MailPut(4, "bob", b"\x02" + bytes(100), b"r" * 16),
    mb.MailFetch(5, 10, 50),
    mb.MailAck(6, (1, 2, 3)),
]
ANSWERS: list[mb.MailFrame] = [
    mb.PrekeysHeld(1, 50),
    mb.PrekeysBundle(3, "bob", b"k", b"s", None),
    mb.MailStored(4, 99),
    mb.MailBatch(5, (mb.MailEnvelope(11, "alice", 1_767_225_600_000, b"x"),)),
    mb.MailAcked(6, 3),
    mb.MailPush(mb.MailEnvelope(12, "alice", 1, b"y")),
    mb.MailWaiting(),
    mb.MailError("mailbox_full", "the mailbox of bob is full", 4),
]


@pytest.mark.parametrize("frame", FRAMES + ANSWERS, ids=lambda f: f.TYPE)
def test_round_trip_and_detection(frame: mb.MailFrame) -> None:
    text = frame.serialize()
    assert mb.is_mailbox_frame(text)
    assert mb.parse_mailbox_frame(text, server=frame in FRAMES) == frame
    assert "yyyy" not in repr(frame) and "bytes>" in repr(mb.MailPut(1, "b", b"yyyy"))


def test_call_messages_are_not_mailbox_frames() -> None:
    assert not mb.is_mailbox_frame('{"type":"invite","call_id":"abcdefgh","peer":"bob"}')
    payload = json.dumps({"type": "offer", "call_id": "abcdefgh", "payload": '"type":"mail_put"'})
    assert not mb.is_mailbox_frame(payload)  # quotes inside a string are escaped


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"type":"mail_put","id":1,"to":"bob"}', "'data' is missing"),
        ('{"type":"mail_put","id":-1,"to":"bob","data":""}', "'id'"),
        ('{"type":"mail_put","id":1,"to":"","data":""}', "'to'"),
        ('{"type":"mail_fetch","id":1,"limit":100000}', "'limit'"),
        ('{"type":"mail_ack","id":1,"ids":[1,"2"]}', "'ids'"),
        ('{"type":"mail_ack","id":1,"ids":' + json.dumps(list(range(1, 1100))) + "}", "'ids'"),
        ('{"type":"prekeys_publish","id":1,"identity_key":"","signed_prekey":"",'
         '"one_time_prekeys":[{"prekey_id":0,"data":""}]}', "'prekey_id'"),
        ('{"type":"mail_bogus","id":1}', "unknown mailbox frame type"),
        ('{"type":"mail_put","id":1,"to":"bob","data":"' + "A" * 2_200_000 + '"}', "'data'"),
    ],
)  # fmt: skip
def test_bad_frames_name_the_field(text: str, field: str) -> None:
    with pytest.raises(SignalingProtocolError, match=field):
        mb.parse_mailbox_frame(text, server=True)


def test_mutated_frames_only_raise_the_protocol_error() -> None:
    rng = random.Random(10)
    texts = [f.serialize() for f in FRAMES + ANSWERS]
    for _ in range(3000):
        text = bytearray(rng.choice(texts).encode())
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.choice(b'{}[]":,0123456789abc\\ -')
        mutated = text.decode("latin-1")
        for server in (True, False):
            try:
                mb.parse_mailbox_frame(mutated, server=server)
            except SignalingProtocolError:
                pass
