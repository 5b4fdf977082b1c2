"""Sound devices for calls: PortAudio through pyaudio (optional).

* :func:`list_devices` — what ``qcall devices`` prints.
* :class:`MicrophoneTrack` — an aiortc audio track from an input device.
* :class:`SpeakerSink` — plays a (remote) audio track on an output device.

pyaudio is imported only when one of these is used; without it (or without
PortAudio) they raise :class:`~qcall.exceptions.MediaError` with
:data:`PYAUDIO_MISSING_MESSAGE`, which says how to install it and how to call
with a file or a test tone instead. The frame format is the one of
:mod:`qcall.call.media`: mono s16 48 kHz, 20 ms.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from qcall.call.audio_analysis import SAMPLE_RATE
from qcall.call.media import (
    PTIME,
    SAMPLES_PER_FRAME,
    TIME_BASE,
    TrackSink,
    make_frame,
    mono_resampler,
)
from qcall.exceptions import MediaError

__all__ = [
    "NO_DEVICE_MESSAGE",
    "PYAUDIO_MISSING_MESSAGE",
    "AudioDevice",
    "MicrophoneTrack",
    "SpeakerSink",
    "list_devices",
]

logger = logging.getLogger(__name__)

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
    """A PortAudio device, as ``qcall devices`` lists it.

    Attributes:
        index: the number to pass to ``--input-device`` / ``--output-device``.
        name: the device name.
        host_api: the host API (ALSA, PulseAudio, CoreAudio, WASAPI …).
        max_input_channels: 0 for an output-only device.
        max_output_channels: 0 for an input-only device.
        default_sample_rate: the device's preferred rate in Hz.
        is_default_input: the system's default input.
        is_default_output: the system's default output.
    """

    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_sample_rate: float
    is_default_input: bool = False
    is_default_output: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _default_index(pa: Any, kind: str) -> int | None:
    getter = pa.get_default_input_device_info if kind == "input" else (
        pa.get_default_output_device_info
    )
    try:
        return int(getter()["index"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def list_devices() -> list[AudioDevice]:
    """Return the sound devices PortAudio sees (an empty list when none).

    Raises:
        MediaError: pyaudio/PortAudio is not installed (the message says how
            to install it).
    """
    _, pa = _open_pyaudio()
    try:
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
    finally:
        _terminate(pa)


def _pick_device(pa: Any, index: int | None, kind: str) -> dict[str, Any]:
    """Return PortAudio's info for device ``index`` (default device if None).

    Raises:
        MediaError: there is no such device, or it has no ``kind`` channels.
    """
    channels_key = "maxInputChannels" if kind == "input" else "maxOutputChannels"
    if index is None:
        default = _default_index(pa, kind)
        if default is None:
            if pa.get_device_count() == 0:
                raise MediaError(NO_DEVICE_MESSAGE)
            raise MediaError(
                f"no default {kind} device; pick one with --{kind}-device N "
                "(`qcall devices` lists them)"
            )
        index = default
    if not isinstance(index, int) or index < 0 or index >= pa.get_device_count():
        if pa.get_device_count() == 0:
            raise MediaError(f"--{kind}-device {index}: {NO_DEVICE_MESSAGE}")
        raise MediaError(f"--{kind}-device {index}: no such device (`qcall devices` lists them)")
    info: dict[str, Any] = pa.get_device_info_by_index(index)
    if int(info.get(channels_key, 0)) < 1:
        raise MediaError(
            f"--{kind}-device {index} ({info.get('name', '?')}) has no {kind} channels "
            "(`qcall devices` lists them)"
        )
    return info


def _device_rate(pa: Any, pyaudio: Any, info: dict[str, Any], kind: str) -> int:
    """Return 48000 if the device takes it for mono s16, else its default rate."""
    key = "input_device" if kind == "input" else "output_device"
    channels = f"{kind}_channels"
    try:
        with _quiet_stderr():
            pa.is_format_supported(
                SAMPLE_RATE, **{key: info["index"], channels: 1, f"{kind}_format": pyaudio.paInt16}
            )
        return SAMPLE_RATE
    except ValueError:
        return round(float(info.get("defaultSampleRate", SAMPLE_RATE)))


# --- tracks and sinks ----------------------------------------------------------------


class MicrophoneTrack(MediaStreamTrack):
    """Audio from a PortAudio input device, through pyaudio.

    PortAudio calls back from its own thread with 20 ms blocks; the blocks
    cross into the event loop with ``call_soon_threadsafe`` and wait in a
    bounded queue (1 s; the oldest block is dropped if the call falls
    behind). Devices that refuse 48 kHz are opened at their default rate and
    resampled.

    Args:
        device_index: PortAudio device index (``None``: the default input).

    Raises:
        MediaError: pyaudio is missing, there is no such input device, or it
            cannot be opened.
    """

    kind = "audio"
    _QUEUE_BLOCKS = 50

    def __init__(self, device_index: int | None = None) -> None:
        super().__init__()
        pyaudio, pa = _open_pyaudio()
        self._pa: Any = pa
        self._paContinue = pyaudio.paContinue
        self._paComplete = pyaudio.paComplete
        try:
            info = _pick_device(pa, device_index, "input")
            self.device_index = int(info["index"])
            self.device_name = str(info.get("name", "?"))
            self.capture_rate = _device_rate(pa, pyaudio, info, "input")
            with _quiet_stderr():
                self._stream: Any = pa.open(
                    format=pyaudio.paInt16,
                    channels=1,
                    rate=self.capture_rate,
                    input=True,
                    input_device_index=self.device_index,
                    frames_per_buffer=round(self.capture_rate * PTIME),
                    stream_callback=self._callback,
                    start=False,
                )
        except (OSError, ValueError) as exc:
            _terminate(pa)
            raise MediaError(f"--input-device {device_index}: cannot open it ({exc})") from exc
        except BaseException:
            _terminate(pa)
            raise
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._resampler = mono_resampler(SAMPLES_PER_FRAME)
        self._pending: collections.deque[av.AudioFrame] = collections.deque()
        self._pts = 0
        self._captured = 0  # samples at the capture rate
        self.dropped_blocks = 0

    def _callback(
        self, in_data: bytes | None, frame_count: int, time_info: Any, status: int
    ) -> tuple[None, int]:
        # PortAudio thread: hand the block to the event loop, nothing else.
        loop = self._event_loop
        if loop is None or loop.is_closed() or in_data is None:
            return None, self._paComplete
        try:
            loop.call_soon_threadsafe(self._enqueue, in_data)
        except RuntimeError:  # loop closed meanwhile
            return None, self._paComplete
        return None, self._paContinue

    def _enqueue(self, data: bytes | None) -> None:
        if data is not None and self._queue.qsize() >= self._QUEUE_BLOCKS:
            self._queue.get_nowait()
            self.dropped_blocks += 1
        self._queue.put_nowait(data)

    async def recv(self) -> av.AudioFrame:
        """Return the next captured 20 ms frame."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
            try:
                with _quiet_stderr():
                    self._stream.start_stream()
            except OSError as exc:
                logger.error("! cannot start input device %s: %s", self.device_name, exc)
                self.stop()
                raise MediaStreamError from exc
        while not self._pending:
            data = await self._queue.get()
            if data is None or self.readyState != "live":
                raise MediaStreamError
            block = np.frombuffer(data, dtype=np.int16)
            frame = make_frame(block, self._captured, self.capture_rate)
            self._captured += block.size
            self._pending.extend(self._resampler.resample(frame))
        frame = self._pending.popleft()
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += frame.samples
        return frame

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            with contextlib.suppress(OSError), _quiet_stderr():
                self._stream.stop_stream()
                self._stream.close()
            _terminate(self._pa)
            self._queue.put_nowait(None)  # wake a pending recv()


