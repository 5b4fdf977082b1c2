"""``qcall seal``: Quantum Cloud Seal — seal documents, approve them, verify, audit.

::

    qcall seal trust-log LOG.pub --url URL [--ca TLS-CA.pem]   (once)
    qcall seal setup --workflows DIR                             (shared workflow directory)
    qcall seal sign FILE [--reason R] [--out FILE.qseal]
    qcall seal verify FILE [FILE.qseal] [--json] [--authority CA.pem --crl CRL.pem]
                                        [--log-key LOG.pub]
    qcall seal request FILE --approvers alice,bob,carol [--any K] [--reason R]
    qcall seal inbox [--json]
    qcall seal approve WORKFLOW [--file FILE] [--reason R]
    qcall seal reject WORKFLOW --reason R [--file FILE]
    qcall seal status WORKFLOW [--json]
    qcall seal audit [--bundle FILE.qseal ...] [--json]

See :mod:`qcall.seal` and ``docs/seal.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcall.org import OrgTrust
    from qcall.seal.bundle import SealBundle
    from qcall.seal.logclient import LogClient
    from qcall.seal.logformat import LogKey
    from qcall.seal.service import SealHome
    from qcall.seal.verify import RecordReport, SealReport

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``seal`` and its subcommands."""
    parser = subparsers.add_parser(
        "seal",
        help="Quantum Cloud Seal: seal, approve, verify and audit documents",
        description="Post-quantum electronic seals, recorded in a transparency log.",
    )
    sub = parser.add_subparsers(dest="seal_command", metavar="SUBCOMMAND", required=True)

    trust = sub.add_parser("trust-log", help="trust a seal log and use it for signing")
    trust.add_argument("key", metavar="LOG.pub", help="the log's public key file")
    trust.add_argument("--url", help="the log's URL, e.g. https://127.0.0.1:8470")
    trust.add_argument("--ca", metavar="TLS-CA.pem", help="CA of the log's TLS certificate")
    trust.set_defaults(func=cmd_trust_log, needs_crypto=False)

    setup = sub.add_parser("setup", help="configure the shared workflow directory")
    setup.add_argument("--workflows", required=True, metavar="DIR")
    setup.set_defaults(func=cmd_setup, needs_crypto=False)

    sign = sub.add_parser("sign", help="seal a document (writes FILE.qseal)")
    sign.add_argument("file")
    sign.add_argument("--reason", default="", help='why, e.g. "approved"')
    sign.add_argument("--out", metavar="FILE.qseal")
    sign.set_defaults(func=cmd_sign)

    verify = sub.add_parser("verify", help="verify a seal offline and print the verdict")
    verify.add_argument("file")
    verify.add_argument("bundle", nargs="?", metavar="FILE.qseal")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--authority", metavar="CA.pem", help="trust this authority (only)")
    verify.add_argument("--crl", metavar="CRL.pem", help="with --authority: its CRL")
    verify.add_argument("--log-key", metavar="LOG.pub", help="trust this log (only)")
    verify.set_defaults(func=cmd_verify)

    request = sub.add_parser("request", help="seal a document and ask for approvals")
    request.add_argument("file")
    request.add_argument("--approvers", required=True, help="names, in order: bob,carol")
    request.add_argument(
        "--any", type=int, metavar="K", help="any K of them (default: all, in order)"
    )
    request.add_argument("--reason", default="", help="what is asked")
    request.add_argument("--out", metavar="FILE.qseal")
    _signaling_flag(request)
    request.set_defaults(func=cmd_request)

    inbox = sub.add_parser("inbox", help="approvals waiting for you")
    inbox.add_argument("--json", action="store_true")
    inbox.set_defaults(func=cmd_inbox)

    for verb in ("approve", "reject"):
        p = sub.add_parser(verb, help=f"{verb} a workflow (after reviewing the document)")
        p.add_argument("workflow", help="workflow ID (at least 8 hex digits)")
        p.add_argument("--file", help="your copy of the document (default: the requester's)")
        p.add_argument("--reason", required=verb == "reject", default="")
        _signaling_flag(p)
        p.set_defaults(func=cmd_decide, approve=verb == "approve")

    status = sub.add_parser("status", help="show a workflow")
    status.add_argument("workflow")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    audit = sub.add_parser("audit", help="monitor the log: forks, rewritten history, your entries")
    audit.add_argument("--bundle", nargs="*", default=[], metavar="FILE.qseal",
                       help="also record the tree heads of these bundles' receipts")  # fmt: skip
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)


