"""``qcall network``: run a simulated QKD network (links, relay, ETSI 014 KMEs) locally.

Example::

    qcall network --topology beijing-hefei --state /tmp/qnet
    qcall network --topology hefei-metro --state /tmp/metro --eve Xinzhan-Gaoxin --eve-delay 10
    qcall network --topology national --fidelity auto --state /tmp/national
    qcall network capacity --topology national      # see qcall/cli/network_capacity.py

Clients find the KMEs and their SAE credentials in ``STATE/network.json``
(see ``docs/relay.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from qcall.exceptions import ConfigError

if TYPE_CHECKING:
    from qcall.qkd.network import SimulatedNetwork

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``network`` subcommand."""
    parser = subparsers.add_parser(
        "network",
        help="run a simulated QKD network (BB84 links, trusted-node relay, ETSI 014 KMEs)",
        description=(
            "Run the simulated QKD network of a topology on this machine: every link runs "
            "BB84 blocks, the trusted-node relay keeps each SAE pair's KME pools topped up, "
            "and each KME serves ETSI GS QKD 014 over mutual TLS. Writes STATE/network.json."
        ),
    )
    parser.add_argument(
        "--topology",
        default="beijing-hefei",
        metavar="NAME|FILE",
        help="bundled topology (beijing-hefei, hefei-metro, national) or a .toml/.json file",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        help="directory for the PKI and network.json (default: HOME/network/TOPOLOGY)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="KME listen address")
    parser.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        metavar="X",
        help="multiply the model's key rate by X (default 1: device speed)",
    )
    parser.add_argument(
        "--eve",
        action="append",
        default=[],
        metavar="LINK[=FRACTION]",
        help="put an intercept-resend eavesdropper on LINK (fraction of pulses, default 1)",
    )
    parser.add_argument(
        "--eve-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="switch the --eve eavesdroppers on after S seconds",
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help="run S seconds, then exit cleanly"
    )
    parser.add_argument("--pool", type=int, default=32, help="keys kept per SAE pair (32)")
    parser.add_argument("--key-size", type=int, default=256, help="bits per key (256)")
    parser.add_argument("--seed", type=int, help="seed the link simulators (reproducible runs)")
    parser.add_argument(
        "--block-pulses", type=int, metavar="N", help="pulses per BB84 block (default: model's)"
    )
    parser.add_argument(
        "--fidelity",
        choices=("auto", "protocol", "model"),
        default="auto",
        help="link simulation: auto (each link's topology field, else protocol), protocol "
        "(full BB84 post-processing) or model (analytic rate with fluctuations)",
    )
    parser.add_argument(
        "--durable-kmes",
        action="store_true",
        help="keep the KME pools in STATE/kme/*.state (crash-safe; docs/faults.md)",
    )
    parser.add_argument(
        "--dashboard",
        metavar="[HOST]:PORT",
        help="serve the live operations view (web page) on HOST:PORT, e.g. :8080",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="no live view")
    out.add_argument(
        "--json-status", action="store_true", help="print one JSON status line per second"
    )
    parser.set_defaults(func=run)
    from qcall.cli.network_capacity import register_capacity

    register_capacity(parser.add_subparsers(dest="network_command", metavar="{capacity}"))


