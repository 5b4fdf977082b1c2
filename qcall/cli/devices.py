"""``qcall devices``: list the sound devices a call can use.

Prints each input and output device of the audio API in use (the sound
server's own sources and sinks when PulseAudio or PipeWire runs, else
PortAudio's devices) with its index, name, description, channels, rate and
the default, as ``--mic`` / ``--speaker`` take them; on a machine without
sound devices it says so and explains how to call with a file or a test tone
instead.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``devices`` subcommand to the ``qcall`` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "devices",
        help="list microphones and speakers",
        description="List sound devices (PulseAudio/PipeWire, else PortAudio) by index and name.",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the devices; return 0 (also when there are none)."""
    from qcall.call.audio_devices import NO_DEVICE_MESSAGE, audio_api, list_devices

    api = audio_api()
    devices = list_devices(api)  # MediaError (exit 1) if the API is missing
    inputs = [d for d in devices if d.max_input_channels > 0]
    outputs = [d for d in devices if d.max_output_channels > 0]
    if args.json:
        document = {
            "inputs": [d.to_json() for d in inputs],
            "outputs": [d.to_json() for d in outputs],
            "message": None if devices else NO_DEVICE_MESSAGE,
            "api": api,
        }
        print(json.dumps(document, indent=2))
        return 0
    if not devices:
        print(f"qcall: {NO_DEVICE_MESSAGE}")
        return 0
    for title, group, flag, channels in (
        ("Input devices", inputs, "--mic", "max_input_channels"),
        ("Output devices", outputs, "--speaker", "max_output_channels"),
    ):
        print(f"{title} ({flag} NAME or N):")
        if not group:
            print("  (none)")
        for d in group:
            default = d.is_default_input if flag == "--mic" else d.is_default_output
            mark = "*" if default else " "
            described = f"  ({d.description})" if d.description else ""
            print(
                f" {mark}{d.index:3d}  {d.name}{described}  [{d.host_api}, "
                f"{getattr(d, channels)} ch, {d.default_sample_rate:g} Hz]"
            )
    print("(* = default)")
    return 0
