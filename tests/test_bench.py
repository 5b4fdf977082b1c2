"""The latency harness: its pure parts, then a tiny real run (signaling, KMEs, calls, plots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcall.bench.report import build_report, markdown, phase_durations, summary
from qcall.bench.runner import MODES, PHASES, BenchConfig, CallResult, schedule
from qcall.call.netem import PROFILES
from qcall.cli.bench import main

# --- pure parts ----------------------------------------------------------------------


def test_schedule_interleaves_and_rotates() -> None:
    order = schedule(MODES, calls=3, warmup=1)
    assert len(order) == 16
    assert [m for m, _, _ in order[:4]] == ["plain", "fast-plain", "pqc", "hybrid"]
    assert [m for m, _, _ in order[4:8]] == ["fast-plain", "pqc", "hybrid", "plain"]
    assert [w for _, _, w in order] == [True] * 4 + [False] * 12
    for mode in MODES:  # every mode equally often, in every round
        assert sum(1 for m, _, w in order if m == mode and not w) == 3


def test_summary_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    data = list(rng.exponential(50.0, 101))
    got = summary([*data, None])
    assert got["n"] == 101
    assert got["p50"] == pytest.approx(float(np.median(data)), abs=0.01)
    assert got["p90"] == pytest.approx(float(np.percentile(data, 90)), abs=0.01)
    assert got["max"] == pytest.approx(max(data), abs=0.01)
    assert summary([None])["p50"] is None


def test_phase_durations_follow_the_milestones() -> None:
    milestones = {"sdp_sent": 2.0, "accepted": 2.5, "answer_received": 9.0,
                  "ice_connected": 30.0, "offer_sent": 12.0, "dtls_done": 41.0,
                  "confirmed": 44.0, "media": 41.5, "first_audio": 130.0,
                  "qkd_fetch": 3.0}  # fmt: skip
    phases = phase_durations(milestones)
    assert list(phases) == [key for key, _ in PHASES]
    assert sum(phases.values()) == pytest.approx(130.0)
    assert phases["ice_connected"] == pytest.approx(21.0)
    # plain has no key confirmation; an out-of-order milestone gives a zero phase
    plain = phase_durations({"accepted": 1.0, "dtls_done": 20.0, "ice_connected": 25.0})
    assert plain == {"accepted": 1.0, "ice_connected": 24.0, "dtls_done": 0.0}


def test_report_ratios_and_checks() -> None:
    results = []
    for i, setup in enumerate([50.0, 52.0, 54.0]):
        for mode, factor in (("plain", 1.0), ("pqc", 1.02), ("hybrid", 1.05)):
            results.append(CallResult(
                mode, i, warmup=False, ok=True, setup_ms=setup * factor,
                first_audio_ms=setup * factor + 80, one_way_ms=[30.0, 32.0],
                caller_ms={"media": setup * factor}, packets_received=100, packets_lost=1,
            ))  # fmt: skip
    results.append(CallResult("hybrid", 9, warmup=True, ok=True, setup_ms=900.0))
    config = BenchConfig(calls=3, profile=PROFILES["loopback"], modes=("plain", "pqc", "hybrid"))
    report = build_report(config, results)
    assert report["modes"]["hybrid"]["setup_ms"]["p50"] == pytest.approx(52.0 * 1.05, abs=0.01)
    assert report["modes"]["hybrid"]["setup_ms"]["max"] < 900  # warm-up not counted
    assert report["ratio"]["hybrid_over_plain_setup"] == pytest.approx(1.05, abs=0.001)
    assert report["modes"]["plain"]["loss"]["fraction"] == pytest.approx(3 / 303, abs=1e-4)
    assert report["checks"]["hybrid_setup_within_1.10x_plain"] is True
    assert report["checks"]["loopback_one_way_p50_le_40ms"] is True
    text = markdown(report)
    assert "callee: answer signed and sent | – | – | – |" in text  # no callee milestones
    assert "| hybrid | 3 |" in text and "hybrid_over_plain_setup = 1.050" in text


def test_report_fast_setup_targets() -> None:
    """Issue 16: both ratios in one run, the loopback and lossy targets, CPU per side."""
    results = []
    for i in range(3):
        for mode, setup in (("plain", 30.0), ("fast-plain", 12.0), ("hybrid", 12.3)):
            results.append(CallResult(
                mode, i, warmup=False, ok=True, setup_ms=setup + i, caller_ms={"media": setup},
                cpu_ms={"caller": 100.0 + i, "callee": 80.0}, call_s=2.0,
            ))  # fmt: skip
    config = BenchConfig(
        calls=3, profile=PROFILES["loopback"], modes=("plain", "fast-plain", "hybrid")
    )
    report = build_report(config, results)
    assert report["ratio"]["hybrid_over_plain_setup"] == pytest.approx(13.3 / 31.0, abs=0.001)
    assert report["ratio"]["hybrid_over_fast_plain_setup"] == pytest.approx(13.3 / 13.0, abs=0.001)
    checks = report["checks"]
    assert checks["hybrid_setup_le_0.6x_stock_plain"] is True
    assert checks["hybrid_setup_le_1.02x_fast_plain"] is False  # 1.023
    assert checks["loopback_hybrid_setup_p50_le_20ms"] is True
    cpu = report["modes"]["hybrid"]
    assert cpu["cpu_ms_per_call"]["caller"]["p50"] == pytest.approx(101.0)
    assert cpu["cpu_percent_of_a_core"]["callee"]["p50"] == pytest.approx(4.0)
    assert "| callee | 80 ms (4.0 % of a core) |" in markdown(report)
    lossy = build_report(
        BenchConfig(calls=3, profile=PROFILES["lossy"], modes=("plain", "fast-plain", "hybrid")),
        results,
    )
    assert lossy["checks"]["lossy_setup_p90_le_400ms"] is True


# --- a tiny real run -----------------------------------------------------------------


@pytest.mark.slow
def test_harness_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([
        "--calls", "1", "--warmup", "0", "--seconds", "1.3", "--rekey-interval", "0.5",
        "--profile", "beijing-hefei", "--out", str(out), "--quiet",
    ])  # fmt: skip
    report = json.loads((out / "latency.json").read_text())
    assert code == 0, report["modes"]
    assert report["schema"] == "qcall-latency/1"
    assert report["config"]["profile"]["name"] == "beijing-hefei"
    for mode in MODES:
        m = report["modes"][mode]
        assert m["calls"] == 1 and m["failed"] == 0
        for key in ("setup_ms", "one_way_ms", "first_audio_ms"):
            assert set(m[key]) >= {"p50", "p90", "max"}
        assert 0 < m["setup_ms"]["p50"] < m["first_audio_ms"]["p50"] < 20_000
        # chirps found by cross-correlation; both directions cross ~5.5 ms of "fibre"
        assert m["chirps"]["found"] >= 1
        assert 5.5 < m["one_way_ms"]["p50"] < 1000
        assert m["decrypt_failures"] == 0
        assert m["netem"]["datagrams"] > 50
        assert m["netem"]["achieved_delay_ms"]["p50"] >= PROFILES["beijing-hefei"].delay_ms
        assert m["breakdown_ms"]["ice_connected"]["p50"] is not None
    assert report["modes"]["hybrid"]["qkd_fetch_ms"]["p50"] is not None
    for mode in ("pqc", "hybrid"):  # where the signed offer's time goes, on each side
        m = report["modes"][mode]
        at = [m["milestones_ms"][k]["p50"] for k in ("offer_key_wait", "offer_signed")]
        assert 0 < at[0] <= at[1] <= m["milestones_ms"]["offer_sent"]["p50"]
        for key in ("offer_verified", "answer_sdp_ready", "answer_sent"):
            assert m["callee_spans_ms"][key]["p50"] >= 0
    assert report["modes"]["plain"]["callee_spans_ms"]["answer_sent"]["n"] == 0
    assert report["modes"]["hybrid"]["rekeys"] >= 1  # decrypt failures counted across rekeys
    assert report["modes"]["pqc"]["compute_ms"]["callee"]["p50"] > 0
    assert isinstance(report["ratio"]["hybrid_over_plain_setup"], float)
    assert len(report["calls"]) == len(MODES)
    for mode in MODES:  # CPU per call and side, from each process's own counters
        for side in ("caller", "callee"):
            assert report["modes"][mode]["cpu_ms_per_call"][side]["p50"] > 0
    assert isinstance(report["ratio"]["hybrid_over_fast_plain_setup"], float)
    for name in ("latency.md", "setup_breakdown.png", "latency_distributions.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "setup_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((out / "audio").glob("*.wav"))  # recordings removed unless --keep-audio


def test_a_restarted_callee_keeps_its_name(tmp_path: Path) -> None:
    """After a failed call the harness starts a fresh callee process: it must come back
    with the same identity, or the server (which pins bob's key) refuses the name and
    the whole run stops (seen on the ``lossy`` profile)."""
    import asyncio

    from qcall.bench.runner import Lab
    from qcall.identity import Identity

    async def run() -> tuple[bytes, bytes]:
        async with Lab.start(tmp_path) as lab:
            first = Identity.load(tmp_path / "bob").public_key
            await lab.restart_callee()  # raised CallError (name_taken) before the fix
            return first, Identity.load(tmp_path / "bob").public_key

    first, again = asyncio.run(run())
    assert first == again
