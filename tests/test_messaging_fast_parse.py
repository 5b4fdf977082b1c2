"""The one-step parsers of the common cases (a short ratchet message without a QKD
reference, a text content) accept exactly what the general parsers accept, with the same
result: whatever parses re-encodes to the very same bytes, anything else is a typed error."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qcall.exceptions import MessageFormatError, MessageTooLargeError
from qcall.messaging.content import MAX_TEXT_BYTES, Content, ContentKind
from qcall.messaging.messages import QKDRef, RatchetMessage, ratchet_header

SHORT = RatchetMessage(
    bytes(range(16)), 3, 0, 7, 0, 0, b"", b"", None, None, b"\x5a" * 80, compact=True
).serialize()
TEXT = Content(ContentKind.TEXT, bytes(range(16)), 1_767_225_600_000, text="héllo").serialize()


def _mutations(data: bytes, at: int, chunk: bytes) -> list[bytes]:
    at %= len(data) + 1
    return [
        data[:at],  # truncated
        data + chunk,  # trailing bytes
        data[:at] + chunk + data[at + len(chunk) :],  # overwritten
        data[:at] + chunk + data[at:],  # inserted
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 200), st.binary(min_size=1, max_size=12))
def test_a_short_message_parses_to_what_it_encodes_or_is_a_format_error(
    at: int, chunk: bytes
) -> None:
    for data in [SHORT, *_mutations(SHORT, at, chunk)]:
        try:
            message = RatchetMessage.parse(data)
        except MessageFormatError:
            continue
        assert message.serialize() == data
        assert message.header() == data[: len(data) - 4 - len(message.ciphertext)]
        assert message.compact == (data[1] == 5)


def test_the_one_step_parse_gives_the_general_result() -> None:
    message = RatchetMessage.parse(SHORT)
    assert (message.session_id, message.chain, message.index) == (bytes(range(16)), (3, 0), 7)
    assert message.compact and message.ciphertext == b"\x5a" * 80
    header = ratchet_header(bytes(range(16)), 3, 0, 7, 0, 0, None, None)
    assert message.header() == SHORT[:-84] == header
    # with a generation QKD reference (the general path), the same header recipe
    ref = QKDRef("alice-sae", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", 32)
    other = RatchetMessage(bytes(16), 3, 1, 0, 0, 5, b"", b"", None, ref, bytes(16), compact=True)
    assert RatchetMessage.parse(other.serialize()) == other
    # the checks of the general path hold on the one-step path too
    for bad, what in [
        (SHORT[:18] + struct.pack(">I", 0) + SHORT[22:], "epoch"),  # epoch 0
        (SHORT[:-84] + struct.pack(">I", 4) + b"abcd", "ciphertext"),  # shorter than a tag
        (SHORT[:-84] + struct.pack(">I", 1 << 20) + SHORT[-80:], "ciphertext"),  # over the limit
        (SHORT[:22] + struct.pack(">I", 1) + SHORT[26:], "generation_qkd"),  # generation 1
    ]:
        with pytest.raises(MessageFormatError, match=what):
            RatchetMessage.parse(bad)


def test_the_objects_built_without_init_are_the_constructors() -> None:
    """The one-step parsers and Content.text_message skip the frozen __init__: the object
    is the one the constructor builds (fields, equality, hash, repr)."""
    built = RatchetMessage(
        bytes(range(16)), 3, 0, 7, 0, 0, b"", b"", None, None, b"\x5a" * 80, compact=True
    )
    parsed = RatchetMessage.parse(SHORT)
    assert parsed == built and hash(parsed) == hash(built) and repr(parsed) == repr(built)
    assert dataclasses.asdict(parsed) == dataclasses.asdict(built)
    content = Content(ContentKind.TEXT, bytes(range(16)), 1_767_225_600_000, text="héllo")
    decoded = Content.decode(TEXT)
    assert decoded == content and hash(decoded) == hash(content) and repr(decoded) == repr(content)
    assert dataclasses.asdict(decoded) == dataclasses.asdict(content)
    new = Content.text_message("hi", 1.5)
    assert new == Content(ContentKind.TEXT, new.message_id, 1500, text="hi")
    with pytest.raises(MessageTooLargeError):
        Content.text_message("é" * (MAX_TEXT_BYTES // 2 + 1), 1.5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40), st.integers(0, 80), st.binary(min_size=1, max_size=8))
def test_a_text_content_decodes_to_what_it_encodes_or_is_a_format_error(
    text: str, at: int, chunk: bytes
) -> None:
    data = Content(ContentKind.TEXT, bytes(16), 5, text=text).serialize()
    assert Content.decode(data).text == text
    for bad in _mutations(data, at, chunk):
        try:
            content = Content.decode(bad)
        except MessageFormatError:
            continue
        assert content.serialize() == bad


def test_a_text_content_that_is_not_utf8_or_too_long_is_refused() -> None:
    with pytest.raises(MessageFormatError, match="UTF-8"):
        Content.decode(TEXT[:-2] + b"\xff\xfe")
    long = Content(ContentKind.TEXT, bytes(16), 5, text="a" * MAX_TEXT_BYTES).serialize()
    assert len(Content.decode(long).text) == MAX_TEXT_BYTES
    too_long = long[:25] + struct.pack(">I", MAX_TEXT_BYTES + 1) + long[29:] + b"a"
    with pytest.raises((MessageFormatError, MessageTooLargeError)):
        Content.decode(too_long)


def test_message_ids_sort_by_time_and_stay_unique() -> None:
    """§8.1: u48 ms ‖ 10 random bytes, so the sender's index of sent ids is appended to."""
    import time

    from qcall.messaging.content import MESSAGE_ID_LEN, new_message_id

    before = time.time_ns() // 1_000_000
    first = new_message_id()
    time.sleep(0.003)
    ids = [new_message_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert all(len(i) == MESSAGE_ID_LEN for i in ids) and len(set(ids)) == 1000
    assert before <= int.from_bytes(first[:6], "big") <= after
    assert all(first < i for i in ids)  # a later millisecond sorts after
