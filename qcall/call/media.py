"""Call audio: sources and sinks for aiortc.

Sources are :class:`aiortc.MediaStreamTrack` s of kind ``"audio"`` that produce
``av.AudioFrame`` s in the shape aiortc's Opus encoder wants: signed 16-bit,
mono, 48 kHz (Opus always codes at 48 kHz, RFC 7587 section 4), 20 ms per frame,
``pts`` counting samples with ``time_base = 1/48000``.

* :class:`ToneTrack` — a sine tone, with marker chirps for latency measurement.
* :class:`FileTrack` — any file PyAV (FFmpeg) decodes, resampled to 48 kHz.
* :class:`~qcall.call.audio_devices.MicrophoneTrack` — a PortAudio input
  device through pyaudio.

Sinks consume a (remote) track: ``addTrack(track)``, ``await start()``,
``await stop()``, like aiortc's ``MediaRecorder``.

* :class:`WavRecorder` — writes a mono 48 kHz 16-bit WAV and notes when each
  frame arrived, for :func:`qcall.call.audio_analysis.one_way_latencies`.
* :class:`~qcall.call.audio_devices.SpeakerSink` — a PortAudio output device
  through pyaudio.

:func:`open_source` and :func:`open_sink` turn the call command's flags
(:func:`add_media_arguments`) into one of these. Devices live in
:mod:`qcall.call.audio_devices`, imported only when one is asked for, since
pyaudio is optional (``pip install 'qcall[audio]'``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import os
import struct
import time
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from qcall.call.audio_analysis import (
    SAMPLE_RATE,
    FloatArray,
    FrameArrival,
    Int16Array,
    ToneGenerator,
)
from qcall.call.media_args import add_media_arguments
from qcall.exceptions import ConfigError, MediaError

__all__ = [
    "PTIME",
    "SAMPLES_PER_FRAME",
    "FileTrack",
    "ToneTrack",
    "TrackSink",
    "UnityGainTrack",
    "WavRecorder",
    "add_media_arguments",
    "make_frame",
    "mono_resampler",
    "open_sink",
    "open_source",
    "read_wav",
    "stereo_frame",
]

logger = logging.getLogger(__name__)

#: Packetization time: 20 ms, the Opus default (RFC 7587 section 4.2).
PTIME = 0.020
SAMPLES_PER_FRAME = round(SAMPLE_RATE * PTIME)
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)

#: Longest run of lost audio a recorder fills with silence (larger pts jumps
#: are taken as a new timeline rather than allocating minutes of zeros).
MAX_CONCEALED_GAP = 5 * SAMPLE_RATE

#: Frames a sink still takes from its track on stop when they are ready at once.
_MAX_DRAIN_FRAMES = 256

#: The recorder rewrites its WAV header's two sizes after this much audio (and at the end).
WAV_HEADER_EVERY = SAMPLE_RATE  # 1 s
#: RIFF/WAVE header of 16-bit PCM (44 bytes): RIFF size, then the fmt and data chunks.
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")
_UINT32 = struct.Struct("<I")

# --- frames -------------------------------------------------------------------------


def make_frame(samples: Int16Array, pts: int, rate: int = SAMPLE_RATE) -> av.AudioFrame:
    """Return a mono s16 frame of ``samples`` with ``pts`` in units of ``1/rate``."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, rate)
    return frame


def mono_resampler(frame_size: int | None = None, rate: int = SAMPLE_RATE) -> av.AudioResampler:
    """Return a resampler to mono s16 at ``rate`` (in ``frame_size`` chunks if given)."""
    return av.AudioResampler(format="s16", layout="mono", rate=rate, frame_size=frame_size)


def _samples(frame: av.AudioFrame) -> Int16Array:
    """The samples of a packed s16 frame, interleaved, as one flat array (no copy).

    Read straight from the frame's buffer (which may be padded at the end):
    PyAV's ``to_ndarray`` stacks planes and costs more than the rest of a sink.
    """
    count = frame.samples * len(frame.layout.channels)
    return np.frombuffer(memoryview(frame.planes[0]), dtype=np.int16, count=count)


class _Pacer:
    """Real-time pacing: sample ``pts`` is due ``pts / rate`` s after the first frame."""

    def __init__(self, clock: Callable[[], float], rate: int = SAMPLE_RATE) -> None:
        self.clock = clock
        self.rate = rate
        self.start: float | None = None

    async def wait(self, pts: int) -> None:
        if self.start is None:
            self.start = self.clock() - pts / self.rate
            return
        delay = self.start + pts / self.rate - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)


