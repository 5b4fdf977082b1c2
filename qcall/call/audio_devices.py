"""Sound devices for calls: PulseAudio natively, or PortAudio through pyaudio.

* :func:`list_devices` — what ``qcall devices`` prints.
* :class:`MicrophoneTrack` — an aiortc audio track from an input device,
  paced on a steady 20 ms clock (:class:`CapturePacer`).
* :class:`SpeakerSink` — plays a (remote) audio track on an output device.

Two device APIs (docs/audio.md, "Which audio path"):

* ``pulse`` — the sound server's own sinks and sources, through
  :mod:`qcall.call.pulse` (libpulse-simple with small buffers). Chosen when a
  PulseAudio or ``pipewire-pulse`` server answers: it adds ≈ 10 ms to a call
  where PortAudio over ALSA's ``pulse`` plugin adds 70–100 ms.
* ``portaudio`` — pyaudio, for machines without a sound server (ALSA, macOS,
  Windows). pyaudio is imported only when used; without it the classes raise
  :class:`~qcall.exceptions.MediaError` with :data:`PYAUDIO_MISSING_MESSAGE`.

``QCALL_AUDIO_API=pulse|portaudio`` forces one (default ``auto``). A device is
named by its index in ``qcall devices`` or by (part of) its name or
description (``--mic USB``). The frame format is the one of
:mod:`qcall.call.media`: mono s16 48 kHz, 20 ms.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from qcall.call.audio_analysis import SAMPLE_RATE
from qcall.call.media import (
    PTIME,
    TIME_BASE,
    TrackSink,
    make_frame,
    mono_resampler,
)
from qcall.exceptions import ConfigError, MediaError

__all__ = [
    "AUDIO_APIS",
    "NO_DEVICE_MESSAGE",
    "PYAUDIO_MISSING_MESSAGE",
    "AudioDevice",
    "CapturePacer",
    "MicrophoneTrack",
    "SpeakerSink",
    "audio_api",
    "find_device",
    "list_devices",
]

logger = logging.getLogger(__name__)

AUDIO_APIS = ("auto", "pulse", "portaudio")

#: Buffering asked of PulseAudio: the capture fragment and the playback target.
PULSE_CAPTURE_LATENCY = 0.002
PULSE_PLAYBACK_LATENCY = 0.010
#: Audio waiting for the PulseAudio writer beyond which the oldest is dropped.
PULSE_MAX_QUEUED = 0.040
#: The microphone's frame (and so Opus packet) length: 10 ms (docs/audio.md).
MIC_PTIME = 0.010

PYAUDIO_MISSING_MESSAGE = (
    "sound devices need pyaudio, which is not installed: run "
    "`apt-get install portaudio19-dev` then `pip install 'qcall[audio]'`; "
    "or use a file (--input FILE, --output FILE.wav) or a test tone (--tone HZ)"
)

NO_DEVICE_MESSAGE = (
    "no sound devices found. Use a file or a test tone instead: "
    "--input FILE (anything FFmpeg reads) or --tone HZ for the microphone, "
    "--output FILE.wav for the speaker"
)

FLAGS = {"input": "--mic", "output": "--speaker"}


def audio_api() -> str:
    """Return the device API to use: ``pulse`` or ``portaudio``.

    ``QCALL_AUDIO_API`` chooses (``auto``, the default: ``pulse`` when a sound
    server answers, else ``portaudio``).

    Raises:
        ConfigError: ``QCALL_AUDIO_API`` is not one of :data:`AUDIO_APIS`.
    """
    choice = os.environ.get("QCALL_AUDIO_API", "auto").strip().lower() or "auto"
    if choice not in AUDIO_APIS:
        raise ConfigError(f"QCALL_AUDIO_API={choice!r}: choose one of {', '.join(AUDIO_APIS)}")
    if choice != "auto":
        return choice
    from qcall.call.pulse import pulse_available

    return "pulse" if pulse_available() else "portaudio"


# --- devices (pyaudio / PortAudio) ------------------------------------------------


def _import_pyaudio() -> Any:
    """Import pyaudio lazily; raise :class:`MediaError` with install help if absent."""
    try:
        import pyaudio
    except ImportError as exc:  # ModuleNotFoundError, or libportaudio missing
        raise MediaError(PYAUDIO_MISSING_MESSAGE) from exc
    return pyaudio


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while PortAudio probes ALSA/JACK.

    PortAudio's host APIs print dozens of ``ALSA lib …`` lines straight to the
    C-level stderr when no card exists; qcall reports the outcome itself.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _open_pyaudio() -> tuple[Any, Any]:
    """Return ``(pyaudio_module, PyAudio())``; the caller must ``terminate()`` it."""
    pyaudio = _import_pyaudio()
    try:
        with _quiet_stderr():
            pa = pyaudio.PyAudio()
    except OSError as exc:
        raise MediaError(f"cannot initialise PortAudio: {exc}") from exc
    return pyaudio, pa


def _terminate(pa: Any) -> None:
    with _quiet_stderr():
        pa.terminate()


@dataclass(frozen=True)
class AudioDevice:
    """A sound device, as ``qcall devices`` lists it.

    Attributes:
        index: the number to pass to ``--mic`` / ``--speaker`` (PortAudio's
            device index, or the PulseAudio source or sink index).
        name: the device name (also accepted by ``--mic`` / ``--speaker``).
        host_api: ``PulseAudio``, or PortAudio's host API (ALSA, CoreAudio …).
        max_input_channels: 0 for an output-only device.
        max_output_channels: 0 for an input-only device.
        default_sample_rate: the device's preferred rate in Hz.
        is_default_input: the system's default input.
        is_default_output: the system's default output.
        description: the human-readable name (PulseAudio), else ``""``.
    """

    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_sample_rate: float
    is_default_input: bool = False
    is_default_output: bool = False
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def channels(self, kind: str) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels

    def is_default(self, kind: str) -> bool:
        return self.is_default_input if kind == "input" else self.is_default_output


def _default_index(pa: Any, kind: str) -> int | None:
    getter = pa.get_default_input_device_info if kind == "input" else (
        pa.get_default_output_device_info
    )
    try:
        return int(getter()["index"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _portaudio_devices(pa: Any) -> list[AudioDevice]:
    default_in = _default_index(pa, "input")
    default_out = _default_index(pa, "output")
    devices = []
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        try:
            host_api = str(pa.get_host_api_info_by_index(info["hostApi"])["name"])
        except (OSError, KeyError):
            host_api = "?"
        devices.append(
            AudioDevice(
                index=i,
                name=str(info.get("name", "?")),
                host_api=host_api,
                max_input_channels=int(info.get("maxInputChannels", 0)),
                max_output_channels=int(info.get("maxOutputChannels", 0)),
                default_sample_rate=float(info.get("defaultSampleRate", 0.0)),
                is_default_input=i == default_in,
                is_default_output=i == default_out,
            )
        )
    return devices


def _pulse_devices() -> list[AudioDevice]:
    from qcall.call.pulse import pulse_devices

    return [
        AudioDevice(
            index=d.index,
            name=d.name,
            host_api="PulseAudio",
            max_input_channels=d.channels if d.kind == "input" else 0,
            max_output_channels=d.channels if d.kind == "output" else 0,
            default_sample_rate=float(d.rate),
            is_default_input=d.is_default and d.kind == "input",
            is_default_output=d.is_default and d.kind == "output",
            description=d.description,
        )
        for d in pulse_devices()
    ]


def list_devices(api: str | None = None) -> list[AudioDevice]:
    """Return the sound devices of ``api`` (default :func:`audio_api`); empty when none.

    Raises:
        MediaError: the API is not installed (the message says how to install it).
    """
    if (api or audio_api()) == "pulse":
        return _pulse_devices()
    _, pa = _open_pyaudio()
    try:
        return _portaudio_devices(pa)
    finally:
        _terminate(pa)


def find_device(devices: list[AudioDevice], spec: int | str | None, kind: str) -> AudioDevice:
    """Pick the ``kind`` (``input``/``output``) device ``spec`` names.

    ``spec`` is ``None`` (the default device), an index (an ``int`` or a string
    of digits), or text: a device whose name is exactly that, else the one
    device whose name or description contains it, ignoring case.

    Raises:
        MediaError: no such device, several match, or it has no ``kind`` channels.
    """
    flag = FLAGS[kind]
    usable = [d for d in devices if d.channels(kind) > 0]
    if spec is None:
        defaults = [d for d in usable if d.is_default(kind)]
        if defaults:
            return defaults[0]
        if not devices:
            raise MediaError(NO_DEVICE_MESSAGE)
        raise MediaError(f"no default {kind} device; pick one with {flag} NAME (`qcall devices`)")
    text = str(spec).strip()
    if not devices:
        raise MediaError(f"{flag} {text}: {NO_DEVICE_MESSAGE}")
    if text.isdigit():
        found = [d for d in devices if d.index == int(text)]
        if not found or not any(d.channels(kind) for d in found):
            if found:
                raise MediaError(
                    f"{flag} {text} ({found[0].name}) has no {kind} channels "
                    "(`qcall devices` lists them)"
                )
            raise MediaError(f"{flag} {text}: no such device (`qcall devices` lists them)")
        return next(d for d in found if d.channels(kind))
    exact = [d for d in usable if d.name == text]
    if exact:
        return exact[0]
    folded = text.casefold()
    matches = [
        d for d in usable if folded in d.name.casefold() or folded in d.description.casefold()
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(d.name for d in matches)
        raise MediaError(f"{flag} {text!r} matches several {kind} devices: {names}; be precise")
    raise MediaError(f"{flag} {text!r}: no {kind} device by that name (`qcall devices` lists them)")


def _device_rate(pa: Any, pyaudio: Any, index: int, default_rate: float, kind: str) -> int:
    """Return 48000 if the device takes it for mono s16, else its default rate."""
    key = "input_device" if kind == "input" else "output_device"
    channels = f"{kind}_channels"
    try:
        with _quiet_stderr():
            pa.is_format_supported(
                SAMPLE_RATE, **{key: index, channels: 1, f"{kind}_format": pyaudio.paInt16}
            )
        return SAMPLE_RATE
    except ValueError:
        return round(default_rate or SAMPLE_RATE)


# --- pacing --------------------------------------------------------------------------


class CapturePacer:
    """When to hand each captured 20 ms frame to the encoder: on a steady clock.

    Sound servers and drivers deliver capture blocks in bursts (two frames at
    once, or a frame 14 ms late and the next one early). Sent as they come,
    they reach the far end as network jitter, which its jitter buffer must
    either conceal or absorb with more delay. The pacer releases frame ``k``
    at ``slot_k = base + k · period`` — or at its arrival if it comes later,
    in which case the clock restarts from that arrival (``late`` counts them;
    later frames keep the new phase, so a late frame costs one shift, not a
    gap per frame). After ``window`` frames that all waited at least
    ``tolerance``, the clock moves earlier by the smallest wait, so a past
    burst or a capture clock slightly faster than this one does not leave
    delay behind. Pure: the caller passes arrival times in, sleeps until the
    returned times.

    Args:
        period: seconds per frame (20 ms).
        window: frames over which the smallest wait is taken.
        tolerance: waits below this (seconds) are left alone.
    """

    def __init__(self, period: float = PTIME, window: int = 10, tolerance: float = 0.001) -> None:
        self.period = period
        self.window = window
        self.tolerance = tolerance
        self._next: float | None = None
        self._min_wait = float("inf")
        self._count = 0
        self.late = 0
        self.frames = 0
        self.total_wait = 0.0

    def release(self, arrival: float) -> float:
        """Return when to release the next frame, which arrived at ``arrival``."""
        slot = arrival if self._next is None else self._next
        if arrival > slot:
            if self._next is not None:
                self.late += 1
            slot = arrival
        wait = slot - arrival
        self.frames += 1
        self.total_wait += wait
        self._min_wait = min(self._min_wait, wait)
        self._count += 1
        self._next = slot + self.period
        if self._count >= self.window:
            if self._min_wait > self.tolerance:
                self._next -= self._min_wait - self.tolerance / 2
            self._min_wait, self._count = float("inf"), 0
        return slot

    @property
    def mean_wait(self) -> float:
        """Mean seconds a frame waited for its slot."""
        return self.total_wait / self.frames if self.frames else 0.0


# --- capture and playback streams ------------------------------------------------------

#: Called from a device thread with a captured block (``None``: the device
#: failed) and the monotonic time it arrived; returns False to stop capturing.
OnBlock = Callable[[bytes | None, float], bool]


class _PortAudioCapture:
    """PortAudio input: its callback thread hands over each block of ``ptime``."""

    def __init__(self, spec: int | str | None, ptime: float = PTIME) -> None:
        pyaudio, pa = _open_pyaudio()
        self._pa: Any = pa
        self._pa_continue, self._pa_complete = pyaudio.paContinue, pyaudio.paComplete
        self._on_block: OnBlock | None = None
        try:
            device = find_device(_portaudio_devices(pa), spec, "input")
            self.index, self.name = device.index, device.name
            self.rate = _device_rate(pa, pyaudio, device.index, device.default_sample_rate, "input")
            with _quiet_stderr():
                self._stream: Any = pa.open(
                    format=pyaudio.paInt16,
                    channels=1,
                    rate=self.rate,
                    input=True,
                    input_device_index=self.index,
                    frames_per_buffer=round(self.rate * ptime),
                    stream_callback=self._callback,
                    start=False,
                )
        except (OSError, ValueError) as exc:
            _terminate(pa)
            raise MediaError(f"--mic {spec}: cannot open it ({exc})") from exc
        except BaseException:
            _terminate(pa)
            raise

    def _callback(
        self, in_data: bytes | None, frame_count: int, time_info: Any, status: int
    ) -> tuple[None, int]:
        on_block = self._on_block
        if on_block is None or in_data is None or not on_block(in_data, time.monotonic()):
            return None, self._pa_complete
        return None, self._pa_continue

    def start(self, on_block: OnBlock) -> None:
        self._on_block = on_block
        try:
            with _quiet_stderr():
                self._stream.start_stream()
        except OSError as exc:
            raise MediaError(f"cannot start input device {self.name}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(OSError), _quiet_stderr():
            self._stream.stop_stream()
            self._stream.close()
        _terminate(self._pa)


class _PulseCapture:
    """A PulseAudio source read by a thread in blocks of ``ptime`` (2 ms fragments)."""

    def __init__(self, spec: int | str | None, ptime: float = PTIME) -> None:
        device = find_device(_pulse_devices(), spec, "input")
        self.index, self.name, self.rate = device.index, device.name, SAMPLE_RATE
        self.block = round(SAMPLE_RATE * ptime)
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, on_block: OnBlock) -> None:
        from qcall.call.pulse import SimpleStream

        # Opened only now: a record stream opened at dial time would hold
        # everything said while the phone rang, as delay.
        self._stream = SimpleStream(
            "record", self.name, self.rate, PULSE_CAPTURE_LATENCY, name="qcall microphone"
        )
        self._thread = threading.Thread(
            target=self._run, args=(self._stream, on_block), name="qcall-mic", daemon=True
        )
        self._thread.start()

    def _run(self, stream: Any, on_block: OnBlock) -> None:
        while not self._stopping.is_set():
            try:
                data = stream.read(self.block)
            except MediaError as exc:
                logger.error("! microphone %s: %s", self.name, exc)
                on_block(None, time.monotonic())
                return
            if not on_block(data, time.monotonic()):
                return

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(0.5)
        if self._stream is not None and (self._thread is None or not self._thread.is_alive()):
            self._stream.close()


class _PortAudioPlayback:
    """PortAudio output: its callback drains a 200 ms byte buffer, silence on underrun."""

    def __init__(self, spec: int | str | None) -> None:
        pyaudio, pa = _open_pyaudio()
        self._pa: Any = pa
        self._pa_continue = pyaudio.paContinue
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.underruns = 0
        try:
            device = find_device(_portaudio_devices(pa), spec, "output")
            self.index, self.name = device.index, device.name
            self.rate = _device_rate(
                pa, pyaudio, device.index, device.default_sample_rate, "output"
            )
            self.max_buffer = 2 * self.rate // 5  # bytes: 200 ms of mono s16
            with _quiet_stderr():
                self._stream: Any = pa.open(
                    format=pyaudio.paInt16,
                    channels=1,
                    rate=self.rate,
                    output=True,
                    output_device_index=self.index,
                    frames_per_buffer=round(self.rate * PTIME),
                    stream_callback=self._callback,
                )
        except (OSError, ValueError) as exc:
            _terminate(pa)
            raise MediaError(f"--speaker {spec}: cannot open it ({exc})") from exc
        except BaseException:
            _terminate(pa)
            raise

    def _callback(
        self, in_data: Any, frame_count: int, time_info: Any, status: int
    ) -> tuple[bytes, int]:
        wanted = 2 * frame_count
        with self._lock:
            chunk = bytes(self._buffer[:wanted])
            del self._buffer[:wanted]
        if len(chunk) < wanted:
            self.underruns += 1
            chunk += bytes(wanted - len(chunk))
        return chunk, self._pa_continue

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer += data
            excess = len(self._buffer) - self.max_buffer
            if excess > 0:
                del self._buffer[:excess]

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def close(self) -> None:
        with contextlib.suppress(OSError), _quiet_stderr():
            self._stream.stop_stream()
            self._stream.close()
        _terminate(self._pa)


class _PulsePlayback:
    """A PulseAudio sink written by a thread; at most 40 ms wait in its queue.

    The writer blocks against the server's 10 ms target, so a healthy queue
    is empty whenever the writer comes back for more. Frames that pile up
    behind a stall (a burst from the jitter buffer) would otherwise stay as
    delay for the rest of the call: when the writer has found a frame already
    waiting every time for :data:`TRIM_AFTER` frames in a row, it drops one
    (``trimmed``), and beyond two frames the oldest audio is dropped at once.

    An underrun is counted when a block reaches the thread after the server
    had played everything written before it (the server's reported latency
    says when that was): the listener heard a gap.
    """

    def __init__(self, spec: int | str | None) -> None:
        from qcall.call.pulse import SimpleStream

        device = find_device(_pulse_devices(), spec, "output")
        self.index, self.name, self.rate = device.index, device.name, SAMPLE_RATE
        self.max_buffer = round(2 * self.rate * PULSE_MAX_QUEUED)
        self.underruns = 0
        self.trimmed = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._stream = SimpleStream(
            "playback", self.name, self.rate, PULSE_PLAYBACK_LATENCY, name="qcall speaker"
        )
        self._thread = threading.Thread(target=self._run, name="qcall-speaker", daemon=True)
        self._thread.start()

    TRIM_AFTER = 10

    def _run(self) -> None:
        dry_at: float | None = None
        behind = 0
        while True:
            behind = behind + 1 if self._queue.qsize() > 1 else 0
            if behind >= self.TRIM_AFTER:  # persistently a frame behind: drop one
                behind = 0
                with contextlib.suppress(queue.Empty):
                    old = self._queue.get_nowait()
                    if old is not None:
                        with self._lock:
                            self._queued -= len(old)
                        self.trimmed += 1
                    else:
                        self._queue.put_nowait(None)
            data = self._queue.get()
            if data is None:
                with contextlib.suppress(MediaError):
                    self._stream.drain()
                return
            with self._lock:
                self._queued -= len(data)
            if dry_at is not None and time.monotonic() > dry_at:
                self.underruns += 1
            try:
                self._stream.write(data)
                dry_at = time.monotonic() + self._stream.latency()
            except MediaError as exc:
                logger.error("! speaker %s: %s", self.name, exc)
                return

    def write(self, data: bytes) -> None:
        with self._lock:
            self._queued += len(data)
            while self._queued > self.max_buffer:  # drop the oldest: no lasting delay
                try:
                    old = self._queue.get_nowait()
                except queue.Empty:
                    break
                if old is not None:
                    self._queued -= len(old)
        self._queue.put_nowait(data)

    def pending(self) -> int:
        with self._lock:
            return self._queued

    def close(self) -> None:
        self._queue.put_nowait(None)
        self._thread.join(0.5)
        if not self._thread.is_alive():
            self._stream.close()


# --- tracks and sinks ----------------------------------------------------------------


class MicrophoneTrack(MediaStreamTrack):
    """Audio from an input device, as an aiortc track of 10 ms frames on a steady clock.

    The device's thread hands each ``ptime`` block to the event loop
    (``call_soon_threadsafe``) with its arrival time; blocks wait in a bounded
    queue (1 s; the oldest is dropped if the call falls behind:
    :attr:`dropped_blocks`). Devices that refuse 48 kHz are opened at their
    default rate and resampled. :meth:`recv` releases frames on the steady
    clock of a :class:`CapturePacer` (:attr:`pacer`), so the far end sees no
    capture jitter. 10 ms frames (10 ms packets, :mod:`qcall.call.opus`) halve the fill wait.

    Args:
        device: index or name (``None``: the default input); see :func:`find_device`.
        pace: pace frames (default) or hand them on as they arrive.
        api: ``pulse`` or ``portaudio`` (default: :func:`audio_api`).
        ptime: the frame length in seconds (default :data:`MIC_PTIME`; an Opus
            frame size: 0.0025, 0.005, 0.01 or 0.02).

    Raises:
        MediaError: the API is missing, there is no such input device, or it
            cannot be opened.
    """

    kind = "audio"

    def __init__(
        self,
        device: int | str | None = None,
        *,
        pace: bool = True,
        api: str | None = None,
        ptime: float = MIC_PTIME,
    ) -> None:
        super().__init__()
        if round(SAMPLE_RATE * ptime) not in (120, 240, 480, 960):
            raise MediaError(f"ptime {ptime!r} s: use 0.0025, 0.005, 0.01 or 0.02")
        self.api = api or audio_api()
        self.ptime = ptime
        capture = (_PulseCapture if self.api == "pulse" else _PortAudioCapture)(device, ptime)
        self._capture: _PulseCapture | _PortAudioCapture = capture
        self.device_index, self.device_name = capture.index, capture.name
        self.capture_rate = capture.rate
        self.pacer = CapturePacer(ptime) if pace else None
        self._queue_blocks = round(1 / ptime)  # 1 s
        self._queue: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._resampler = mono_resampler(round(SAMPLE_RATE * ptime))
        self._pending: collections.deque[tuple[av.AudioFrame, float]] = collections.deque()
        self._pts = 0
        self._captured = 0  # samples at the capture rate
        self.dropped_blocks = 0

    def _on_block(self, data: bytes | None, arrival: float) -> bool:
        # Device thread: hand the block to the event loop, nothing else.
        loop = self._event_loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(self._enqueue, data, arrival)
        except RuntimeError:  # loop closed meanwhile
            return False
        return data is not None

    def _enqueue(self, data: bytes | None, arrival: float) -> None:
        if data is None:
            self._queue.put_nowait(None)
            return
        if self._queue.qsize() >= self._queue_blocks:
            self._queue.get_nowait()
            self.dropped_blocks += 1
        self._queue.put_nowait((data, arrival))

    async def recv(self) -> av.AudioFrame:
        """Return the next captured 20 ms frame, on its slot of the steady clock."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
            try:
                self._capture.start(self._on_block)
            except MediaError as exc:
                logger.error("! %s", exc)
                self.stop()
                raise MediaStreamError from exc
        while not self._pending:
            item = await self._queue.get()
            if item is None or self.readyState != "live":
                raise MediaStreamError
            data, arrival = item
            block = np.frombuffer(data, dtype=np.int16)
            frame = make_frame(block, self._captured, self.capture_rate)
            self._captured += block.size
            self._pending.extend((out, arrival) for out in self._resampler.resample(frame))
        frame, arrival = self._pending.popleft()
        if self.pacer is not None:
            delay = self.pacer.release(arrival) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += frame.samples
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._capture.close()
            self._queue.put_nowait(None)  # wake a pending recv()