# --- helpers ------------------------------------------------------------------------------


def _signaling_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--signaling",
        metavar="URL",
        help="also notify by qcall message through this server (default: the config's "
        "'signaling', if any)",
    )


@contextlib.asynccontextmanager
async def _notifier(args: argparse.Namespace, workflows: Path) -> AsyncIterator[Any]:
    """The workflow notifier: by qcall message too when a signaling server is configured."""
    from qcall.cli.messaging import configured_signaling, messenger_args, open_messenger
    from qcall.seal.notify import MessagingNotifier, make_notifier

    url = configured_signaling(args)
    if url is None:
        yield make_notifier(workflows)
        return
    async with open_messenger(messenger_args(args.home, url)) as messenger:
        notifier = make_notifier(workflows, messenger.client.send_text)
        yield notifier
        assert isinstance(notifier, MessagingNotifier)
        for recipient, error in await notifier.flush():
            print(f"qcall: warning: no message to {recipient} ({error}); the notice is in "
                  f"the workflow inbox", file=sys.stderr)  # fmt: skip
        sent = sorted({m for m, _ in notifier.sent})
        if sent:
            print(f"  notified  {', '.join(sent)} by qcall message ({messenger.mode})")


def _home(args: argparse.Namespace) -> SealHome:
    from qcall import config
    from qcall.seal.service import SealHome

    return SealHome(config.qcall_home(args.home))


def _read(path: str | Path) -> bytes:
    from qcall.exceptions import ConfigError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _log_key(path: str) -> LogKey:
    from qcall.exceptions import ConfigError, SealFormatError
    from qcall.seal.logformat import LogKey

    try:
        return LogKey.from_json(json.loads(_read(path)))
    except (ValueError, SealFormatError) as exc:
        raise ConfigError(f"{path} is not a seal log key: {exc}") from None


def _client(home: SealHome) -> LogClient:
    from qcall.seal.logclient import LogClient, client_tls_context

    key, url, ca = home.default_log()
    ctx = client_tls_context(ca) if url.startswith("https:") else None
    return LogClient(url, key, ctx)


def _bundle_path(file: str, out: str | None) -> Path:
    from qcall.seal.bundle import SUFFIX

    return Path(out) if out else Path(file + SUFFIX)


def _write_bundle(path: Path, bundle: SealBundle) -> None:
    from qcall import config

    config.atomic_write(path, bundle.serialize(), mode=0o644)


def _load_bundle(path: str | Path) -> SealBundle:
    from qcall.seal.bundle import SealBundle

    return SealBundle.parse(_read(path), str(path))


# --- trust-log, setup -------------------------------------------------------------------


def cmd_trust_log(args: argparse.Namespace) -> int:
    key = _log_key(args.key)
    ca = str(Path(args.ca).resolve()) if args.ca else None
    _home(args).trust_log(key, url=args.url, tls_ca=ca)
    print(f"Trusting the seal log {key.name!r} ({key.log_id.hex()[:16]}…)"
          + (f" at {args.url}" if args.url else ""))  # fmt: skip
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    path = Path(args.workflows).resolve()
    _home(args).set_config(workflows=str(path))
    print(f"Approval workflows live in {path} (share it with your approvers)")
    return 0


# --- sign, request ----------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace) -> int:
    return asyncio.run(_sign(args, None))


def cmd_request(args: argparse.Namespace) -> int:
    from qcall.exceptions import ConfigError, SealFormatError
    from qcall.seal.statement import Mode, Policy

    approvers = tuple(a.strip() for a in args.approvers.split(",") if a.strip())
    try:
        if args.any is None:
            policy = Policy(Mode.ORDERED, len(approvers), approvers)
        else:
            policy = Policy(Mode.THRESHOLD, args.any, approvers)
    except SealFormatError as exc:
        raise ConfigError(f"--approvers/--any: {exc}") from None
    return asyncio.run(_sign(args, policy))


