"""``qcall pki init``: a test CA plus KME and SAE certificates for ETSI GS QKD 014.

* ``qcall pki init --topology NAME|FILE --out DIR`` — every KME and SAE of a topology
* ``qcall pki init --kme ID --sae ID [--kme ID …] [--sae ID …] --out DIR`` — explicit lists

Both may be combined. Private keys are written mode 0600.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``pki`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "pki",
        help="create a test CA and KME/SAE certificates",
        description="Create the mutual-TLS certificates of a (simulated) QKD network.",
    )
    sub = parser.add_subparsers(dest="pki_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("init", help="create (or extend) a test PKI in --out")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--topology", metavar="NAME|FILE", help="take KMEs and SAEs from a topology")
    p.add_argument("--kme", action="append", default=[], metavar="ID", help="a KME ID")
    p.add_argument("--sae", action="append", default=[], metavar="ID", help="an SAE ID")
    p.add_argument("--json", action="store_true", help="print the paths as JSON")
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from qcall.exceptions import ConfigError
    from qcall.qkd.pki import create_pki

    kmes: list[str] = list(args.kme)
    saes: list[str] = list(args.sae)
    if args.topology:
        from qcall.qkd.network import kme_id_for
        from qcall.qkd.topology import load_topology

        topology = load_topology(args.topology)
        kmes += [kme_id_for(node) for node in topology.kme_nodes]
        saes += list(topology.sae_ids)
    if not kmes and not saes:
        raise ConfigError("nothing to do: give --topology, or --kme and --sae IDs")
    kmes = list(dict.fromkeys(kmes))
    saes = list(dict.fromkeys(saes))
    paths = create_pki(args.out, kmes, saes)
    if args.json:
        print(json.dumps(paths.to_json(), indent=2))
    else:
        print(f"CA        {paths.ca_cert}")
        for kme_id, cert in paths.kmes.items():
            print(f"KME {kme_id:20} {cert.cert}")
        for sae_id, cert in paths.saes.items():
            print(f"SAE {sae_id:20} {cert.cert}")
    return 0
