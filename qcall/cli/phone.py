"""``qcall phone``: the full-screen terminal phone (docs/phone.md).

It takes the same connection, key and audio settings as ``qcall call`` and
``qcall listen`` (flags, else ``HOME/config.toml``), and keeps the recent
calls in ``HOME/calls.json``. ``qcall call`` and ``qcall listen`` stay as they
are, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

__all__ = ["register"]

logger = logging.getLogger(__name__)


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

    controller = PhoneController(
        phone,
        ContactStore.in_home(home, strict=args.strict_contacts),
        CallHistory.in_home(home),
        open_speaker=open_speaker,
    )
    # The phone must keep its own contacts store: build_phone gave it one already.
    controller.contacts = _contacts_of(phone, controller.contacts)
    app = PhoneApp(controller)
    try:
        await app.run_async()
    finally:
        await controller.close()
    if app.error is not None:
        raise app.error
    return 0


def _contacts_of(phone: Any, fallback: Any) -> Any:
    """The :class:`ContactStore` whose ``check_peer`` the phone uses (its peer_trust matters)."""
    owner = getattr(phone.check_peer, "__self__", None)
    return owner if owner is not None else fallback


def run_phone(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
