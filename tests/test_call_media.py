"""Tests for qcall.call.media, .audio_devices and .audio_analysis (no sound card needed)."""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import math
import stat
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from qcall.call.audio_analysis import (
    FrameArrival,
    ToneGenerator,
    chirp_template,
    find_chirps,
    is_silent,
    one_way_latencies,
    peak_frequency,
    receive_time,
    rms_dbfs,
)
from qcall.call.audio_devices import (
    NO_DEVICE_MESSAGE,
    AudioDevice,
    MicrophoneTrack,
    SpeakerSink,
    list_devices,
)
from qcall.call.media import (
    SAMPLES_PER_FRAME,
    FileTrack,
    ToneTrack,
    UnityGainTrack,
    WavRecorder,
    add_media_arguments,
    open_sink,
    open_source,
    read_wav,
)
from qcall.cli import main
from qcall.exceptions import ConfigError, MediaError

from .utils import TIMEOUT_FACTOR, connect_peers

RATE = 48000
try:
    HAVE_PYAUDIO, HAVE_DEVICES = True, bool(list_devices())
except MediaError:  # pyaudio or PortAudio not installed
    HAVE_PYAUDIO, HAVE_DEVICES = False, False

needs_pyaudio = pytest.mark.skipif(not HAVE_PYAUDIO, reason="pyaudio is not installed")
needs_no_devices = pytest.mark.skipif(
    not HAVE_PYAUDIO or HAVE_DEVICES, reason="needs pyaudio on a machine without sound devices"
)


# --- helpers -------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    """Write int16 samples (interleaved if ``channels`` > 1) with the stdlib."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    n = np.arange(round(seconds * rate))
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * n / rate)).astype(np.int16)


def encode_with_av(path: Path, codec: str, freq: float, seconds: float) -> None:
    """Encode a tone to ``path`` (container from the suffix) with PyAV/FFmpeg."""
    rate = 48000 if codec == "libopus" else 44100
    samples = sine(freq, seconds, rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream)  # for mypy
        size = 960
        for start in range(0, samples.size - size + 1, size):
            frame = av.AudioFrame.from_ndarray(
                samples[start : start + size].reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = start
            frame.time_base = fractions.Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


async def read_all(track: MediaStreamTrack, limit: int = 10_000) -> list[av.AudioFrame]:
    frames = []
    for _ in range(limit):
        try:
            frame = await track.recv()
            assert isinstance(frame, av.AudioFrame)  # for mypy: audio tracks only here
            frames.append(frame)
        except MediaStreamError:
            break
    return frames


def samples_of(frames: list[av.AudioFrame]) -> np.ndarray:
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


class QueuedTrack(MediaStreamTrack):
    """A track that hands out given frames, then waits (like a live remote track)."""

    kind = "audio"

    def __init__(self, frames: list[av.AudioFrame]) -> None:
        super().__init__()
        self.queue: asyncio.Queue[av.AudioFrame] = asyncio.Queue()
        for frame in frames:
            self.queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return await self.queue.get()


def make_frame(samples: np.ndarray, pts: int, rate: int = RATE) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


# --- analysis ------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [440.0, 1000.0, 1234.5, 3150.7])
def test_peak_frequency_is_accurate_between_bins(freq: float) -> None:
    x = sine(freq, 0.25, RATE)  # 4 Hz bins
    assert peak_frequency(x, RATE) == pytest.approx(freq, abs=0.5)


def test_peak_frequency_and_levels_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="rate"):
        peak_frequency(np.zeros(100), 0)
    with pytest.raises(ValueError, match="samples"):
        peak_frequency(np.zeros((2, 100)), RATE)
    with pytest.raises(ValueError, match="samples"):
        peak_frequency(np.zeros(2), RATE)


def test_is_silent_and_rms() -> None:
    assert is_silent(np.zeros(960, np.int16))
    assert rms_dbfs(np.zeros(10, np.int16)) == -math.inf
    assert not is_silent(sine(440, 0.02, RATE, amplitude=0.01))  # -43 dBFS
    assert rms_dbfs(sine(440, 0.1, RATE, amplitude=1.0)) == pytest.approx(-3.01, abs=0.02)
    rng = np.random.default_rng(1)
    hiss = np.round(rng.normal(0, 10, 4800)).astype(np.int16)  # about -70 dBFS
    assert is_silent(hiss)


