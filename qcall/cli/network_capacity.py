"""``qcall network capacity``: how many simultaneous calls each pair of metro networks sustains.

Example::

    qcall network capacity --topology national
    qcall network capacity --topology national --rekey 60 --rekey 10 --opus-bitrate 6000
    qcall network capacity --topology hefei-metro --json

For each pair of metro networks (topology nodes with a ``metro`` field; the
metro's first KME node stands for it), and for each pair of KME nodes inside
a metro with several, prints the route's end-to-end key rate (the max-flow
of the link rates, :mod:`qcall.qkd.capacity`) and the calls it sustains in
each mode: AES rekeyed every N s, one-time pad at a fixed Opus bitrate.
Topologies without metros list every pair of KME nodes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any

from qcall.exceptions import ConfigError

__all__ = ["register_capacity"]


def register_capacity(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``qcall network capacity``."""
    parser = subparsers.add_parser(
        "capacity",
        help="print the simultaneous calls each pair of metro networks sustains",
        description=(
            "For each pair of metro networks (and of KME sites inside a metro), print the "
            "end-to-end key rate and the simultaneous calls it sustains: AES rekeyed every "
            "N s, and one-time pad at a fixed Opus bitrate (docs/qkd-simulation.md)."
        ),
    )
    parser.add_argument(
        "--topology", default="national", metavar="NAME|FILE", help="topology (national)"
    )
    parser.add_argument(
        "--rekey",
        type=float,
        action="append",
        metavar="N",
        help="AES mode: a QKD key every N seconds (repeatable; default 60 and 10)",
    )
    parser.add_argument(
        "--opus-bitrate",
        type=int,
        default=12_000,
        metavar="B",
        help="OTP mode: constant Opus bitrate in bit/s (12000, as `qcall call --otp`)",
    )
    parser.add_argument(
        "--frame-ms",
        type=int,
        default=20,
        metavar="MS",
        help="OTP mode: packet duration (20: what qcall's OTP calls spend, block ends included;"
        " other durations: the formula of docs/qkd-simulation.md)",
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=0.9,
        metavar="U",
        help="share of the key rate calls may spend (0.9)",
    )
    parser.add_argument(
        "--rates",
        choices=("simulated", "analytic"),
        default="simulated",
        help="link rates: measured over model-fidelity blocks (default) or the analytic formula",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated rates")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def metro_sites(topology: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Return (metro → the KME node standing for it, metro → all its KME nodes).

    Without metros every KME node is its own "metro".
    """
    kme_nodes = set(topology.kme_nodes)
    inside: dict[str, list[str]] = {}
    for metro, members in topology.metros.items():
        sites = [n for n in members if n in kme_nodes]
        if sites:
            inside[metro] = sites
    if not inside:
        inside = {node: [node] for node in topology.kme_nodes}
    return {metro: sites[0] for metro, sites in inside.items()}, inside


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qcall network capacity``."""
    from qcall.qkd.capacity import CallMode, CapacityPlanner, link_rates, simulated_link_rates
    from qcall.qkd.topology import load_topology

    topology = load_topology(args.topology)
    rekeys = args.rekey or [60.0, 10.0]
    try:
        modes = [CallMode.aes(n) for n in rekeys]
        if args.frame_ms == 20:  # qcall's own OTP calls: plan with what they spend
            from qcall.otp.capacity import call_mode
            from qcall.otp.keystream import OTPPolicy

            modes.append(call_mode(OTPPolicy(bitrate=args.opus_bitrate)))
        else:
            modes.append(CallMode.otp(args.opus_bitrate, args.frame_ms))
    except ValueError as exc:
        raise ConfigError(f"capacity: {exc}") from None
    if not 0 < args.utilisation <= 1:
        raise ConfigError("--utilisation must be in (0, 1]")
    if args.rates == "simulated":
        rates = simulated_link_rates(topology, seed=args.seed)
    else:
        rates = link_rates(topology)
    planner = CapacityPlanner(topology, rates, args.utilisation)
    stand_for, inside = metro_sites(topology)
    pairs = [(a, b) for a, b in itertools.combinations(stand_for, 2)]
    rows: list[tuple[str, str, Any]] = []
    for a, b in pairs:
        rows.append((a, b, planner.table([(stand_for[a], stand_for[b])], modes)[0]))
    for metro, sites in inside.items():
        for x, y in itertools.combinations(sites, 2):
            rows.append((f"{metro}:{x}", f"{metro}:{y}", planner.table([(x, y)], modes)[0]))
    if args.json:
        print(json.dumps(_json(topology, args, modes, rows), indent=1))
        return 0
    _print_table(topology, args, modes, rows)
    return 0


def _json(topology: Any, args: argparse.Namespace, modes: list[Any], rows: list[Any]) -> Any:
    return {
        "topology": topology.name,
        "rates": args.rates,
        "utilisation": args.utilisation,
        "modes": {m.name: {"kind": m.kind, "bits_per_second": m.bits_per_second} for m in modes},
        "pairs": [
            {
                "a": a,
                "b": b,
                "source": caps[0].source,
                "target": caps[0].target,
                "hops": caps[0].hops,
                "route_km": caps[0].route_km,
                "key_rate_bps": caps[0].route_rate_bps,
                "bottleneck": caps[0].bottleneck,
                "calls": {c.mode.name: c.calls for c in caps},
            }
            for a, b, caps in rows
        ],
    }


def _rate(bps: float) -> str:
    if bps == float("inf"):
        return "local"
    for unit, scale in (("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def _print_table(
    topology: Any, args: argparse.Namespace, modes: list[Any], rows: list[Any]
) -> None:
    out = sys.stdout
    print(
        f"qcall network capacity: {topology.name}, {len(topology.nodes)} nodes, "
        f"{len(topology.links)} links; link rates {args.rates} "
        f"(docs/qkd-simulation.md); calls may spend {args.utilisation:.0%} of the key rate",
        file=out,
    )
    legend = ", ".join(
        f"{m.name} = {m.bits_per_second:,.1f} bit/s of key per call" for m in modes
    )
    print(f"modes: {legend}", file=out)
    print("each pair is planned alone on the network (shared trunks divide it)\n", file=out)
    width = max([len(f"{a} – {b}") for a, b, _ in rows] + [4])
    head = f"{'pair':<{width}} {'hops':>4} {'km':>6} {'key rate':>12}"
    head += "".join(f" {m.name:>10}" for m in modes)
    print(head, file=out)
    for a, b, caps in rows:
        first = caps[0]
        line = f"{a + ' – ' + b:<{width}} {first.hops:>4} {first.route_km:>6.0f} "
        line += f"{_rate(first.route_rate_bps):>12}"
        line += "".join(f" {_calls(c.calls):>10}" for c in caps)
        print(line, file=out)


def _calls(n: int) -> str:
    return "unbounded" if n >= 10**9 else f"{n:,}"
