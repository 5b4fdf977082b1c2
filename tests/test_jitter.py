"""Tests of qcall.call.jitter: the Sans-I/O adaptive buffer with a manual clock, the
concealment payloads through the real Opus decoder, and real aiortc calls on loopback
and through the ``lossy`` network profile (stock vs adaptive figures are printed)."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from pathlib import Path
from typing import Any, cast

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from qcall.call.audio_analysis import SAMPLE_RATE, find_chirps, one_way_latencies
from qcall.call.jitter import (
    AdaptiveJitterBuffer,
    JitterBufferConfig,
    PlayoutFrame,
    ReceiverJitterBuffer,
    apply_jitter_buffer_mode,
    check_aiortc_version,
    conceal_payload,
    get_jitter_buffer,
    install_jitter_buffer,
)
from qcall.call.media import ToneTrack, WavRecorder, read_wav
from qcall.call.netem import apply_profile, get_profile
from qcall.exceptions import CallError
from tests.utils import TIMEOUT_FACTOR

RATE = 48000
FRAME = 960  # 20 ms at 48 kHz
PTIME = 0.020

Arrival = tuple[float, int, int]  # (arrival time, sequence number, timestamp)
Released = tuple[float, PlayoutFrame[int]]


def simulate(
    buffer: AdaptiveJitterBuffer[int],
    arrivals: list[Arrival],
    until: float,
    *,
    keep_tail: bool = False,
) -> list[Released]:
    """Drive ``buffer`` like its asyncio shell: packets at their arrival, timers on time.

    Each packet's payload is its index in ``arrivals``. Unless ``keep_tail``, the
    concealment after the last packet played (the stream's end) is left out.
    """
    pending = sorted(((t, i, seq, ts) for i, (t, seq, ts) in enumerate(arrivals)), reverse=True)
    released: list[Released] = []
    now = 0.0
    while True:
        timer = buffer.get_timer()
        next_arrival = pending[-1][0] if pending else None
        if timer is not None and (next_arrival is None or timer <= next_arrival):
            if timer > until:
                break
            now = max(now, timer)
            buffer.handle_timer(now)
        elif next_arrival is not None:
            if next_arrival > until:
                break
            now, index, seq, ts = pending.pop()
            buffer.receive_packet(seq, ts, index, now)
        else:
            break
        released.extend((now, frame) for frame in buffer.frames_to_play())
    while released and not keep_tail and released[-1][1].concealed:
        released.pop()
    return released


def stream(
    count: int,
    *,
    transit: float = 0.010,
    jitter: Any = None,
    lose: set[int] = frozenset(),  # type: ignore[assignment]
    seq0: int = 1000,
    ts0: int = 123456,
    start: float = 0.0,
) -> list[Arrival]:
    """``count`` 20 ms packets sent every 20 ms; ``jitter(k)`` adds to packet k's transit."""
    out = []
    for k in range(count):
        if k in lose:
            continue
        extra = jitter(k) if jitter is not None else 0.0
        out.append(
            (
                start + k * PTIME + transit + extra,
                (seq0 + k) & 0xFFFF,
                (ts0 + k * FRAME) & 0xFFFFFFFF,
            )
        )
    return out


def check_timeline(released: list[Released]) -> None:
    """Slots leave in order, one frame apart in pts, never before they are due."""
    pts = [frame.pts for _, frame in released]
    assert pts == list(range(pts[0], pts[0] + FRAME * len(pts), FRAME))
    for when, frame in released:
        assert when >= frame.due - 1e-12


# --- the Sans-I/O core ------------------------------------------------------------------


def test_calm_network_gives_small_constant_delay() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(200)
    released = simulate(buffer, arrivals, until=5.0, keep_tail=True)
    check_timeline(released)
    # After the last packet, max_conceal (200 ms) of concealment, then a pause.
    assert [f.concealed for _, f in released] == [False] * 200 + [True] * 10
    assert buffer.get_timer() is None
    released = released[:200]
    # The first frames wait initial_delay (20 ms); the delay then shrinks at
    # 10 % to min_delay (4 ms) and stays there.
    waits = [when - arrivals[f.payload][0] for when, f in released if f.payload is not None]
    assert waits[0] == pytest.approx(0.020)
    assert all(w == pytest.approx(0.004, abs=1e-9) for w in waits[40:])
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(waits))
    assert buffer.delay == pytest.approx(0.004)
    assert buffer.stats.played == 200 and buffer.stats.late == 0