def test_chirp_template_shape_and_validation() -> None:
    chirp = chirp_template(RATE)
    assert chirp.size == 480
    assert chirp[0] == 0.0 and abs(chirp[-1]) < 1e-3
    assert np.max(np.abs(chirp)) <= 1.0
    with pytest.raises(ValueError, match="f1"):
        chirp_template(RATE, f1=30000)
    with pytest.raises(ValueError, match="duration"):
        chirp_template(RATE, duration=0.0001)


def test_find_chirps_in_noise_within_one_ms() -> None:
    rng = np.random.default_rng(7)
    template = chirp_template(RATE)
    x = rng.normal(0, 0.1, 3 * RATE)  # -20 dBFS noise
    x += 0.2 * np.sin(2 * np.pi * 2000 * np.arange(x.size) / RATE)  # and a tone in the sweep
    offsets = [12_345, 50_000, 50_000 + 3 * template.size, 101_111, 140_000]
    for offset in offsets:
        x[offset : offset + template.size] += 0.3 * template
    found = find_chirps(x, RATE, template)
    assert len(found) == len(offsets)
    for got, want in zip(found, offsets, strict=True):
        assert abs(got - want) <= RATE // 1000  # 1 ms
        assert abs(got - want) <= 1  # in fact, to the sample


def test_overlap_save_correlation_matches_direct() -> None:
    from qcall.call.audio_analysis import _correlate_valid

    rng = np.random.default_rng(11)
    x = rng.normal(size=1000)
    t = rng.normal(size=37)
    direct = np.correlate(x, t, mode="valid")
    for block in (64, 100, 1 << 15):  # blocks much shorter than x, and one longer
        assert np.allclose(_correlate_valid(x, t, block), direct)


def test_find_chirps_no_false_positives() -> None:
    rng = np.random.default_rng(3)
    template = chirp_template(RATE)
    noise = rng.normal(0, 0.2, 2 * RATE)
    assert find_chirps(noise, RATE, template) == []
    assert find_chirps(np.zeros(RATE), RATE, template) == []  # digital silence
    assert find_chirps(np.zeros(10), RATE, template) == []  # shorter than the template
    assert find_chirps(sine(3000, 1.0, RATE), RATE, template) == []
    with pytest.raises(ValueError, match="threshold"):
        find_chirps(noise, RATE, template, threshold=0)


def test_tone_generator_is_phase_continuous_and_places_chirps() -> None:
    gen = ToneGenerator(440, amplitude=0.5, chirp_offsets=[1000, 5000])
    whole = gen.render(0, 6000)
    parts = np.concatenate([gen.render(s, 960) for s in range(0, 6000, 960)])[:6000]
    assert np.array_equal(whole, parts)
    chirp = np.round(gen.chirp * 0.5 * 32767).astype(np.int16)
    assert np.array_equal(whole[1000 : 1000 + chirp.size], chirp)
    assert np.array_equal(whole[5000 : 5000 + chirp.size], chirp)
    assert np.array_equal(whole[:1000], gen.render(0, 1000))
    assert gen.chirps_in(960, 960) == [1000]
    assert gen.chirps_in(1001, 3999) == []
    with pytest.raises(ValueError, match="amplitude"):
        ToneGenerator(440, amplitude=1.5)
    with pytest.raises(ValueError, match="freq_hz"):
        ToneGenerator(30000)


def test_latency_from_synthetic_delays() -> None:
    rng = np.random.default_rng(5)
    delay = 0.0734
    t0 = 1000.0
    frames = 250  # 5 s
    arrivals = [
        FrameArrival(k * 960, k * 960, 960, t0 + k * 0.02 + delay + rng.uniform(0, 0.002))
        for k in range(frames)
    ]
    chirps = [24_000, 72_500, 120_100, 200_000]
    sends = [t0 + c / RATE for c in chirps]
    latencies = one_way_latencies(sends, arrivals, chirps, RATE)
    assert len(latencies) == 4
    for latency in latencies:
        assert delay <= latency <= delay + 0.002 + 1e-9

    # A lost chirp (chirps[2]), a false detection 0.7 s after a send and one
    # outside every received frame are skipped.
    noisy = [*chirps[:2], 150_000, 2_000_000, chirps[3]]
    latencies = one_way_latencies(sends, arrivals, noisy, RATE, max_latency=0.5)
    assert len(latencies) == 3
    assert all(delay <= x <= delay + 0.002 + 1e-9 for x in latencies)
    early = [FrameArrival(0, 0, 960, t0 - 1.0)]  # received before any send: no match
    assert one_way_latencies(sends, early, [10], RATE) == []


