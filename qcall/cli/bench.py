"""``qcall bench``: the latency harness (also ``scripts/latency.py``).

Runs ``--calls`` calls per mode (``plain`` baseline, ``pqc``, ``hybrid``),
interleaved, through the real signaling server and the simulated Beijing–Hefei
KMEs, over a user-space network profile, and writes ``latency.json``,
``latency.md`` and PNG plots into ``--out`` (see :mod:`qcall.bench` and
docs/performance.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_arguments", "main", "register"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's options (shared by ``qcall bench`` and ``scripts/latency.py``)."""
    from qcall.call.netem import PROFILES

    parser.add_argument("--calls", type=int, default=10, metavar="N", help="calls per mode (10)")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="loopback",
        help="emulated network, each direction (loopback)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR",
                        help="output directory (bench-out)")  # fmt: skip
    parser.add_argument(
        "--modes", default="plain,fast-plain,pqc,hybrid", metavar="LIST",
        help="comma-separated modes to compare (plain,fast-plain,pqc,hybrid; plain is "
        "stock aiortc, fast-plain the same fast transport as pqc/hybrid)",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=2.0, metavar="S",
                        help="audio per call after setup (2.0)")  # fmt: skip
    parser.add_argument("--rekey-interval", type=float, default=0.9, metavar="S",
                        help="seconds between rekeys in pqc/hybrid calls (0.9)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="uncounted rounds first (1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="network emulation seed (0)")
    parser.add_argument("--keep-audio", action="store_true", help="keep each call's WAV")
    parser.add_argument(
        "--no-signaling-delay", action="store_true",
        help="keep the signaling path on bare loopback (default: half the profile's "
        "one-way delay on each user's leg to the server)",
    )  # fmt: skip
    parser.add_argument(
        "--timers", choices=("precise", "epoll"), default="precise",
        help="event loop of the harness's processes: precise (select, timers ≈ 0.1 ms "
        "late) or epoll (asyncio's default: whole milliseconds, rounded up, so each "
        "emulated one-way trip ≈ 0.5 ms longer) (precise)",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand."""
    parser = sub.add_parser(
        "bench",
        help="latency harness: setup time, one-way audio latency, plain vs pqc vs hybrid",
        description=(
            "Run N calls per mode (plain: stock aiortc DTLS-SRTP; fast-plain: DTLS-SRTP over "
            "qcall's fast transport; pqc; hybrid), interleaved, "
            "through the real signaling server and the simulated beijing-hefei KMEs over an "
            "emulated network; write latency.json, latency.md and PNG plots."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the harness; 0 when every call connected with no decrypt failure."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qcall.bench.report import build_report, markdown, write_report
    from qcall.bench.runner import BenchConfig, run_bench, schedule
    from qcall.call.netem import TIMERS_ENV, get_profile, run as run_loop
    from qcall.exceptions import CallError

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if args.calls < 1 or args.warmup < 0 or args.seconds <= 0 or args.rekey_interval <= 0:
        raise CallError("--calls must be >= 1, --warmup >= 0, --seconds and --rekey-interval > 0")
    config = BenchConfig(
        calls=args.calls,
        profile=get_profile(args.profile),
        modes=modes,
        seconds=args.seconds,
        rekey_interval=args.rekey_interval,
        warmup=args.warmup,
        seed=args.seed,
        out=args.out,
        keep_audio=args.keep_audio,
        signaling_delay=not args.no_signaling_delay,
        timers=args.timers,
    )
    console = Console(stderr=True)
    total = len(schedule(modes, config.calls, config.warmup))
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, disable=args.quiet, transient=False,
    ) as bar:  # fmt: skip
        task = bar.add_task("starting the lab", total=total)

        def progress(text: str, done: int) -> None:
            bar.update(task, description=text, completed=done)

        os.environ[TIMERS_ENV] = config.timers  # the callee's and the server's processes too
        results = run_loop(run_bench(config, progress), config.timers)
    report = build_report(config, results, wall_s=time.monotonic() - started)
    paths = write_report(args.out, report)
    if not args.no_plots:
        from qcall.bench.plots import write_plots

        paths += write_plots(args.out, report)
    if not args.quiet:
        print(markdown(report))
        console.print("wrote " + ", ".join(str(p) for p in paths))
    checks = report["checks"]
    return 0 if checks["all_calls_connected"] and checks["zero_decrypt_failures"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/latency.py``: the same as ``qcall bench``."""
    from qcall.exceptions import QCallError

    parser = argparse.ArgumentParser(
        prog="latency.py",
        description="qcall latency harness: plain vs pqc vs hybrid call setup and audio latency",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except QCallError as exc:
        print(f"latency.py: {exc}", file=sys.stderr)
        return 1
