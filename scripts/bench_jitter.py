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

Usage::

    python scripts/bench_jitter.py                      # loopback and lossy, 3 runs
    python scripts/bench_jitter.py --profiles loopback --runs 5 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["loopback", "lossy"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
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