def parse_eve(spec: str) -> tuple[str, float]:
    """Parse ``LINK[=FRACTION]`` (fraction in [0, 1], default 1).

    Raises:
        ConfigError: malformed fraction.
    """
    link, _, value = spec.partition("=")
    if not link:
        raise ConfigError(f"--eve {spec!r}: missing link name")
    if not value:
        return link, 1.0
    try:
        fraction = float(value)
    except ValueError:
        raise ConfigError(f"--eve {spec!r}: fraction must be a number") from None
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--eve {spec!r}: fraction must be in [0, 1]")
    return link, fraction


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qcall network``."""
    from qcall.config import qcall_home
    from qcall.qkd.topology import load_topology

    topology = load_topology(args.topology)
    eves = [parse_eve(spec) for spec in args.eve]
    for link, _ in eves:
        topology.link(link)  # unknown link: TopologyError before anything starts
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration must be positive")
    if args.dashboard:
        from qcall.dashboard.server import parse_listen

        parse_listen(args.dashboard)  # a bad address fails before anything starts
    state = args.state or str(qcall_home(args.home) / "network" / topology.name)
    return asyncio.run(_serve(args, topology, state, eves))


async def _serve(args: argparse.Namespace, topology: Any, state: str, eves: list[Any]) -> int:
    from qcall.qkd.network import SimulatedNetwork, default_link_factory

    overrides: dict[str, Any] = {}
    if args.block_pulses:
        overrides["block_pulses"] = args.block_pulses
    stop = stop_on_signals()
    async with (
        SimulatedNetwork.start(
            topology,
            state,
            host=args.host,
            speedup=args.speedup,
            key_size=args.key_size,
            pool_target=args.pool,
            seed=args.seed,
            link_factory=default_link_factory(
                fidelity=None if args.fidelity == "auto" else args.fidelity, **overrides
            ),
            durable_kmes=args.durable_kmes,
        ) as net,
        contextlib.AsyncExitStack() as stack,
    ):
        if args.dashboard:
            from qcall.dashboard.server import DashboardServer, parse_listen

            host, port = parse_listen(args.dashboard)
            board = await stack.enter_async_context(DashboardServer(net, host, port))
            print(f"  operations view: {board.url}", file=sys.stderr)
        if not args.json_status:
            _print_intro(net)
            announce = asyncio.ensure_future(_announce_ready(net))
        live = None if args.quiet or args.json_status else start_live(net)
        await run_until_stopped(stop, args, net, eves, live)
        if not args.json_status:
            announce.cancel()
            _print_summary(net)
    return 0


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT (Ctrl-C) and SIGTERM set: the command then stops cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_stopped(
    stop: asyncio.Event,
    args: argparse.Namespace,
    net: Any,
    eves: list[tuple[str, float]],
    live: Any | None,
    tick: Callable[[], None] | None = None,
) -> None:
    """Show the network's status until ``stop`` is set or ``--duration`` is over.

    Shared by ``qcall network`` and ``qcall network-site``. ``net`` has
    ``status()`` and ``set_eavesdropper()``; the ``--eve`` eavesdroppers start
    after ``--eve-delay``. With ``--json-status`` one JSON line per second, else
    ``live`` (a started rich ``Live``, or ``None``) is refreshed 4 times a second
    and stopped at the end. ``tick`` runs on every round.
    """
    eve_at = time.monotonic() + args.eve_delay
    deadline = None if args.duration is None else time.monotonic() + args.duration
    pending = list(eves)
    try:
        while not stop.is_set():
            now = time.monotonic()
            if pending and now >= eve_at:
                for link, fraction in pending:
                    net.set_eavesdropper(link, fraction)
                pending = []
            if tick is not None:
                tick()
            if deadline is not None and now >= deadline:
                break
            if args.json_status:
                print(json.dumps(net.status(), separators=(",", ":")), flush=True)
            elif live is not None:
                live.update(render(net))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0 if args.json_status else 0.25):
                    await stop.wait()
    finally:
        if live is not None:
            live.update(render(net))
            live.stop()


def _print_intro(net: SimulatedNetwork) -> None:
    topo = net.topology
    print(
        f"qcall network {topo.name}: {len(topo.nodes)} nodes, {len(topo.links)} links, "
        f"{topo.total_length_km:.0f} km; speed-up ×{net.speedup:g}",
        file=sys.stderr,
    )
    for node in topo.kme_nodes:
        saes = ", ".join(topo.nodes[node].saes)
        print(f"  KME at {node}: {net.kme_url(node)}  (SAEs: {saes})", file=sys.stderr)
    print(f"  clients: {net.network_file}", file=sys.stderr)


async def _announce_ready(net: SimulatedNetwork) -> None:
    """Say once when every SAE pair has keys: calls can start (the README waits for it)."""
    await net.wait_ready()
    print("  ready: every SAE pair has keys in its KMEs", file=sys.stderr, flush=True)


def _print_summary(net: SimulatedNetwork) -> None:
    status = net.status()
    print(file=sys.stderr)
    for pair in status["pairs"]:
        line = f"  {pair['master']} -> {pair['slave']}: {pair['delivered']} keys relayed"
        if pair["alarm"] or pair["error"]:
            line += f"  ({pair['alarm'] or pair['error']})"
        print(line, file=sys.stderr)


def start_live(net: Any) -> Any:
    """A started rich ``Live`` view of ``net`` (a network or a site)."""
    from rich.live import Live

    live = Live(render(net), refresh_per_second=4, transient=False)
    live.start()
    return live


def _si(value: float) -> str:
    """Compact SI number: 950, 13k, 6.0M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            scaled = value / scale
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.0f}"


def render(net: SimulatedNetwork) -> Any:
    """Build the rich renderable of the live view (links, then SAE pairs)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    status = net.status()
    links = Table(
        title=f"{net.topology.name} · up {status['uptime_s']:.0f} s · speed-up ×{net.speedup:g}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    links.add_column("link", overflow="ellipsis", no_wrap=True, min_width=12, max_width=18)
    for name in ("km", "state", "QBER", "target", "rate", "buffer", "spent", "blk"):
        justify: Literal["left", "right"] = "left" if name == "state" else "right"
        links.add_column(name, justify=justify, no_wrap=True, min_width=len(name))
    idle = 0
    for name, link in status["links"].items():
        if not link["active"]:
            idle += 1
            continue
        if link["state"] == "LINK_ALARM":
            state = "[bold red]ALARM[/]"  # fits the column: "state" + padding
        elif link["state"] == "LINK_DOWN":
            state = "[bold red]cut[/]"
        elif link["eve_fraction"]:
            state = "[yellow]eve on[/]"
        else:
            state = "[green]up[/]"
        qber = "–" if link["qber"] is None else f"{link['qber']:.1%}"
        links.add_row(
            name,
            f"{link['length_km']:.0f}",
            state,
            qber,
            _si(link["target_rate_bps"]),
            _si(link["rate_bps"]),
            _si(link["available_bits"]),
            _si(link["consumed_bits"]),
            str(link["blocks"]),
        )
    caption = (
        "target: model key rate × speed-up, rate: measured (30 s), in bit/s; buffer, spent: bits"
    )
    if idle:
        caption += f"; {idle} links serve no SAE route and stay idle"
    links.caption = caption
    pairs = Table(title="SAE pairs (master → slave)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("pair", "KME pool", "relayed", "hops", "status"):
        pairs.add_column(column)
    for pair in status["pairs"]:
        route = pair["route"]
        if pair["error"] or (pair["alarm"] and pair["alarm"].endswith("relay stopped")):
            note = f"[bold red]{pair['alarm'] or pair['error']}[/]"
        elif pair["alarm"]:
            note = f"[yellow]{pair['alarm']}[/]"
        else:
            note = "[green]ok[/]"
        pairs.add_row(
            f"{pair['master']} → {pair['slave']}",
            str(pair["stored_keys"]),
            str(pair["delivered"]),
            "–" if not route else str(len(route) - 1),
            note,
        )
    return Group(links, pairs)
