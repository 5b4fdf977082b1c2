"""``qcall send``, ``inbox``, ``chat``, ``history``, ``group``: Quantum Secret messaging.

::

    qcall send bob "text"                 a message (stored by the server if bob is offline)
    qcall send bob --file report.pdf      a file: progress bar, resumes after a broken connection
    qcall send @team "text"               a group
    qcall inbox [--json]                  fetch, show and acknowledge new messages
    qcall chat bob | @team                interactive: history, live messages, a line to type
    qcall history bob [--grep WORD]       local history (encrypted at rest)
    qcall group create team alice bob carol | add | remove | leave | list

Settings: ``--signaling`` and the key source flags as ``qcall call`` (or the config
file's ``signaling`` and ``[key_source]``), and a ``[messaging]`` table::

    [messaging]
    max_file_size = 1073741824   # bytes (default 1 GiB); bigger files are refused before upload
    require_qkd = false          # true: refuse to start a session without a QKD key

With a QKD key source, sessions take QKD keys (``hybrid``); without one they are
``pqc`` (ML-KEM only), and every command says so. See docs/messaging.md §16.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcall.cli.settings import DEFAULT_SIGNALING
from qcall.exceptions import ConfigError, QCallError, SignalingError

if TYPE_CHECKING:
    from qcall.messaging.api import Event
    from qcall.messaging.client import MessagingClient
    from qcall.messaging.transport import SignalingTransport
    from qcall.signaling.client import SignalingClient

__all__ = ["Messenger", "open_messenger", "register"]

_MESSAGING_KEYS = {"max_file_size": int, "require_qkd": bool, "chunk_size": int}
_STATUS = {0: "sent", 1: "delivered", 2: "read"}
_RESUME_ATTEMPTS = 20
_RESUME_WAIT = 30.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = sub.add_parser("send", help="send an end-to-end encrypted message or file")
    send.add_argument("to", help="a user, or @group")
    send.add_argument("text", nargs="?", help="the message")
    send.add_argument("--file", metavar="FILE", help="send this file instead")
    send.add_argument(
        "--max-file-size", type=int, metavar="BYTES", help="largest file sent (default 1 GiB)"
    )
    _common(send)
    send.set_defaults(func=lambda a: _run(_send(a)))

    inbox = sub.add_parser("inbox", help="fetch and show new messages")
    _common(inbox)
    inbox.set_defaults(func=lambda a: _run(_inbox(a)))

    chat = sub.add_parser("chat", help="chat with a user or @group (interactive)")
    chat.add_argument("to", help="a user, or @group")
    chat.add_argument("--lines", type=int, default=20, help="history lines shown first (20)")
    _common(chat)
    chat.set_defaults(func=lambda a: _run(_chat(a)))

    history = sub.add_parser("history", help="show the local history with a user or @group")
    history.add_argument("to", help="a user, or @group")
    history.add_argument("--grep", metavar="TEXT", help="only messages containing TEXT")
    history.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    _common(history)
    history.set_defaults(func=_history)

    group = sub.add_parser("group", help="create and manage groups")
    gsub = group.add_subparsers(dest="group_command", metavar="SUBCOMMAND", required=True)
    for verb, text in (("create", "create a group"), ("add", "add members"),
                       ("remove", "remove members"), ("leave", "leave a group")):  # fmt: skip
        p = gsub.add_parser(verb, help=text)
        p.add_argument("name", help="the group (with or without @)")
        if verb != "leave":
            p.add_argument("members", nargs="+", help="user names")
        _common(p)
        p.set_defaults(func=lambda a: _run(_group(a)))
    lst = gsub.add_parser("list", help="list your groups")
    _common(lst)
    lst.set_defaults(func=_group_list)


def _common(p: argparse.ArgumentParser) -> None:
    from qcall.cli.call import add_connection_arguments

    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _run(coro: Any) -> int:
    return int(asyncio.run(coro))


# --- opening ----------------------------------------------------------------------------------


@dataclass
class Messenger:
    """An open messaging client: its signaling connection, transport and mode."""

    client: MessagingClient
    signaling: SignalingClient
    transport: SignalingTransport
    mode: str  # "hybrid" (a QKD key source) or "pqc"
    notice: str

    def mode_of(self, to: str) -> str:
        """The mode of the conversation: the session's (1:1), else ours."""
        if to.startswith("@"):
            return self.mode
        state = self.client.store.active_session(to)
        return state.mode.value if state is not None else self.mode


def _client_config(args: argparse.Namespace, conf: dict[str, Any]) -> Any:
    from qcall.messaging.api import ClientConfig

    table = conf.get("messaging", {})
    for key, value in table.items():
        kind = _MESSAGING_KEYS.get(key)
        if kind is None or not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise ConfigError(f"[messaging] {key}: unknown setting or wrong type")
    options = dict(table)
    if getattr(args, "max_file_size", None) is not None:
        options["max_file_size"] = args.max_file_size
    if options.get("max_file_size", 1) < 1:
        raise ConfigError("max_file_size must be positive")
    return ClientConfig(sae_id=getattr(args, "sae", None), **options)