class SpeakerSink(TrackSink):
    """Play a received audio track on an output device.

    Frames are converted to mono s16 at 48 kHz (or at a PortAudio device's
    default rate if it refuses 48 kHz) and queued for the device's thread:
    at most 40 ms for PulseAudio, 200 ms for PortAudio (older audio is
    dropped, so a stall does not become permanent delay); underruns play silence and are counted
    (:attr:`underruns`). :meth:`stop` lets what is queued play out (at most
    250 ms), then closes the device.

    Args:
        device: index or name (``None``: the default output); see :func:`find_device`.
        api: ``pulse`` or ``portaudio`` (default: :func:`audio_api`).

    Raises:
        MediaError: the API is missing, there is no such output device, or it
            cannot be opened.
    """

    def __init__(self, device: int | str | None = None, *, api: str | None = None) -> None:
        super().__init__()
        self.api = api or audio_api()
        playback = _PulsePlayback(device) if self.api == "pulse" else _PortAudioPlayback(device)
        self._playback: _PulsePlayback | _PortAudioPlayback = playback
        self.device_index, self.device_name = playback.index, playback.name
        self.output_rate = playback.rate
        self.max_buffer = playback.max_buffer

    @property
    def underruns(self) -> int:
        """Times the device ran out of audio and played silence."""
        return self._playback.underruns

    def _write(self, samples: np.ndarray, pts: int | None, arrival: float) -> None:
        self._playback.write(samples.astype("<i2", copy=False).tobytes())

    async def _close(self) -> None:
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline and self._playback.pending():
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self._playback.close)