def test_receive_time_uses_frame_arrival_and_position() -> None:
    arrivals = [FrameArrival(0, 0, 960, 10.0), FrameArrival(1920, 1920, 960, 10.5)]
    assert receive_time(arrivals, 480, RATE) == pytest.approx(10.01)
    assert receive_time(arrivals, 1920, RATE) == 10.5
    for bad in (-1, 960, 1919, 2880):
        with pytest.raises(ValueError, match="sample_offset"):
            receive_time(arrivals, bad, RATE)


# --- sources -------------------------------------------------------------------------


async def test_tone_track_frames_format_and_pts() -> None:
    track = ToneTrack(440, duration=0.05, realtime=False)
    assert track.kind == "audio"
    frames = await read_all(track)
    assert [f.samples for f in frames] == [960, 960, 480]
    assert [f.pts for f in frames] == [0, 960, 1920]
    for frame in frames:
        assert frame.format.name == "s16"
        assert frame.layout.name == "mono"
        assert frame.sample_rate == RATE
        assert frame.time_base == fractions.Fraction(1, RATE)
    assert track.readyState == "ended"
    assert peak_frequency(samples_of(frames), RATE) == pytest.approx(440, abs=2)


async def test_tone_track_keeps_real_time_pace() -> None:
    track = ToneTrack(440)
    start = time.monotonic()
    frames = [await track.recv() for _ in range(11)]
    elapsed = time.monotonic() - start
    track.stop()
    assert frames[-1].pts == 10 * 960
    # Frame k is due k * 20 ms after frame 0: never early (1 ms loop granularity).
    assert elapsed >= 0.2 - 0.002
    assert elapsed < 0.2 + 1.0 * TIMEOUT_FACTOR
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_tone_track_records_chirp_send_times() -> None:
    now = [100.0]
    track = ToneTrack(0, chirp_at=[0.025, 0.05], realtime=False, clock=lambda: now[0])
    assert track.chirp_offsets == [1200, 2400]
    frames = []
    for _ in range(4):
        frames.append(await track.recv())
        now[0] += 1.0
    # The chirp at 1200 left in frame 1 (960..1919), read at t=101.
    assert track.chirp_send_times == pytest.approx([101.0 + 240 / RATE, 102.0 + 480 / RATE])
    assert find_chirps(samples_of(frames), RATE, track.chirp) == [1200, 2400]


def test_tone_track_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ptime"):
        ToneTrack(440, ptime=0.0201)
    with pytest.raises(ValueError, match="duration"):
        ToneTrack(440, duration=0)
    with pytest.raises(ValueError, match="chirp_at"):
        ToneTrack(440, chirp_at=[-1])


