"""One-way audio latency and smoothness: aiortc's stock jitter buffer vs qcall's adaptive one.

Each run is a real aiortc call between two ``RTCPeerConnection`` s in this
process (Opus over DTLS-SRTP on the host's interface): a
:class:`~qcall.call.media.ToneTrack` with marker chirps every 0.7 s on one side,
a :class:`~qcall.call.media.WavRecorder` on the other, and the network profile
of :mod:`qcall.call.netem` (``loopback``, ``lossy``, ``beijing-hefei``) applied
to both directions. One-way latency is measured chirp by chirp
(:func:`~qcall.call.audio_analysis.one_way_latencies`, docs/audio.md).

Per mode and profile it prints the median over runs of: the median and 95th
percentile one-way latency, the fraction of 20 ms frames the receiver had to
conceal (Opus PLC from the adaptive buffer, or silence where the stock buffer
skipped frames), the longest pause between two frames reaching the application,
and the ratio of the adaptive median latency to the stock one (same run).

With ``--cpu`` it measures instead the CPU the adaptive buffer's own code
takes per packet (:func:`cpu_per_packet`): the receiver glue
(:class:`~qcall.call.jitter.ReceiverJitterBuffer`: ``add``, its timer,
``_service``) and the core, fed a synthetic 20 ms stream with jitter and loss
on a simulated clock (no sockets, no codec), against the implementation at
``--baseline`` (loaded from git) in the same run, interleaved.

Usage::

    python scripts/bench_jitter.py                      # loopback and lossy, 3 runs
    python scripts/bench_jitter.py --profiles loopback --runs 5 --seconds 8
    python scripts/bench_jitter.py --cpu --runs 7       # µs of CPU per packet, new / old
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from qcall.call.audio_analysis import SAMPLE_RATE, find_chirps, one_way_latencies
from qcall.call.jitter import JITTER_BUFFER_MODES, get_jitter_buffer, install_jitter_buffer
from qcall.call.media import PTIME, ToneTrack, WavRecorder, read_wav
from qcall.call.netem import apply_profile, get_profile

#: Chirps must be further apart than the largest latency measured (the stock buffer
#: under loss reaches ≈ 300 ms), or a chirp is matched with the next one's send time.
CHIRP_SPACING = 0.7
WARM_UP = 1.0


async def measure(
    mode: str, profile_name: str, seconds: float, seed: int, out: Path
) -> dict[str, Any]:
    """Run one call for ``seconds`` of audio; return its figures."""
    profile = get_profile(profile_name)
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    callee = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    apply_profile(caller, profile, seed=2 * seed)
    apply_profile(callee, profile, seed=2 * seed + 1)
    chirps = [WARM_UP + CHIRP_SPACING * k for k in range(int((seconds - WARM_UP) / CHIRP_SPACING))]
    tone = ToneTrack(1000, chirp_at=chirps)
    recorder = WavRecorder(out)
    got_track = asyncio.Event()
    if mode == "adaptive":
        install_jitter_buffer(callee)

    @callee.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        recorder.addTrack(track)
        got_track.set()

    try:
        caller.addTrack(tone)
        await caller.setLocalDescription(await caller.createOffer())
        await callee.setRemoteDescription(caller.localDescription)
        await got_track.wait()
        await recorder.start()
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)
        deadline = time.monotonic() + seconds + 20
        while tone.seconds_sent < seconds + 0.5:
            if time.monotonic() > deadline:
                raise RuntimeError("audio did not flow")
            await asyncio.sleep(0.1)
        receiver = callee.getTransceivers()[0].receiver
        buffer = get_jitter_buffer(receiver)
        buffer_stats = buffer.stats.as_dict() if buffer is not None else None
    finally:
        await recorder.stop()
        await caller.close()
        await callee.close()

    samples, rate = read_wav(out)
    found = find_chirps(samples, rate, tone.chirp)
    latencies = one_way_latencies(tone.chirp_send_times, recorder.arrivals, found, rate)
    arrivals = [a for a in recorder.arrivals if a.sample_offset > WARM_UP * SAMPLE_RATE]
    gaps = [b.arrival_time - a.arrival_time for a, b in itertools.pairwise(arrivals)]
    frames = recorder.samples_written / (PTIME * SAMPLE_RATE)
    plc = buffer_stats["concealed"] if buffer_stats else 0
    missing = recorder.concealed_samples / (PTIME * SAMPLE_RATE) + plc
    return {
        "latency_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))]
        if latencies
        else float("nan"),
        "chirps": f"{len(latencies)}/{len(tone.chirp_send_times)}",
        "missing": missing / max(frames, 1.0),
        "max_gap_ms": 1000 * max(gaps, default=0.0),
        "buffer": buffer_stats,
    }


class _Handle:
    def __init__(self, loop: _SimLoop, when: float, callback: Any) -> None:
        self.loop, self.when, self.callback = loop, when, callback

    def cancel(self) -> None:
        if self.loop.armed is self:
            self.loop.armed = None


class _SimLoop:
    """The one event-loop call the glue makes (``call_at``), on a simulated clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.armed: _Handle | None = None
        self.wakeups = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> _Handle:
        self.armed = _Handle(self, when, callback)
        return self.armed