def test_jitter_grows_the_delay_to_cover_it() -> None:
    rng = random.Random(7)
    jitter = {k: rng.uniform(0, 0.030) for k in range(500)}
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    released = simulate(buffer, stream(500, jitter=jitter.__getitem__), until=12.0)
    check_timeline(released)
    # About 1 - quantile (3 %) of the packets may come after their slot.
    assert buffer.stats.late <= 0.05 * 500
    assert buffer.stats.played == len([f for _, f in released if not f.concealed])
    assert buffer.stats.played >= 0.95 * 500
    # Uniform 0-30 ms (reordering allowed): the 97th percentile is ≈ 29 ms.
    assert 0.025 <= buffer.delay <= 0.040
    assert buffer.stats.jitter > 0.005


def test_delay_shrinks_again_when_the_network_calms_down() -> None:
    rng = random.Random(3)
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer(JitterBufferConfig(window=100))
    # 4 s of 0-60 ms jitter, then 8 s calm.
    arrivals = stream(600, jitter=lambda k: rng.uniform(0, 0.060) if k < 200 else 0.0)
    released = simulate(buffer, arrivals, until=4.0)
    jittery = buffer.delay
    assert jittery > 0.045
    released += simulate(buffer, sorted(arrivals)[buffer.stats.received :], until=13.0)
    check_timeline(released)
    assert buffer.delay == pytest.approx(0.004)
    # Never faster than shrink_rate: consecutive frames leave at least 18 ms apart.
    times = [when for when, _ in released[200:]]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.018 - 1e-9