async def _sign(args: argparse.Namespace, policy: Any) -> int:
    from qcall import config
    from qcall.seal.notify import WorkflowStore
    from qcall.seal.service import Signer, seal_document
    from qcall.seal.workflow import Workflow

    home = _home(args)
    signer = Signer.load(config.qcall_home(args.home))
    out = _bundle_path(args.file, args.out)
    async with _client(home) as client:
        bundle = await seal_document(
            signer, args.file, client, home.logs(), reason=args.reason, policy=policy, home=home
        )
    _write_bundle(out, bundle)
    receipt = bundle.seal.receipt
    assert receipt is not None
    print(f"Sealed {args.file} as {signer.member.describe()}")
    print(f"  log entry {receipt.leaf_index} of {receipt.tree_head.tree_size} "
          f"(inclusion proof verified)")  # fmt: skip
    print(f"  bundle    {out}")
    if policy is not None:
        store = WorkflowStore(home.workflows())
        document = str(Path(args.file).resolve())
        wid = store.save(bundle, document=document, bundle_path=str(out.resolve()))
        workflow = Workflow(bundle.seal.statement, signer.name, signer.member.issuer_fingerprint)
        print(f"  workflow  {wid[:16]}  waiting for {', '.join(workflow.waiting_for())}")
        async with _notifier(args, home.workflows()) as notifier:
            for notice in workflow.start():
                notifier.notify(notice, bundle, document)
    return 0


# --- verify -----------------------------------------------------------------------------


def _verifier_trust(args: argparse.Namespace, tmp: str) -> tuple[OrgTrust, dict[bytes, LogKey]]:
    from qcall import config
    from qcall.org import OrgTrust

    home = _home(args)
    if args.authority:
        trust = OrgTrust(Path(tmp) / "org")
        trust.trust(_read(args.authority), args.authority)
        if args.crl:
            trust.update_crl(_read(args.crl), args.crl)
    else:
        trust = OrgTrust.in_home(config.qcall_home(args.home))
    if args.log_key:
        key = _log_key(args.log_key)
        logs = {key.log_id: key}
    else:
        logs = home.logs()
    return trust, logs


