"""``qcall identity``: create and show the user's ML-DSA identity.

::

    qcall identity new --name alice [--algorithm ML-DSA-65] [--force]
    qcall identity new --name alice --algorithm ML-DSA-87 --seal-only
    qcall identity show [--json]

The files live in the qcall home (``--home``, ``$QCALL_HOME``, XDG); see
:mod:`qcall.identity` and ``docs/identity.md``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]

_SCHEMES = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")


def register(subparsers: Any) -> None:
    """Add ``identity`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "identity",
        help="create or show your ML-DSA identity key",
        description="Your long-term ML-DSA identity: contacts pin its fingerprint.",
    )
    sub = parser.add_subparsers(dest="identity_command", metavar="SUBCOMMAND", required=True)

    new = sub.add_parser("new", help="create a new identity key pair")
    new.add_argument("--name", required=True, help="your name, as peers will know you")
    new.add_argument(
        "--algorithm",
        choices=_SCHEMES,
        default="ML-DSA-65",
        help="ML-DSA parameter set (FIPS 204; default ML-DSA-65, the only one that can "
        "log in to the signaling server; others need --seal-only)",
    )
    new.add_argument(
        "--seal-only",
        action="store_true",
        help="allow ML-DSA-44/-87: an identity that signs seals but cannot place or answer calls",
    )
    new.add_argument(
        "--force",
        action="store_true",
        help="replace an existing identity (every contact will see a changed key)",
    )
    new.add_argument("--json", action="store_true", help="print the new identity as JSON")
    new.set_defaults(func=cmd_new, needs_crypto=True)

    show = sub.add_parser("show", help="print your name, algorithm and fingerprint")
    show.add_argument(
        "--json",
        action="store_true",
        help="print JSON with the public key (give it to contacts: qcall contacts pin)",
    )
    show.set_defaults(func=cmd_show, needs_crypto=True)


def _print(identity_obj: dict[str, str], home: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(identity_obj, indent=2))
        return
    print(f"Name:        {identity_obj['name']}")
    print(f"Algorithm:   {identity_obj['algorithm']}")
    print(f"Fingerprint: {identity_obj['fingerprint']}")
    print(f"Home:        {home}")


def cmd_new(args: argparse.Namespace) -> int:
    """``qcall identity new``."""
    from qcall import config, pqc
    from qcall.exceptions import ConfigError
    from qcall.identity import PREVIOUS_IDENTITY_DIR, Identity
    from qcall.signaling.messages import ALGORITHM

    if args.algorithm != ALGORITHM and not args.seal_only:
        raise ConfigError(
            f"the signaling server registers {ALGORITHM} identities only: an {args.algorithm} "
            "identity could not place or answer calls. Use the default, or give --seal-only "
            "for an identity that only signs seals"
        )
    home = config.qcall_home(args.home)
    scheme = pqc.SignatureScheme(args.algorithm)
    identity = Identity.generate(args.name, scheme)
    if args.force and Identity.exists(home):
        # Keep the replaced key: it signs moving our name to the new key on the
        # signaling server (docs/signaling.md, "Moving a name").
        previous = Identity.load(home)
        previous_home = config.make_private_dir(home / PREVIOUS_IDENTITY_DIR)
        previous.save(previous_home, overwrite=True)
    identity.save(home, overwrite=args.force)
    _print(identity.to_public_dict(), str(home), args.json)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``qcall identity show``."""
    from qcall import config
    from qcall.identity import Identity

    home = config.qcall_home(args.home)
    identity = Identity.load(home)
    _print(identity.to_public_dict(), str(home), args.json)
    return 0
