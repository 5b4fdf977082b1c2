"""Tests for qcall.qkd.sim.channel and .messages: authentication and hostile parsing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qcall.exceptions import ChannelAuthenticationError, KeyExhaustedError, PostProcessingError
from qcall.qkd.sim import messages as m
from qcall.qkd.sim.channel import ALICE, BOB, AuthenticatedChannel, ChannelEnd

MAC_KEY = bytes(range(32))
PAD = bytes(range(256)) * 4


def channel(**kw: object) -> AuthenticatedChannel:
    return AuthenticatedChannel(MAC_KEY, PAD, **kw)  # type: ignore[arg-type]


def sample_messages() -> list[m.Message]:
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 1, 1], dtype=np.uint8)
    return [
        m.Detections.from_indices(10**12, np.array([3, 9, 2**40], dtype=np.int64), bits[:3]),
        m.Sifting(match=bits, intensity=np.array([0, 2, 1], dtype=np.uint8),
                  sample_seed=b"\x01" * 16),
        m.Parameters(abort=0, qber=0.0123, y1_lower=0.5, e1_upper=0.02,
                     single_photon_fraction=0.6),
        m.ParityQuery(pass_index=3, starts=np.array([0, 8], dtype=np.uint32),
                      ends=np.array([4, 12], dtype=np.uint32)),
        m.ReconciliationDone(),
        m.VerifyChallenge(seed=bits, tag=2**64 - 1),
        m.Amplification(length=0, seed=np.zeros(0, dtype=np.uint8)),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda x: type(x).__name__)
def test_encode_decode_roundtrip(msg: m.Message) -> None:
    back = m.decode(m.encode(msg))
    assert type(back) is type(msg)
    for name, value in vars(msg).items():
        got = getattr(back, name)
        if isinstance(value, np.ndarray):
            assert np.array_equal(got, value)
        else:
            assert got == value


def test_detections_gap_encoding() -> None:
    idx = np.array([0, 1, 65534, 65535 + 65534, 2**45], dtype=np.int64)
    msg = m.Detections.from_indices(2**46, idx, np.zeros(5, np.uint8))
    assert msg.long_gaps.size == 2  # gaps 65535 and ~2**45 need the escape
    back = m.decode(m.encode(msg))
    assert isinstance(back, m.Detections)
    assert np.array_equal(back.indices(), idx)
    empty = m.Detections.from_indices(10, np.zeros(0, np.int64), np.zeros(0, np.uint8))
    assert empty.indices().size == 0


def test_repr_hides_contents() -> None:
    msg = m.Disclosure(bits=np.ones(1000, dtype=np.uint8))
    assert repr(msg) == "Disclosure(bits=<1000 x uint8>)"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "empty"),
        (b"\xff", "unknown"),
        (bytes([m.PassRequest.TYPE]) + b"\x01\x02", "PassRequest.block_size: truncated"),
        (bytes([m.PassRequest.TYPE]) + struct.pack("<QB", 4, 0), "trailing"),
        (bytes([m.Disclosure.TYPE]) + struct.pack("<Q", 2**40), "Disclosure.bits: .* too many"),
        (bytes([m.Disclosure.TYPE]) + struct.pack("<Q", 100) + b"\x00", "Disclosure.bits: trunc"),
        (bytes([m.Sifting.TYPE]) + struct.pack("<Q", 0) + struct.pack("<Q", 0)
         + struct.pack("<I", 2**31), "Sifting.sample_seed"),
    ],
)
def test_decode_rejects_hostile_input(data: bytes, error: str) -> None:
    with pytest.raises(PostProcessingError, match=error):
        m.decode(data)


def test_transfer_counts_and_transcript() -> None:
    ch = channel()
    got = ch.transfer(BOB, m.PassRequest(block_size=37))
    assert isinstance(got, m.PassRequest) and got.block_size == 37
    ch.transfer(ALICE, m.ReconciliationDone())
    assert ch.messages == [1, 1]
    assert [e.message_type for e in ch.transcript] == ["PassRequest", "ReconciliationDone"]
    assert ch.bytes_sent[BOB] == ch.transcript[0].size
    ch.authenticate_block()
    assert ch.auth_bits_consumed == 256
    assert ch.ends[ALICE].pad_available == ch.ends[BOB].pad_available == len(PAD) - 32


def flip_byte(position: int) -> object:
    def tamper(sender: int, frame: bytes) -> bytes:
        b = bytearray(frame)
        b[position % len(b)] ^= 0x01
        return bytes(b)
    return tamper


@pytest.mark.parametrize("position", [0, 1, 3, 11, -17, -1])
def test_tampered_frame_is_rejected(position: int) -> None:
    ch = channel(tamper=flip_byte(position))
    with pytest.raises(ChannelAuthenticationError, match="frame #0"):
        ch.transfer(BOB, m.PassRequest(block_size=5))


def test_replay_and_reflection_are_rejected() -> None:
    alice = ChannelEnd(ALICE, MAC_KEY, PAD)
    bob = ChannelEnd(BOB, MAC_KEY, PAD)
    frame = bob.seal(m.PassRequest(block_size=5))
    assert isinstance(alice.open(frame), m.PassRequest)
    with pytest.raises(ChannelAuthenticationError, match="seq"):
        alice.open(frame)  # replay
    reflected = alice.seal(m.ReconciliationDone())
    with pytest.raises(ChannelAuthenticationError, match="direction"):
        ChannelEnd(ALICE, MAC_KEY, PAD).open(reflected)
    with pytest.raises(ChannelAuthenticationError, match="too short"):
        ChannelEnd(ALICE, MAC_KEY, PAD).open(b"\x01\x02")


def test_wrong_key_is_rejected() -> None:
    frame = ChannelEnd(BOB, bytes(32), PAD).seal(m.ReconciliationDone())
    with pytest.raises(ChannelAuthenticationError, match="tag"):
        ChannelEnd(ALICE, MAC_KEY, PAD).open(frame)


def test_block_tag_catches_divergent_transcripts() -> None:
    ch = channel()
    ch.transfer(BOB, m.ReconciliationDone())
    ch.ends[BOB]._transcript.update(b"something Alice never saw")
    with pytest.raises(ChannelAuthenticationError, match="block tag"):
        ch.authenticate_block()


def test_tampered_block_tag_is_rejected() -> None:
    ch = channel(tamper=lambda sender, data: data if len(data) > 16 else bytes(16))
    ch.transfer(BOB, m.ReconciliationDone())
    with pytest.raises(ChannelAuthenticationError, match="block tag from Alice"):
        ch.authenticate_block()


def test_pad_exhaustion_and_replenish() -> None:
    ch = AuthenticatedChannel(MAC_KEY, bytes(48))
    ch.authenticate_block()
    with pytest.raises(KeyExhaustedError):
        ch.authenticate_block()
    for end in ch.ends:
        end.replenish(b"\x07" * 32)
    ch.discard_block()
    ch.authenticate_block()
    assert "\\x07" not in repr(ch.ends[0]) and "pad_left" in repr(ch.ends[0])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=1, max_value=12))
def test_decoder_never_crashes_on_garbage(data: bytes, msg_type: int) -> None:
    for raw in (data, bytes([msg_type]) + data):
        try:
            msg = m.decode(raw)
        except PostProcessingError:
            continue
        assert m.encode(msg) == raw or isinstance(msg, m.Message)