def _local(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    from qcall.cli.settings import load_config
    from qcall.config import qcall_home
    from qcall.contacts import ContactStore
    from qcall.identity import Identity
    from qcall.messaging.store import ClientStore

    home = qcall_home(args.home)
    conf = load_config(args.config, home)
    identity = Identity.load(home)
    store = ClientStore(home / "messages.db", identity.signing_key.seed_bytes())
    return identity, store, ContactStore.in_home(home), conf


@contextlib.asynccontextmanager
async def open_messenger(args: argparse.Namespace) -> AsyncIterator[Messenger]:
    """Connect to the signaling server as the home's identity and publish prekeys."""
    from qcall.cli.settings import key_source_config, signaling_tls
    from qcall.messaging.client import MessagingClient
    from qcall.messaging.transport import SignalingTransport
    from qcall.qkd.client import open_key_source
    from qcall.signaling.client import SignalingClient

    identity, store, contacts, conf = _local(args)
    config = _client_config(args, conf)
    ks_conf = key_source_config(args, conf, args.sae or identity.name)
    key_source = open_key_source(ks_conf) if ks_conf else None
    url = args.signaling or conf.get("signaling") or DEFAULT_SIGNALING
    tls = signaling_tls(url, getattr(args, "signaling_ca", None) or conf.get("signaling_ca"))
    signaling = SignalingClient(
        url, identity.signing_key, identity.name, tls, backoff_max=2.0
    )
    transport = SignalingTransport(signaling)
    client = MessagingClient(
        identity, store, transport, contacts, key_source=key_source, config=config
    )
    if key_source is not None:
        mode, notice = "hybrid", "QKD keys + ML-KEM"
    else:
        mode, notice = "pqc", "no QKD key source: ML-KEM only"
    try:
        await signaling.connect()
        await client.ensure_prekeys()
        await client.flush_outbox()  # what a crash or a broken connection left
        await client.files.resume_uploads()
        yield Messenger(client, signaling, transport, mode, notice)
    finally:
        await signaling.close()
        if key_source is not None:
            with contextlib.suppress(Exception):
                await key_source.close()
        store.close()


def messenger_args(home: str | None, signaling: str | None) -> argparse.Namespace:
    """The arguments :func:`open_messenger` needs, for another command (``qcall seal``)."""
    return argparse.Namespace(
        home=home, config=None, signaling=signaling, kme=None, cert=None, key=None, ca=None,
        key_source=None, network=None, sae=None, json=False,
    )  # fmt: skip


def configured_signaling(args: argparse.Namespace) -> str | None:
    """``--signaling``, else the config file's ``signaling``, else ``None``."""
    from qcall.cli.settings import load_config
    from qcall.config import qcall_home

    if getattr(args, "signaling", None):
        return str(args.signaling)
    value = load_config(getattr(args, "config", None), qcall_home(args.home)).get("signaling")
    return str(value) if value else None


# --- showing ---------------------------------------------------------------------------------


def _when(ms: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


#: How a sender was trusted (``ContactStore.peer_trust`` form), given its name.
Trust = Callable[[str], str | None]


def sender_trust(client: Any, name: str) -> str | None:
    """How ``name`` is trusted: the contacts' word on the identity key of our session with it.

    ``"organisation: …"`` (certified by a trusted organisation), ``"verified"``,
    ``"unverified"``, or ``None`` (no 1:1 session, or the key is refused now, e.g. a
    certificate revoked since).
    """
    state = client.store.active_session(name)
    contacts = client.contacts
    if state is None or not hasattr(contacts, "peer_trust"):
        return None
    try:
        contacts.check_peer(name, state.peer_identity)
    except QCallError:
        return None
    trust = contacts.peer_trust(name)
    return str(trust) if trust else None


def event_json(event: Event, trust: Trust | None = None) -> dict[str, Any] | None:
    """A JSON object for an event, or ``None`` (internal events).

    With ``trust``, messages and files also say how their sender was trusted
    (``"trust"``: ``organisation: …``, ``verified``, ``unverified`` or ``null``).
    """
    from qcall.messaging.api import (
        FileReceived,
        GroupChanged,
        MessagePending,
        MessageReceived,
        MessageRejected,
        ReceiptReceived,
    )

    if isinstance(event, MessageReceived):
        c = event.content
        out: dict[str, Any] = {
            "event": "message", "conversation": event.conversation, "from": event.sender,
            "text": c.text, "mode": event.mode.value, "sent_ms": c.sent_ms,
            "id": c.message_id.hex(),
        }  # fmt: skip
        if c.kind.name == "FILE":
            from qcall.messaging.files import FileOffer

            offer = FileOffer.parse(c.body)
            out.update(event="file_offer", text=offer.name, size=offer.size)
        if trust is not None:
            out["trust"] = trust(event.sender)
        return out
    if isinstance(event, FileReceived):
        return {"event": "file", "conversation": event.conversation, "from": event.sender,
                "name": event.offer.name, "size": event.offer.size, "path": str(event.path),
                "sha256_match": True}  # fmt: skip
    if isinstance(event, ReceiptReceived):
        return {"event": "receipt", "from": event.sender, "status": event.status.name.lower(),
                "ids": [i.hex() for i in event.message_ids]}  # fmt: skip
    if isinstance(event, GroupChanged):
        return {"event": "group", "group": "@" + event.group,
                "action": event.change.action.name.lower(), "by": event.change.author,
                "members": [m.name for m in event.change.members], "left": event.left}  # fmt: skip
    if isinstance(event, MessageRejected):
        code = getattr(event.error, "code", "error")
        return {"event": "rejected", "from": event.sender, "code": code, "error": str(event.error)}
    if isinstance(event, MessagePending):
        return {"event": "pending", "from": event.sender, "reason": event.reason}
    return None


def event_text(event: Event, trust: Trust | None = None) -> str | None:
    """One line for a person, or ``None``."""
    from qcall.contacts import describe_trust

    obj = event_json(event, trust)
    if obj is None:
        return None
    kind = obj["event"]
    if kind == "message":
        where = "" if obj["conversation"] == obj["from"] else f" in {obj['conversation']}"
        how = obj["mode"] + (f", {describe_trust(obj['trust'])}" if "trust" in obj else "")
        return f"[{_when(obj['sent_ms'])}] {obj['from']}{where}: {obj['text']}  ({how})"
    if kind == "file_offer":
        where = "" if obj["conversation"] == obj["from"] else f" in {obj['conversation']}"
        return f"{obj['from']} is sending a file{where}: {obj['text']} ({obj['size']} bytes)"
    if kind == "file":
        size = f"{obj['size']} bytes, SHA-256 ok"
        return f"{obj['from']} sent {obj['name']} ({size}) → {obj['path']}"
    if kind == "receipt":
        return None
    if kind == "group":
        members = ", ".join(obj["members"])
        return f"{obj['group']}: {obj['action']} by {obj['by']} (members: {members})"
    if kind == "rejected":
        return f"! REJECTED an envelope from {obj['from']}: {obj['error']}"
    return f"… kept for later, from {obj['from']}: {obj['reason']}"


async def _acknowledge(m: Messenger, events: list[Event], status: Any) -> None:
    """Send delivered (or read) receipts for 1:1 messages."""
    from qcall.messaging.api import MessageReceived

    by_peer: dict[str, list[bytes]] = {}
    for e in events:
        if isinstance(e, MessageReceived) and e.conversation == e.sender:
            by_peer.setdefault(e.sender, []).append(e.content.message_id)
    for peer, ids in by_peer.items():
        await m.client.send_receipt(peer, ids, status)


def _print_events(events: list[Event], as_json: bool, client: Any = None) -> None:
    def trust(name: str) -> str | None:
        return sender_trust(client, name)

    how = None if client is None else trust
    for event in events:
        if as_json:
            obj = event_json(event, how)
            if obj is not None:
                print(json.dumps(obj), flush=True)
        elif (line := event_text(event, how)) is not None:
            print(line, flush=True)


# --- commands --------------------------------------------------------------------------------


def _progress_bar(enabled: bool) -> tuple[Any, Callable[[int, int], None]]:
    if not enabled:
        return contextlib.nullcontext(), lambda done, total: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), transient=True)
    task = bar.add_task("sending", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


async def _send(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.file is None):
        raise ConfigError("give the message text, or --file FILE (not both)")
    if args.file is not None:  # refused before connecting, and before any upload
        from qcall.messaging.files import check_file_size

        _, store, _, conf = _local(args)
        store.close()
        path = Path(args.file)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        check_file_size(size, path.name, _client_config(args, conf).max_file_size)
    async with open_messenger(args) as m:
        events = await m.client.receive()
        _print_events(events, args.json, m.client)
        if args.file is None:
            message_id = await m.client.send_text(args.to, args.text)
            result: dict[str, Any] = {"sent": True, "to": args.to, "id": message_id.hex()}
        else:
            offer = await _send_file(m, args)
            result = {"sent": True, "to": args.to, "file": offer.name, "size": offer.size,
                      "sha256": offer.sha256.hex()}  # fmt: skip
        result.update(mode=m.mode_of(args.to), notice=m.notice)
        if args.json:
            print(json.dumps(result))
        else:
            what = f"file {result['file']} ({result['size']} bytes)" if args.file else "message"
            print(f"sent {what} to {args.to} · {result['mode']} ({m.notice})")
    return 0


async def _send_file(m: Messenger, args: argparse.Namespace) -> Any:
    """Send; after a broken connection, wait for it to come back and resume the upload
    from the last chunk the server committed (the offer and each chunk are idempotent)."""
    from qcall.messaging.files import FileOffer

    bar, update = _progress_bar(not args.json and sys.stderr.isatty())
    with bar:
        try:
            return await m.client.send_file(args.to, args.file, progress=update)
        except SignalingError as exc:
            error: Exception = exc
        store = m.client.store
        offers = [store.transfer(i) for i in store.transfers(outgoing=True)]
        mine = [t for t in offers if t is not None and t.conversation == args.to]
        if not mine:
            raise error
        offer = FileOffer.parse(mine[-1].offer)
        for _ in range(_RESUME_ATTEMPTS):
            print(f"connection broken ({error}); resuming…", file=sys.stderr)
            try:
                await m.signaling.wait_registered(_RESUME_WAIT)
                await m.client.flush_outbox()
                await m.client.files.upload(offer.file_id, update)
            except (SignalingError, TimeoutError) as exc:
                error = exc
                continue
            return offer
        raise SignalingError(f"the upload of {offer.name} did not finish: {error}")


async def _inbox(args: argparse.Namespace) -> int:
    from qcall.messaging.content import ReceiptStatus

    async with open_messenger(args) as m:
        events = await m.client.receive()
        await _acknowledge(m, events, ReceiptStatus.DELIVERED)
        _print_events(events, args.json, m.client)
        if not args.json and not any(event_text(e) for e in events):
            print("no new messages")
    return 0


def _history(args: argparse.Namespace) -> int:
    _, store, _, _ = _local(args)
    from qcall.messaging.content import Content

    try:
        rows = []
        for entry in store.history(args.to, limit=args.limit):
            content = Content.decode(entry.body)
            if args.grep and args.grep.lower() not in content.text.lower():
                continue
            rows.append(_history_row(entry, content, args.to))
    finally:
        store.close()
    for row in rows:
        print(json.dumps(row) if args.json else _history_line(row))
    return 0


def _history_row(entry: Any, content: Any, conversation: str) -> dict[str, Any]:
    text = content.text
    if content.kind.name == "FILE":
        from qcall.messaging.files import FileOffer

        offer = FileOffer.parse(content.body)
        text = f"[file {offer.name}, {offer.size} bytes]"
    return {"conversation": conversation, "outgoing": entry.outgoing, "at_ms": entry.at_ms,
            "status": _STATUS.get(entry.status, str(entry.status)), "text": text,
            "kind": content.kind.name.lower(), "id": entry.message_id.hex()}  # fmt: skip


def _history_line(row: dict[str, Any]) -> str:
    arrow = "→" if row["outgoing"] else "←"
    mark = {"sent": " ✓", "delivered": " ✓✓", "read": " ✓✓ read"}.get(row["status"], "")
    return f"[{_when(row['at_ms'])}] {arrow} {row['text']}{mark if row['outgoing'] else ''}"


async def _group(args: argparse.Namespace) -> int:
    name = args.name.removeprefix("@")
    async with open_messenger(args) as m:
        _print_events(await m.client.receive(), args.json, m.client)
        verb = args.group_command
        if verb == "create":
            state = await m.client.create_group(name, args.members)
        elif verb == "add":
            state = await m.client.add_members(name, args.members)
        elif verb == "remove":
            state = await m.client.remove_members(name, args.members)
        else:
            state = await m.client.leave_group(name)
        members = [x.name for x in state.members]
        if args.json:
            print(json.dumps({"group": "@" + name, "action": verb, "members": members,
                              "epoch": state.epoch}))  # fmt: skip
        else:
            print(f"@{name}: {verb} done, epoch {state.epoch}; members: {', '.join(members)}")
    return 0


def _group_list(args: argparse.Namespace) -> int:
    identity, store, _, _ = _local(args)
    try:
        groups = [
            {
                "group": "@" + g.name,
                "members": [x.name for x in g.members],
                "epoch": g.epoch,
                "member": g.member(identity.name) is not None,
            }
            for g in store.groups()
        ]
    finally:
        store.close()
    if args.json:
        print(json.dumps(groups))
    for g in [] if args.json else groups:
        left = "" if g["member"] else " (you left)"
        print(f"{g['group']}: {', '.join(g['members'])}{left}")
    if not groups and not args.json:
        print("no groups")
    return 0


async def _chat(args: argparse.Namespace) -> int:
    from qcall.cli.chat import run_chat

    async with open_messenger(args) as m:
        return await run_chat(m, args.to, lines=args.lines)
