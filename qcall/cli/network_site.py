"""``qcall network-site``: one host's part of a simulated QKD network split across two hosts.

Example (docs/two-machines.md)::

    qcall network-site init --topology beijing-hefei --split Jinan-Taian --out bundle
    # machine A (Beijing side; the split link's transmitter):
    qcall network-site run --bundle bundle --site Beijing --listen 0.0.0.0:7400 --state qa
    # machine B (Hefei side):
    qcall network-site run --bundle bundle --site Hefei --connect 10.77.0.1:7400 --state qb

Each site writes ``STATE/network.json`` for its own SAEs (``qcall call --network``)
and creates ``STATE/ready`` once keys flow in both directions across the split.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from qcall.exceptions import ConfigError

__all__ = ["register"]

#: The split used when ``init`` is not told one, per bundled topology.
DEFAULT_SPLITS = {"beijing-hefei": "Jinan-Taian"}
BUNDLE_FILE = "site.json"
PSK_FILE = "split.psk"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``network-site`` subcommand."""
    parser = subparsers.add_parser(
        "network-site",
        help="run one host's part of a QKD network split across two hosts",
        description=(
            "Split a topology at one link: each host runs its side's nodes, links and KMEs; "
            "the split link's BB84 and its relay hop cross a TCP (mutual TLS) connection."
        ),
    )
    sub = parser.add_subparsers(dest="site_command", metavar="SUBCOMMAND", required=True)
    init = sub.add_parser("init", help="create the bundle both hosts need (PKI, split-link PSK)")
    init.add_argument("--topology", default="beijing-hefei", metavar="NAME|FILE")
    init.add_argument("--split", metavar="LINK", help="the link between the two hosts")
    init.add_argument("--out", required=True, metavar="DIR", help="bundle directory")
    init.set_defaults(func=run_init, needs_crypto=False)

    run = sub.add_parser("run", help="run this host's site")
    run.add_argument("--bundle", required=True, metavar="DIR", help="from `network-site init`")
    run.add_argument("--site", required=True, metavar="NODE", help="a node of this host's side")
    where = run.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT", help="accept the other site here")
    where.add_argument("--connect", metavar="HOST:PORT", help="connect to the other site")
    run.add_argument("--state", required=True, metavar="DIR", help="network.json, ready marker")
    run.add_argument("--host", default="127.0.0.1", help="KME listen address (127.0.0.1)")
    run.add_argument("--no-tls", action="store_true", help="plain TCP between the sites")
    run.add_argument(
        "--link-delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="hold each frame to the other site MS ms (user-space one-way delay)",
    )
    run.add_argument("--speedup", type=float, default=1.0, metavar="X")
    run.add_argument("--pool", type=int, default=32, help="keys kept per SAE pair (32)")
    run.add_argument("--key-size", type=int, default=256, help="bits per key (256)")
    run.add_argument("--seed", type=int, help="seed the link simulators")
    run.add_argument("--block-pulses", type=int, metavar="N", help="pulses per BB84 block")
    run.add_argument("--eve", action="append", default=[], metavar="LINK[=FRACTION]")
    run.add_argument("--eve-delay", type=float, default=0.0, metavar="S")
    run.add_argument("--duration", type=float, metavar="S", help="run S seconds, then exit")
    out = run.add_mutually_exclusive_group()
    out.add_argument("--quiet", action="store_true", help="no live view")
    out.add_argument("--json-status", action="store_true", help="one JSON status line a second")
    run.set_defaults(func=run_site, needs_crypto=False)


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{flag} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def run_init(args: argparse.Namespace) -> int:
    """Entry point of ``qcall network-site init``."""
    from qcall.qkd.network import kme_id_for
    from qcall.qkd.pki import create_pki
    from qcall.qkd.site import create_psk, split_sides
    from qcall.qkd.topology import load_topology

    topology = load_topology(args.topology)
    split = args.split or DEFAULT_SPLITS.get(topology.name)
    if not split:
        raise ConfigError("--split LINK is required for this topology")
    side_a, side_b = split_sides(topology, split)
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = topology.name
    source = Path(args.topology)
    if source.suffix in (".toml", ".json") and source.is_file():
        name = "topology" + source.suffix
        shutil.copyfile(source, out / name)
    kmes = [kme_id_for(n) for n in topology.kme_nodes]
    pki = create_pki(out / "pki", kmes, topology.sae_ids)
    psk = create_psk(out / PSK_FILE)
    link = topology.link(split)
    doc = {"topology": name, "split": link.name}
    (out / BUNDLE_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"bundle {out}: topology {topology.name}, split at {link.name} ({link.length_km:g} km)")
    for side, nodes in ((link.a, side_a), (link.b, side_b)):
        here = [n for n in topology.kme_nodes if n in nodes]
        saes = [s for s in topology.sae_ids if topology.sae_node(s) in nodes]
        print(
            f"  side of {side}: {len(nodes)} nodes, KMEs {', '.join(here)}, SAEs {', '.join(saes)}"
        )
    print(f"  CA {pki.ca_cert}; split-link PSK {psk} (secret: copy only over a secure channel)")
    return 0


