"""``qcall phone``: the full-screen terminal phone (docs/phone.md).

It takes the same connection, key and audio settings as ``qcall call`` and
``qcall listen`` (flags, else ``HOME/config.toml``), keeps the recent
calls in ``HOME/calls.json`` and, while it owns the terminal, writes its log to
``HOME/phone.log``. ``qcall call`` and ``qcall listen`` stay as they
are, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register"]

logger = logging.getLogger(__name__)

#: While the app runs, logs go to this file in the qcall home (the screen is the app's).
LOG_FILE = "phone.log"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qcall.call.media_args import add_media_arguments
    from qcall.cli.call import _common

    parser = sub.add_parser(
        "phone",
        help="the full-screen phone: contacts, calls, messages",
        description="A full-screen terminal phone: contacts with presence and verification, "
        "recent and missed calls, conversations, and the call screen (keys: docs/phone.md).",
    )
    _common(parser)
    add_media_arguments(parser)
    parser.set_defaults(func=run_phone)


async def _run(args: argparse.Namespace) -> int:
    from qcall.call.media import open_sink
    from qcall.cli.call import build_phone
    from qcall.config import qcall_home
    from qcall.contacts import ContactStore
    from qcall.exceptions import MediaError
    from qcall.phone.app import PhoneApp
    from qcall.phone.controller import PhoneController
    from qcall.phone.history import CallHistory

    home = qcall_home(args.home)
    phone, _ = build_phone(args)  # the source it opened (a check) serves the first call

    def open_speaker() -> Any:
        try:
            return open_sink(args)
        except MediaError:
            raise
        except Exception as exc:  # e.g. PortAudio errors on a machine with no sound at all
            raise MediaError(f"no speaker: {exc}") from exc

    # The contacts store whose check_peer the phone calls: its peer_trust() tells how a peer
    # was accepted (organisation, SAS, first use).
    contacts = getattr(phone.check_peer, "__self__", None)
    if not isinstance(contacts, ContactStore):
        contacts = ContactStore.in_home(home, strict=args.strict_contacts)
    controller = PhoneController(
        phone, contacts, CallHistory.in_home(home), open_speaker=open_speaker
    )
    store = _messaging(args, phone, contacts, controller)
    app = PhoneApp(controller)
    with _log_to(home / LOG_FILE):
        try:
            await app.run_async()
        finally:
            await controller.close()
            store.close()
    if app.error is not None:
        raise app.error
    return 0


def _messaging(args: argparse.Namespace, phone: Any, contacts: Any, controller: Any) -> Any:
    """Quantum Secret in the phone: a messaging client on the phone's own signaling
    connection and key source, its history in ``HOME/messages.db``; returns the store."""
    from qcall.cli.messaging import _client_config
    from qcall.cli.settings import load_config
    from qcall.config import qcall_home
    from qcall.identity import Identity
    from qcall.messaging.client import MessagingClient
    from qcall.messaging.store import ClientStore
    from qcall.messaging.transport import SignalingTransport
    from qcall.phone.conversations import Conversations

    home = qcall_home(args.home)
    identity = Identity.load(home)
    store = ClientStore(home / "messages.db", identity.signing_key.seed_bytes())
    client = MessagingClient(
        identity,
        store,
        SignalingTransport(phone.signaling),
        contacts,
        key_source=phone.key_source,
        config=_client_config(args, load_config(args.config, home)),
    )
    controller.conversations = Conversations(
        client,
        lambda: [contact.name for contact in contacts.list()],
        on_change=lambda: controller.on_change(),
    )
    return store


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send log records to ``path`` (mode 0600) while the full-screen app owns the terminal."""
    root = logging.getLogger()
    saved = root.handlers[:]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()
        handler.stream.close()


def run_phone(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
