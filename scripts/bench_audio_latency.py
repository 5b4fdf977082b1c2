"""Mouth-to-ear delay of a call through a sound server, with its breakdown.

Starts a private PulseAudio server with virtual devices
(:class:`~qcall.call.soundserver.VirtualSoundServer`): marker chirps are played
into the virtual ``mouth``, which the virtual microphone ``mic`` hears; a real
aiortc call (two ``RTCPeerConnection`` s in this process, Opus over DTLS-SRTP on
the host's interface, qcall's adaptive jitter buffer) carries the microphone to
a :class:`~qcall.call.audio_devices.SpeakerSink` on the virtual speaker
``spk``. The server's ``bench.monitor`` holds the mouth on its left channel and
the speaker on its right, on one sample clock: mouth-to-ear is the distance
between a chirp on the left and the same chirp on the right, to the sample.

Breakdown per chirp (each boundary timed on ``time.monotonic``; the recording
is put on that clock with the latency the server reports for its reads, ±5 ms):

* capture — mouth → ``MicrophoneTrack.recv()`` returns the frame (block
  filling, server fragment, pacing wait);
* encode + network + decode — that → the frame reaches the speaker sink, minus
  the jitter buffer's share (Opus's 6.5 ms look-ahead is in here);
* jitter buffer — the adaptive buffer's playout delay (its own statistic);
* playout — the sink got the frame → the virtual speaker played it.

Configurations, in the same run: ``pulse`` (qcall's native PulseAudio path,
paced and unpaced) and ``portaudio`` (pyaudio through ALSA's ``pulse`` plugin,
the path before; the baseline of the ratio). Prints medians over runs, the
ratio to the baseline, and the frames the receiver concealed.

Usage::

    python scripts/bench_audio_latency.py                 # 3 runs of 6 s each
    python scripts/bench_audio_latency.py --runs 5 --apis pulse
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import threading
import time
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from qcall.call import audio_devices
from qcall.call.audio_analysis import SAMPLE_RATE, chirp_template, find_chirps
from qcall.call.audio_devices import MicrophoneTrack, SpeakerSink
from qcall.call.jitter import get_jitter_buffer, install_jitter_buffer
from qcall.call.media import UnityGainTrack
from qcall.call.opus import install_opus_encoder
from qcall.call.soundserver import MIC, MONITOR, MOUTH, SPEAKER, VirtualSoundServer

CHIRP_SPACING = 0.5
WARM_UP = 1.5
BLOCK = 480  # 10 ms


class Probe(MediaStreamTrack):
    """Passes a source through, noting each frame's samples and when it left."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self.frames: list[tuple[float, np.ndarray]] = []

    async def recv(self) -> Any:
        frame = await self.source.recv()
        assert isinstance(frame, av.AudioFrame)  # a microphone track gives audio frames
        self.frames.append((time.monotonic(), frame.to_ndarray().reshape(-1).copy()))
        return frame


class ProbedSpeaker(SpeakerSink):
    """A SpeakerSink that notes each frame it is given and when."""

    def __init__(self, device: str, api: str) -> None:
        super().__init__(device, api=api)
        self.written: list[tuple[float, np.ndarray]] = []

    def _write(self, samples: np.ndarray, pts: int | None, arrival: float) -> None:
        self.written.append((arrival, samples.copy()))
        super()._write(samples, pts, arrival)


def chirp_times(frames: list[tuple[float, np.ndarray]], template: np.ndarray) -> list[float]:
    """Times at which the chirps in a frame log passed (frame time + offset in it)."""
    if not frames:
        return []
    samples = np.concatenate([f for _, f in frames])
    starts = np.cumsum([0] + [f.size for _, f in frames])
    times = []
    for offset in sorted(find_chirps(samples, SAMPLE_RATE, template)):
        k = int(np.searchsorted(starts, offset, side="right")) - 1
        times.append(frames[k][0] + (offset - starts[k]) / SAMPLE_RATE)
    return times


def after(times: list[float], t: float, limit: float = 0.5) -> float | None:
    """The first of ``times`` in ``(t - 0.002, t + limit]`` minus ``t``."""
    later = [x - t for x in times if -0.002 < x - t <= limit]
    return min(later) if later else None