def cmd_verify(args: argparse.Namespace) -> int:
    from qcall.seal.service import hash_file
    from qcall.seal.verify import verify_bundle

    bundle = _load_bundle(args.bundle or _bundle_path(args.file, None))
    with tempfile.TemporaryDirectory(prefix="qcall-verify-") as tmp:
        trust, logs = _verifier_trust(args, tmp)
        report = verify_bundle(bundle, trust, logs, document_hash=hash_file(args.file))
    _observe_heads(args, report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    return 0 if report.ok else 1


def _observe_heads(args: argparse.Namespace, report: SealReport) -> None:
    """Feed the receipts' tree heads to the audit monitor (split-view detection)."""
    from qcall.seal.audit import AuditStore, Monitor

    home = _home(args)
    logs = home.logs()
    heads = [h for h in report.tree_heads() if h.log_id in logs]
    if not heads:
        return
    store = AuditStore(home.directory / "audit.db")
    try:
        for head in heads:
            for alarm in Monitor(store, logs[head.log_id]).observe(head, "bundle"):
                print(f"qcall: ALARM: {alarm.message}", file=sys.stderr)
    finally:
        store.close()


def _when(ms: int | None) -> str:
    from qcall.org import from_millis

    return "—" if ms is None else f"{from_millis(ms):%Y-%m-%d %H:%M:%S} UTC"


def _line(r: RecordReport) -> str:
    who = r.member.describe() if r.member else r.signer
    serial = f", certificate {r.member.serial_hex}" if r.member else ""
    return f"{who}{serial}"


def _print_report(report: SealReport) -> None:
    mark = "VALID" if report.ok else "INVALID"
    state = f"; approvals {report.workflow_state.upper()}" if report.workflow_state else ""
    print(
        f"{mark}: seal of {report.document_name!r} "
        f"(SHA-384 {report.document_hash.hex()[:32]}…){state}"
    )
    s = report.seal
    print(f"  sealed by   {_line(s)}")
    if s.member:
        print(f"  authority   {s.member.organisation}")
    print(f"  reason      {s.reason!r}")
    print(f"  when        {_when(s.log_time)} (log time; signer's clock {_when(s.signing_time)})")
    if s.in_log:
        print(f"  log         {s.log_name!r}: entry {s.leaf_index} of {s.tree_size}, "
              "inclusion proof verified")  # fmt: skip
    else:
        print("  log         NOT shown to be in a trusted log")
    if s.member and s.member.revoked_later:
        rl = s.member.revoked_later
        print(f"  note        the certificate was revoked later ({rl.reason}, {rl.at:%Y-%m-%d}); "
              "the seal predates it")  # fmt: skip
    if report.workflow:
        print(f"  approvals   {report.workflow}")
        for i, d in enumerate(report.decisions, 1):
            verdict = "ok" if not d.failures else "REFUSED"
            reason = f" {d.reason!r}" if d.reason else ""
            print(f"    {i}. {d.kind:<7} {_line(d)} at {_when(d.log_time)}{reason} [{verdict}]")
    for f in report.failures:
        print(f"  FAILED [{f.cause}] {f.message}")


# --- workflows ----------------------------------------------------------------------------


def cmd_inbox(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.identity import Identity
    from qcall.seal.notify import make_notifier

    home = _home(args)
    me = Identity.load(config.qcall_home(args.home)).name
    notices = make_notifier(home.workflows()).inbox(me)
    if args.json:
        print(json.dumps(notices, indent=2))
        return 0
    if not notices:
        print("Nothing waiting for you.")
    for n in notices:
        print(f"{n.get('workflow', '')[:16]}  {n.get('what')}: {n.get('document')!r} "
              f"{n.get('detail') or n.get('reason') or ''}")  # fmt: skip
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    return asyncio.run(_decide(args))


async def _decide(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.exceptions import ConfigError
    from qcall.org import OrgTrust
    from qcall.seal.notify import WorkflowStore
    from qcall.seal.service import Signer, decide, hash_file

    home = _home(args)
    qhome = config.qcall_home(args.home)
    signer = Signer.load(qhome)
    store = WorkflowStore(home.workflows())
    wid = store.resolve(args.workflow)
    with store.locked(wid):
        bundle, meta = store.load(wid)
        document = args.file or meta.get("document")
        if not document:
            raise ConfigError("give the document you reviewed with --file FILE")
        async with _client(home) as client:
            bundle, report, notices = await decide(
                signer, bundle, OrgTrust.in_home(qhome), client, home.logs(),
                approve=args.approve, reason=args.reason,
                document_hash=hash_file(document), home=home,
            )  # fmt: skip
        store.save(bundle)
    target = meta.get("bundle")
    if isinstance(target, str):
        try:
            _write_bundle(Path(target), bundle)
        except ConfigError as exc:
            print(f"qcall: warning: could not update {target}: {exc}", file=sys.stderr)
    verb = "Approved" if args.approve else "Rejected"
    print(f"{verb} {bundle.seal.statement.document_name!r}: workflow {report.workflow}")
    async with _notifier(args, home.workflows()) as notify:
        notify.clear(signer.name, wid)
        for notice in notices:
            notify.notify(notice, bundle, meta.get("document"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.org import OrgTrust
    from qcall.seal.notify import WorkflowStore
    from qcall.seal.verify import verify_bundle

    home = _home(args)
    store = WorkflowStore(home.workflows())
    wid = store.resolve(args.workflow)
    bundle, _ = store.load(wid)
    trust = OrgTrust.in_home(config.qcall_home(args.home))
    report = verify_bundle(bundle, trust, home.logs())
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    return 0 if report.ok else 1


# --- audit --------------------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(args))


async def _audit(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.exceptions import LogConsistencyError
    from qcall.identity import Identity
    from qcall.seal.audit import AuditStore, Monitor, own_key_id

    home = _home(args)
    identity = Identity.load(config.qcall_home(args.home))
    key, _, _ = home.default_log()
    store = AuditStore(home.directory / "audit.db")
    try:
        monitor = Monitor(
            store, key, own_keys={own_key_id(identity.public_key)}, signed=home.journal(key.log_id)
        )
        alarms = []
        for path in args.bundle:
            bundle = _load_bundle(path)
            for record in (bundle.seal, *bundle.decisions):
                if record.receipt and record.receipt.tree_head.log_id == key.log_id:
                    alarms += monitor.observe(record.receipt.tree_head, f"bundle {path}")
        async with _client(home) as client:
            result = await monitor.audit(client)
        result.alarms[:0] = alarms
    finally:
        store.close()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"log {result.log!r}: {result.tree_size} entries, {result.entries_checked} new "
              f"checked, {result.own_entries} signed with your key")  # fmt: skip
    if result.alarms:
        raise LogConsistencyError("\n".join(a.message for a in result.alarms))
    if not args.json:
        print("consistent: no fork, no rewritten history, every entry with your key is yours")
    return 0