class _Receiver:
    """The private fields of aiortc's RTCRtpReceiver that the glue reads."""

    def __init__(self) -> None:
        self._RTCRtpReceiver__codecs = {111: "opus"}
        self._RTCRtpReceiver__decoder_thread = "running"
        self._RTCRtpReceiver__decoder_queue = self
        self.frames: list[tuple[int, bytes]] = []

    def put(self, item: Any) -> None:
        self.frames.append((item[1].timestamp, item[1].data))


class _Packet:
    def __init__(self, seq: int, ts: int) -> None:
        self.payload_type, self.sequence_number, self.timestamp = 111, seq, ts
        self._data = b"\xfc" + bytes(80)


def _stream(packets: int, seed: int) -> list[tuple[float, _Packet]]:
    """20 ms packets with ±8 ms of jitter (some reordering) and 2 % loss."""
    rng = random.Random(seed)
    arrivals = [
        (0.05 + 0.02 * k + rng.uniform(0, 0.008), _Packet(k & 0xFFFF, (960 * k) & 0xFFFFFFFF))
        for k in range(packets)
        if rng.random() >= 0.02
    ]
    return sorted(arrivals, key=lambda a: a[0])


def cpu_per_packet(
    module: Any, arrivals: list[tuple[float, _Packet]]
) -> tuple[float, list[tuple[int, bytes]]]:
    """Feed ``arrivals`` through ``module.ReceiverJitterBuffer``; return µs of CPU a packet
    and the frames it put on the decoder queue."""
    loop = _SimLoop()
    receiver = _Receiver()
    buffer = module.ReceiverJitterBuffer.__new__(module.ReceiverJitterBuffer)
    module.ReceiverJitterBuffer.__init__(buffer, receiver, clock=loop.time)
    buffer._loop = loop
    start = time.process_time()
    for arrival, packet in arrivals:
        while loop.armed is not None and loop.armed.when <= arrival:
            handle, loop.armed = loop.armed, None
            loop.now = handle.when
            loop.wakeups += 1
            handle.callback()
        loop.now = arrival
        buffer.add(packet)
    spent = time.process_time() - start
    return 1e6 * spent / len(arrivals), receiver.frames


def _baseline(rev: str, name: str) -> Any:
    """Module ``qcall.call.NAME`` as of git revision ``rev``, loaded as a separate module."""
    path = f"qcall/call/{name}.py"
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"{name}_baseline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def cpu_per_recorded_frame(module: Any, frames: list[Any], out: Path) -> tuple[float, bytes]:
    """Write decoded frames through ``module.WavRecorder``; µs of CPU a frame, and the file."""
    recorder = module.WavRecorder(out)
    start = time.process_time()
    for k, frame in enumerate(frames):
        recorder._handle(frame, 0.02 * k)
    closing = recorder._close()  # awaits nothing: run it to the end here
    try:
        closing.send(None)
    except StopIteration:
        pass
    spent = time.process_time() - start
    return 1e6 * spent / len(frames), out.read_bytes()


def _decoded_frames(count: int) -> list[Any]:
    """What aiortc's Opus decoder hands a sink: s16 stereo 48 kHz, 20 ms, pts in 1/48000."""
    rng = np.random.default_rng(7)
    frames = []
    for k in range(count):
        data = rng.integers(-8000, 8000, size=(1, 1920), dtype=np.int16)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 960 * k
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        frames.append(frame)
    return frames