class Monitor:
    """Plays chirps into the mouth and records bench.monitor (stereo) in threads."""

    def __init__(self, seconds: float) -> None:
        from qcall.call.pulse import SimpleStream

        self.template = chirp_template(SAMPLE_RATE)
        signal = np.zeros(round(seconds * SAMPLE_RATE))
        t = WARM_UP
        while t < seconds - 0.3:
            start = round(t * SAMPLE_RATE)
            signal[start : start + self.template.size] = 0.5 * self.template
            t += CHIRP_SPACING
        self.signal = np.round(signal * 32767).astype("<i2")
        self.record = SimpleStream("record", MONITOR, SAMPLE_RATE, 0.005, channels=2)
        self.mouth = SimpleStream("playback", MOUTH, SAMPLE_RATE, 0.02)
        self.blocks: list[bytes] = []
        self.clock: list[float] = []  # per block: monotonic time of its first sample
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._play, daemon=True),
            threading.Thread(target=self._record, daemon=True),
        ]

    def _play(self) -> None:
        for i in range(0, self.signal.size, BLOCK):
            if self._stop.is_set():
                return
            self.mouth.write(self.signal[i : i + BLOCK].tobytes())

    def _record(self) -> None:
        while not self._stop.is_set():
            data = self.record.read(BLOCK)
            done = time.monotonic() - self.record.latency()
            self.blocks.append(data)
            self.clock.append(done - BLOCK / SAMPLE_RATE)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> tuple[np.ndarray, float]:
        """Stop; return the stereo recording and the monotonic time of its sample 0."""
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.record.close()
        self.mouth.close()
        audio = np.frombuffer(b"".join(self.blocks), dtype="<i2").reshape(-1, 2)
        zero = statistics.median(t - k * BLOCK / SAMPLE_RATE for k, t in enumerate(self.clock))
        return audio, zero


