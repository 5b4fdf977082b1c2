"""Sound devices through a real PulseAudio server with virtual devices (no sound card).

The module starts :class:`~qcall.call.soundserver.VirtualSoundServer` (Debian's
``pulseaudio`` as a user-space daemon in a temporary folder; ``run.sh``
installs it) and points the clients at it with ``PULSE_SERVER``. Speech played
into the virtual ``mouth`` is what the virtual microphone ``mic`` hears; what a
call plays on ``spk`` is recorded from ``spk.monitor``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from qcall.call.audio_analysis import rms_dbfs
from qcall.call.audio_devices import (
    AudioDevice,
    CapturePacer,
    MicrophoneTrack,
    SpeakerSink,
    find_device,
    list_devices,
)
from qcall.call.media import add_media_arguments, open_sink, open_source
from qcall.call.session import CallSession
from qcall.call.soundserver import MIC, MOUTH, SPEAKER, VirtualSoundServer
from qcall.cli import main
from qcall.cli.call import _status_table
from qcall.exceptions import MediaError
from tests.test_call_session import Lab, connect, lab  # noqa: F401 (the lab fixture)
from tests.utils import TIMEOUT_FACTOR as T

RATE = 48000
HAVE_PULSEAUDIO = shutil.which("pulseaudio") is not None
needs_server = pytest.mark.skipif(
    not HAVE_PULSEAUDIO, reason="pulseaudio is not installed (run.sh installs it on Debian)"
)


@pytest.fixture(scope="module")
def sound_server() -> Iterator[VirtualSoundServer]:
    """One private PulseAudio server for the module; clients find it via PULSE_SERVER."""
    if not HAVE_PULSEAUDIO:
        pytest.skip("pulseaudio is not installed (run.sh installs it on Debian)")
    saved = {name: os.environ.get(name) for name in ("PULSE_SERVER", "QCALL_AUDIO_API")}
    with VirtualSoundServer() as server:
        os.environ.update(server.env)
        os.environ.pop("QCALL_AUDIO_API", None)
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def speech(seconds: float = 2.0) -> np.ndarray:
    """Speech at 48 kHz: espeak-ng when installed, else a speech-like synthetic signal."""
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        wav = subprocess.run(
            [espeak, "--stdout", "-s", "170", "quantum keys protect this call today"],
            capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        data = np.frombuffer(wav[44:], dtype="<i2").astype(np.float64)
        source_rate = int.from_bytes(wav[24:28], "little")
        t = np.arange(round(data.size * RATE / source_rate)) / RATE
        samples = np.interp(t, np.arange(data.size) / source_rate, data)
    else:  # vowels: a 120 Hz pulse train through two formants, in syllables
        t = np.arange(round(seconds * RATE)) / RATE
        pulses = np.sin(2 * np.pi * 120 * t) ** 31
        formants = np.sin(2 * np.pi * 700 * t) + 0.6 * np.sin(2 * np.pi * 1200 * t)
        samples = pulses * formants * (np.sin(2 * np.pi * 3 * t) > 0) * 12000
    peak = np.max(np.abs(samples)) or 1.0
    return np.round(samples / peak * 16000).astype(np.int16)


def play_into_mouth(samples: np.ndarray) -> threading.Thread:
    """Play ``samples`` into the virtual mouth (so into the microphone) in a thread."""
    from qcall.call.pulse import SimpleStream

    def run() -> None:
        stream = SimpleStream("playback", MOUTH, RATE, 0.02)
        for i in range(0, samples.size, 960):
            stream.write(samples[i : i + 960].astype("<i2").tobytes())
        stream.drain()
        stream.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def best_correlation(reference: np.ndarray, recording: np.ndarray) -> float:
    """Peak normalized cross-correlation of ``reference`` inside ``recording``."""
    ref = reference.astype(np.float64)
    rec = recording.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(ref.size + rec.size)))
    corr = np.fft.irfft(np.fft.rfft(rec, n) * np.conj(np.fft.rfft(ref, n)), n)[: rec.size]
    window = np.concatenate(([0.0], np.cumsum(rec**2)))
    energy = window[np.minimum(np.arange(rec.size) + ref.size, rec.size)] - window[: rec.size]
    k = int(np.argmax(corr))
    return float(corr[k] / np.sqrt(np.sum(ref**2) * max(energy[k], 1e-9)))


def speech_correlation(said: np.ndarray, heard: np.ndarray, piece: float = 0.4) -> float:
    """Median over the voiced pieces of ``said`` of each piece's best correlation in ``heard``.

    Piece by piece, so that a playout delay that moves during the call (an
    underrun restarts the speaker a little later) does not count as distortion.
    """
    size = round(piece * RATE)
    scores = [
        best_correlation(said[i : i + size], heard)
        for i in range(0, said.size - size, size)
        if rms_dbfs(said[i : i + size]) > -35
    ]
    return float(np.median(scores))


# --- devices by name ------------------------------------------------------------------


def test_devices_by_name_index_and_description() -> None:
    pa = "PulseAudio"
    devices = [
        AudioDevice(0, "alsa_input.usb-Jabra", pa, 1, 0, 48000, True, False, "USB Headset"),
        AudioDevice(1, "alsa_input.pci-analog", pa, 2, 0, 44100, False, False, "Built-in"),
        AudioDevice(0, "alsa_output.usb-Jabra", pa, 0, 2, 48000, False, True, "USB Headset"),
    ]
    assert find_device(devices, None, "input").index == 0
    assert find_device(devices, "usb", "input").name == "alsa_input.usb-Jabra"
    assert find_device(devices, "built-in", "input").index == 1
    assert find_device(devices, "1", "input").name == "alsa_input.pci-analog"
    assert find_device(devices, "USB Headset", "output").name == "alsa_output.usb-Jabra"
    with pytest.raises(MediaError, match="--mic 'alsa_input' matches several input devices"):
        find_device(devices, "alsa_input", "input")
    with pytest.raises(MediaError, match="--speaker 'HDMI': no output device by that name"):
        find_device(devices, "HDMI", "output")
    with pytest.raises(MediaError, match="--mic 7: no such device"):
        find_device(devices, 7, "input")
    parser = argparse.ArgumentParser()
    add_media_arguments(parser)
    args = parser.parse_args(["--mic", "USB", "--speaker", "2"])
    assert (args.input_device, args.output_device) == ("USB", 2)
    assert parser.parse_args(["--input-device", "3"]).input_device == 3  # the old name
    with pytest.raises(SystemExit):
        parser.parse_args(["--mic", "-1"])


@needs_server
def test_qcall_devices_lists_the_servers_devices(
    sound_server: VirtualSoundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "Input devices (--mic NAME or N):" in out
    assert "Output devices (--speaker NAME or N):" in out
    assert "mic  (qcall-virtual-microphone)  [PulseAudio, 1 ch, 48000 Hz]" in out
    assert "spk  (qcall-virtual-speaker)  [PulseAudio, 1 ch, 48000 Hz]" in out
    assert main(["devices", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["api"] == "pulse"
    assert [d["name"] for d in document["inputs"] if d["is_default_input"]] == [MIC]
    assert [d["name"] for d in document["outputs"] if d["is_default_output"]] == [SPEAKER]
    by_description = open_source(input_device="virtual-microphone")
    assert isinstance(by_description, MicrophoneTrack) and by_description.device_name == MIC
    assert by_description.api == "pulse"
    by_description.stop()
    spk = next(d for d in list_devices() if d.name == SPEAKER)
    with pytest.raises(MediaError, match="--speaker 'nowhere': no output device"):
        open_sink(output_device="nowhere")
    asyncio.run(_open_and_stop(spk.index))


async def _open_and_stop(index: int) -> None:
    sink = open_sink(output_device=index)
    assert isinstance(sink, SpeakerSink) and sink.device_name == SPEAKER
    await sink.stop()


# --- pacing ---------------------------------------------------------------------------


def test_pacer_releases_bursty_capture_on_a_steady_clock() -> None:
    pacer = CapturePacer()
    # Blocks in pairs every 40 ms, and one 14 ms late: released every 20 ms.
    arrivals = [0.0, 0.0, 0.04, 0.04, 0.08, 0.08, 0.134, 0.134, 0.16, 0.16]
    released = [pacer.release(a) for a in arrivals]
    assert all(r >= a for r, a in zip(released, arrivals, strict=True))
    steps = np.diff(released)
    assert np.allclose(steps[:5], 0.02)  # the pairs are spread out
    assert pacer.late == 1  # the late block shifts the clock once ...
    assert np.allclose(steps[6:], 0.02)  # ... and the rest follow it without a gap
    # A clock that is ahead of the blocks is pulled back after a window.
    pacer = CapturePacer(window=10)
    released = [pacer.release(0.02 * k + (0.01 if k == 0 else 0.0)) for k in range(40)]
    waits = [r - 0.02 * k for k, r in enumerate(released)]
    assert waits[5] > 0.009 and waits[-1] < 0.001
    assert pacer.mean_wait > 0


# --- a call through the sound server ---------------------------------------------------


@needs_server
async def test_call_carries_speech_from_microphone_to_speaker(
    sound_server: VirtualSoundServer, lab: Lab  # noqa: F811
) -> None:
    from qcall.call.pulse import SimpleStream

    alice = await lab.phone("alice")
    alice.make_source = lambda: MicrophoneTrack(MIC)
    bob = await lab.phone("bob")
    speaker = SpeakerSink(SPEAKER)
    started: list[asyncio.Future[None]] = []

    def on_track(session: CallSession, track: Any) -> None:
        session.sink = speaker
        speaker.addTrack(track)
        started.append(asyncio.ensure_future(speaker.start()))

    bob.on_track = on_track
    caller, callee = await connect(alice, bob)
    said = speech()
    recorder = SimpleStream("record", f"{SPEAKER}.monitor", RATE, 0.01)
    await asyncio.sleep(0.5)  # the call settles
    frames = round((said.size / RATE + 1.5) * RATE / 960)
    blocks: list[bytes] = []
    recording = threading.Thread(
        target=lambda: blocks.extend(recorder.read(960) for _ in range(frames)), daemon=True
    )
    recording.start()
    mouth = play_into_mouth(said)
    await asyncio.to_thread(recording.join, 20 * T)
    heard = np.frombuffer(b"".join(blocks), dtype="<i2")
    mouth.join(5)
    recorder.close()
    await callee.refresh_stats()
    await caller.refresh_stats()
    await caller.hangup()
    await asyncio.wait_for(callee.wait(), 5 * T)
    await speaker.stop()

    correlation = speech_correlation(said, heard)
    print(f"speech correlation {correlation:.3f}")
    assert correlation > 0.9
    # The level arrives unchanged (Opus is not transparent: within 1.5 dB), over
    # the loudest stretch as long as what was said.
    window = np.concatenate(([0.0], np.cumsum(heard.astype(np.float64) ** 2)))
    loudest = float(np.max(window[said.size :] - window[: -said.size]))
    heard_dbfs = 10 * np.log10(loudest / said.size) - 20 * np.log10(32768)
    assert heard_dbfs == pytest.approx(rms_dbfs(said), abs=1.5)
    assert isinstance(caller.source, MicrophoneTrack)
    assert caller.source.readyState == "ended"  # the call's end closed the microphone
    assert caller.status.mic_dropped_blocks == 0
    assert isinstance(callee.status.speaker_underruns, int)
    # Both are in the report (the status as JSON) and on the live status line.
    assert callee.status.as_dict()["speaker_underruns"] == callee.status.speaker_underruns
    assert caller.status.as_dict()["mic_dropped_blocks"] == 0
    console = Console(record=True, width=120)
    console.print(_status_table(callee))
    line = next(x for x in console.export_text().splitlines() if x.strip().startswith("devices"))
    assert f"speaker underruns {callee.status.speaker_underruns}" in line