def stereo_frame(frame: av.AudioFrame) -> av.AudioFrame:
    """Return a mono s16 ``frame`` as stereo with both channels equal (unity gain).

    aiortc's Opus encoder codes stereo and converts mono input with
    libswresample, whose mono → stereo matrix scales by 1/√2 (−3 dB). Copying
    the one channel into both keeps the level; other frames are returned as is.
    """
    if frame.layout.name != "mono" or frame.format.name != "s16":
        return frame
    samples = frame.to_ndarray().astype(np.int16, copy=False).reshape(-1)
    interleaved = np.repeat(samples, 2).reshape(1, -1)
    out = av.AudioFrame.from_ndarray(interleaved, format="s16", layout="stereo")
    out.sample_rate = frame.sample_rate
    out.pts = frame.pts
    out.time_base = frame.time_base
    return out


class UnityGainTrack(MediaStreamTrack):
    """What a call hands aiortc: ``source``'s frames as stereo (:func:`stereo_frame`).

    The sources keep producing mono (the format every sink and test
    expects); this wrapper sits only between the source and the encoder, so
    a tone at −10 dBFS arrives at −10 dBFS rather than −13.

    Args:
        source: an audio track of mono s16 frames.
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.source.recv()
        if not isinstance(frame, av.AudioFrame):
            raise MediaStreamError(f"not an audio frame: {type(frame).__name__}")
        return stereo_frame(frame)


# --- sources ------------------------------------------------------------------------


class ToneTrack(MediaStreamTrack):
    """A sine tone with optional marker chirps, at real-time pace.

    Frame ``k`` holds samples ``[k·N, (k+1)·N)`` (``N = ptime · sample_rate``)
    and is returned ``k · ptime`` seconds after the first one. When a frame
    holding the start of a chirp is returned, the chirp's send time — the
    clock reading at that moment plus the chirp's offset inside the frame — is
    appended to :attr:`chirp_send_times`.

    Args:
        freq_hz: tone frequency in Hz (0: silence between chirps).
        sample_rate: output rate; keep 48000 for Opus.
        ptime: frame duration in seconds (Opus: 2.5 … 120 ms; 20 ms default).
        amplitude: peak amplitude as a fraction of full scale, in (0, 1].
        duration: stop after this many seconds (``None``: run until stopped).
        chirp_at: times in seconds from the first sample at which to insert the
            marker chirp (:func:`~qcall.call.audio_analysis.chirp_template`).
        realtime: pace frames in real time (``False``: as fast as asked).
        clock: the clock for pacing and send times (``time.monotonic``).

    Attributes:
        chirp_offsets: sample offsets of the chirps.
        chirp_send_times: send time of each chirp sent so far.
        generator: the Sans-I/O :class:`~qcall.call.audio_analysis.ToneGenerator`.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """

    kind = "audio"

    def __init__(
        self,
        freq_hz: float,
        *,
        sample_rate: int = SAMPLE_RATE,
        ptime: float = PTIME,
        amplitude: float = 0.3,
        duration: float | None = None,
        chirp_at: Sequence[float] | None = None,
        realtime: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not 0.0025 <= ptime <= 0.120:
            raise ValueError(f"ptime: {ptime!r} s is outside [0.0025, 0.120] s")
        samples = ptime * sample_rate
        if abs(samples - round(samples)) > 1e-6:
            raise ValueError(f"ptime: {ptime!r} s is not a whole number of samples")
        if duration is not None and duration <= 0:
            raise ValueError(f"duration: {duration!r} s must be positive")
        if chirp_at and any(t < 0 for t in chirp_at):
            raise ValueError("chirp_at: times must not be negative")
        self.chirp_offsets = sorted(round(t * sample_rate) for t in chirp_at or ())
        self.generator = ToneGenerator(
            freq_hz,
            sample_rate=sample_rate,
            amplitude=amplitude,
            chirp_offsets=self.chirp_offsets,
        )
        self.sample_rate = sample_rate
        self.samples_per_frame = round(samples)
        self.total_samples = None if duration is None else round(duration * sample_rate)
        self.chirp_send_times: list[float] = []
        self._clock = clock
        self._pacer = _Pacer(clock, sample_rate) if realtime else None
        self._pts = 0

    @property
    def chirp(self) -> FloatArray:
        """The chirp template (float samples in [-1, 1]) to search for."""
        return self.generator.chirp

    @property
    def seconds_sent(self) -> float:
        """Audio handed to the sender so far, in seconds."""
        return self._pts / self.sample_rate

    async def recv(self) -> av.AudioFrame:
        """Return the next frame; raise ``MediaStreamError`` once stopped or done."""
        if self.readyState != "live":
            raise MediaStreamError
        pts = self._pts
        count = self.samples_per_frame
        if self.total_samples is not None:
            count = min(count, self.total_samples - pts)
            if count <= 0:
                self.stop()
                raise MediaStreamError
        if self._pacer is not None:
            await self._pacer.wait(pts)
        frame = make_frame(self.generator.render(pts, count), pts, self.sample_rate)
        self._pts = pts + count
        now = self._clock()
        for offset in self.generator.chirps_in(pts, count):
            self.chirp_send_times.append(now + (offset - pts) / self.sample_rate)
        return frame


class FileTrack(MediaStreamTrack):
    """Audio from any file FFmpeg decodes, resampled to mono 48 kHz s16, 20 ms frames.

    The file is opened, and its first audio frame decoded, in the constructor,
    so a missing or unreadable file fails at once with :class:`MediaError`.
    A decoding error later ends the track (logged as a warning).

    Args:
        path: a local file (WAV, FLAC, Ogg/Opus, MP3, M4A, …).
        loop: start again from the beginning at the end of the file.
        realtime: pace frames in real time (``False``: as fast as asked).
        clock: the clock for pacing.

    Raises:
        MediaError: the file does not exist, is not media, or has no audio.
    """

    kind = "audio"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        loop: bool = False,
        realtime: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.exists():
            raise MediaError(f"--input {self.path}: no such file")
        if self.path.is_dir():
            raise MediaError(f"--input {self.path}: is a directory")
        try:
            self._container: Any = av.open(str(self.path), mode="r")
        except (OSError, av.FFmpegError) as exc:
            raise MediaError(f"--input {self.path}: cannot read it as media ({exc})") from exc
        if not self._container.streams.audio:
            self._container.close()
            raise MediaError(f"--input {self.path}: the file has no audio stream")
        self._stream = self._container.streams.audio[0]
        self._looping = loop
        self._pacer = _Pacer(clock) if realtime else None
        self._pending: collections.deque[av.AudioFrame] = collections.deque()
        self._eof = False
        self._pts = 0
        self._samples_decoded = 0
        self._start_decoding()
        try:
            self._fill()
        except MediaError:
            self._container.close()
            raise
        if not self._pending:
            self._container.close()
            raise MediaError(f"--input {self.path}: the audio stream holds no samples")

    def _start_decoding(self) -> None:
        self._decoder = self._container.decode(self._stream)
        self._resampler = mono_resampler(SAMPLES_PER_FRAME)

    def _fill(self) -> None:
        """Decode until a 48 kHz frame is pending or the file ends."""
        while not self._pending and not self._eof:
            try:
                frame = next(self._decoder)
            except StopIteration:
                self._pending.extend(self._resampler.resample(None))
                if self._looping and self._samples_decoded > 0:
                    self._container.seek(0)
                    self._start_decoding()
                    continue
                self._eof = True
                return
            except (av.FFmpegError, ValueError) as exc:
                raise MediaError(f"--input {self.path}: decoding failed ({exc})") from exc
            self._samples_decoded += frame.samples
            self._pending.extend(self._resampler.resample(frame))

    async def recv(self) -> av.AudioFrame:
        """Return the next frame; raise ``MediaStreamError`` at the end of the file."""
        if self.readyState != "live":
            raise MediaStreamError
        try:
            self._fill()
        except MediaError as exc:
            logger.warning("! %s; ending the input track", exc)
            self.stop()
            raise MediaStreamError from exc
        if not self._pending:
            self.stop()
            raise MediaStreamError
        frame = self._pending.popleft()
        if self._pacer is not None:
            await self._pacer.wait(self._pts)
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += frame.samples
        return frame

    def stop(self) -> None:
        super().stop()
        if self._container is not None:
            self._container.close()
            self._container = None


# --- sinks --------------------------------------------------------------------------


class TrackSink:
    """Base of the sinks: consumes one audio track in a task.

    Subclasses implement :meth:`_write` (called with the samples of each frame
    as mono s16 at ``output_rate``, 48 kHz unless a subclass changes it, in
    order) and :meth:`_close`. Frames already s16 at that rate (what aiortc's
    Opus decoder gives) are mixed to mono with numpy, bit-exact with the
    resampler's (L + R + 1) >> 1; others go through a PyAV resampler.

    Args:
        clock: the clock for arrival times (``time.monotonic``).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._track: MediaStreamTrack | None = None
        self._task: asyncio.Task[None] | None = None
        self._resampler: av.AudioResampler | None = None
        self._input_shape: tuple[str, str, int] | None = None
        self.output_rate = SAMPLE_RATE
        self._closed = False
        self.frames_received = 0
        #: The error that stopped the output (for example, a full disk); the
        #: track is still drained so that it does not pile up frames.
        self.error: MediaError | None = None

    def addTrack(self, track: MediaStreamTrack) -> None:  # noqa: N802 (aiortc's name)
        """Set the audio track to consume (one per sink)."""
        if track.kind != "audio":
            raise MediaError(f"a {type(self).__name__} takes audio tracks, not {track.kind!r}")
        if self._track is not None and self._track is not track:
            raise MediaError(f"a {type(self).__name__} takes a single track")
        self._track = track

    async def start(self) -> None:
        """Start consuming the track (in a task)."""
        if self._closed:
            raise MediaError(f"this {type(self).__name__} is already stopped")
        if self._track is not None and self._task is None:
            self._task = asyncio.ensure_future(self._run(self._track))

    async def join(self) -> None:
        """Wait until the track ends (it never does for a live remote track)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop consuming and finish the output; nothing already received is lost.

        Frames the track already holds are taken without waiting, the
        resampler is flushed, and the output is closed. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                if self._track is not None and self.error is None:
                    await self._drain(self._track)
            if self._resampler is not None and self.error is None:
                self._flush_resampler(self._clock())
        finally:
            await self._close()

    async def _run(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if self.error is not None:
                continue  # keep draining, so a remote track's queue cannot grow
            try:
                self._handle(frame, self._clock())
            except MediaError as exc:
                self.error = exc
                logger.error("! %s; discarding the rest of the call audio", exc)

    async def _drain(self, track: MediaStreamTrack) -> None:
        for _ in range(_MAX_DRAIN_FRAMES):
            if track.readyState != "live":
                return
            pending = asyncio.ensure_future(track.recv())
            await asyncio.sleep(0)
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, MediaStreamError):
                    await pending
                return
            try:
                frame = pending.result()
            except MediaStreamError:
                return
            self._handle(frame, self._clock())

    def _handle(self, frame: Any, arrival: float) -> None:
        if not isinstance(frame, av.AudioFrame):
            return
        self.frames_received += 1
        pts = frame.pts
        seconds = None
        time_base = frame.time_base
        if pts is not None and time_base is not None:
            if not isinstance(time_base, fractions.Fraction):  # PyAV gives a Fraction
                time_base = fractions.Fraction(time_base.numerator, time_base.denominator)
            seconds = pts * time_base
        # A resampler is bound to its first input's format (PyAV even passes
        # later frames through untouched when the first needed no work), so
        # a new input format gets a new resampler, after flushing the old one.
        shape = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is not None and shape != self._input_shape:
            self._flush_resampler(arrival)
        self._input_shape = shape
        direct = self._direct(frame)
        if direct is not None:
            converted = [direct]
        else:
            if self._resampler is None:
                self._resampler = mono_resampler(rate=self.output_rate)
            converted = [_samples(out) for out in self._resampler.resample(frame)]
        self._timeline(seconds, fractions.Fraction(frame.samples, frame.sample_rate))
        for samples in converted:
            self._write(samples, pts, arrival)

    def _direct(self, frame: av.AudioFrame) -> Int16Array | None:
        """The frame as mono s16 at ``output_rate`` without a resampler, when exact."""
        if frame.format.name != "s16" or frame.sample_rate != self.output_rate:
            return None
        layout = frame.layout.name
        if layout == "mono":
            return _samples(frame)
        if layout != "stereo":
            return None
        pairs = _samples(frame).reshape(-1, 2)
        mixed = pairs[:, 0].astype(np.int32)
        mixed += pairs[:, 1]
        mixed += 1
        mixed >>= 1
        return mixed.astype(np.int16)

    def _flush_resampler(self, arrival: float) -> None:
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                self._write(_samples(out), None, arrival)
            self._resampler = None

    def _timeline(self, seconds: fractions.Fraction | None, duration: fractions.Fraction) -> None:
        """Hook: called with each frame's pts and duration in seconds before it is written."""

    def _write(self, samples: Int16Array, pts: int | None, arrival: float) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class WavRecorder(TrackSink):
    """Write a received audio track to a WAV file (mono, 48 kHz, 16-bit).

    The file is created (mode 0600: it holds a private conversation) in the
    constructor. Each frame is written to the file (no buffer in this
    process) when it arrives; the header's sizes are rewritten (``pwrite``,
    no seek) after every :data:`WAV_HEADER_EVERY` samples and at the end, so
    even a crash leaves a playable file, missing at most the last second
    from its header. When the
    frame timestamps jump forward (packets lost), the gap is filled with
    silence, up to :data:`MAX_CONCEALED_GAP`, so the recording keeps the
    sender's timeline.

    Args:
        path: the WAV file to write (replaced if it exists).
        clock: the clock for arrival times (``time.monotonic``).

    Attributes:
        arrivals: a :class:`~qcall.call.audio_analysis.FrameArrival` for each
            frame written, in order, for latency analysis.
        samples_written: samples in the file so far (including concealment).
        concealed_samples: silence inserted for lost packets.

    Raises:
        MediaError: the file cannot be created.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(clock=clock)
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise MediaError(f"--output {self.path}: cannot create it ({exc.strerror})") from exc
        self._fd: int | None = fd
        self.arrivals: list[FrameArrival] = []
        self.samples_written = 0
        self.concealed_samples = 0
        self._next_seconds: fractions.Fraction | None = None
        self._header_at = 0  # samples_written when the header was last written
        try:  # the header now, so the file is valid from the start
            self._write_all(self._header(0))
        except MediaError as exc:  # kept like any write error: the track is still drained
            self.error = exc
            logger.error("! %s; discarding the call audio", exc)

    @property
    def duration(self) -> float:
        """Seconds of audio in the file so far."""
        return self.samples_written / SAMPLE_RATE

    def _timeline(self, seconds: fractions.Fraction | None, duration: fractions.Fraction) -> None:
        if seconds is None:
            return
        if self._next_seconds is not None:
            gap = round((seconds - self._next_seconds) * SAMPLE_RATE)
            if 0 < gap <= MAX_CONCEALED_GAP:
                self._write_bytes(bytes(2 * gap))
                self.samples_written += gap
                self.concealed_samples += gap
        self._next_seconds = seconds + duration

    @staticmethod
    def _header(samples: int) -> bytes:
        data = min(2 * samples, 0xFFFFFFFF - 36)  # a WAV holds at most 4 GiB
        rate = SAMPLE_RATE
        return _WAV_HEADER.pack(
            b"RIFF", 36 + data, b"WAVE", b"fmt ", 16, 1, 1, rate, 2 * rate, 2, 16, b"data", data
        )

    def _write_all(self, data: bytes, at: int | None = None) -> None:
        """Write ``data`` (at offset ``at``: ``pwrite``, the position unmoved)."""
        if self._fd is None:
            raise MediaError(f"--output {self.path}: already closed")
        view = memoryview(data)
        try:
            while view:
                done = os.write(self._fd, view) if at is None else os.pwrite(self._fd, view, at)
                view = view[done:]
                at = None if at is None else at + done
        except OSError as exc:
            raise MediaError(f"--output {self.path}: write failed ({exc.strerror})") from exc

    def _write_bytes(self, data: bytes) -> None:
        self._write_all(data)
        if self.samples_written + len(data) // 2 - self._header_at >= WAV_HEADER_EVERY:
            self._patch_header(self.samples_written + len(data) // 2)

    def _patch_header(self, samples: int) -> None:
        header = self._header(samples)
        self._write_all(header[4:8], 4)  # RIFF chunk size
        self._write_all(header[40:44], 40)  # data chunk size
        self._header_at = samples

    def _write(self, samples: Int16Array, pts: int | None, arrival: float) -> None:
        if samples.size == 0:
            return
        self._write_bytes(samples.astype("<i2", copy=False).tobytes())
        self.arrivals.append(FrameArrival(pts, self.samples_written, samples.size, arrival))
        self.samples_written += samples.size

    async def _close(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            if self.error is None and self._header_at != self.samples_written:
                self._patch_header(self.samples_written)
        except MediaError as exc:
            self.error = exc
            logger.error("! %s", exc)
        finally:
            self._fd = None
            os.close(fd)
        logger.info(
            "= recorded %.2f s to %s (%d frames, %d samples concealed)",
            self.duration,
            self.path,
            self.frames_received,
            self.concealed_samples,
        )


# --- files --------------------------------------------------------------------------


def read_wav(path: str | os.PathLike[str]) -> tuple[Int16Array, int]:
    """Read a 16-bit PCM WAV file; return ``(mono int16 samples, sample rate)``.

    Multi-channel files are averaged to mono.

    Raises:
        MediaError: the file is missing, not WAV, or not 16-bit PCM.
    """
    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise MediaError(f"{path}: sample width {wav.getsampwidth()} bytes, expected 2")
            channels = wav.getnchannels()
            rate = wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise MediaError(f"{path}: not a readable WAV file ({exc})") from exc
    samples = np.frombuffer(data, dtype="<i2")
    if channels > 1:
        usable = samples[: samples.size - samples.size % channels]
        mixed = usable.reshape(-1, channels).astype(np.int32).mean(axis=1)
        return np.round(mixed).astype(np.int16), rate
    return samples.astype(np.int16), rate


# --- command-line glue --------------------------------------------------------------

# ``add_media_arguments`` lives in the light :mod:`qcall.call.media_args` (so that
# ``qcall --help`` does not import aiortc); it is re-exported here.


def _pick(args: object | None, name: str, value: Any) -> Any:
    if value is not None:
        return value
    return getattr(args, name, None) if args is not None else None


def open_source(
    args: object | None = None,
    *,
    tone: float | None = None,
    input: str | os.PathLike[str] | None = None,
    input_device: int | str | None = None,
    chirp_at: Sequence[float] | None = None,
) -> MediaStreamTrack:
    """Open the audio source the flags ask for (default: the default microphone).

    Args:
        args: an object with ``tone``, ``input``, ``input_device`` attributes
            (an ``argparse.Namespace``); keywords given here take precedence.
        tone: test tone frequency in Hz.
        input: a media file.
        input_device: an input device index or name (``--mic``).
        chirp_at: for a tone, marker chirp times (see :class:`ToneTrack`).

    Raises:
        ConfigError: more than one source was asked for, or a bad tone.
        MediaError: the file or device cannot be used (the message says what
            to do instead, for example when this machine has no sound device).
    """
    tone = _pick(args, "tone", tone)
    path = _pick(args, "input", input)
    device = _pick(args, "input_device", input_device)
    flags = (("--tone", tone), ("--input", path), ("--mic", device))
    chosen = [flag for flag, value in flags if value is not None]
    if len(chosen) > 1:
        raise ConfigError(f"choose one audio source, not {' and '.join(chosen)}")
    if tone is not None:
        try:
            return ToneTrack(float(tone), chirp_at=chirp_at)
        except ValueError as exc:
            raise ConfigError(f"--tone {tone}: {exc}") from exc
    if path is not None:
        return FileTrack(path)
    from qcall.call.audio_devices import MicrophoneTrack

    return MicrophoneTrack(device)


def open_sink(
    args: object | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    output_device: int | str | None = None,
) -> TrackSink:
    """Open the audio sink the flags ask for (default: the default speaker).

    Args:
        args: an object with ``output`` and ``output_device`` attributes;
            keywords given here take precedence.
        output: a WAV file to record to (must end in ``.wav``).
        output_device: an output device index or name (``--speaker``).

    Raises:
        ConfigError: both were given, or ``output`` does not end in ``.wav``.
        MediaError: the file or device cannot be used.
    """
    path = _pick(args, "output", output)
    device = _pick(args, "output_device", output_device)
    if path is not None and device is not None:
        raise ConfigError("choose one audio sink, not --output and --speaker")
    if path is not None:
        if Path(path).suffix.lower() != ".wav":
            raise ConfigError(f"--output {path}: only WAV is written; name the file *.wav")
        return WavRecorder(path)
    from qcall.call.audio_devices import SpeakerSink

    return SpeakerSink(device)
