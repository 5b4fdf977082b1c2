"""The ``qcall`` command line.

Each subcommand lives in its own module under :mod:`qcall.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable ``(args) -> int``. Heavy imports stay inside those functions so
``qcall --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qcall import __version__
from qcall.exceptions import QCallError

__all__ = ["main"]

#: Subcommand modules, in the order ``--help`` lists them (``call`` also adds ``listen``).
COMMANDS = (
    "init", "demo", "call", "phone", "identity", "contacts", "qkd", "pki", "network",
    "network_site", "devices", "bench", "org", "seal", "seal_log", "messaging",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcall",
        description="Quantum-secured voice calls: QKD + ML-KEM hybrid keys, ML-DSA identities.",
    )
    parser.add_argument("--version", action="version", version=f"qcall {__version__}")
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="qcall home directory (default: $QCALL_HOME, else $XDG_CONFIG_HOME/qcall)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"qcall.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # Fail early and clearly if OpenSSL lacks ML-KEM/ML-DSA (--help never gets here).
        # Commands that use no post-quantum crypto opt out: set_defaults(needs_crypto=False).
        if getattr(args, "needs_crypto", True):
            from qcall import pqc

            pqc.check_support()
        return int(args.func(args) or 0)
    except QCallError as exc:
        print(f"qcall: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # say what Ctrl-C stopped
        print(f"qcall: interrupted: stopped `qcall {args.command}`", file=sys.stderr)
        return 130
