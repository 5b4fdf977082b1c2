"""The native PulseAudio path: libpulse-simple through ctypes, device lists through pulsectl.

Debian's PortAudio has no PulseAudio host API: it reaches a sound server only
through ALSA's ``pulse`` plugin, which adds 70–100 ms of buffering and hides
the server's own devices (docs/audio.md). This module talks to the server
directly:

* :class:`SimpleStream` — one playback or record stream through
  ``libpulse-simple.so.0`` (the blocking "simple API",
  https://freedesktop.org/software/pulseaudio/doxygen/simple.html) with small
  explicit buffer attributes (``pa_buffer_attr``): the server then sizes its
  own latency to them (the simple API always sets
  ``PA_STREAM_ADJUST_LATENCY``).
* :func:`pulse_devices` — the server's sinks and sources with their names,
  descriptions, rates and the defaults (pulsectl, a ctypes binding of libpulse).
* :func:`pulse_available` — whether a server answers (never autospawns one).

PipeWire's ``pipewire-pulse`` speaks the same protocol, so all of this works
against PipeWire too. Nothing here touches asyncio: the tracks in
:mod:`qcall.call.audio_devices` run the blocking calls in their own threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

from qcall.exceptions import MediaError

__all__ = [
    "PulseDevice",
    "SimpleStream",
    "pulse_available",
    "pulse_devices",
]

logger = logging.getLogger(__name__)

PA_SAMPLE_S16LE = 3
PA_STREAM_PLAYBACK = 1
PA_STREAM_RECORD = 2
#: ``(uint32_t) -1``: "let the server choose" in ``pa_buffer_attr``.
PA_DEFAULT = 0xFFFFFFFF


class _SampleSpec(ctypes.Structure):
    _fields_ = (("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8))


class _BufferAttr(ctypes.Structure):
    _fields_ = (
        ("maxlength", ctypes.c_uint32),
        ("tlength", ctypes.c_uint32),
        ("prebuf", ctypes.c_uint32),
        ("minreq", ctypes.c_uint32),
        ("fragsize", ctypes.c_uint32),
    )


_LIBS: list[tuple[Any, Any]] = []


def _libs() -> tuple[Any, Any]:
    """Load ``libpulse-simple`` and ``libpulse`` once; :class:`MediaError` if absent."""
    if _LIBS:
        return _LIBS[0]
    names = (
        ctypes.util.find_library("pulse-simple") or "libpulse-simple.so.0",
        ctypes.util.find_library("pulse") or "libpulse.so.0",
    )
    try:
        simple, pulse = (ctypes.CDLL(name) for name in names)
    except OSError as exc:
        raise MediaError(
            f"the PulseAudio client library is missing ({exc}): apt-get install libpulse0"
        ) from exc
    ptr, c_int_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
    simple.pa_simple_new.restype = ptr
    simple.pa_simple_new.argtypes = (
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.POINTER(_SampleSpec), ptr, ctypes.POINTER(_BufferAttr), c_int_p,
    )  # fmt: skip
    for name in ("pa_simple_read", "pa_simple_write"):
        getattr(simple, name).restype = ctypes.c_int
        getattr(simple, name).argtypes = (ptr, ptr, ctypes.c_size_t, c_int_p)
    for name in ("pa_simple_drain", "pa_simple_flush"):
        getattr(simple, name).restype = ctypes.c_int
        getattr(simple, name).argtypes = (ptr, c_int_p)
    simple.pa_simple_get_latency.restype = ctypes.c_uint64
    simple.pa_simple_get_latency.argtypes = (ptr, c_int_p)
    simple.pa_simple_free.restype = None
    simple.pa_simple_free.argtypes = (ptr,)
    pulse.pa_strerror.restype = ctypes.c_char_p
    pulse.pa_strerror.argtypes = (ctypes.c_int,)
    _LIBS.append((simple, pulse))
    return simple, pulse


def _strerror(code: int) -> str:
    text = _libs()[1].pa_strerror(code)
    return text.decode("utf-8", "replace") if text else f"error {code}"


class SimpleStream:
    """One mono s16le stream to or from a PulseAudio device (the simple API).

    Args:
        direction: ``"playback"`` or ``"record"``.
        device: the sink or source name (``None``: the server's default).
        rate: samples per second.
        latency: the buffering asked of the server, in seconds: ``tlength``
            for playback (``prebuf`` and ``minreq`` are a quarter of it, so
            playback starts as soon as a little audio is queued), ``fragsize``
            for record (how often the server hands over what it captured).
        channels: 1 (qcall's frames) or 2.
        name: the stream's name as the server shows it.

    Raises:
        MediaError: no server, no such device, or the server refused.
    """

    def __init__(
        self,
        direction: str,
        device: str | None,
        rate: int,
        latency: float,
        *,
        channels: int = 1,
        name: str = "qcall",
    ) -> None:
        simple, _ = _libs()
        self._simple = simple
        self.direction = direction
        self.rate = rate
        self.channels = channels
        self.frame_bytes = 2 * channels
        spec = _SampleSpec(PA_SAMPLE_S16LE, rate, channels)
        size = max(1, round(latency * rate)) * self.frame_bytes
        if direction == "playback":
            quarter = max(self.frame_bytes, size // 4 // self.frame_bytes * self.frame_bytes)
            attr = _BufferAttr(PA_DEFAULT, size, quarter, quarter, PA_DEFAULT)
            kind = PA_STREAM_PLAYBACK
        elif direction == "record":
            attr = _BufferAttr(PA_DEFAULT, PA_DEFAULT, PA_DEFAULT, PA_DEFAULT, size)
            kind = PA_STREAM_RECORD
        else:
            raise ValueError(f"direction must be playback or record, not {direction!r}")
        error = ctypes.c_int(0)
        handle = simple.pa_simple_new(
            None, b"qcall", kind, device.encode() if device else None, name.encode(),
            ctypes.byref(spec), None, ctypes.byref(attr), ctypes.byref(error),
        )  # fmt: skip
        if not handle:
            raise MediaError(
                f"PulseAudio {direction} device {device or '(default)'}: "
                f"cannot open it ({_strerror(error.value)})"
            )
        self._handle: int | None = handle
        logger.debug("< pulse %s stream on %s, %g ms", direction, device, latency * 1000)

    def _check(self, result: int, error: ctypes.c_int, what: str) -> None:
        if result < 0:
            raise MediaError(f"PulseAudio {what} failed: {_strerror(error.value)}")

    def _live(self) -> int:
        if self._handle is None:
            raise MediaError(f"PulseAudio {self.direction} stream is closed")
        return self._handle

    def read(self, frames: int) -> bytes:
        """Block until ``frames`` sample frames were captured; return them."""
        buffer = ctypes.create_string_buffer(frames * self.frame_bytes)
        error = ctypes.c_int(0)
        handle = self._live()
        result = self._simple.pa_simple_read(handle, buffer, len(buffer), ctypes.byref(error))
        self._check(result, error, "read")
        return buffer.raw

    def write(self, data: bytes) -> None:
        """Queue ``data`` for playback; blocks while the server's buffer is full."""
        error = ctypes.c_int(0)
        result = self._simple.pa_simple_write(self._live(), data, len(data), ctypes.byref(error))
        self._check(result, error, "write")

    def latency(self) -> float:
        """Seconds between now and when the next written sample plays / the last read was
        captured (what the server reports: its buffer plus the device's)."""
        error = ctypes.c_int(0)
        usec = self._simple.pa_simple_get_latency(self._live(), ctypes.byref(error))
        if error.value:
            raise MediaError(f"PulseAudio latency query failed: {_strerror(error.value)}")
        return int(usec) / 1e6

    def drain(self) -> None:
        """Block until everything written has played."""
        error = ctypes.c_int(0)
        self._check(self._simple.pa_simple_drain(self._live(), ctypes.byref(error)), error, "drain")

    def close(self) -> None:
        """Free the stream (idempotent). Not while another thread is blocked in it."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._simple.pa_simple_free(handle)


@dataclass(frozen=True)
class PulseDevice:
    """A PulseAudio sink (output) or source (input).

    Attributes:
        index: the server's index of the sink or source.
        name: its name (``alsa_output.usb-…``, ``spk``); pass it to ``--speaker``.
        description: the human name (``USB Audio Analog Stereo``).
        kind: ``"input"`` (a source) or ``"output"`` (a sink).
        channels: its channel count.
        rate: its sample rate in Hz.
        is_default: the server's default source or sink.
    """

    index: int
    name: str
    description: str
    kind: str
    channels: int
    rate: int
    is_default: bool


def _pulsectl() -> Any:
    try:
        import pulsectl
    except ImportError as exc:
        raise MediaError(
            "listing PulseAudio devices needs pulsectl: pip install 'qcall[audio]'"
        ) from exc
    return pulsectl


def pulse_available() -> bool:
    """Return whether a PulseAudio (or pipewire-pulse) server answers; never spawns one."""
    try:
        _libs()
        pulsectl = _pulsectl()
    except MediaError:
        return False
    try:
        with pulsectl.Pulse("qcall-probe", connect=False) as pulse:
            pulse.connect(autospawn=False)
            return True
    except pulsectl.PulseError:
        return False


def pulse_devices() -> list[PulseDevice]:
    """Return the server's sources, then its sinks.

    Raises:
        MediaError: no server answers, or pulsectl is not installed.
    """
    pulsectl = _pulsectl()
    try:
        with pulsectl.Pulse("qcall-devices", connect=False) as pulse:
            pulse.connect(autospawn=False)
            server = pulse.server_info()
            defaults = {"input": server.default_source_name, "output": server.default_sink_name}
            devices = []
            for kind, lister in (("input", pulse.source_list), ("output", pulse.sink_list)):
                # Read every field now: pulsectl's sample_spec points into memory
                # that the next request reuses.
                devices += [
                    PulseDevice(
                        index=int(s.index),
                        name=str(s.name),
                        description=str(s.description),
                        kind=kind,
                        channels=int(s.channel_count),
                        rate=int(s.sample_spec.rate),
                        is_default=s.name == defaults[kind],
                    )
                    for s in lister()
                ]
    except pulsectl.PulseError as exc:
        raise MediaError(f"cannot talk to the PulseAudio server: {exc}") from exc
    return devices
