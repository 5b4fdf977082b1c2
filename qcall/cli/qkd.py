"""``qcall qkd``: talk to any ETSI GS QKD 014 KME, or run a stand-alone one.

* ``qcall qkd status  --kme URL --cert F --key F --ca F --peer SAE``
* ``qcall qkd get     … --peer SAE [--size BITS] [--number N]``
* ``qcall qkd get-by-id … --peer SAE --key-id UUID [--key-id UUID …]``
* ``qcall qkd serve --id KME_ID --cert F --key F --ca F --pair MASTER:SLAVE [--fill N]
  [--key-size BITS] [--min-key-size BITS] [--max-key-size BITS] [--state FILE]``:
  with ``--state``, the pools live in FILE (+ FILE.journal), so a killed KME
  restarts with every unused key and never serves a consumed one
  (docs/faults.md); ``--fill`` then only fills pairs the state does not have yet.
  SIGINT (Ctrl-C), SIGTERM and SIGHUP stop it cleanly: the state is compacted,
  so consumed keys leave the disk, and it exits 0.

Keys are never printed: only their key_IDs and a short SHA-256 tag. ``--json``
prints one machine-readable JSON object instead of text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``qkd`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "qkd",
        help="query an ETSI GS QKD 014 KME (status, get, get-by-id) or serve one",
        description="Talk to an ETSI GS QKD 014 key management entity over mutual TLS.",
    )
    sub = parser.add_subparsers(dest="qkd_command", metavar="SUBCOMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kme", required=True, metavar="URL", help="KME base URL (https://…)")
    common.add_argument("--cert", required=True, metavar="FILE", help="our SAE certificate (PEM)")
    common.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    common.add_argument("--ca", required=True, metavar="FILE", help="CA certificate of the KME")
    common.add_argument("--peer", required=True, metavar="SAE_ID", help="the other SAE")
    common.add_argument(
        "--server-name", metavar="NAME", help="name to verify the KME certificate against"
    )
    common.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("status", parents=[common], help="show the key supply shared with --peer")
    p.set_defaults(func=_run, action="status")

    p = sub.add_parser("get", parents=[common], help="get new keys for --peer (enc_keys)")
    p.add_argument("--size", type=int, metavar="BITS", help="key size (default: the KME's)")
    p.add_argument("--number", type=int, default=1, metavar="N", help="how many keys")
    p.set_defaults(func=_run, action="get")

    p = sub.add_parser(
        "get-by-id", parents=[common], help="get keys that --peer obtained (dec_keys)"
    )
    p.add_argument("--key-id", action="append", required=True, metavar="UUID", dest="key_ids")
    p.set_defaults(func=_run, action="get-by-id")

    p = sub.add_parser("serve", help="run a stand-alone ETSI 014 KME with random test keys")
    p.add_argument("--id", required=True, metavar="KME_ID", dest="kme_id")
    p.add_argument("--cert", required=True, metavar="FILE", help="KME certificate (PEM)")
    p.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA of the SAE certificates")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="MASTER:SLAVE",
        help="serve this SAE pair locally (repeatable)",
    )
    p.add_argument(
        "--fill", type=int, default=1000, metavar="N", help="random keys per pair (default 1000)"
    )
    p.add_argument(
        "--key-size",
        type=int,
        default=256,
        metavar="BITS",
        help="default key size (Status key_size) and size of each --fill key (default 256)",
    )
    p.add_argument(
        "--min-key-size",
        type=int,
        metavar="BITS",
        help="smallest key an SAE may ask for, a multiple of 8 (default 64, or --key-size "
        "if smaller)",
    )
    p.add_argument(
        "--max-key-size",
        type=int,
        metavar="BITS",
        help="largest key an SAE may ask for, a multiple of 8 (default 4096, or --key-size "
        "if larger; at most 524280); keys of every size in between come from the same pool",
    )
    p.add_argument(
        "--state",
        metavar="FILE",
        help="keep the key pools in FILE (0600, crash-safe); reload them at start; "
        "SIGINT, SIGTERM and SIGHUP stop the KME cleanly",
    )
    p.set_defaults(func=_serve)


def _key_json(key: Any) -> dict[str, Any]:
    return {"key_ID": key.key_id, "size": key.size_bits, "sha256": key.fingerprint}


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_query(args))


async def _query(args: argparse.Namespace) -> int:
    from qcall.exceptions import ConfigError
    from qcall.qkd.client import ETSI014Client
    from qcall.qkd.pki import client_ssl_context

    if not args.kme.lower().startswith("https://"):
        raise ConfigError(f"--kme must be an https:// URL, not {args.kme!r}")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    ctx = client_ssl_context(args.cert, args.key, args.ca)
    out: dict[str, Any]
    async with ETSI014Client(
        args.kme, ctx, server_name=args.server_name, timeout=args.timeout, certificate=args.cert
    ) as client:
        if args.action == "status":
            status = await client.status(args.peer)
            out = status.to_json()
            lines = [f"{name:20} {value}" for name, value in out.items()]
            if status.alarm:
                lines.append(f"ALARM: {status.alarm} (QBER {status.qber})")
        elif args.action == "get":
            if args.number < 1:
                raise ConfigError("--number must be at least 1")
            if args.size is not None and args.size < 1:
                raise ConfigError("--size must be positive")
            keys = await client.get_keys(args.peer, args.number, args.size)
            out = {"keys": [_key_json(k) for k in keys]}
            lines = [f"{k.key_id}  {k.size_bits} bits  sha256:{k.fingerprint}" for k in keys]
        else:
            keys = await client.get_keys_by_id(args.peer, args.key_ids)
            out = {"keys": [_key_json(k) for k in keys]}
            lines = [f"{k.key_id}  {k.size_bits} bits  sha256:{k.fingerprint}" for k in keys]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(lines))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from qcall.exceptions import ConfigError
    from qcall.qkd.kme import KME, random_keys
    from qcall.qkd.kmestore import DurableKME
    from qcall.qkd.pki import server_ssl_context
    from qcall.qkd.server import KMEServer

    if not args.pair:
        raise ConfigError("give at least one --pair MASTER:SLAVE")
    ctx = server_ssl_context(args.cert, args.key, args.ca)
    sizes = {
        "key_size": args.key_size,
        "min_key_size": args.min_key_size,
        "max_key_size": args.max_key_size,
    }
    try:
        if args.state:
            kme: KME = DurableKME.open(args.state, args.kme_id, **sizes)
        else:
            kme = KME(args.kme_id, **sizes)
        known = {(m, s) for m, s, _ in kme.pairs()}
        for pair in args.pair:
            master, sep, slave = pair.partition(":")
            if not sep:
                raise ConfigError(f"--pair must be MASTER:SLAVE, not {pair!r}")
            if (master, slave) not in known:
                kme.supply(master, slave, random_keys(args.fill, args.key_size), role="local")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(kme, DurableKME):
        kme.store.flush()  # the filled keys are on disk before the first request

    async def serve() -> str:
        stop: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with _stop_on_signals(stop):
            try:
                server = KMEServer(kme, args.host, args.port, ctx)
                await server.start()
            except OSError as exc:
                text = f"cannot listen on {args.host}:{args.port}: {exc.strerror}"
                raise ConfigError(text) from exc
            print(f"KME {kme.kme_id} serving {server.url}", file=sys.stderr, flush=True)
            try:
                return await stop
            finally:
                await server.close()

    try:
        name = asyncio.run(serve())
    finally:
        if isinstance(kme, DurableKME):
            kme.close()  # compact: consumed keys leave the disk
    print(f"KME {kme.kme_id} stopped ({name})", file=sys.stderr, flush=True)
    return 0


#: The signals that stop ``qcall qkd serve`` cleanly (docs/faults.md §4.1).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Future[str]) -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP resolve ``stop`` with the signal's name.

    Without this, SIGTERM and SIGHUP would kill the process at once, skipping
    the final compaction of ``--state``: consumed keys would stay on disk.
    """
    loop = asyncio.get_running_loop()

    def stopped(sig: signal.Signals) -> None:
        if not stop.done():
            stop.set_result(sig.name)

    installed = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stopped, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
