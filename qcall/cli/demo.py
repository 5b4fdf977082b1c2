"""``qcall demo``: the Beijing–Hefei quantum-secured call, whole, on this machine.

See :mod:`qcall.call.demo` for what runs. ``--handshake-only`` instead runs the
hybrid handshake alone between two in-process parties
(:mod:`qcall.cli.handshake_demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "demo",
        help="the Beijing–Hefei quantum-secured call, on this machine",
        description=(
            "Start the simulated beijing-hefei QKD network (BB84 links over 965 km of "
            "trusted relays), a signaling server and two users as separate processes; "
            "alice (Beijing) calls bob (Hefei) with a test tone; check what bob hears; "
            "rekey during the call; print a report."
        ),
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="call duration (8)")
    parser.add_argument(
        "--rekey-interval", type=float, default=2.5, metavar="S", help="seconds between rekeys"
    )
    parser.add_argument("--tone", type=float, default=440.0, metavar="HZ", help="test tone (440)")
    parser.add_argument("--state", metavar="DIR", help="keep logs, WAV and reports in DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--handshake-only",
        action="store_true",
        help="only the hybrid handshake between two in-process parties (milliseconds)",
    )
    parser.add_argument(
        "--policy", choices=["hybrid", "pqc"], default="hybrid",
        help="with --handshake-only: hybrid (default) or pqc",
    )  # fmt: skip
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.handshake_only:
        from qcall.cli.handshake_demo import print_handshake_demo

        return print_handshake_demo(args)
    from qcall.call.demo import check_report, run_demo

    def progress(text: str) -> None:
        if not args.json:
            print(text, file=sys.stderr, flush=True)

    report = asyncio.run(
        run_demo(
            seconds=args.seconds,
            rekey_interval=args.rekey_interval,
            tone_hz=args.tone,
            state_dir=args.state,
            progress=progress,
        )
    )
    problems = check_report(report)
    report["ok"] = not problems
    report["problems"] = problems
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0 if not problems else 1


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    call, sec, qkd, audio = report["call"], report["security"], report["qkd"], report["audio"]
    table = Table(title="qcall demo — Beijing ⇄ Hefei", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("call", f"alice (Beijing) → bob (Hefei): connected={call['connected']}, "
                  f"setup {call['setup_ms']} ms")  # fmt: skip
    table.add_row("security", f"{sec['mode']}: QKD ‖ {sec['kem']} ‖ DTLS exporter, "
                  f"{sec['signature']} identities, {sec['srtp_profile']}")  # fmt: skip
    if sec.get("notice"):
        table.add_row("notice", f"[yellow]{sec['notice']}[/]")
    colour = "green" if sec["sas_match"] else "red"
    table.add_row("SAS", f"[{colour}]{sec['sas']}[/] (both sides "
                  f"{'equal' if sec['sas_match'] else 'DIFFERENT'})")  # fmt: skip
    table.add_row("QKD route", " → ".join(qkd["route"]) + f"  ({qkd['hops']} hops, "
                  f"{qkd['route_km']} km, mean QBER {_pct(qkd['mean_qber'])})")  # fmt: skip
    table.add_row("QKD key_IDs", "\n".join(qkd["key_ids"]))
    table.add_row("rekeys", f"{report['rekeys']} (decrypt failures "
                  f"{report['decrypt_failures']})")  # fmt: skip
    table.add_row("audio", f"tone {audio['tone_hz']:g} Hz → bob heard {audio['peak_hz']} Hz; "
                  f"sent {audio['sent_seconds']} s, received {audio['received_seconds']} s; "
                  f"one-way {audio['one_way_ms']} ms ({audio['chirps_found']} chirps)")  # fmt: skip
    rtcp = report["rtcp"]
    table.add_row("RTCP", f"RTT {rtcp['rtt_ms']} ms, lost {rtcp['packets_lost']}")
    messages, files = report.get("messages"), report.get("files")  # Quantum Secret
    if messages is not None and files is not None:
        ok = "[green]SHA-256 match[/]" if files["sha256_match"] else "[red]SHA-256 MISMATCH[/]"
        counts = f"{messages['sent']} sent, {messages['received']} received"
        sent_file = f"file {files['name']} {files['size']} bytes: {ok}"
        table.add_row("messages", f"{counts} ({messages['mode']}); {sent_file}")
    seal = report.get("seal")  # Quantum Cloud Seal (qcall/seal/demo.py)
    if seal is not None:
        ok = "[green]verified[/]" if seal["verified"] else "[red]NOT verified[/]"
        log = f"in the log (size {seal['log_size']}): {seal['inclusion_verified']}"
        table.add_row("seal", f"{seal['sealed_by']}, {seal['workflow']}: {ok} offline; {log}")
    console.print(table)
    if report["problems"]:
        console.print("[red]demo checks failed:[/] " + "; ".join(report["problems"]))
    else:
        console.print("[green]all checks passed[/]: hybrid keys, audio crossed, rekeyed.")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.2f} %"
