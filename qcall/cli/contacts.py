"""``qcall contacts``: pinned identities of the people you call.

::

    qcall contacts list [--json]
    qcall contacts show NAME [--json]
    qcall contacts verify NAME [--yes]        after comparing the SAS by voice
    qcall contacts pin NAME --key FILE [--verified] [--force]
    qcall contacts forget NAME                (alias: remove) to re-pin after a key change

``pin --key`` reads what ``qcall identity show --json`` prints, a raw ML-DSA
public key, or its base64 text. See :mod:`qcall.contacts` and ``docs/identity.md``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcall.contacts import Contact, ContactStore

__all__ = ["read_public_key_file", "register"]

#: Largest key file read by ``pin --key``.
_MAX_KEY_FILE = 16 * 1024


def register(subparsers: Any) -> None:
    """Add ``contacts`` and its subcommands to the top-level parser."""
    parser = subparsers.add_parser(
        "contacts",
        help="list, verify, pin or forget your contacts' identity keys",
        description="Contacts are pinned on first use (TOFU); verify them by comparing the SAS.",
    )
    sub = parser.add_subparsers(dest="contacts_command", metavar="SUBCOMMAND", required=True)

    lst = sub.add_parser("list", help="list pinned contacts")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one contact and its fingerprint")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON (with the public key)")
    show.set_defaults(func=cmd_show)

    verify = sub.add_parser(
        "verify", help="mark a contact verified after comparing the SAS or fingerprint"
    )
    verify.add_argument("name")
    verify.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    verify.set_defaults(func=cmd_verify)

    pin = sub.add_parser("pin", help="pin a contact's key from a file")
    pin.add_argument("name")
    pin.add_argument(
        "--key",
        required=True,
        metavar="FILE",
        help="output of 'qcall identity show --json', or a raw/base64 ML-DSA public key",
    )
    pin.add_argument("--verified", action="store_true", help="also mark it verified")
    pin.add_argument("--force", action="store_true", help="replace a different pinned key")
    pin.set_defaults(func=cmd_pin, needs_crypto=True)

    forget = sub.add_parser(
        "forget", aliases=["remove"], help="forget a contact (its next key is pinned afresh)"
    )
    forget.add_argument("name")
    forget.set_defaults(func=cmd_forget)

    for p in (lst, show, verify, forget):
        p.set_defaults(needs_crypto=False)


def _store(args: argparse.Namespace) -> ContactStore:
    from qcall import config
    from qcall.contacts import ContactStore

    return ContactStore.in_home(config.qcall_home(args.home))


def _get(store: ContactStore, name: str) -> Contact:
    from qcall.exceptions import UnknownIdentityError

    contact = store.get(name)
    if contact is None:
        raise UnknownIdentityError(f"no contact named {name!r} (see: qcall contacts list)")
    return contact


def _status(contact: Contact) -> str:
    return "verified" if contact.verified else "UNVERIFIED"


def _as_json(contact: Contact) -> dict[str, Any]:
    return {"name": contact.name, **contact.to_dict()}


def cmd_list(args: argparse.Namespace) -> int:
    """``qcall contacts list``."""
    contacts = _store(args).list()
    if args.json:
        print(json.dumps([_as_json(c) for c in contacts], indent=2))
        return 0
    if not contacts:
        print("No contacts yet: they are pinned on the first call.")
        return 0
    width = max(len(c.name) for c in contacts)
    for c in contacts:
        print(f"{c.name:<{width}}  {_status(c):<10}  {c.scheme.value}  {c.fingerprint}")
    return 0


def _print_contact(contact: Contact) -> None:
    print(f"Name:        {contact.name}")
    print(f"Status:      {_status(contact)}")
    print(f"Algorithm:   {contact.scheme.value}")
    print(f"Fingerprint: {contact.fingerprint}")


def cmd_show(args: argparse.Namespace) -> int:
    """``qcall contacts show NAME``."""
    contact = _get(_store(args), args.name)
    if args.json:
        print(json.dumps(_as_json(contact), indent=2))
    else:
        _print_contact(contact)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``qcall contacts verify NAME``: the user vouches for the pinned key."""
    store = _store(args)
    contact = _get(store, args.name)
    if contact.verified:
        print(f"{contact.name} is already verified ({contact.fingerprint}).")
        return 0
    if not args.yes:
        _print_contact(contact)
        print(
            "Only continue if you compared the SAS shown during a call with "
            f"{contact.name} by voice, or this fingerprint over a trusted channel."
        )
        if not sys.stdin.isatty():
            print("qcall: error: not a terminal; pass --yes to confirm", file=sys.stderr)
            return 1
        if input("Mark as verified? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Not verified.")
            return 1
    contact = store.mark_verified(args.name)
    print(f"{contact.name} is now verified ({contact.fingerprint}).")
    return 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_public_key_file(path: str) -> bytes:
    """Read an ML-DSA public key from ``path`` (identity JSON, raw bytes or base64).

    Raises:
        ConfigError: the file cannot be read.
        InvalidKeyError: no ML-DSA public key in it.
    """
    from qcall.exceptions import ConfigError, InvalidKeyError
    from qcall.identity import identity_from_json, scheme_for_public_key

    try:
        with Path(path).open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > _MAX_KEY_FILE:
        raise InvalidKeyError(f"{path}: larger than {_MAX_KEY_FILE} bytes")
    if data.lstrip().startswith(b"{") and _is_utf8(data):  # a raw key may start with "{"
        try:
            return identity_from_json(data)[2]
        except (InvalidKeyError, ConfigError) as exc:
            raise InvalidKeyError(f"{path}: {exc}") from None
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    for candidate in (decoded, data):  # base64 text first: raw keys are never valid base64
        try:
            scheme_for_public_key(candidate)
        except InvalidKeyError:
            continue
        return candidate
    raise InvalidKeyError(
        f"{path}: not an ML-DSA public key (expected 'qcall identity show --json' output, "
        "or a raw or base64 public key)"
    )


def cmd_pin(args: argparse.Namespace) -> int:
    """``qcall contacts pin NAME --key FILE``."""
    public_key = read_public_key_file(args.key)
    contact = _store(args).pin(args.name, public_key, verified=args.verified, replace=args.force)
    print(f"Pinned {contact.name} ({_status(contact)}): {contact.fingerprint}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """``qcall contacts forget NAME``."""
    contact = _store(args).remove(args.name)
    print(f"Forgot {contact.name} ({contact.fingerprint}); the next key seen will be pinned.")
    return 0
