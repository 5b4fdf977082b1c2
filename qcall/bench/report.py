"""Turn the harness's call results into ``latency.json`` and a Markdown table.

Statistics are over the counted (non-warm-up) calls that connected: ``p50``
is the median, ``p90`` the 90th percentile (linear interpolation between
order statistics, numpy's default), ``max`` the largest value. One-way
latency pools every chirp of every call of a mode.

Definitions (docs/performance.md):

* **setup_ms** — from the caller's ``dial()`` to the moment its outbound media
  is keyed and allowed: DTLS-SRTP connected (``plain``), key confirmation
  received and the hybrid SRTP keys armed (``pqc``, ``hybrid``). The same
  milestone (``CallStatus.timings_ms["media"]``) for every mode.
* **first_audio_ms** — from the caller's ``dial()`` to the first audio frame
  the callee decodes (same clock: both phones run in one process).
* **one_way_ms** — for each marker chirp: its receive time at the callee's
  sink minus its send time at the caller's track (encode, packetize, SRTP,
  network, jitter buffer, decode).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcall.bench.runner import CALLEE_SPANS, OVERLAPPING, PHASES, BenchConfig, CallResult

__all__ = ["SCHEMA", "TARGETS", "build_report", "markdown", "summary", "write_report"]

SCHEMA = "qcall-latency/1"

#: Issue 5's targets, then issue 16's (``plain`` is stock aiortc, ``fast-plain`` the
#: same fast transport as ``hybrid`` without QKD or ML-KEM).
TARGETS = {
    "hybrid_over_plain_setup_max": 1.10,
    "loopback_one_way_p50_max_ms": 40.0,
    "hybrid_over_stock_plain_setup_max": 0.6,
    "hybrid_over_fast_plain_setup_max": 1.02,
    "loopback_hybrid_setup_p50_max_ms": 20.0,
    "path_round_trips_max": 3.0,
    "lossy_setup_p90_max_ms": 400.0,
}


def summary(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``{n, p50, p90, max, min}`` of the values that are not ``None`` (``None`` if empty)."""
    data = np.array([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {"n": 0, "p50": None, "p90": None, "max": None, "min": None}
    return {
        "n": int(data.size),
        "p50": round(float(np.percentile(data, 50)), 2),
        "p90": round(float(np.percentile(data, 90)), 2),
        "max": round(float(data.max()), 2),
        "min": round(float(data.min()), 2),
    }


def phase_durations(milestones: dict[str, float]) -> dict[str, float]:
    """Split a call's caller-side milestones into consecutive phase durations (ms).

    A missing milestone gives no phase (its time falls into the next one); a
    milestone earlier than the previous one gives a zero-length phase.
    """
    out: dict[str, float] = {}
    previous = 0.0
    for key, _label in PHASES:
        if key not in milestones:
            continue
        at = float(milestones[key])
        out[key] = round(max(0.0, at - previous), 3)
        previous = max(previous, at)
    return out


def _span(milestones: dict[str, float], start: str, end: str) -> float | None:
    if start not in milestones or end not in milestones:
        return None
    return round(float(milestones[end]) - float(milestones[start]), 3)


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(float(a) / float(b), 3)


def _mode_report(calls: Sequence[CallResult]) -> dict[str, Any]:
    ok = [c for c in calls if c.ok]
    received = sum(c.packets_received or 0 for c in ok)
    lost = sum(c.packets_lost or 0 for c in ok)
    phases = [phase_durations(c.caller_ms) for c in ok]
    netem = [c.netem for c in ok if c.netem]
    datagrams = sum(n["datagrams"] for n in netem)
    dropped = sum(n["dropped"] for n in netem)
    return {
        "calls": len(ok),
        "failed": len(calls) - len(ok),
        "errors": sorted({c.error for c in calls if c.error}),
        "setup_ms": summary(c.setup_ms for c in ok),
        "first_audio_ms": summary(c.first_audio_ms for c in ok),
        "one_way_ms": summary(v for c in ok for v in c.one_way_ms),
        "chirps": {
            "sent": sum(c.chirps_sent for c in ok),
            "found": sum(len(c.one_way_ms) for c in ok),
        },
        "breakdown_ms": {key: summary(p.get(key) for p in phases) for key, _ in PHASES},
        "milestones_ms": {key: summary(c.caller_ms.get(key) for c in ok) for key, _ in OVERLAPPING},
        "qkd_fetch_ms": summary(c.caller_ms.get("qkd_fetch") for c in ok),
        "callee_spans_ms": {
            end: summary(_span(c.callee_ms, start, end) for c in ok)
            for start, end, _ in CALLEE_SPANS
        },
        "compute_ms": {
            "caller": summary(c.caller_ms.get("compute") for c in ok),
            "callee": summary(c.callee_ms.get("compute") for c in ok),
        },
        "jitter_ms": summary(c.jitter_ms for c in ok),
        "loss": {
            "packets_received": received,
            "packets_lost": lost,
            "fraction": round(lost / (received + lost), 4) if received + lost else None,
        },
        "cpu_ms_per_call": {
            side: summary(c.cpu_ms.get(side) for c in ok) for side in ("caller", "callee")
        },
        "cpu_percent_of_a_core": {
            side: summary(
                c.cpu_ms[side] / (10 * c.call_s) if c.call_s and side in c.cpu_ms else None
                for c in ok
            )
            for side in ("caller", "callee")
        },
        "decrypt_failures": sum(c.decrypt_failures for c in calls),
        "rekeys": sum(c.rekeys for c in ok),
        "netem": {
            "datagrams": datagrams,
            "dropped": dropped,
            "achieved_loss": round(dropped / datagrams, 4) if datagrams else None,
            "achieved_delay_ms": summary(n.get("achieved_delay_ms_median") for n in netem),
        },
    }


def build_report(
    config: BenchConfig, results: Sequence[CallResult], *, wall_s: float | None = None
) -> dict[str, Any]:
    """The whole ``latency.json`` document."""
    counted = [r for r in results if not r.warmup]
    modes = {mode: _mode_report([r for r in counted if r.mode == mode]) for mode in config.modes}

    def p50(mode: str, key: str) -> float | int | None:
        if mode not in modes:
            return None
        value = modes[mode][key]["p50"]
        return value if isinstance(value, int | float) else None

    ratio = {
        "hybrid_over_plain_setup": _ratio(p50("hybrid", "setup_ms"), p50("plain", "setup_ms")),
        "pqc_over_plain_setup": _ratio(p50("pqc", "setup_ms"), p50("plain", "setup_ms")),
        "hybrid_over_plain_first_audio": _ratio(
            p50("hybrid", "first_audio_ms"), p50("plain", "first_audio_ms")
        ),
        "hybrid_over_plain_one_way": _ratio(
            p50("hybrid", "one_way_ms"), p50("plain", "one_way_ms")
        ),
        "hybrid_over_fast_plain_setup": _ratio(
            p50("hybrid", "setup_ms"), p50("fast-plain", "setup_ms")
        ),
        "fast_plain_over_plain_setup": _ratio(
            p50("fast-plain", "setup_ms"), p50("plain", "setup_ms")
        ),
    }
    hybrid_ratio = ratio["hybrid_over_plain_setup"]
    one_way = {m: p50(m, "one_way_ms") for m in modes}
    checks: dict[str, bool | None] = {
        "hybrid_setup_within_1.10x_plain": None
        if hybrid_ratio is None
        else hybrid_ratio <= TARGETS["hybrid_over_plain_setup_max"],
        "zero_decrypt_failures": all(m["decrypt_failures"] == 0 for m in modes.values()),
        "all_calls_connected": all(m["failed"] == 0 for m in modes.values()),
    }
    checks.update(_fast_setup_checks(config, modes, ratio))
    if config.profile.name == "loopback":
        checks["loopback_one_way_p50_le_40ms"] = all(
            v is not None and v <= TARGETS["loopback_one_way_p50_max_ms"] for v in one_way.values()
        )
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {
            "calls": config.calls,
            "warmup": config.warmup,
            "modes": list(config.modes),
            "profile": config.profile.as_dict(),
            "seconds_per_call": config.seconds,
            "rekey_interval_s": config.rekey_interval,
            "chirp_every_s": config.chirp_every,
            "seed": config.seed,
            "signaling_delay_ms_per_leg": config.profile.delay_ms / 2
            if config.signaling_delay
            else 0.0,
            "timers": config.timers,
            "wall_s": None if wall_s is None else round(wall_s, 1),
        },
        "phases": {key: label for key, label in PHASES},
        "overlapping": {key: label for key, label in OVERLAPPING},
        "callee_spans": {end: label for _, end, label in CALLEE_SPANS},
        "modes": modes,
        "ratio": ratio,
        "targets": dict(TARGETS),
        "checks": checks,
        "calls": [r.as_dict() for r in results],
    }


def _at_most(value: float | int | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _fast_setup_checks(
    config: BenchConfig, modes: dict[str, Any], ratio: dict[str, float | None]
) -> dict[str, bool | None]:
    """Issue 16's targets (docs/performance.md, "Set-up speed"), where the run has the modes."""
    checks: dict[str, bool | None] = {}
    hybrid = modes.get("hybrid")
    if "plain" in modes and hybrid is not None:
        checks["hybrid_setup_le_0.6x_stock_plain"] = _at_most(
            ratio["hybrid_over_plain_setup"], TARGETS["hybrid_over_stock_plain_setup_max"]
        )
    if "fast-plain" in modes and hybrid is not None:
        checks["hybrid_setup_le_1.02x_fast_plain"] = _at_most(
            ratio["hybrid_over_fast_plain_setup"], TARGETS["hybrid_over_fast_plain_setup_max"]
        )
    if hybrid is None:
        return checks
    setup = hybrid["setup_ms"]
    name = config.profile.name
    if name == "loopback":
        checks["loopback_hybrid_setup_p50_le_20ms"] = _at_most(
            setup["p50"], TARGETS["loopback_hybrid_setup_p50_max_ms"]
        )
    elif name == "lossy":
        checks["lossy_setup_p90_le_400ms"] = _at_most(
            setup["p90"], TARGETS["lossy_setup_p90_max_ms"]
        )
    elif config.profile.delay_ms > 0 and setup["p50"] is not None:
        rtt = 2 * config.profile.delay_ms
        compute = sum(hybrid["compute_ms"][side]["p50"] or 0.0 for side in ("caller", "callee"))
        hybrid["round_trips"] = round((setup["p50"] - compute) / rtt, 2)
        # The same in round trips of the path as achieved (the emulator's timer
        # lateness included: twice the median datagram's achieved one-way delay);
        # for information, the target stays on the configured RTT above.
        achieved = hybrid["netem"]["achieved_delay_ms"]["p50"]
        hybrid["round_trips_of_achieved_rtt"] = (
            round((setup["p50"] - compute) / (2 * achieved), 2) if achieved else None
        )
        checks[f"{name}_hybrid_setup_le_3_rtt_plus_compute"] = (
            hybrid["round_trips"] <= TARGETS["path_round_trips_max"]
        )
    return checks


def _machine() -> dict[str, Any]:
    import aiortc

    load = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
        "loadavg": load,
        "aiortc": getattr(aiortc, "__version__", "?"),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary: the per-mode table, the setup breakdown, the ratios."""
    cfg = report["config"]
    prof = cfg["profile"]
    lines = [
        f"# qcall latency — profile `{prof['name']}`",
        "",
        f"{cfg['calls']} calls per mode (+{cfg['warmup']} warm-up), interleaved; "
        f"{cfg['seconds_per_call']} s of audio per call, rekey every "
        f"{cfg['rekey_interval_s']} s. {prof.get('description') or ''}",
        f"Machine: {report['machine']['cpus']} CPUs, load average "
        f"{report['machine']['loadavg']} (shared; figures are noisy). Times in ms. "
        f"Event loop timers: {cfg.get('timers', 'epoll')} (docs/performance.md).",
        "",
        "| mode | calls | setup p50 | setup p90 | setup max | first audio p50 "
        "| one-way p50 | one-way p90 | one-way max | jitter p50 | loss | decrypt failures "
        "| rekeys |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in report["modes"].items():
        loss = m["loss"]["fraction"]
        failed = f" ({m['failed']} failed)" if m["failed"] else ""
        lines.append(
            f"| {mode} | {m['calls']}{failed} "
            f"| {_fmt(m['setup_ms']['p50'])} | {_fmt(m['setup_ms']['p90'])} "
            f"| {_fmt(m['setup_ms']['max'])} | {_fmt(m['first_audio_ms']['p50'])} "
            f"| {_fmt(m['one_way_ms']['p50'])} | {_fmt(m['one_way_ms']['p90'])} "
            f"| {_fmt(m['one_way_ms']['max'])} | {_fmt(m['jitter_ms']['p50'])} "
            f"| {'–' if loss is None else f'{loss:.1%}'} | {m['decrypt_failures']} "
            f"| {m['rekeys']} |"
        )
    lines += ["", "Setup breakdown (caller's timeline, medians of each phase):", ""]
    modes = list(report["modes"])
    lines.append("| phase | " + " | ".join(modes) + " |")
    lines.append("|---|" + "---|" * len(modes))
    for key, label in report["phases"].items():
        cells = [_fmt(report["modes"][m]["breakdown_ms"][key]["p50"]) for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in report.get("overlapping", {}).items():
        cells = [_fmt(report["modes"][m]["milestones_ms"][key]["p50"]) for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (("qkd_fetch_ms", "QKD status + enc_keys (duration)"),):
        cells = [_fmt(report["modes"][m][key]["p50"]) for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in report.get("callee_spans", {}).items():
        cells = [_fmt(report["modes"][m]["callee_spans_ms"][key]["p50"]) for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for side in ("caller", "callee"):
        cells = [_fmt(report["modes"][m]["compute_ms"][side]["p50"]) for m in modes]
        lines.append(
            f"| handshake CPU time, {side} (ML-KEM, ML-DSA, HKDF) | " + " | ".join(cells) + " |"
        )
    lines += ["", "CPU per call (each process's own getrusage, dial → hang-up, medians):", ""]
    lines.append("| side | " + " | ".join(modes) + " |")
    lines.append("|---|" + "---|" * len(modes))
    for side in ("caller", "callee"):
        cells = []
        for m in modes:
            cpu = report["modes"][m].get("cpu_ms_per_call", {}).get(side, {}).get("p50")
            share = report["modes"][m].get("cpu_percent_of_a_core", {}).get(side, {}).get("p50")
            cells.append("–" if cpu is None else f"{cpu:.0f} ms ({share:.1f} % of a core)")
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios of medians: "
        + ", ".join(
            f"{k} = {_fmt(v)}" if v is None else f"{k} = {v:.3f}"
            for k, v in report["ratio"].items()
        ),
    ]
    lines.append("Checks: " + ", ".join(f"{k}: {v}" for k, v in report["checks"].items()))
    errors = [e for m in report["modes"].values() for e in m["errors"]]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write ``latency.json`` and ``latency.md`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "latency.json"
    md_path = out / "latency.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return [json_path, md_path]