async def test_file_track_reads_resampled_wav(tmp_path: Path) -> None:
    path = tmp_path / "in.wav"
    stereo = np.repeat(sine(600, 0.5, 44100), 2)  # 44.1 kHz stereo
    write_wav(path, stereo, 44100, channels=2)
    track = FileTrack(path, realtime=False)
    frames = await read_all(track)
    assert all(f.sample_rate == RATE and f.layout.name == "mono" for f in frames)
    assert all(f.samples == SAMPLES_PER_FRAME for f in frames[:-1])
    assert [f.pts for f in frames] == list(np.cumsum([0] + [f.samples for f in frames[:-1]]))
    total = samples_of(frames)
    assert abs(total.size - RATE // 2) <= SAMPLES_PER_FRAME
    assert peak_frequency(total[2000:-2000], RATE) == pytest.approx(600, abs=2)
    assert track.readyState == "ended"


@pytest.mark.parametrize(("name", "codec"), [("in.ogg", "libopus"), ("in.mp3", "libmp3lame")])
async def test_file_track_reads_compressed_audio(tmp_path: Path, name: str, codec: str) -> None:
    path = tmp_path / name
    encode_with_av(path, codec, 880, 0.6)
    frames = await read_all(FileTrack(path, realtime=False))
    total = samples_of(frames)
    assert abs(total.size - 0.6 * RATE) < 0.1 * RATE
    assert peak_frequency(total[4800:-4800], RATE) == pytest.approx(880, abs=3)


async def test_file_track_loops_and_keeps_pts(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_wav(path, sine(500, 0.1, RATE), RATE)  # 5 frames
    track = FileTrack(path, loop=True, realtime=False)
    frames = [await track.recv() for _ in range(12)]
    track.stop()
    assert [f.pts for f in frames] == [960 * k for k in range(12)]
    assert not is_silent(samples_of(frames[5:10]))


def test_file_track_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="no such file"):
        FileTrack(tmp_path / "missing.wav")
    with pytest.raises(MediaError, match="directory"):
        FileTrack(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(MediaError, match=r"notes\.txt"):
        FileTrack(text)
    truncated = tmp_path / "empty.wav"
    write_wav(truncated, np.zeros(0, np.int16), RATE)
    with pytest.raises(MediaError, match=r"empty\.wav"):
        FileTrack(truncated)


# --- sinks ---------------------------------------------------------------------------


async def test_wav_recorder_writes_tone(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    recorder = WavRecorder(path)
    recorder.addTrack(ToneTrack(440, duration=0.5, realtime=False))
    await recorder.start()
    await asyncio.wait_for(recorder.join(), 5 * TIMEOUT_FACTOR)
    await recorder.stop()
    await recorder.stop()  # idempotent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    samples, rate = read_wav(path)
    assert rate == RATE and samples.size == RATE // 2
    assert peak_frequency(samples, rate) == pytest.approx(440, abs=1)
    assert len(recorder.arrivals) == 25
    assert recorder.arrivals[3].sample_offset == 3 * 960 and recorder.arrivals[3].pts == 2880


async def test_wav_recorder_stop_keeps_queued_frames(tmp_path: Path) -> None:
    frames = [make_frame(sine(1000, 0.02, RATE), k * 960) for k in range(7)]
    track = QueuedTrack(frames)
    recorder = WavRecorder(tmp_path / "out.wav")
    recorder.addTrack(track)
    await recorder.start()
    await recorder.stop()  # before the consuming task ever ran
    samples, _ = read_wav(tmp_path / "out.wav")
    assert samples.size == 7 * 960
    assert recorder.frames_received == 7


async def test_wav_recorder_conceals_lost_frames_and_resamples(tmp_path: Path) -> None:
    one = sine(1000, 0.02, RATE)
    frames = [make_frame(one, 0), make_frame(one, 960), make_frame(one, 4 * 960)]
    frames.append(make_frame(sine(1000, 0.02, 16000), 5 * 320, 16000))  # format change
    recorder = WavRecorder(tmp_path / "out.wav")
    recorder.addTrack(QueuedTrack(frames))
    await recorder.start()
    await asyncio.sleep(0.05)
    await recorder.stop()
    samples, _ = read_wav(tmp_path / "out.wav")
    assert recorder.concealed_samples == 2 * 960
    assert is_silent(samples[2 * 960 : 4 * 960]) and not is_silent(samples[4 * 960 : 5 * 960])
    assert samples.size >= 5 * 960 + 900  # the 16 kHz frame, resampled to 48 kHz
    assert [a.sample_offset for a in recorder.arrivals[:3]] == [0, 960, 4 * 960]


def test_wav_recorder_and_read_wav_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="cannot create"):
        WavRecorder(tmp_path / "no" / "such" / "dir.wav")
    with pytest.raises(MediaError, match="not a readable WAV"):
        read_wav(tmp_path / "missing.wav")
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"RIFF\x00\x00\x00\x00JUNK")
    with pytest.raises(MediaError, match="bogus"):
        read_wav(bogus)
    recorder = WavRecorder(tmp_path / "x.wav")

    class VideoTrack(MediaStreamTrack):
        kind = "video"

        async def recv(self) -> av.AudioFrame:  # pragma: no cover - never consumed
            raise MediaStreamError

    with pytest.raises(MediaError, match="video"):
        recorder.addTrack(VideoTrack())


class DelayLine(MediaStreamTrack):
    """Hands out each frame of ``source`` exactly ``delay`` seconds after it was produced."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, delay: float) -> None:
        super().__init__()
        self.source = source
        self.delay = delay
        self.line: asyncio.Queue[tuple[float, av.AudioFrame]] = asyncio.Queue()
        self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        while True:
            frame = await self.source.recv()
            assert isinstance(frame, av.AudioFrame)  # for mypy: an audio source
            self.line.put_nowait((time.monotonic() + self.delay, frame))

    async def recv(self) -> av.AudioFrame:
        due, frame = await self.line.get()
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        return frame

    def stop(self) -> None:
        super().stop()
        self.pump.cancel()


@pytest.mark.parametrize("delay", [0.0, 0.050])
async def test_latency_method_measures_a_known_delay(tmp_path: Path, delay: float) -> None:
    tone = ToneTrack(800, chirp_at=[0.05, 0.15, 0.25])
    line = DelayLine(tone, delay)
    recorder = WavRecorder(tmp_path / "d.wav")
    recorder.addTrack(line)
    await recorder.start()
    while len(tone.chirp_send_times) < 3 or recorder.duration < 0.3:
        await asyncio.sleep(0.02)
    await recorder.stop()
    line.stop()
    samples, rate = read_wav(tmp_path / "d.wav")
    found = find_chirps(samples, rate, tone.chirp)
    assert found == tone.chirp_offsets  # no codec: found to the sample
    latencies = one_way_latencies(tone.chirp_send_times, recorder.arrivals, found, rate)
    assert len(latencies) == 3
    print(f"\ndelay {delay * 1000:.0f} ms measured {[round(x * 1000, 3) for x in latencies]} ms")
    for latency in latencies:  # asyncio timers fire late, never early
        assert delay - 0.001 <= latency < delay + 0.015 * TIMEOUT_FACTOR


# --- end to end through aiortc: ToneTrack → Opus → SRTP → WavRecorder -------------------


async def test_call_loop_tone_opus_recorder(tmp_path: Path) -> None:
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    callee = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    chirp_times = [0.5, 1.0, 1.5, 2.0]
    amplitude = 10 ** (-10 / 20) * math.sqrt(2)  # −10 dBFS RMS (a sine's RMS is peak / √2)
    tone = ToneTrack(1000, chirp_at=chirp_times, amplitude=amplitude)
    recorder = WavRecorder(tmp_path / "call.wav")
    try:
        caller.addTrack(UnityGainTrack(tone))  # as a call does (session_sdp.py)
        await connect_peers(caller, callee, recorder)
        assert "opus/48000/2" in caller.localDescription.sdp
        deadline = time.monotonic() + 10 * TIMEOUT_FACTOR
        while len(tone.chirp_send_times) < len(chirp_times) or recorder.duration < 2.3:
            assert time.monotonic() < deadline, "audio did not flow"
            await asyncio.sleep(0.05)
    finally:
        await recorder.stop()
        await caller.close()
        await callee.close()

    samples, rate = read_wav(tmp_path / "call.wav")
    assert peak_frequency(samples[4800:4800 + 9600], rate) == pytest.approx(1000, abs=3)
    # Unity gain: −10 dBFS arrives at −10 dBFS (mono straight into Opus: −13 dBFS).
    assert rms_dbfs(samples[4800:4800 + 9600]) == pytest.approx(-10.0, abs=0.5)
    found = find_chirps(samples, rate, tone.chirp)
    assert len(found) == len(chirp_times)
    latencies = one_way_latencies(tone.chirp_send_times, recorder.arrivals, found, rate)
    assert len(latencies) == len(chirp_times)
    # Loopback: Opus look-ahead (6.5 ms) + jitter-buffer prefetch (4 × 20 ms) dominate.
    assert all(0.005 < x < 0.5 * TIMEOUT_FACTOR for x in latencies)
    assert max(latencies) - min(latencies) < 0.1 * TIMEOUT_FACTOR
    print(f"\none-way latency over aiortc loopback: {[round(x * 1000, 1) for x in latencies]} ms")


# --- device selection and the CLI (this machine has no sound devices) -----------------------


def test_open_source_and_sink_from_args(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_media_arguments(parser)
    args = parser.parse_args(["--tone", "440", "--output", str(tmp_path / "o.wav")])
    source = open_source(args)
    assert isinstance(source, ToneTrack) and source.generator.freq_hz == 440
    sink = open_sink(args)
    assert isinstance(sink, WavRecorder)
    asyncio.run(sink.stop())

    wav = tmp_path / "in.wav"
    write_wav(wav, sine(440, 0.1, RATE), RATE)
    assert isinstance(open_source(parser.parse_args(["--input", str(wav)])), FileTrack)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tone", "440", "--input", "x.wav"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--tone", "-3"])
    with pytest.raises(ConfigError, match="one audio source"):
        open_source(tone=440, input=wav)
    with pytest.raises(ConfigError, match="one audio sink"):
        open_sink(output="a.wav", output_device=1)
    with pytest.raises(ConfigError, match="WAV"):
        open_sink(output=tmp_path / "o.mp3")
    with pytest.raises(MediaError, match="no such file"):
        open_source(input=tmp_path / "nope.ogg")


@needs_no_devices
def test_no_devices_gives_clear_errors() -> None:
    for opener in (open_source, open_sink, MicrophoneTrack, SpeakerSink):
        with pytest.raises(MediaError, match="no sound devices") as info:
            opener()
        assert "--tone" in str(info.value) and "--output FILE.wav" in str(info.value)
    with pytest.raises(MediaError, match="--mic 3"):
        open_source(input_device=3)


@needs_no_devices
def test_cli_devices_says_no_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "no sound devices" in out and "--tone HZ" in out
    assert main(["devices", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "inputs": [], "outputs": [], "message": NO_DEVICE_MESSAGE, "api": "portaudio"
    }


def test_cli_devices_without_pyaudio(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyaudio", None)  # import pyaudio → ImportError
    assert main(["devices"]) == 1
    err = capsys.readouterr().err
    assert "apt-get install portaudio19-dev" in err and "pip install 'qcall[audio]'" in err
    for opener in (open_source, open_sink):
        with pytest.raises(MediaError, match="portaudio19-dev") as info:
            opener()
        assert "--tone HZ" in str(info.value)


# --- real PortAudio I/O on ALSA plugins (no sound card needed) ---------------------------

ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
#: The ALSA plugin devices by name, and the file playback is written to.
AlsaDevices = tuple[dict[str, AudioDevice], Path]


@pytest.fixture
def alsa_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AlsaDevices:
    """Make PortAudio see two ALSA plugin devices instead of sound cards.

    ``qcallnull`` (the default) is a ``null`` PCM: output is discarded, input is
    whatever its buffer holds. ``qcallfile`` is a ``file`` PCM over it: capture
    reads ``mic.raw`` (a 700 Hz tone) and playback is written to ``played.raw``,
    both mono s16le at 48 kHz. Neither paces in real time, so tests stay short.
    """
    if not HAVE_PYAUDIO:
        pytest.skip("pyaudio is not installed")
    if not ALSA_CONF.exists():
        pytest.skip("no ALSA configuration to extend")
    mic = tmp_path / "mic.raw"
    mic.write_bytes(sine(700, 5.0, RATE, amplitude=0.4).astype("<i2").tobytes())
    played = tmp_path / "played.raw"
    conf = tmp_path / "asound.conf"
    conf.write_text(
        'pcm.qcallnull { type null hint { show on description "qcall null" } }\n'
        f'pcm.qcallfile {{ type file slave.pcm "qcallnull" file "{played}" '
        f'infile "{mic}" format "raw" hint {{ show on description "qcall file" }} }}\n'
    )
    monkeypatch.setenv("ALSA_CONFIG_PATH", f"{ALSA_CONF}:{conf}")
    monkeypatch.setenv("QCALL_AUDIO_API", "portaudio")  # these test the PortAudio path
    devices = {d.name: d for d in list_devices()}
    if sorted(devices) != ["qcallfile", "qcallnull"]:
        pytest.skip(f"PortAudio did not expose the ALSA plugins: {devices}")
    return devices, played


def test_cli_devices_lists_devices_with_indexes(
    alsa_devices: AlsaDevices, capsys: pytest.CaptureFixture[str]
) -> None:
    devices, _ = alsa_devices
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "Input devices (--mic NAME or N):" in out
    assert "Output devices (--speaker NAME or N):" in out
    assert f"*{devices['qcallnull'].index:3d}  qcallnull  [ALSA" in out
    assert f" {devices['qcallfile'].index:3d}  qcallfile  [ALSA" in out
    assert main(["devices", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["message"] is None
    assert sorted(d["name"] for d in document["outputs"]) == ["qcallfile", "qcallnull"]
    defaults = [d["name"] for d in document["inputs"] if d["is_default_input"]]
    assert defaults == ["qcallnull"]


async def test_microphone_track_captures_device_audio(alsa_devices: AlsaDevices) -> None:
    devices, _ = alsa_devices
    default = open_source()
    assert isinstance(default, MicrophoneTrack) and default.device_name == "qcallnull"
    default.stop()

    track = open_source(input_device=devices["qcallfile"].index)
    assert isinstance(track, MicrophoneTrack) and track.device_name == "qcallfile"
    frames = [await asyncio.wait_for(track.recv(), 5 * TIMEOUT_FACTOR) for _ in range(10)]
    track.stop()
    track.stop()  # idempotent
    size = round(RATE * track.ptime)  # 10 ms frames: 10 ms Opus packets (qcall/call/opus.py)
    assert size == 480
    assert [f.pts for f in frames] == [size * k for k in range(10)]
    assert all(
        (f.format.name, f.layout.name, f.sample_rate, f.samples) == ("s16", "mono", RATE, size)
        for f in frames
    )
    captured = samples_of(frames)
    assert peak_frequency(captured, RATE) == pytest.approx(700, abs=2)
    with pytest.raises(MediaStreamError):
        await track.recv()
    with pytest.raises(MediaError, match="--mic 7: no such device"):
        MicrophoneTrack(7)


async def test_speaker_sink_plays_to_device(alsa_devices: AlsaDevices) -> None:
    devices, played = alsa_devices
    sink = open_sink(output_device=devices["qcallfile"].index)
    assert isinstance(sink, SpeakerSink) and sink.device_name == "qcallfile"
    # Not paced: all 150 ms fit in the sink's 200 ms buffer, and the device
    # (which consumes far faster than real time) is open only briefly.
    source = ToneTrack(440, duration=0.15, realtime=False)
    sink.addTrack(source)
    await sink.start()
    await asyncio.wait_for(sink.join(), 5 * TIMEOUT_FACTOR)
    await sink.stop()
    assert sink.frames_received == 8
    out = np.frombuffer(played.read_bytes(), dtype="<i2")
    expected = source.generator.render(0, 7200)
    # Every sample reached the device, in order, between stretches of silence
    # (underruns); zero samples are left out as silence and tone cannot be
    # told apart there.
    assert np.count_nonzero(expected) > 7100
    assert np.array_equal(out[out != 0], expected[expected != 0])
    default = open_sink()
    assert isinstance(default, SpeakerSink) and default.device_name == "qcallnull"
    await default.stop()
    with pytest.raises(MediaError, match="--speaker 4: no such device"):
        SpeakerSink(4)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_wav_recorder_full_disk_is_reported_and_track_drained() -> None:
    recorder = WavRecorder("/dev/full")  # every write fails with ENOSPC
    source = ToneTrack(440, duration=1.0, realtime=False)
    recorder.addTrack(source)
    await recorder.start()
    await asyncio.wait_for(recorder.join(), 5 * TIMEOUT_FACTOR)
    await recorder.stop()  # does not raise
    assert isinstance(recorder.error, MediaError)
    assert "/dev/full: write failed" in str(recorder.error)
    assert source.readyState == "ended"  # consumed to the end, not abandoned
