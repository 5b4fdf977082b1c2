"""The audio command-line flags, kept free of heavy imports (``qcall --help`` stays fast).

:func:`add_media_arguments` adds them; :func:`qcall.call.media.open_source` and
:func:`qcall.call.media.open_sink` turn the parsed flags into tracks.
"""

from __future__ import annotations

import argparse

__all__ = ["add_media_arguments"]

#: Opus runs at 48 kHz: a tone must stay below its Nyquist frequency.
SAMPLE_RATE = 48_000


def _tone_hz(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a frequency: {text!r}") from None
    if not 0 < value < SAMPLE_RATE / 2:
        raise argparse.ArgumentTypeError(f"{text} Hz is outside (0, 24000) Hz")
    return value


def _device(text: str) -> int | str:
    """A device index (digits) or a name to look up (``qcall devices``)."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("empty device name")
    if text.lstrip("-").isdigit():
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"device index {value} is negative")
        return value
    return text


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--input``, ``--tone``, ``--mic``, ``--output``, ``--speaker``.

    ``--mic`` and ``--speaker`` take an index or (part of) a device name or
    description; ``--input-device`` and ``--output-device`` are their old names.
    """
    group = parser.add_argument_group("audio (default: the default microphone and speaker)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="FILE", help="send this file (anything FFmpeg reads)")
    source.add_argument("--tone", metavar="HZ", type=_tone_hz, help="send a test tone")
    source.add_argument(
        "--mic",
        "--input-device",
        dest="input_device",
        metavar="NAME|N",
        type=_device,
        help="microphone by name or index (`qcall devices`)",
    )
    sink = group.add_mutually_exclusive_group()
    sink.add_argument("--output", metavar="FILE.wav", help="record what you hear to a WAV file")
    sink.add_argument(
        "--speaker",
        "--output-device",
        dest="output_device",
        metavar="NAME|N",
        type=_device,
        help="speaker by name or index (`qcall devices`)",
    )
