"""Opus packets as long as the source's frames (qcall/call/opus.py; docs/audio.md)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from av import AudioFrame

from qcall.call.audio_analysis import find_chirps, peak_frequency
from qcall.call.jitter import get_jitter_buffer, install_jitter_buffer
from qcall.call.media import ToneTrack, UnityGainTrack, WavRecorder, read_wav, stereo_frame
from qcall.call.opus import SourceFramedOpusEncoder, install_opus_encoder
from tests.utils import TIMEOUT_FACTOR, connect_peers

RATE = 48000


def code(encoder: OpusEncoder, ptime: float, seconds: float = 0.5) -> tuple[list[bytes], list[int]]:
    """Encode a tone with one chirp (at 0.2 s) in frames of ``ptime``; return packets and ts."""
    tone = ToneTrack(0, ptime=ptime, chirp_at=[0.2], realtime=False)
    packets, stamps = [], []
    for _ in range(round(seconds / ptime)):
        frame = asyncio.run(tone.recv())
        payloads, timestamp = encoder.encode(stereo_frame(frame))
        packets += payloads
        stamps += [timestamp] * len(payloads)
    return packets, stamps


def decode(packets: list[bytes], stamps: list[int]) -> np.ndarray:
    decoder = OpusDecoder()
    out = [
        cast(AudioFrame, f).to_ndarray().reshape(-1, 2)[:, 0]  # an Opus decoder's frames
        for data, ts in zip(packets, stamps, strict=True)
        for f in decoder.decode(JitterFrame(data=data, timestamp=ts))
    ]
    return np.concatenate(out)


def test_ten_ms_frames_become_ten_ms_low_delay_packets() -> None:
    packets, stamps = code(SourceFramedOpusEncoder(), 0.010)
    assert len(packets) == 50  # one packet per 10 ms frame, sent at once
    assert np.all(np.diff(stamps) == 480)
    # TOC (RFC 6716 §3.1): config 30 is CELT-only, fullband, 10 ms; code 0, one frame.
    assert {p[0] >> 3 for p in packets} == {30}
    # The restricted low-delay encoder's look-ahead: 2.5 ms (120 samples).
    template = ToneTrack(0, chirp_at=[0]).chirp
    assert find_chirps(decode(packets, stamps), RATE, template) == [round(0.2 * RATE) + 120]


def test_twenty_ms_frames_are_coded_as_aiortc_does() -> None:
    ours, our_stamps = code(SourceFramedOpusEncoder(), 0.020)
    stock, stock_stamps = code(OpusEncoder(), 0.020)
    assert len(ours) == 25 and np.all(np.diff(our_stamps) == 960)
    assert [p[0] for p in ours] == [p[0] for p in stock]  # the same configuration
    template = ToneTrack(0, chirp_at=[0]).chirp
    expected = [round(0.2 * RATE) + 312]  # voip: 6.5 ms of look-ahead
    assert find_chirps(decode(ours, our_stamps), RATE, template) == expected
    assert find_chirps(decode(stock, stock_stamps), RATE, template) == expected


def test_stock_encoder_regroups_ten_ms_frames() -> None:
    """What the hook exists for: aiortc alone waits for two 10 ms frames per packet."""
    packets, stamps = code(OpusEncoder(), 0.010)
    assert len(packets) == 25 and np.all(np.diff(stamps) == 960)


async def test_call_sends_the_microphones_frame_length(tmp_path: Path) -> None:
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    callee = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    tone = ToneTrack(1000, ptime=0.010, amplitude=0.3)
    recorder = WavRecorder(tmp_path / "heard.wav")
    install_jitter_buffer(callee)
    try:
        caller.addTrack(UnityGainTrack(tone))
        install_opus_encoder(caller)
        install_opus_encoder(caller)  # harmless twice
        await connect_peers(caller, callee, recorder)
        deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
        while recorder.duration < 0.6:
            assert time.monotonic() < deadline, "audio did not flow"
            await asyncio.sleep(0.05)
        buffer = get_jitter_buffer(callee.getTransceivers()[0].receiver)
        assert buffer is not None
        assert buffer.core.frame_length == 480  # 10 ms packets on the wire
        assert buffer.stats.played > 40
    finally:
        await recorder.stop()
        await caller.close()
        await callee.close()
    samples, rate = read_wav(tmp_path / "heard.wav")
    assert peak_frequency(samples[4800:14400], rate) == pytest.approx(1000, abs=3)
