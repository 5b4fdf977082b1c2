"""Command line of the signaling server: ``python -m signaling`` / ``qcall-signaling``.

Examples::

    qcall-signaling --host 127.0.0.1 --port 8765
    qcall-signaling --host 0.0.0.0 --port 8443 --tls-cert cert.pem --tls-key key.pem
    qcall-signaling --max-connections 2000 --ring-timeout 60

Every limit of :class:`~qcall.signaling.config.ServerConfig` has its flag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qcall import __version__
from qcall.exceptions import ConfigError, QCallError
from qcall.signaling.config import LIMITS, ServerConfig
from qcall.signaling.messages import TurnCredentials
from qcall.signaling.protocol import SignalingProtocol
from qcall.signaling.turn import turn_issuer
from signaling.server import SignalingServer
from signaling.store import MessageStore, SQLiteMessageStore

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcall-signaling",
        description="qcall signaling server: ML-DSA registration, presence, call set-up relay.",
    )
    parser.add_argument("--version", action="version", version=f"qcall-signaling {__version__}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any)")
    parser.add_argument("--tls-cert", metavar="PEM", help="certificate chain: serve wss://")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    defaults = ServerConfig()
    parser.add_argument(
        "--server-id",
        default=f"qcall-signaling@{socket.gethostname()}",
        help="identity bound into registration signatures (default qcall-signaling@HOST)",
    )
    limits = parser.add_argument_group('limits (docs/signaling.md, "Limits")')
    for name, (metavar, text) in LIMITS.items():
        default = getattr(defaults, name)
        limits.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            metavar=metavar,
            help=f"{text} (default {default:.10g})",
        )
    parser.add_argument(
        "--no-early-offer",
        action="store_true",
        help="do not offer the early_offer feature (a caller's signed offer relayed while "
        'the call rings: docs/signaling.md, "The offer while ringing")',
    )
    mailbox = parser.add_argument_group("messages (docs/messaging.md §12)")
    mailbox.add_argument(
        "--mailbox",
        metavar="FILE",
        help="SQLite store of offline messages and prekeys (default "
        "$XDG_STATE_HOME/qcall/signaling-messages.db, else ~/.local/state/qcall/…)",
    )
    mailbox.add_argument("--no-mailbox", action="store_true", help="store no messages (calls only)")
    scale = parser.add_argument_group('several instances (docs/signaling.md, "Several instances")')
    scale.add_argument(
        "--redis", metavar="URL", help="redis://HOST:PORT/N shared by the instances (presence, "
        "routing, messages between instances)",
    )  # fmt: skip
    scale.add_argument(
        "--database", metavar="URL", help="postgresql://... for the offline message store and "
        "prekeys (default: the embedded SQLite store)",
    )  # fmt: skip
    scale.add_argument("--instance-id", help="unique name of this instance (default HOST:PORT:PID)")
    scale.add_argument(
        "--cluster-secret-file", metavar="FILE", help="file (mode 0600) holding the secret the "
        "instances share (>= 16 bytes): call frames go over direct, authenticated links between "
        "instances instead of Redis",
    )  # fmt: skip
    scale.add_argument(
        "--link", metavar="HOST:PORT", default="127.0.0.1:0", help="address the links listen on "
        "and that the other instances dial (default 127.0.0.1:0; a LAN address across hosts)",
    )  # fmt: skip
    scale.add_argument(
        "--cluster-tls-cert", metavar="PEM", help="this instance's certificate for its links "
        "(server and client use; it must name the --link address): links run over mutual TLS",
    )  # fmt: skip
    scale.add_argument("--cluster-tls-key", metavar="PEM", help="private key of --cluster-tls-cert")
    scale.add_argument(
        "--cluster-ca", metavar="PEM", help="CA that signed every instance's --cluster-tls-cert"
    )
    turn = parser.add_argument_group("TURN (docs/two-machines.md, hosts behind NAT)")
    turn.add_argument(
        "--turn-url", action="append", default=[], metavar="URL",
        help="turn:HOST:PORT given to every registered user (repeatable)",
    )  # fmt: skip
    turn.add_argument(
        "--turn-secret-file", metavar="FILE",
        help="file holding coturn's static-auth-secret (use-auth-secret REST scheme)",
    )  # fmt: skip
    turn.add_argument(
        "--turn-ttl", type=int, default=3600, metavar="S", help="credential lifetime (3600)"
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    return parser


def config_from(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerConfig:
    """Return the :class:`ServerConfig` of the parsed flags (usage error if invalid)."""
    try:
        return ServerConfig(
            server_id=args.server_id,
            early_offer=not getattr(args, "no_early_offer", False),
            **{name: getattr(args, name) for name in LIMITS},
        )
    except ValueError as exc:
        parser.error(str(exc).replace("field '", "--").replace("_", "-").replace("'", ""))


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Return a server TLS context for ``cert``/``key`` (PEM files).

    Raises:
        ConfigError: a file is missing or does not hold a matching cert and key.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from exc
    return context


def _default_mailbox() -> Path:
    """``$XDG_STATE_HOME/qcall/signaling-messages.db`` (directory created, mode 0700)."""
    from qcall.config import make_private_dir

    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return make_private_dir(Path(state) / "qcall") / "signaling-messages.db"


def turn_from(args: argparse.Namespace) -> Callable[[str, float], TurnCredentials] | None:
    """The TURN credential issuer of ``--turn-url``/``--turn-secret-file``, if given.

    Raises:
        ConfigError: the secret file is missing, empty, or readable by others.
    """
    if not args.turn_url and not args.turn_secret_file:
        return None
    if not (args.turn_url and args.turn_secret_file):
        raise ConfigError("--turn-url and --turn-secret-file go together")
    secret = _read_secret("--turn-secret-file", args.turn_secret_file)
    return turn_issuer(secret, args.turn_url, args.turn_ttl)


def _read_secret(flag: str, name: str) -> bytes:
    """The stripped contents of a secret file (mode 0600, not empty)."""
    path = Path(name)
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others: chmod 600 {path}")
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path}: {exc.strerror}") from exc
    if not secret:
        raise ConfigError(f"{path} is empty")
    return secret


def link_from(args: argparse.Namespace) -> tuple[bytes, str, int] | None:
    """The cluster secret and link address of ``--cluster-secret-file``/``--link``, if given.

    Raises:
        ConfigError: no ``--redis``, a bad secret file (see :func:`_read_secret`), a
            secret under 16 bytes, or a ``--link`` that is not ``HOST:PORT``.
    """
    if not args.cluster_secret_file:
        return None
    if not args.redis:
        raise ConfigError("--cluster-secret-file needs --redis")
    from signaling.cluster_links import parse_endpoint

    secret = _read_secret("--cluster-secret-file", args.cluster_secret_file)
    if len(secret) < 16:
        raise ConfigError(f"{args.cluster_secret_file}: the cluster secret needs >= 16 bytes")
    host, sep, port = args.link.rpartition(":")
    address = parse_endpoint(args.link if sep else "")
    if address is None and port != "0":
        raise ConfigError(f"--link {args.link}: not HOST:PORT")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        raise ConfigError(f"--link {args.link}: an address the other instances reach, please")
    return secret, host.strip("[]"), int(port)


def link_tls_from(args: argparse.Namespace) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """The links' ``(server, client)`` TLS contexts of ``--cluster-tls-cert/-key/--cluster-ca``.

    Raises:
        ConfigError: not all three given, no ``--cluster-secret-file``, or a file
            missing or unreadable (named).
    """
    files = (args.cluster_tls_cert, args.cluster_tls_key, args.cluster_ca)
    if not any(files):
        return None
    if not all(files):
        raise ConfigError("--cluster-tls-cert, --cluster-tls-key and --cluster-ca go together")
    if not args.cluster_secret_file:
        raise ConfigError("--cluster-tls-cert needs --cluster-secret-file (links)")
    from qcall.qkd.pki import client_ssl_context, server_ssl_context

    server = server_ssl_context(*files)
    client = client_ssl_context(*files)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _serve(
    config: ServerConfig, args: argparse.Namespace, tls: ssl.SSLContext | None
) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, _set_once, stop)
    protocol = SignalingProtocol(config, turn=turn_from(args))
    if args.database:
        from signaling.pgstore import PostgresMessageStore  # needs qcall[scale]

        store: MessageStore | None = await PostgresMessageStore.connect(args.database)
    elif args.no_mailbox:
        store = None
    else:
        store = SQLiteMessageStore(args.mailbox or _default_mailbox())
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(  # closes the store with it
            SignalingServer(protocol=protocol, manage_gc=True, mailbox=store)
        )
        await server.start(args.host, args.port, ssl=tls)
        if args.redis:
            from signaling.cluster import Cluster  # needs qcall[scale]

            instance = args.instance_id or f"{socket.gethostname()}:{server.port}:{os.getpid()}"
            link = link_from(args)
            secret, link_host, link_port = link or (None, "127.0.0.1", 0)
            cluster = Cluster(
                args.redis, instance, pin_ttl=config.pin_ttl, link_secret=secret,
                link_host=link_host, link_port=link_port, link_tls=link_tls_from(args),
            )  # fmt: skip
            await cluster.start(server)
            stack.push_async_callback(cluster.close)
        scheme = "wss" if tls else "ws"
        print(f"qcall-signaling listening on {scheme}://{args.host}:{server.port}", flush=True)
        await stop


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    config = config_from(parser, args)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        turn_from(args)  # errors before listening
        link_from(args)
        link_tls_from(args)
        asyncio.run(_serve(config, args, tls))
    except QCallError as exc:
        print(f"qcall-signaling: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"qcall-signaling: error: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