class SpeakerSink(TrackSink):
    """Play a received audio track on a PortAudio output device, through pyaudio.

    Frames are converted to mono s16 at 48 kHz, or at the device's default
    rate if it refuses 48 kHz, and go into a byte buffer that PortAudio's
    callback thread reads. The buffer holds at most 200 ms (older audio is
    dropped, so a stall does not become permanent delay) and underruns play
    silence. :meth:`stop` lets what is buffered play out (at most 200 ms),
    then closes the device.

    Args:
        device_index: PortAudio device index (``None``: the default output).

    Raises:
        MediaError: pyaudio is missing, there is no such output device, or it
            cannot be opened.
    """

    def __init__(self, device_index: int | None = None) -> None:
        super().__init__()
        pyaudio, pa = _open_pyaudio()
        self._pa: Any = pa
        self._paContinue = pyaudio.paContinue
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self.underruns = 0
        try:
            info = _pick_device(pa, device_index, "output")
            self.device_index = int(info["index"])
            self.device_name = str(info.get("name", "?"))
            self.output_rate = _device_rate(pa, pyaudio, info, "output")
            self.max_buffer = 2 * self.output_rate // 5  # bytes: 200 ms of mono s16
            with _quiet_stderr():
                self._stream: Any = pa.open(
                    format=pyaudio.paInt16,
                    channels=1,
                    rate=self.output_rate,
                    output=True,
                    output_device_index=self.device_index,
                    frames_per_buffer=round(self.output_rate * PTIME),
                    stream_callback=self._callback,
                )
        except (OSError, ValueError) as exc:
            _terminate(pa)
            raise MediaError(f"--output-device {device_index}: cannot open it ({exc})") from exc
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
        return chunk, self._paContinue

    def _write(self, frame: av.AudioFrame, pts: int | None, arrival: float) -> None:
        data = frame.to_ndarray().astype("<i2", copy=False).tobytes()
        with self._lock:
            self._buffer += data
            excess = len(self._buffer) - self.max_buffer
            if excess > 0:
                del self._buffer[:excess]

    async def _close(self) -> None:
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline:
            with self._lock:
                if not self._buffer:
                    break
            await asyncio.sleep(0.01)
        with contextlib.suppress(OSError), _quiet_stderr():
            self._stream.stop_stream()
            self._stream.close()
        _terminate(self._pa)
