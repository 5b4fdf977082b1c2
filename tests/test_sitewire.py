"""Tests for qcall.qkd.sitewire: frames between two network sites, and the split link's pads."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcall.exceptions import SiteLinkError
from qcall.qkd.sitewire import (
    MAX_FRAME,
    BlockTag,
    FrameReader,
    FrameType,
    Hello,
    Optics,
    PadBook,
    PostProcessing,
    RelayKey,
    RelayResult,
    encode_frame,
)

RELAY = RelayKey(7, "6f1c3c2e-6a43-4a4e-9d4c-0d2b5f3f9a11", "alice", "bob", 3, 64,
                 b"\x11" * 32, b"\x22" * 32)  # fmt: skip


def optics(seed: int = 1, n: int = 10_000, clicks: int = 200) -> Optics:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, clicks, replace=False)).astype(np.int64)
    return Optics(5, n, idx, rng.integers(0, 2, clicks, dtype=np.uint8),
                  rng.integers(0, 2, clicks, dtype=np.uint8))  # fmt: skip


def roundtrip(*messages: object, chunk: int = 7) -> list[object]:
    data = b"".join(encode_frame(m) for m in messages)  # type: ignore[arg-type]
    reader = FrameReader()
    out: list[object] = []
    for i in range(0, len(data), chunk):  # arbitrary TCP segmentation
        out += reader.feed(data[i : i + chunk])
    return out


def test_every_message_roundtrips_across_segment_boundaries() -> None:
    messages = [
        Hello(1, "beijing-hefei", "Jinan-Taian", "Jinan", 10, 12),
        PostProcessing(5, b"frame bytes"),
        BlockTag(5, b"t" * 16),
        RELAY,
        RelayResult(7, False, "slave pool alice->bob is full"),
        RelayResult(8, True),
    ]
    assert roundtrip(*messages) == messages
    (got,) = roundtrip(optics())
    want = optics()
    assert isinstance(got, Optics)
    assert (got.block, got.n_pulses) == (want.block, want.n_pulses)
    for name in ("indices", "basis", "bit"):
        assert np.array_equal(getattr(got, name), getattr(want, name))


def test_reprs_hide_key_material() -> None:
    text = repr(RELAY) + repr(BlockTag(1, b"\x99" * 16)) + repr(PostProcessing(1, b"\x77" * 9))
    assert "\\x11" not in text and "\\x22" not in text and "\\x99" not in text
    assert "\\x77" not in text and "key_id" in repr(RELAY)
    assert "clicks=200" in repr(optics())


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (FrameType.HELLO, b"not json", "Hello: payload is not JSON"),
        (FrameType.HELLO, b'{"version": 1}', "Hello.topology"),
        (FrameType.HELLO, b"[1]", "Hello: payload is not an object"),
        (FrameType.OPTICS, b"\x00" * 5, "Optics: too short"),
        (FrameType.OPTICS, struct.pack(">QQIB", 1, 10, 3, 1), "Optics.count"),
        (FrameType.OPTICS, struct.pack(">QQIB", 1, 10, 0, 3), "Optics.width: 3"),
        (FrameType.BLOCK_TAG, b"\x00" * 20, "BlockTag.tag"),
        (FrameType.RELAY_KEY, b"\x00\x05\x00\x00{}", "RelayKey.length"),
        (FrameType.RELAY_RESULT, b'{"relay_id": 1, "ok": "yes", "reason": ""}', "RelayResult.ok"),
        (99, b"", "frame type 99"),
    ],
)
def test_malformed_frames_name_the_field(kind: int, payload: bytes, field: str) -> None:
    with pytest.raises(SiteLinkError, match=re.escape(field)):
        FrameReader().feed(struct.pack(">BI", kind, len(payload)) + payload)


def test_optics_indices_must_be_sorted_and_in_range() -> None:
    bad = optics()
    repeated = bad.indices.copy()
    repeated[5] = repeated[4]
    for indices in (repeated, bad.indices + 10_000):
        frame = encode_frame(Optics(1, bad.n_pulses, indices, bad.basis, bad.bit))
        with pytest.raises(SiteLinkError, match=r"Optics\.indices"):
            FrameReader().feed(frame)


def test_optics_sends_index_gaps_in_the_smallest_width() -> None:
    small = optics()  # gaps < 65536: 2 bytes each
    assert len(encode_frame(small)) == 5 + 21 + 2 * 200 + 2 * 25
    wide = Optics(1, 1 << 40, np.array([0, 1 << 35], dtype=np.int64),
                  np.zeros(2, np.uint8), np.ones(2, np.uint8))  # fmt: skip
    (got,) = roundtrip(wide)
    assert isinstance(got, Optics) and got.indices.tolist() == [0, 1 << 35]
    assert got.bit.tolist() == [1, 1] and len(encode_frame(wide)) == 5 + 21 + 16 + 2


def test_oversized_frame_is_refused_before_buffering() -> None:
    with pytest.raises(SiteLinkError, match="exceeds the limit"):
        FrameReader().feed(struct.pack(">BI", FrameType.OPTICS, MAX_FRAME + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_raise_only_site_link_errors(data: bytes) -> None:
    reader = FrameReader(max_frame=1 << 16)
    try:
        reader.feed(data)
    except SiteLinkError:
        pass


def test_pad_book_two_ends_pick_the_same_bytes() -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.bytes(200), rng.bytes(120)]
    sender, receiver = PadBook(), PadBook()
    for n, key in enumerate(blocks):
        sender.deposit(n, key)
        receiver.deposit(n, key)
    assert sender.available_bits("ab") == 8 * (100 + 60)
    used = []
    for _ in range(3):
        block, offset, pad = sender.take_next("ab", 40)
        assert receiver.take_at("ab", block, offset, 40) == pad
        used.append((block, offset))
    # Block 0's first half (100 bytes) holds two pads; the 20-byte rest is skipped.
    assert used == [(0, 0), (0, 40), (1, 0)]
    assert not receiver.has_block("ab", 0) and not sender.has_block("ab", 0)
    # The other direction is untouched, and halves never overlap.
    assert sender.available_bits("ba") == 8 * 160
    assert sender.take_next("ba", 10)[2] == blocks[0][100:110]
    assert sender.consumed_bits == receiver.consumed_bits + 8 * 10


def test_pad_book_refuses_replays_and_unknown_blocks() -> None:
    book = PadBook()
    book.deposit(4, bytes(range(100)))
    assert book.take_at("ab", 4, 10, 10) == bytes(range(10, 20))
    with pytest.raises(SiteLinkError, match="not available"):
        book.take_at("ab", 4, 10, 10)  # the same bytes again: a replay
    with pytest.raises(SiteLinkError, match="not available"):
        book.take_at("ab", 4, 45, 10)  # beyond the half
    with pytest.raises(SiteLinkError, match="unknown"):
        book.take_at("ab", 5, 0, 10)
    with pytest.raises(SiteLinkError, match="no key left"):
        PadBook().take_next("ba", 1)
    assert "bits" in repr(book)