def run_site(args: argparse.Namespace) -> int:
    """Entry point of ``qcall network-site run``."""
    from qcall.cli.network import parse_eve

    bundle = Path(args.bundle)
    try:
        doc = json.loads((bundle / BUNDLE_FILE).read_text(encoding="utf-8"))
        topology, split = str(doc["topology"]), str(doc["split"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{bundle / BUNDLE_FILE}: not a site bundle ({exc})") from exc
    if (bundle / topology).is_file():
        topology = str(bundle / topology)
    if args.duration is not None and args.duration <= 0:
        raise ConfigError("--duration must be positive")
    eves = [parse_eve(spec) for spec in args.eve]
    listen = _address(args.listen, "--listen") if args.listen else None
    connect = _address(args.connect, "--connect") if args.connect else None
    return asyncio.run(_serve(args, topology, split, listen, connect, eves))


async def _serve(
    args: argparse.Namespace,
    topology: str,
    split: str,
    listen: tuple[str, int] | None,
    connect: tuple[str, int] | None,
    eves: list[tuple[str, float]],
) -> int:
    from qcall.cli.network import run_until_stopped, start_live, stop_on_signals
    from qcall.qkd.site import NetworkSite

    overrides: dict[str, Any] = {}
    if args.block_pulses:
        overrides["block_pulses"] = args.block_pulses
    stop = stop_on_signals()
    state = Path(args.state)
    ready_file = state / "ready"
    with contextlib.suppress(FileNotFoundError):
        ready_file.unlink()
    async with NetworkSite.start(
        topology, split, args.site, state,
        pki_dir=Path(args.bundle) / "pki", psk_file=Path(args.bundle) / PSK_FILE,
        listen=listen, connect=connect, tls=not args.no_tls,
        link_delay=args.link_delay_ms / 1000.0, link_overrides=overrides,
        host=args.host, speedup=args.speedup, key_size=args.key_size,
        pool_target=args.pool, seed=args.seed,
    ) as site:  # fmt: skip
        for link, _ in eves:  # fail now, not after --eve-delay
            name = site.topology.link(link).name
            if name == site.split.name and not site.transmitter:
                raise ConfigError(f"--eve {name}: the split link's optics run at {site.split.a}")
            if name != site.split.name and name not in {r.link.name for r in site.links_view()}:
                raise ConfigError(f"--eve {name}: not a link of this site")
        say = (lambda _t: None) if args.json_status else _stderr
        side = "transmitter" if site.transmitter else "receiver"
        say(f"qcall network-site {site.topology.name}: this host runs {len(site.local_nodes)} "
            f"nodes ({', '.join(sorted(site.local_nodes))})")  # fmt: skip
        say(f"  split link {site.split.name} ({site.split.length_km:g} km): {side} end at "
            f"{site.border}; " + (f"listening on {args.listen}" if listen else
                                  f"connecting to {args.connect}"))  # fmt: skip
        for node in site.kmes:
            say(f"  KME at {node}: {site.kme_url(node)}")
        say(f"  clients: {site.network_file}")
        live = None
        if not (args.quiet or args.json_status) and sys.stderr.isatty():
            live = start_live(site)

        def mark_ready() -> None:
            if site.is_ready and not ready_file.exists():
                ready_file.write_text("ready\n", encoding="utf-8")
                say("  ready: keys relayed across the split link in both directions")

        await run_until_stopped(stop, args, site, eves, live, tick=mark_ready)
        status = site.status()
        say(
            f"  split link: {status['split_link']['blocks']} blocks, "
            f"{status['split_link']['consumed_bits']} bits spent on relay hops"
        )
        for pair in status["pairs"]:
            note = f"  ({pair['error']})" if pair["error"] else ""
            role = pair.get("role", "local")
            say(f"  {pair['master']} -> {pair['slave']}: {pair['delivered']} keys ({role}){note}")
    return 0


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