def test_lost_packet_is_concealed_on_time_without_stalling() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(100, lose={50, 70, 71})
    released = simulate(buffer, arrivals, until=3.0)
    check_timeline(released)
    concealed = [frame for _, frame in released if frame.concealed]
    assert [f.pts // FRAME for f in concealed] == [50, 70, 71]
    assert buffer.stats.played == 97 and len(released) == 100
    # Every slot, concealed or not, left at its due time: 20 ms apart, no stall.
    times = [when for when, _ in released[40:]]
    assert max(b - a for a, b in itertools.pairwise(times)) == pytest.approx(0.020)


def test_packet_arriving_after_its_slot_is_dropped_as_late() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(100)
    t, seq, ts = arrivals[60]
    arrivals[60] = (t + 0.100, seq, ts)  # 100 ms late: its slot is concealed
    released = simulate(buffer, arrivals, until=3.0)
    check_timeline(released)
    assert [f.pts // FRAME for _, f in released if f.concealed] == [60]
    assert buffer.stats.late == 1
    # One late packet in 100 is within the 3 % the 97th percentile leaves out.
    assert buffer.stats.max_delay_seen == pytest.approx(0.020)


def test_repeated_late_packets_grow_the_delay_until_they_are_on_time() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(400, jitter=lambda k: 0.060 if k % 10 == 5 else 0.0)
    released = simulate(buffer, arrivals, until=9.0)
    check_timeline(released)
    late = [f.pts // FRAME for _, f in released if f.concealed]
    assert late and max(late) < 40  # late only until the delay covered 60 ms
    assert buffer.stats.late == len(late)
    assert 0.060 <= buffer.delay <= 0.065


#: Starts with enough buffering for the first reordered packet (12 ms late) to be on
#: time; later ones are covered by the statistics (1 in 10 packets: above 3 %).
REORDER_CONFIG = JitterBufferConfig(initial_delay=0.030)


def test_reordered_packets_play_in_order() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer(REORDER_CONFIG)
    arrivals = stream(100, jitter=lambda k: 0.012 if k % 10 == 5 else 0.0)  # 5 after 6
    released = simulate(buffer, arrivals, until=3.0)
    check_timeline(released)
    assert [f.payload for _, f in released] == list(range(100))  # none concealed
    assert buffer.stats.late == 0


def test_duplicates_are_dropped() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(50)
    arrivals += [(t + 0.001, seq, ts) for t, seq, ts in arrivals[10:20]]  # held copies
    arrivals += [(t + 0.3, seq, ts) for t, seq, ts in arrivals[30:32]]  # played copies
    released = simulate(buffer, arrivals, until=2.0)
    check_timeline(released)
    assert len(released) == 50
    assert buffer.stats.duplicates == 12


def test_sequence_and_timestamp_wrap_are_seamless() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer(REORDER_CONFIG)
    # Sequence numbers wrap after packet 35, timestamps after 39; 35 comes after 36.
    arrivals = stream(
        100,
        seq0=65500,
        ts0=(1 << 32) - 40 * FRAME,
        lose={60},
        jitter=lambda k: 0.012 if k % 10 == 5 else 0.0,
    )
    released = simulate(buffer, arrivals, until=3.0)
    check_timeline(released)
    assert len(released) == 100 and released[-1][1].pts == 99 * FRAME
    assert [f.pts // FRAME for _, f in released if f.concealed] == [60]
    assert buffer.stats.late == 0 and buffer.stats.resyncs == 0


def test_timestamp_jump_starts_a_new_schedule_with_continuous_pts() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(50) + stream(50, seq0=1050, ts0=123456 + 10**7, start=1.0)
    released = simulate(buffer, arrivals, until=3.0)
    check_timeline(released)
    assert len(released) == 100
    assert buffer.stats.resyncs == 1 and buffer.stats.late == 0
    # The new timeline is scheduled from its own arrivals: small delay again.
    assert buffer.delay == pytest.approx(0.004)


def test_sequence_restart_starts_a_new_schedule() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(50) + stream(50, seq0=5, ts0=123456 + 50 * FRAME, start=1.0)
    released = simulate(buffer, arrivals, until=3.0)
    assert buffer.stats.resyncs == 1
    assert [f.payload for _, f in released] == list(range(100))


def test_pause_conceals_a_little_then_waits_and_resumes() -> None:
    config = JitterBufferConfig(max_conceal=0.1)
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer(config)
    # DTX-like: 1 s without packets, timestamps and sequence numbers go on where
    # the sender resumes (sequence contiguous, timestamp + 1 s).
    arrivals = stream(50) + stream(50, seq0=1050, ts0=123456 + 100 * FRAME, start=2.0)
    released = simulate(buffer, arrivals[:50], until=1.9, keep_tail=True)
    assert buffer.stats.concealed == 5  # 100 ms, then nothing
    assert buffer.get_timer() is None  # paused: no busy timer
    released += simulate(buffer, arrivals[50:], until=4.0)
    assert buffer.stats.played == 100 and buffer.stats.late == 0
    assert buffer.stats.skipped == 45 and buffer.stats.resyncs == 0
    pts = [f.pts // FRAME for _, f in released]
    assert pts == [*range(55), *range(100, 150)]


def test_frame_length_is_learnt_and_survives_timestamp_jumps() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    assert buffer.frame_length == FRAME  # 20 ms until packets show otherwise
    # 10 ms frames; packet 30 lost; a DTX-like jump of 1 s before packet 40.
    arrivals = [
        (k * 0.010 + (1.0 if k >= 40 else 0.0), 7 + k, 480 * k + (RATE if k >= 40 else 0))
        for k in range(60)
        if k != 30
    ]
    released = simulate(buffer, arrivals, until=2.0)
    assert buffer.frame_length == 480
    concealed = [f.pts for _, f in released if f.concealed]
    assert concealed[0] == 30 * 480  # the lost packet's slot, 10 ms long
    assert buffer.stats.played == 59 and buffer.stats.late == 0


def test_delay_is_bounded() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    arrivals = stream(100, jitter=lambda k: 0.8 if k % 7 == 0 else 0.0)  # huge spikes
    simulate(buffer, arrivals, until=4.0)
    assert buffer.stats.max_delay_seen <= buffer.config.max_delay + 1e-9
    assert buffer.stats.resyncs == 0


def test_bad_input_names_the_field() -> None:
    buffer: AdaptiveJitterBuffer[int] = AdaptiveJitterBuffer()
    with pytest.raises(ValueError, match="sequence_number"):
        buffer.receive_packet(70000, 0, 0, 0.0)
    with pytest.raises(ValueError, match="timestamp"):
        buffer.receive_packet(1, -1, 0, 0.0)
    assert buffer.stats.received == 0 and buffer.get_timer() is None
    cases: list[tuple[str, dict[str, Any]]] = [
        ("clock_rate", {"clock_rate": 0}),
        ("frame_duration", {"frame_duration": 0.5}),
        ("min_delay", {"min_delay": 0.5}),
        ("initial_delay", {"initial_delay": 0.001}),
        ("quantile", {"quantile": 0.0}),
        ("window", {"window": 0}),
        ("resync_threshold", {"resync_threshold": 0.1}),
    ]
    for field, kwargs in cases:
        with pytest.raises(ValueError, match=field):
            JitterBufferConfig(**kwargs)


# --- concealment through the real decoders ----------------------------------------------------


def test_opus_concealment_payload_decodes_to_a_frame_of_plc() -> None:
    encoder, decoder = OpusEncoder(), OpusDecoder()
    codec = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
    packets: list[bytes] = []
    for k in range(6):
        x = np.sin(2 * np.pi * 440 * np.arange(k * FRAME, (k + 1) * FRAME) / RATE) * 8000
        frame = av.AudioFrame.from_ndarray(x.astype(np.int16).reshape(1, -1), layout="mono")
        frame.sample_rate, frame.pts = RATE, k * FRAME
        packets += encoder.encode(frame)[0]
    out: list[av.AudioFrame] = []
    for k, data in enumerate(packets):
        if k == 3:
            concealed = conceal_payload(codec, packets[2], FRAME)
            assert concealed is not None and len(concealed) == 1 and concealed[0] & 0x03 == 0
            data = concealed
        # An Opus decoder's frames are audio frames.
        out += cast("list[av.AudioFrame]", decoder.decode(JitterFrame(data, k * FRAME)))
    assert [f.samples for f in out] == [FRAME] * len(packets)
    assert [f.pts for f in out] == [k * FRAME for k in range(len(packets))]
    plc = out[3].to_ndarray()
    assert np.abs(plc).max() > 1000  # PLC continues the tone, not silence


def test_g711_and_unknown_concealment_payloads() -> None:
    pcmu = RTCRtpCodecParameters(mimeType="audio/PCMU", clockRate=8000)
    pcma = RTCRtpCodecParameters(mimeType="audio/PCMA", clockRate=8000)
    other = RTCRtpCodecParameters(mimeType="audio/G722", clockRate=8000)
    assert conceal_payload(pcmu, b"\x00" * 160, 160) == b"\xff" * 160
    assert conceal_payload(pcma, b"\x00" * 160, 160) == b"\xd5" * 160
    assert conceal_payload(other, b"\x00", 160) is None
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2)
    assert conceal_payload(opus, b"", FRAME) is None


# --- the aiortc glue ----------------------------------------------------------------------


def test_version_check() -> None:
    check_aiortc_version("1.16.2")
    for version in ("1.15.0", "1.17.0", "2.0", "x"):
        with pytest.raises(CallError, match="jitter_buffer='stock'"):
            check_aiortc_version(version)


async def test_install_is_per_instance_and_idempotent() -> None:
    adaptive = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    stock = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        adaptive.addTransceiver("audio")
        adaptive.addTransceiver("video")
        stock.addTransceiver("audio")
        installed = install_jitter_buffer(adaptive)
        assert len(installed) == 1 and isinstance(installed[0], ReceiverJitterBuffer)
        assert install_jitter_buffer(adaptive) == installed
        audio, video = (t.receiver for t in adaptive.getTransceivers())
        assert get_jitter_buffer(audio) is installed[0]
        assert getattr(audio, "_RTCRtpReceiver__jitter_buffer") is installed[0]
        assert isinstance(getattr(video, "_RTCRtpReceiver__jitter_buffer"), JitterBuffer)
        other = stock.getTransceivers()[0].receiver
        assert get_jitter_buffer(other) is None
        assert isinstance(getattr(other, "_RTCRtpReceiver__jitter_buffer"), JitterBuffer)
        with pytest.raises(CallError, match="audio"):
            install_jitter_buffer(video)
        with pytest.raises(CallError, match="target"):
            install_jitter_buffer("pc")  # type: ignore[arg-type]
    finally:
        await adaptive.close()
        await stock.close()


async def test_call_options_modes() -> None:
    pcs = [RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(3)]
    try:
        for pc in pcs:
            pc.addTransceiver("audio")
        assert len(apply_jitter_buffer_mode(pcs[0], "adaptive")) == 1
        assert apply_jitter_buffer_mode(pcs[1], "stock") == []
        assert get_jitter_buffer(pcs[1].getTransceivers()[0].receiver) is None
        with pytest.raises(CallError, match="jitter_buffer: unknown mode 'fast'"):
            apply_jitter_buffer_mode(pcs[2], "fast")
    finally:
        for pc in pcs:
            await pc.close()


async def run_call(
    tmp_path: Path,
    mode: str,
    profile: str,
    seconds: float,
    seed: int = 1,
    stall_every: float | None = None,
) -> dict[str, Any]:
    """A ToneTrack → Opus → DTLS-SRTP → WavRecorder call between two local peers.

    ``stall_every``: block the event loop for 80 ms that often (a busy process).
    """
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    callee = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    apply_profile(caller, get_profile(profile), seed=2 * seed)
    apply_profile(callee, get_profile(profile), seed=2 * seed + 1)
    warm_up, spacing = 1.0, 0.5  # spacing > the largest latency measured
    tone = ToneTrack(1000, chirp_at=np.arange(warm_up, seconds, spacing).tolist())
    recorder = WavRecorder(tmp_path / f"{mode}-{profile}.wav")
    got_track = asyncio.Event()
    if mode == "adaptive":
        install_jitter_buffer(callee)  # receivers come with the offer: the track event

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
        deadline = time.monotonic() + seconds + 10 * TIMEOUT_FACTOR
        next_stall = warm_up
        while tone.seconds_sent < seconds + 0.3:
            assert time.monotonic() < deadline, "audio did not flow"
            await asyncio.sleep(0.05)
            if stall_every is not None and tone.seconds_sent > next_stall:
                next_stall += stall_every
                time.sleep(0.080)  # blocks the whole event loop, as a busy process would
        buffer = get_jitter_buffer(callee.getTransceivers()[0].receiver)
        assert (buffer is not None) == (mode == "adaptive")
    finally:
        await recorder.stop()
        await caller.close()
        await callee.close()
    samples, rate = read_wav(recorder.path)
    found = find_chirps(samples, rate, tone.chirp)
    latencies = one_way_latencies(tone.chirp_send_times, recorder.arrivals, found, rate)
    settled = [a for a in recorder.arrivals if a.sample_offset >= warm_up * SAMPLE_RATE]
    gaps = [b.arrival_time - a.arrival_time for a, b in itertools.pairwise(settled)]
    return {
        "latencies": latencies,
        "median_ms": 1000 * statistics.median(latencies),
        "sent": len(tone.chirp_send_times),
        "long_gaps": sum(gap > 0.1 for gap in gaps),
        "max_gap": max(gaps),
        "frames": recorder.samples_written / FRAME,
        "silence_frames": recorder.concealed_samples / FRAME,
        "buffer": buffer,
    }


# Under heavy load (other jobs on a small machine) the event loop stalls for tens
# of milliseconds: the bounds below leave room for that (TIMEOUT_FACTOR scales them);
# the figures printed, and docs/jitter-buffer.md, give the real values.


@pytest.mark.slow
async def test_loopback_latency_adaptive_vs_stock(tmp_path: Path) -> None:
    # A run during which this machine stalled (the application saw a pause of more
    # than 100 ms: other jobs on a small CI machine) says nothing about steady-state
    # latency; up to three runs are made and the first undisturbed one is checked.
    attempts = []
    for _ in range(3):
        adaptive = await run_call(tmp_path, "adaptive", "loopback", 4.0)
        attempts.append(adaptive)
        if adaptive["long_gaps"] == 0:
            break
    stock = await run_call(tmp_path, "stock", "loopback", 2.5)
    medians = ", ".join(f"{a['median_ms']:.1f}" for a in attempts)
    print(
        f"\nloopback one-way latency: adaptive {medians} ms "
        f"(pauses > 100 ms: {[a['long_gaps'] for a in attempts]}), "
        f"stock {stock['median_ms']:.1f} ms"
    )
    assert len(adaptive["latencies"]) >= 0.6 * adaptive["sent"]
    # The issue asks for <= 40 ms (measured ≈ 15 ms); looser here for loaded CI machines.
    assert adaptive["median_ms"] < 60 * TIMEOUT_FACTOR
    assert adaptive["median_ms"] < stock["median_ms"]
    stats = adaptive["buffer"].stats
    assert stats.played > 150 and stats.concealed <= 0.1 * adaptive["frames"]


@pytest.mark.slow
async def test_blocked_event_loop_is_not_mistaken_for_network_jitter(tmp_path: Path) -> None:
    result = await run_call(tmp_path, "adaptive", "loopback", 4.0, stall_every=0.5)
    buffer = result["buffer"]
    print(
        f"\nloopback with an 80 ms loop stall every 0.5 s: one-way {result['median_ms']:.1f} ms, "
        f"{buffer.stalls} stalls seen, buffering {1000 * buffer.stats.delay:.1f} ms "
        f"(max {1000 * buffer.stats.max_delay_seen:.1f}), {buffer.stats.concealed} concealed"
    )
    assert buffer.stalls >= 4
    # Without the stall detection the 97th percentile would sit near 80 ms. (The
    # chirps' latency itself includes the stalls: not asserted.)
    assert buffer.stats.delay < 0.040 * TIMEOUT_FACTOR


@pytest.mark.slow
async def test_lossy_audio_keeps_flowing_with_concealment(tmp_path: Path) -> None:
    result = await run_call(tmp_path, "adaptive", "lossy", 5.0)
    stock = await run_call(tmp_path, "stock", "lossy", 3.0)
    stats = result["buffer"].stats
    missing = (stats.concealed + result["silence_frames"]) / result["frames"]
    stock_missing = stock["silence_frames"] / stock["frames"]
    print(
        f"\nlossy (30 ± 20 ms, 5 % loss): adaptive one-way {result['median_ms']:.1f} ms, "
        f"{100 * missing:.1f} % of frames concealed, buffering {1000 * stats.delay:.1f} ms, "
        f"longest pause {1000 * result['max_gap']:.1f} ms, {result['long_gaps']} pauses "
        f"> 100 ms; stock one-way {stock['median_ms']:.1f} ms, {100 * stock_missing:.1f} % "
        f"missing, longest pause {1000 * stock['max_gap']:.1f} ms"
    )
    assert stats.played + stats.concealed >= 0.9 * result["frames"]  # audio flowed
    assert missing < 0.15  # 5 % loss, plus the few late packets the quantile allows
    assert result["silence_frames"] <= 0.02 * result["frames"]  # losses concealed by PLC
    assert result["long_gaps"] <= 2  # no stalls
    # The stock buffer waits for 16 packets behind each loss, then plays one frame
    # per packet: ≈ 300 ms late, and it drops about a quarter of the frames.
    assert missing < stock_missing and result["median_ms"] < stock["median_ms"]
    assert stats.max_delay_seen <= result["buffer"].core.config.max_delay + 1e-9  # bounded
    assert len(result["latencies"]) >= 0.75 * result["sent"]
    assert result["median_ms"] < 250 * TIMEOUT_FACTOR  # ≈ 62 ms on an idle machine
