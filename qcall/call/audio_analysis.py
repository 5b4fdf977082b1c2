"""Pure audio helpers: tone and chirp synthesis, spectrum and latency analysis.

Nothing here does I/O or touches the clock: every function takes sample arrays
(``numpy`` int16 or float) and plain numbers, so the same code serves the live
tracks in :mod:`qcall.call.media`, the tests and the latency harness.

One-way latency is measured the way a loop-back test on real hardware is:
the sender replaces its test tone by a short, windowed linear sweep (a
*chirp*) at known sample offsets and notes the clock time at which each chirp
left the track; the receiver notes the arrival time of every decoded frame; a
matched filter (cross-correlation with the chirp, computed with the FFT) finds
each chirp in the received audio to the sample; the arrival time of the frame
holding it, plus its offset inside that frame, minus the send time, is the
latency.
docs/audio.md describes the method and its accuracy.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "CHIRP_DURATION",
    "CHIRP_F0",
    "CHIRP_F1",
    "SAMPLE_RATE",
    "FrameArrival",
    "ToneGenerator",
    "chirp_template",
    "find_chirps",
    "is_silent",
    "one_way_latencies",
    "peak_frequency",
    "receive_time",
    "received_audio_summary",
    "rms_dbfs",
    "to_float",
]

FloatArray = npt.NDArray[np.float64]
Int16Array = npt.NDArray[np.int16]

#: Opus (RFC 6716, section 2) always runs at 48 kHz internally; so do we.
SAMPLE_RATE = 48000

#: Default marker chirp: a 10 ms linear sweep from 1 kHz to 6 kHz. A 5 kHz sweep
#: gives a correlation peak about 0.2 ms wide and survives Opus at voice bitrates.
CHIRP_DURATION = 0.010
CHIRP_F0 = 1000.0
CHIRP_F1 = 6000.0

#: Full scale of signed 16-bit samples.
_FULL_SCALE = 32768.0


def _check_rate(rate: int) -> None:
    if not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"rate: expected a positive integer, got {rate!r}")


def to_float(samples: npt.ArrayLike) -> FloatArray:
    """Return ``samples`` as a 1-D float64 array scaled to [-1, 1].

    Integer arrays are scaled by their full scale (int16: 32768); float arrays
    are taken as already scaled.

    Raises:
        ValueError: ``samples`` is not one-dimensional.
    """
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValueError(f"samples: expected a 1-D array, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        scale = float(np.iinfo(array.dtype).max) + 1.0
        return array.astype(np.float64) / scale
    return array.astype(np.float64)


def chirp_template(
    rate: int = SAMPLE_RATE,
    *,
    duration: float = CHIRP_DURATION,
    f0: float = CHIRP_F0,
    f1: float = CHIRP_F1,
) -> FloatArray:
    """Return a unit-amplitude linear sweep from ``f0`` to ``f1`` Hz.

    The sweep is shaped by a Tukey window (25 % cosine tapers) so it starts and
    ends at zero without clicks that would smear the spectrum.

    Args:
        rate: sample rate in Hz.
        duration: length in seconds.
        f0: start frequency in Hz.
        f1: end frequency in Hz (below ``rate / 2``).

    Returns:
        ``round(duration * rate)`` float64 samples in [-1, 1].

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """
    _check_rate(rate)
    length = round(duration * rate)
    if length < 16:
        raise ValueError(f"duration: {duration!r} s gives fewer than 16 samples")
    nyquist = rate / 2
    for name, freq in (("f0", f0), ("f1", f1)):
        if not 0 < freq < nyquist:
            raise ValueError(f"{name}: {freq!r} Hz is outside (0, {nyquist:g}) Hz")
    t = np.arange(length, dtype=np.float64) / rate
    k = (f1 - f0) / duration
    chirp = np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))
    taper = max(1, length // 8)  # 1/8 each side = 25 % Tukey window
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(taper) / taper)
    chirp[:taper] *= ramp
    chirp[-taper:] *= ramp[::-1]
    return chirp


class ToneGenerator:
    """Sans-I/O source of a sine tone with marker chirps at given sample offsets.

    Sample ``n`` of the output is ``amplitude * sin(2π f n / rate)``, except in
    ``[c, c + len(chirp))`` for each chirp offset ``c``, where it is
    ``amplitude * chirp[n - c]``. ``render`` can be called for any range, in any
    order: the output depends only on the sample index, so frames stay
    phase-continuous and reproducible.

    Args:
        freq_hz: tone frequency in Hz (``0`` gives silence between chirps).
        sample_rate: sample rate in Hz.
        amplitude: peak amplitude as a fraction of full scale, in (0, 1].
        chirp_offsets: sample offsets at which a chirp starts.
        chirp: the chirp samples (default: :func:`chirp_template`).

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """

    def __init__(
        self,
        freq_hz: float,
        *,
        sample_rate: int = SAMPLE_RATE,
        amplitude: float = 0.3,
        chirp_offsets: Sequence[int] = (),
        chirp: FloatArray | None = None,
    ) -> None:
        _check_rate(sample_rate)
        if not 0 <= freq_hz < sample_rate / 2:
            raise ValueError(f"freq_hz: {freq_hz!r} Hz is outside [0, {sample_rate / 2:g}) Hz")
        if not 0 < amplitude <= 1:
            raise ValueError(f"amplitude: {amplitude!r} is outside (0, 1]")
        if any(c < 0 for c in chirp_offsets):
            raise ValueError("chirp_offsets: offsets must not be negative")
        self.freq_hz = float(freq_hz)
        self.sample_rate = sample_rate
        self.amplitude = float(amplitude)
        self.chirp = chirp_template(sample_rate) if chirp is None else np.asarray(chirp, float)
        self.chirp_offsets = sorted(int(c) for c in chirp_offsets)

    def chirps_in(self, start: int, count: int) -> list[int]:
        """Return the chirp offsets ``c`` with ``start <= c < start + count``."""
        lo = bisect.bisect_left(self.chirp_offsets, start)
        hi = bisect.bisect_left(self.chirp_offsets, start + count)
        return self.chirp_offsets[lo:hi]

    def render(self, start: int, count: int) -> Int16Array:
        """Return samples ``[start, start + count)`` as int16.

        Args:
            start: index of the first sample (0 is the first sample ever sent).
            count: number of samples.
        """
        if start < 0 or count < 0:
            raise ValueError(f"start/count: expected non-negative, got {start}, {count}")
        n = np.arange(start, start + count, dtype=np.float64)
        # Reduce f*n modulo the rate before scaling to radians, so the phase
        # stays exact (integer f) and the tone clean after hours of samples.
        phase = 2 * np.pi * np.mod(self.freq_hz * n, self.sample_rate) / self.sample_rate
        out = np.sin(phase)
        length = len(self.chirp)
        lo = bisect.bisect_left(self.chirp_offsets, start - length + 1)
        hi = bisect.bisect_left(self.chirp_offsets, start + count)
        for c in self.chirp_offsets[lo:hi]:
            a = max(c, start)
            b = min(c + length, start + count)
            out[a - start : b - start] = self.chirp[a - c : b - c]
        scaled = np.round(out * self.amplitude * (_FULL_SCALE - 1))
        return scaled.astype(np.int16)


def rms_dbfs(samples: npt.ArrayLike) -> float:
    """Return the RMS level of ``samples`` in dB relative to full scale.

    A full-scale sine is -3.01 dBFS; digital silence is ``-inf``.
    """
    x = to_float(samples)
    if x.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(x * x)))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def is_silent(samples: npt.ArrayLike, *, threshold_dbfs: float = -60.0) -> bool:
    """Return whether ``samples`` stay below ``threshold_dbfs`` RMS.

    -60 dBFS is about 33 LSB RMS in 16 bits: the level of a quiet room through a
    cheap microphone is well above it; decoded Opus silence is well below.
    """
    return rms_dbfs(samples) < threshold_dbfs


def peak_frequency(samples: npt.ArrayLike, rate: int) -> float:
    """Return the frequency in Hz of the strongest spectral component.

    The signal is Hann-windowed; the peak bin is refined by fitting a parabola
    through the log magnitudes of the peak and its two neighbours (Gaussian
    interpolation), which is accurate to a small fraction of a bin
    (``rate / len(samples)`` Hz) for a steady tone.

    Args:
        samples: 1-D samples (int16 or float).
        rate: sample rate in Hz.

    Raises:
        ValueError: fewer than 4 samples, or a bad ``rate``.
    """
    _check_rate(rate)
    x = to_float(samples)
    if x.size < 4:
        raise ValueError(f"samples: need at least 4 samples, got {x.size}")
    x = x - x.mean()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    spectrum[0] = 0.0
    k = int(np.argmax(spectrum))
    delta = 0.0
    if 0 < k < spectrum.size - 1:
        a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-300)
        denominator = a - 2 * b + c
        if denominator < 0:
            delta = 0.5 * (a - c) / denominator
    return float((k + delta) * rate / x.size)


def _correlate_valid(x: FloatArray, t: FloatArray, block: int = 1 << 15) -> FloatArray:
    """Return ``r[k] = Σ_j x[k + j] t[j]`` for ``k in [0, len(x) - len(t)]``.

    Overlap-save: blocks of ``n_fft`` input samples give ``n_fft - len(t) + 1``
    outputs each, so memory stays bounded and the FFTs stay in cache however
    long the recording is.
    """
    length = t.size
    n_out = x.size - length + 1
    n_fft = max(block, 1 << (2 * length).bit_length())
    step = n_fft - length + 1
    template = np.conj(np.fft.rfft(t, n_fft))
    out = np.empty(n_out)
    for start in range(0, n_out, step):
        count = min(step, n_out - start)
        segment = np.fft.irfft(np.fft.rfft(x[start : start + n_fft], n_fft) * template, n_fft)
        out[start : start + count] = segment[:count]
    return out


def find_chirps(
    samples: npt.ArrayLike,
    rate: int,
    chirp_template: npt.ArrayLike,
    *,
    threshold: float = 0.5,
    min_distance: int | None = None,
) -> list[int]:
    """Find the start offsets of a chirp in ``samples`` by normalized cross-correlation.

    The cross-correlation ``r[k] = Σ_j x[k + j] t[j]`` is computed with the FFT
    (overlap-save, O(n log L)) and normalized by the energy of the template and of the
    window ``x[k : k + L]``, which gives a coefficient in [-1, 1] that does not
    depend on the level of the received signal. Local maxima above
    ``threshold`` are kept, strongest first, at least ``min_distance`` apart.

    Args:
        samples: 1-D received samples (int16 or float).
        rate: sample rate in Hz (used only to validate the input).
        chirp_template: the chirp as sent, at the same rate.
        threshold: minimum normalized correlation, in (0, 1].
        min_distance: minimum spacing of two detections in samples
            (default: the template length).

    Returns:
        Sample offsets where a chirp starts, ascending.

    Raises:
        ValueError: bad ``rate``, ``threshold`` or array shapes.
    """
    _check_rate(rate)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: {threshold!r} is outside (0, 1]")
    x = to_float(samples)
    t = to_float(chirp_template)
    length = t.size
    if length == 0:
        raise ValueError("chirp_template: empty")
    if x.size < length:
        return []
    n_out = x.size - length + 1
    corr = _correlate_valid(x, t)
    cumulative = np.concatenate(([0.0], np.cumsum(x * x)))
    window_energy = np.maximum(cumulative[length:] - cumulative[:n_out], 0.0)
    template_norm = float(np.sqrt(np.dot(t, t)))
    # The floor keeps digital silence (zero energy) from dividing by zero and
    # keeps sub-LSB noise from matching.
    floor = template_norm * math.sqrt(length) * 1e-6
    ncc = corr / (template_norm * np.sqrt(window_energy) + floor)

    padded = np.concatenate(([-np.inf], ncc, [-np.inf]))
    is_peak = (padded[1:-1] >= padded[:-2]) & (padded[1:-1] > padded[2:]) & (ncc >= threshold)
    candidates = np.flatnonzero(is_peak)
    order = candidates[np.argsort(-ncc[candidates], kind="stable")]
    distance = length if min_distance is None else int(min_distance)
    accepted: list[int] = []
    for k in order.tolist():
        i = bisect.bisect_left(accepted, k)
        if i > 0 and k - accepted[i - 1] < distance:
            continue
        if i < len(accepted) and accepted[i] - k < distance:
            continue
        accepted.insert(i, k)
    return accepted


@dataclass(frozen=True)
class FrameArrival:
    """When a received audio frame reached the application, and where it went.

    Attributes:
        pts: the frame's presentation timestamp as received (``None`` if absent).
        sample_offset: index in the recording of the frame's first sample.
        samples: number of samples the frame contributed to the recording.
        arrival_time: clock time (seconds) at which the frame was received.
    """

    pts: int | None
    sample_offset: int
    samples: int
    arrival_time: float


def receive_time(arrivals: Sequence[FrameArrival], sample_offset: int, rate: int) -> float:
    """Return the time at which recorded sample ``sample_offset`` was received.

    That is the arrival time of the frame holding the sample plus the sample's
    position inside the frame (``(sample_offset - frame.sample_offset) / rate``),
    the same convention :class:`qcall.call.media.ToneTrack` uses for send times.

    Args:
        arrivals: frame arrivals, ascending by ``sample_offset``.
        sample_offset: a sample index in the recording.
        rate: sample rate of the recording.

    Raises:
        ValueError: no frame holds that sample (for example, it lies in
            silence inserted for lost packets).
    """
    _check_rate(rate)
    starts = [a.sample_offset for a in arrivals]
    i = bisect.bisect_right(starts, sample_offset) - 1
    if i < 0 or sample_offset >= arrivals[i].sample_offset + arrivals[i].samples:
        raise ValueError(f"sample_offset: {sample_offset} is not inside any received frame")
    frame = arrivals[i]
    return frame.arrival_time + (sample_offset - frame.sample_offset) / rate


def one_way_latencies(
    send_times: Sequence[float],
    arrivals: Sequence[FrameArrival],
    chirp_offsets: Sequence[int],
    rate: int,
    *,
    max_latency: float = 1.0,
) -> list[float]:
    """Return the one-way latency of each received chirp, in seconds.

    Each detected chirp (``chirp_offsets``, from :func:`find_chirps`) gets a
    receive time from :func:`receive_time` and is matched with the latest send
    time not after it, each send time used at most once. Chirps with no send
    time within ``max_latency`` before them (false detections, or chirps
    falling into concealment silence) are skipped, so chirps must be spaced
    further apart than the largest latency to be measured. Both times must come
    from the same clock (one process, or hosts with synchronised clocks).

    Args:
        send_times: send time of each chirp (``ToneTrack.chirp_send_times``).
        arrivals: frame arrivals of the recording (``WavRecorder.arrivals``).
        chirp_offsets: chirp start offsets found in the recording.
        rate: sample rate of the recording.
        max_latency: largest latency accepted, in seconds.

    Returns:
        Latencies in seconds, in the order of ``chirp_offsets``.
    """
    sends = sorted(send_times)
    used: set[int] = set()
    latencies: list[float] = []
    for offset in sorted(chirp_offsets):
        try:
            received = receive_time(arrivals, offset, rate)
        except ValueError:
            continue
        i = bisect.bisect_right(sends, received) - 1
        while i >= 0 and i in used:
            i -= 1
        if i < 0 or received - sends[i] > max_latency:
            continue
        used.add(i)
        latencies.append(received - sends[i])
    return latencies


def received_audio_summary(
    samples: npt.ArrayLike,
    rate: int,
    arrivals: Sequence[FrameArrival],
    send_times: Sequence[float],
    tone_hz: float,
    sent_seconds: float | None,
) -> dict[str, float | int | None]:
    """The ``audio`` part of a call report: what was heard, how much, how late.

    Args:
        samples: the callee's recording (mono).
        rate: its sample rate.
        arrivals: the recording's frame arrivals (``WavRecorder.arrivals``).
        send_times: the caller's chirp send times, on the same clock.
        tone_hz: the tone the caller sent.
        sent_seconds: how much audio the caller sent, if known.

    Returns:
        ``tone_hz``, ``peak_hz``, ``sent_seconds``, ``received_seconds``,
        ``one_way_ms`` (median over the chirps found, or ``None``) and ``chirps_found``.
    """
    data = np.asarray(samples)
    found = len(data) > 0
    peak = peak_frequency(data, rate) if found else 0.0
    offsets = find_chirps(data, rate, chirp_template(rate)) if found else []
    latencies = one_way_latencies(send_times, arrivals, offsets, rate)
    median = statistics.median(latencies) if latencies else None
    return {
        "tone_hz": tone_hz,
        "peak_hz": round(float(peak), 1),
        "sent_seconds": sent_seconds,
        "received_seconds": round(len(data) / rate, 2),
        "one_way_ms": None if median is None else round(median * 1000, 1),
        "chirps_found": len(latencies),
    }
