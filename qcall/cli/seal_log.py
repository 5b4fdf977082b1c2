"""``qcall seal-log``: run the seal transparency log (a server of its own).

::

    qcall seal-log init DIR --name NAME --authority CA.pem --crl CRL.pem
    qcall seal-log serve DIR [--host 127.0.0.1] [--port 8470] [--no-tls] [--batch N]
    qcall seal-log trust DIR CA.pem [--crl CRL.pem]   another organisation may add
    qcall seal-log crl-update DIR CRL.pem
    qcall seal-log check DIR [--json]                   open, check, print the head

``init`` writes the log's ML-DSA-87 key (``log.key``, 0600), its public key
(``log.pub``: give it to every verifier), the SQLite database (``log.db``) and a
TLS certificate for HTTPS (``tls/``; clients trust ``tls/ca.pem``). See
:mod:`qcall.seal.logserver` and ``docs/seal.md`` §9.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

DEFAULT_PORT = 8470


def register(subparsers: Any) -> None:
    """Add ``seal-log`` and its subcommands."""
    parser = subparsers.add_parser(
        "seal-log",
        help="run the Quantum Cloud Seal transparency log (RFC 9162 Merkle tree, ML-DSA heads)",
        description="An append-only Merkle tree log of seals, served over HTTPS.",
    )
    sub = parser.add_subparsers(dest="seal_log_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser("init", help="create a log in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--name", default="qcall seal log", help="the log's name")
    init.add_argument("--authority", metavar="CA.pem", help="an organisation whose members add")
    init.add_argument("--crl", metavar="CRL.pem", help="that organisation's CRL")
    init.set_defaults(func=cmd_init)

    serve = sub.add_parser("serve", help="serve the log over HTTPS")
    serve.add_argument("dir", metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    serve.add_argument("--no-tls", action="store_true", help="plain HTTP (benchmarks only)")
    serve.add_argument("--batch", type=int, default=512, help="most entries per transaction")
    serve.set_defaults(func=cmd_serve)

    trust = sub.add_parser("trust", help="let another organisation's members add")
    trust.add_argument("dir", metavar="DIR")
    trust.add_argument("certificate", metavar="CA.pem")
    trust.add_argument("--crl", metavar="CRL.pem")
    trust.set_defaults(func=cmd_trust)

    update = sub.add_parser("crl-update", help="store a newer CRL of a trusted organisation")
    update.add_argument("dir", metavar="DIR")
    update.add_argument("crl", metavar="CRL.pem")
    update.set_defaults(func=cmd_crl_update)

    check = sub.add_parser("check", help="open the log, check its database, print its head")
    check.add_argument("dir", metavar="DIR")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check)


def _read(path: str) -> bytes:
    from qcall.exceptions import ConfigError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def cmd_init(args: argparse.Namespace) -> int:
    from qcall.qkd.pki import create_pki
    from qcall.seal.log import TransparencyLog

    log = TransparencyLog.create(args.dir, args.name)
    try:
        if args.authority:
            assert log.trust is not None
            log.trust.trust(_read(args.authority))
            if args.crl:
                log.trust.update_crl(_read(args.crl))
        pki = create_pki(Path(args.dir) / "tls", ["seal-log"], [], ca_name=f"{args.name} TLS CA")
    finally:
        log.close()
    print(f"Created the seal log {args.name!r} in {args.dir}")
    print(f"  public key  {Path(args.dir) / 'log.pub'}  (verifiers: qcall seal trust-log)")
    print(f"  TLS CA      {pki.ca_cert}")
    print(f"  log ID      {log.log_id.hex()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from qcall.seal.log import TransparencyLog
    from qcall.seal.logserver import LogServer, server_tls_context

    directory = Path(args.dir)
    ctx = None
    if not args.no_tls:
        tls = directory / "tls" / "kme"
        ctx = server_tls_context(str(tls / "seal-log.pem"), str(tls / "seal-log.key"))
    log = TransparencyLog.open(directory)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with LogServer(log, args.host, args.port, ctx, max_batch=args.batch) as server:
            print(
                f"qcall seal-log: {log.log_key.name!r} size {log.head.tree_size} "
                f"serving {server.url}",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
    finally:
        log.close()
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from qcall.org import OrgTrust

    trust = OrgTrust(Path(args.dir) / "org")
    cert = trust.trust(_read(args.certificate))
    if args.crl:
        trust.update_crl(_read(args.crl))
    print(f"Members of {cert.subject.rfc4514_string()} may now add to the log.")
    return 0


def cmd_crl_update(args: argparse.Namespace) -> int:
    from qcall.org import OrgTrust

    crl = OrgTrust(Path(args.dir) / "org").update_crl(_read(args.crl))
    print(f"Stored the CRL of {crl.issuer.rfc4514_string()}.")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qcall.seal.log import TransparencyLog

    log = TransparencyLog.open(args.dir)
    try:
        head = log.head
        out = {"name": log.log_key.name, "log_id": log.log_id.hex(), **head.to_json()}
        del out["signature"]
    finally:
        log.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['name']}: {out['tree_size']} entries, root {out['root_hash']}; consistent")
    return 0