async def measure(api: str, pace: bool, seconds: float, ptime: float) -> dict[str, Any]:
    """One call of ``seconds``; return its per-chirp medians."""
    mic_name = MIC if api == "pulse" else "pulse"
    spk_name = SPEAKER if api == "pulse" else "pulse"
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    callee = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = MicrophoneTrack(mic_name, pace=pace, api=api, ptime=ptime)
    probe = Probe(mic)
    speaker = ProbedSpeaker(spk_name, api)
    install_jitter_buffer(callee)
    got = asyncio.Event()
    monitor = Monitor(seconds + 1.0)

    @callee.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        speaker.addTrack(track)
        got.set()

    try:
        caller.addTrack(UnityGainTrack(probe))
        install_opus_encoder(caller)  # as a call does: packets as long as the mic's frames
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        await got.wait()
        await speaker.start()
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        while not speaker.written:
            await asyncio.sleep(0.01)
        monitor.start()
        await asyncio.sleep(seconds)
        buffer = get_jitter_buffer(callee.getTransceivers()[0].receiver)
        # A copy: once the microphone stops, the far end conceals the missing
        # frames until the call closes, which is not a gap anyone heard.
        stats = copy.copy(buffer.stats) if buffer is not None else None
        underruns = speaker.underruns
    finally:
        audio, zero = monitor.stop()
        await speaker.stop()
        mic.stop()
        await caller.close()
        await callee.close()

    template = monitor.template
    mouths = sorted(find_chirps(audio[:, 0].copy(), SAMPLE_RATE, template))
    ears = sorted(find_chirps(audio[:, 1].copy(), SAMPLE_RATE, template))
    sent = chirp_times(probe.frames, template)
    got_at = chirp_times(speaker.written, template)
    rows = []
    for m in mouths:
        later = [e for e in ears if 0 < e - m <= 0.4 * SAMPLE_RATE]
        if not later:
            continue
        mouth_t, ear_t = zero + m / SAMPLE_RATE, zero + later[0] / SAMPLE_RATE
        capture = after(sent, mouth_t)
        if capture is None:
            continue
        transit = after(got_at, mouth_t + capture)
        if transit is None:
            continue
        rows.append(
            {
                "mouth_to_ear": (later[0] - m) / SAMPLE_RATE,
                "capture": capture,
                "transit": transit,
                "playout": ear_t - (mouth_t + capture + transit),
            }
        )
    jitter_buffer = stats.delay if stats is not None else 0.0
    result: dict[str, Any] = {
        key: statistics.median(r[key] for r in rows) * 1000 if rows else float("nan")
        for key in ("mouth_to_ear", "capture", "transit", "playout")
    }
    result["jitter_buffer"] = jitter_buffer * 1000
    result["codec_network"] = result["transit"] - result["jitter_buffer"]
    result["chirps"] = f"{len(rows)}/{len(mouths)}"
    result["concealed"] = stats.concealed if stats is not None else None
    result["underruns"] = underruns
    result["dropped_blocks"] = mic.dropped_blocks
    result["pacer_wait"] = mic.pacer.mean_wait * 1000 if mic.pacer else 0.0
    return result


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--apis", nargs="+", default=["pulse", "pulse-unpaced", "portaudio"])
    parser.add_argument("--capture-ms", type=float, help="PulseAudio capture fragment")
    parser.add_argument("--playout-ms", type=float, help="PulseAudio playback target")
    parser.add_argument(
        "--ptime-ms", type=float, nargs="+", default=[audio_devices.MIC_PTIME * 1000],
        help="microphone frame (= Opus packet) lengths to compare, in ms",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.capture_ms is not None:
        audio_devices.PULSE_CAPTURE_LATENCY = args.capture_ms / 1000
    if args.playout_ms is not None:
        audio_devices.PULSE_PLAYBACK_LATENCY = args.playout_ms / 1000
    print(
        f"bench_audio_latency: {args.runs} runs x {args.seconds:g} s per configuration, "
        "chirps every 0.5 s through a private PulseAudio server (virtual devices); "
        "shared 2-core machine: figures are indicative"
    )
    print(
        f"PulseAudio buffers: capture fragment {audio_devices.PULSE_CAPTURE_LATENCY * 1000:g} ms,"
        f" playback target {audio_devices.PULSE_PLAYBACK_LATENCY * 1000:g} ms"
    )
    results: dict[str, list[dict[str, Any]]] = {}
    with VirtualSoundServer() as server:
        os.environ.update(server.env)
        for run in range(args.runs):
            configurations = [(a, p) for a in args.apis for p in args.ptime_ms]
            for name, ptime in configurations:
                api = name.split("-")[0]
                label = name if len(args.ptime_ms) == 1 else f"{name} {ptime:g} ms"
                try:
                    figures = await measure(
                        api, not name.endswith("unpaced"), args.seconds, ptime / 1000
                    )
                except Exception as exc:  # report and carry on with the others
                    print(f"  run {run + 1} {label}: failed: {exc}", file=sys.stderr)
                    continue
                results.setdefault(label, []).append(figures)
                print(
                    f"  run {run + 1} {label:14s} mouth-to-ear {figures['mouth_to_ear']:6.1f} ms "
                    f"(capture {figures['capture']:.1f}, codec+net {figures['codec_network']:.1f},"
                    f" jitter buffer {figures['jitter_buffer']:.1f}, playout"
                    f" {figures['playout']:.1f}; chirps {figures['chirps']}, concealed"
                    f" {figures['concealed']}, underruns {figures['underruns']})",
                    flush=True,
                )
    keys = ("mouth_to_ear", "capture", "codec_network", "jitter_buffer", "playout")
    print(
        "\nmedian over runs, ms   mouth-to-ear  capture  codec+net  jitterbuf  playout"
        "  concealed  underruns  ratio"
    )
    baseline = next((r for k, r in results.items() if k.split(" ")[0] == "portaudio"), None)
    base = statistics.median(r["mouth_to_ear"] for r in baseline) if baseline else None
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        concealed = statistics.median(r["concealed"] or 0 for r in runs)
        underruns = statistics.median(r["underruns"] for r in runs)
        ratio = f"{med['mouth_to_ear'] / base:5.2f}" if base else "  —"
        print(
            f"{name:22s} {med['mouth_to_ear']:12.1f} {med['capture']:8.1f} "
            f"{med['codec_network']:10.1f} {med['jitter_buffer']:10.1f} {med['playout']:8.1f}"
            f" {concealed:10g} {underruns:10g}  {ratio}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