def cpu_main(runs: int, packets: int, rev: str) -> int:
    """Print the median µs per packet of the baseline and the current buffer, and the ratio."""
    from qcall.call import jitter, media

    modules = {f"baseline {rev}": _baseline(rev, "jitter"), "current": jitter}
    print(
        f"bench_jitter --cpu: {runs} runs x {packets} packets (20 ms, 0-8 ms jitter, 2 % loss),"
        " simulated clock, interleaved; µs of CPU (process_time) per packet"
    )
    if not _compare(
        modules, runs, "µs/packet", lambda m, run: cpu_per_packet(m, _stream(packets, run))
    ):
        print("  the implementations released different frames", file=sys.stderr)
        return 1
    print("(the same frames released)")

    recorders = {f"baseline {rev}": _baseline(rev, "media"), "current": media}
    count = max(50, packets // 10)
    print(f"\nWavRecorder: {runs} runs x {count} decoded frames (s16 stereo 48 kHz, 20 ms)")
    frames = _decoded_frames(count)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        if not _compare(
            recorders, runs, "µs/frame", lambda m, run: cpu_per_recorded_frame(m, frames, out)
        ):
            print("  the recorders wrote different files", file=sys.stderr)
            return 1
    print("(byte-identical files)")
    return 0


def _compare(
    modules: dict[str, Any], runs: int, unit: str, measure: Callable[[Any, int], tuple[float, Any]]
) -> bool:
    """Run ``measure(module, run)`` interleaved; print medians and the ratio; False if the
    modules' outputs differ in a run."""
    figures: dict[str, list[float]] = {name: [] for name in modules}
    for run in range(runs):
        outputs = []
        for name, module in modules.items():
            value, output = measure(module, run)
            figures[name].append(value)
            outputs.append(output)
            print(f"  run {run + 1} {name:18s} {value:6.2f} {unit}")
        if any(out != outputs[0] for out in outputs):
            return False
    medians = {name: statistics.median(values) for name, values in figures.items()}
    for name, value in medians.items():
        print(f"{name:20s} median {value:6.2f} {unit}")
    base, current = medians.values()
    print(f"current / baseline: {current / base:.2f}")
    return True


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["loopback", "lossy"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--cpu", action="store_true", help="CPU per packet, new vs --baseline")
    parser.add_argument("--packets", type=int, default=5000, help="with --cpu: per run")
    parser.add_argument("--baseline", default="46c6851", help="with --cpu: git revision")
    args = parser.parse_args(argv)
    if args.cpu:
        return cpu_main(args.runs, args.packets, args.baseline)
    print(
        f"bench_jitter: {args.runs} runs x {args.seconds:g} s per mode and profile "
        "(shared 2-core machine, loaded by other jobs: figures are indicative)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.profiles:
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in JITTER_BUFFER_MODES}
            for run in range(args.runs):
                for mode in JITTER_BUFFER_MODES:
                    path = Path(tmp) / f"{name}-{mode}-{run}.wav"
                    result = await measure(mode, name, args.seconds, run, path)
                    results[mode].append(result)
                    extra = ""
                    if result["buffer"]:
                        b = result["buffer"]
                        extra = (
                            f" delay {1000 * b['delay']:.1f} ms"
                            f" (max {1000 * b['max_delay_seen']:.1f}) late {b['late']}"
                            f" plc {b['concealed']} jitter {1000 * b['jitter']:.1f} ms"
                        )
                    print(
                        f"  {name:8} {mode:8} run {run}: median {result['latency_ms']:6.1f} ms "
                        f"p95 {result['p95_ms']:6.1f} ms chirps {result['chirps']} missing "
                        f"{100 * result['missing']:4.1f} % max gap {result['max_gap_ms']:5.1f} ms"
                        + extra
                    )
            print(f"{name}:")
            medians = {}
            for mode in JITTER_BUFFER_MODES:
                rs = results[mode]
                medians[mode] = statistics.median(r["latency_ms"] for r in rs)
                print(
                    f"  {mode:8} median one-way {medians[mode]:6.1f} ms, p95 "
                    f"{statistics.median(r['p95_ms'] for r in rs):6.1f} ms, missing "
                    f"{100 * statistics.median(r['missing'] for r in rs):4.1f} %, max gap "
                    f"{statistics.median(r['max_gap_ms'] for r in rs):5.1f} ms"
                )
            print(f"  adaptive / stock latency: {medians['adaptive'] / medians['stock']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
