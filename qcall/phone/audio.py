"""The phone's audio controls: mute, hold, volume, level meters, ringtone and ringback.

Each control is a small :class:`aiortc.MediaStreamTrack` wrapper, so the call
itself (:class:`~qcall.call.session.CallSession`) is unchanged:

* :class:`ControlledSource` wraps the microphone (or file, or tone): it measures
  the input level and sends silence while muted or on hold;
* :class:`ControlledPlayback` wraps the remote track before the speaker: it
  applies the volume (a gain, clipped to 16 bits), measures the output level and
  plays silence while on hold;
* :class:`RingTrack` is a ringtone (incoming) or ringback (outgoing) cadence,
  generated sample by sample (:func:`cadence`) and paced in real time;
* :class:`DiscardSink` consumes a track when there is no speaker, so that the
  remote track's queue never grows and the meters keep moving.

Hold is local (docs/phone.md): this end stops sending and playing audio; the
peer hears silence and the call, its keys and its rekeys go on.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable, Sequence
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.frame import Frame
from av.packet import Packet

from qcall.call.audio_analysis import SAMPLE_RATE
from qcall.call.media import SAMPLES_PER_FRAME, TrackSink, make_frame

__all__ = [
    "RINGBACK",
    "RINGTONE",
    "Cadence",
    "ControlledPlayback",
    "ControlledSource",
    "DiscardSink",
    "RingTrack",
    "cadence",
    "frame_rms",
]

#: A ring pattern: ``(frequencies in Hz, seconds)`` segments, repeated; no
#: frequencies is silence.
Cadence = Sequence[tuple[tuple[float, ...], float]]

#: What the caller hears while the callee's phone rings: 425 Hz, 1 s on, 4 s off
#: (the ringing tone of ETSI ES 201 970 / ITU-T E.180 in most of Europe).
RINGBACK: Cadence = (((425.0,), 1.0), ((), 4.0))
#: What the callee hears: two short bursts of a two-tone warble, then a pause.
RINGTONE: Cadence = (
    ((880.0, 1175.0), 0.4),
    ((), 0.2),
    ((880.0, 1175.0), 0.4),
    ((), 2.0),
)

#: Largest volume (gain) the controls allow; 1.0 is unity.
MAX_VOLUME = 2.0


def cadence(pattern: Cadence, start: int, count: int, *, amplitude: float = 0.25,
            rate: int = SAMPLE_RATE) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Samples ``[start, start + count)`` of ``pattern`` repeated forever (mono s16).

    The output depends only on the sample index, so frames join without clicks.
    """
    bounds = []
    at = 0
    for freqs, seconds in pattern:
        length = round(seconds * rate)
        bounds.append((at, at + length, freqs))
        at += length
    if at <= 0:
        raise ValueError("a cadence must last longer than zero seconds")
    n = np.arange(start, start + count, dtype=np.int64)
    phase = n % at
    out = np.zeros(count, dtype=np.float64)
    for begin, end, freqs in bounds:
        inside = (phase >= begin) & (phase < end)
        for freq in freqs:
            out[inside] += np.sin(2 * np.pi * freq * n[inside] / rate) / len(freqs)
    return np.round(out * amplitude * 32767).astype(np.int16)


def frame_rms(frame: av.AudioFrame) -> float:
    """RMS level of a frame, full scale = 1.0."""
    data = frame.to_ndarray()
    if data.size == 0:
        return 0.0
    scale = 32768.0 if data.dtype == np.int16 else 1.0
    values = data.astype(np.float64) / scale
    return float(np.sqrt(np.mean(values * values)))


def _replace_samples(frame: av.AudioFrame, data: np.ndarray[Any, Any]) -> av.AudioFrame:
    out = av.AudioFrame.from_ndarray(data, format=frame.format.name, layout=frame.layout.name)
    out.sample_rate = frame.sample_rate
    out.pts = frame.pts
    if frame.time_base is not None:
        out.time_base = frame.time_base
    return out


class _Controlled(MediaStreamTrack):
    """An audio track that passes ``inner``'s frames through :meth:`_process`."""

    kind = "audio"

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__()
        self.inner = inner
        self.held = False
        #: RMS level of the last frame (see the subclass for which side), full scale 1.0.
        self.level = 0.0

    async def recv(self) -> Frame | Packet[Any]:
        frame = await self.inner.recv()
        return self._process(frame) if isinstance(frame, av.AudioFrame) else frame

    def _process(self, frame: av.AudioFrame) -> av.AudioFrame:
        raise NotImplementedError

    def stop(self) -> None:
        super().stop()
        self.inner.stop()


def _silence(frame: av.AudioFrame) -> av.AudioFrame:
    return _replace_samples(frame, np.zeros_like(frame.to_ndarray()))


class ControlledSource(_Controlled):
    """The audio this phone sends: ``inner`` with a level meter, mute and hold.

    ``level`` is the microphone's, before muting (the meter moves while muted).

    Args:
        inner: the real source (microphone, file, tone).
    """

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__(inner)
        self.muted = False

    def _process(self, frame: av.AudioFrame) -> av.AudioFrame:
        self.level = frame_rms(frame)
        return _silence(frame) if self.muted or self.held else frame


class ControlledPlayback(_Controlled):
    """The audio this phone plays: the remote ``inner`` track with volume, meter and hold.

    ``level`` is what is played, after the volume.

    Args:
        inner: the remote track of the call.
    """

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__(inner)
        self.volume = 1.0

    def _process(self, frame: av.AudioFrame) -> av.AudioFrame:
        if self.held:
            self.level = 0.0
            return _silence(frame)
        if self.volume != 1.0:
            data = frame.to_ndarray()
            if data.dtype == np.int16:
                scaled = np.clip(np.round(data.astype(np.float64) * self.volume), -32768, 32767)
                frame = _replace_samples(frame, scaled.astype(np.int16))
            else:
                frame = _replace_samples(frame, (data * self.volume).astype(data.dtype))
        self.level = frame_rms(frame)
        return frame


class RingTrack(MediaStreamTrack):
    """A ring pattern as an endless audio track, paced in real time (20 ms frames).

    Args:
        pattern: :data:`RINGTONE` or :data:`RINGBACK` (or another cadence).
        clock: monotonic seconds.
    """

    kind = "audio"

    def __init__(
        self, pattern: Cadence, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.pattern = tuple(pattern)
        cadence(self.pattern, 0, 1)  # check it once, here
        self._clock = clock
        self._pts = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = self._clock()
        delay = self._start + self._pts / SAMPLE_RATE - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = make_frame(cadence(self.pattern, self._pts, SAMPLES_PER_FRAME), self._pts)
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._pts += SAMPLES_PER_FRAME
        return frame


class DiscardSink(TrackSink):
    """A sink that plays nothing: it keeps a track drained when there is no speaker."""

    def _write(self, samples: Any, pts: int | None, arrival: float) -> None:
        pass

    async def _close(self) -> None:
        pass
