"""The sinks' cheap path: decoded frames mixed without a resampler, the WAV header by pwrite."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np

from qcall.call.media import WAV_HEADER_EVERY, WavRecorder, mono_resampler, read_wav

RATE = 48000


def decoded(count: int, layout: str = "stereo", seed: int = 3) -> list[av.AudioFrame]:
    """Frames like aiortc's Opus decoder gives: s16, 48 kHz, 20 ms, full-scale noise."""
    rng = np.random.default_rng(seed)
    channels = 2 if layout == "stereo" else 1
    frames = []
    for k in range(count):
        data = rng.integers(-32768, 32768, size=(1, 960 * channels), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate, frame.pts = RATE, 960 * k
        frame.time_base = fractions.Fraction(1, RATE)
        frames.append(frame)
    return frames


async def record(path: Path, frames: list[av.AudioFrame]) -> WavRecorder:
    recorder = WavRecorder(path)
    for k, frame in enumerate(frames):
        recorder._handle(frame, 0.02 * k)
    await recorder.stop()
    return recorder


async def test_decoded_stereo_is_mixed_exactly_as_the_resampler_did(tmp_path: Path) -> None:
    frames = decoded(20)
    resampler = mono_resampler(rate=RATE)
    expected = np.concatenate(
        [out.to_ndarray().reshape(-1) for f in frames for out in resampler.resample(f)]
        + [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    )
    recorder = await record(tmp_path / "stereo.wav", frames)
    samples, rate = read_wav(tmp_path / "stereo.wav")
    assert rate == RATE and samples.size == 20 * 960
    assert np.array_equal(samples, expected)  # bit-exact, extremes included
    assert [a.sample_offset for a in recorder.arrivals] == [960 * k for k in range(20)]
    mono = decoded(3, "mono")
    await record(tmp_path / "mono.wav", mono)
    samples, _ = read_wav(tmp_path / "mono.wav")
    assert np.array_equal(samples, np.concatenate([f.to_ndarray().reshape(-1) for f in mono]))


async def test_wav_header_is_valid_while_recording(tmp_path: Path) -> None:
    path = tmp_path / "live.wav"
    recorder = WavRecorder(path)
    assert read_wav(path)[0].size == 0  # a valid, empty WAV from the start
    frames = decoded(60)  # 1.2 s
    for k, frame in enumerate(frames):
        recorder._handle(frame, 0.02 * k)
    # Not stopped (as after a crash): the header counts the first full second.
    samples, _ = read_wav(path)
    assert samples.size == WAV_HEADER_EVERY == RATE
    assert path.stat().st_size == 44 + 2 * 60 * 960  # pwrite did not move the position
    await recorder.stop()
    samples, _ = read_wav(path)
    assert samples.size == 60 * 960
    assert path.stat().st_size == 44 + 2 * 60 * 960
