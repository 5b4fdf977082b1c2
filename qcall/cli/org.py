"""``qcall org``: organisation authorities and certified identities.

::

    # the organisation's administrator
    qcall org init --name "Hefei Municipal" [--dir DIR] [--days N]
    qcall org issue NAME --key IDENTITY.json [--department D] [--role R] [--days N] [--out F]
    qcall org revoke SERIAL --reason REASON [--invalid-since ISO-TIME]
    qcall org crl [--out FILE]            sign a fresh CRL
    qcall org list [--json]               issued certificates and revocations

    # every member
    qcall org trust CA.pem [--crl CRL.pem]      trust an organisation (no TOFU for its members)
    qcall org crl-update CRL.pem                 newer revocations
    qcall org install CERT.pem                   your own certificate (for seals)
    qcall org import CERT.pem ...                colleagues' certificates (calls, messages)
    qcall org show [--json]                      what you trust, your certificate

See :mod:`qcall.org` and ``docs/seal.md`` §3.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``org`` and its subcommands."""
    parser = subparsers.add_parser(
        "org",
        help="organisation authorities: certify, revoke and trust ML-DSA identities",
        description="X.509 certificates signed with ML-DSA for an organisation's members.",
    )
    sub = parser.add_subparsers(dest="org_command", metavar="SUBCOMMAND", required=True)

    def directory(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir", metavar="DIR", help="authority directory (default HOME/org/authority)"
        )

    init = sub.add_parser("init", help="create an organisation authority (ML-DSA-87)")
    init.add_argument("--name", required=True, help='the organisation, e.g. "Hefei Municipal"')
    init.add_argument("--days", type=int, default=20 * 365, help="validity (20 years)")
    directory(init)
    init.set_defaults(func=cmd_init)

    issue = sub.add_parser("issue", help="certify a member's ML-DSA identity key")
    issue.add_argument("name", help="the member's name (as in their identity)")
    issue.add_argument(
        "--key", required=True, metavar="FILE", help="their 'qcall identity show --json'"
    )
    issue.add_argument("--department", default="", help="organisational unit (OU)")
    issue.add_argument("--role", default="", help="role or title")
    issue.add_argument("--days", type=int, default=365, help="validity in days (365)")
    issue.add_argument("--out", metavar="FILE", help="also write the certificate chain here")
    directory(issue)
    issue.set_defaults(func=cmd_issue)

    revoke = sub.add_parser("revoke", help="revoke a certificate and sign a new CRL")
    revoke.add_argument("serial", help="the certificate serial (hex, as 'org list' shows)")
    revoke.add_argument(
        "--reason",
        required=True,
        choices=["unspecified", "key-compromise", "affiliation-changed", "superseded",
                 "cessation-of-operation", "privilege-withdrawn"],
    )  # fmt: skip
    revoke.add_argument(
        "--invalid-since",
        metavar="TIME",
        help="ISO time from which seals by it are refused (e.g. when a key leaked)",
    )
    directory(revoke)
    revoke.set_defaults(func=cmd_revoke)

    crl = sub.add_parser("crl", help="sign a fresh CRL (crl.pem in the authority directory)")
    crl.add_argument("--out", metavar="FILE", help="also write it here")
    directory(crl)
    crl.set_defaults(func=cmd_crl)

    lst = sub.add_parser("list", help="list issued certificates")
    lst.add_argument("--json", action="store_true")
    directory(lst)
    lst.set_defaults(func=cmd_list, needs_crypto=False)

    trust = sub.add_parser("trust", help="trust an organisation's authority certificate")
    trust.add_argument("certificate", metavar="CA.pem")
    trust.add_argument("--crl", metavar="CRL.pem", help="its current CRL")
    trust.set_defaults(func=cmd_trust)

    update = sub.add_parser("crl-update", help="store a newer CRL of a trusted authority")
    update.add_argument("crl", metavar="CRL.pem")
    update.set_defaults(func=cmd_crl_update)

    install = sub.add_parser("install", help="install your own certificate")
    install.add_argument("certificate", metavar="CERT.pem")
    install.set_defaults(func=cmd_install)

    imp = sub.add_parser("import", help="import colleagues' certificates")
    imp.add_argument("certificates", nargs="+", metavar="CERT.pem")
    imp.set_defaults(func=cmd_import)

    show = sub.add_parser("show", help="trusted authorities and your certificate")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)


def _authority_dir(args: argparse.Namespace) -> Path:
    from qcall import config
    from qcall.org import Authority

    return Path(args.dir) if args.dir else Authority.default_directory(config.qcall_home(args.home))


def _read(path: str) -> bytes:
    from qcall.exceptions import ConfigError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _trust(args: argparse.Namespace) -> Any:
    from qcall import config
    from qcall.org import OrgTrust

    return OrgTrust.in_home(config.qcall_home(args.home))


def cmd_init(args: argparse.Namespace) -> int:
    from qcall.org import Authority

    authority = Authority.create(_authority_dir(args), args.name, days=args.days)
    trust = _trust(args)
    trust.trust(_read(str(authority.directory / Authority.CERT_FILE)))
    trust.update_crl(_read(str(authority.directory / Authority.CRL_FILE)))
    print(f"Organisation:  {authority.name}")
    print(f"Certificate:   {authority.directory / Authority.CERT_FILE}  (give it to members)")
    print(f"CRL:           {authority.directory / Authority.CRL_FILE}")
    print(f"SHA-256:       {authority.fingerprint.hex()}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.exceptions import ConfigError
    from qcall.identity import identity_from_json
    from qcall.org import Authority

    authority = Authority.load(_authority_dir(args))
    name, _, public_key = identity_from_json(_read(args.key))
    if name != args.name:
        raise ConfigError(f"{args.key} is the identity of {name!r}, not {args.name!r}")
    member = authority.issue(
        args.name, public_key, department=args.department, role=args.role, days=args.days
    )
    chain_path = authority.issued_path(member.serial)
    if args.out:
        config.atomic_write(Path(args.out), chain_path.read_bytes(), mode=0o644)
    print(f"Issued {member.describe()}")
    print(f"  serial      {member.serial_hex}")
    print(f"  valid       {member.not_before:%Y-%m-%d} to {member.not_after:%Y-%m-%d}")
    print(f"  certificate {args.out or chain_path}  (the member runs: qcall org install FILE)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from qcall.exceptions import ConfigError
    from qcall.org import Authority, parse_serial

    authority = Authority.load(_authority_dir(args))
    since = None
    if args.invalid_since:
        try:
            since = datetime.datetime.fromisoformat(args.invalid_since)
        except ValueError:
            raise ConfigError(
                f"--invalid-since {args.invalid_since!r} is not an ISO time"
            ) from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=datetime.UTC)
    authority.revoke(parse_serial(args.serial), args.reason, invalid_since=since)
    crl = authority.directory / Authority.CRL_FILE
    print(f"Revoked {args.serial.upper()} ({args.reason}); new CRL: {crl}")
    print("Distribute it: members run 'qcall org crl-update crl.pem', the seal log "
          "'qcall seal-log crl-update DIR crl.pem'.")  # fmt: skip
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from qcall import config, pqc
    from qcall.org import Authority

    authority = Authority.load(_authority_dir(args))
    crl = authority.write_crl()
    if args.out:
        config.atomic_write(Path(args.out), pqc.x509_pem(crl), mode=0o644)
    print(f"CRL written to {args.out or authority.directory / Authority.CRL_FILE}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qcall.org import Authority

    issued = Authority.load(_authority_dir(args)).issued()
    if args.json:
        print(json.dumps(issued, indent=2))
        return 0
    for serial, entry in sorted(issued.items(), key=lambda kv: kv[1]["not_before"]):
        revoked = entry.get("revoked")
        state = f"REVOKED {revoked['at'][:19]} ({revoked['reason']})" if revoked else "valid"
        print(f"{serial:>16}  {entry['name']:<20} until {entry['not_after'][:10]}  {state}")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    trust = _trust(args)
    cert = trust.trust(_read(args.certificate))
    if args.crl:
        trust.update_crl(_read(args.crl))
    print(f"Trusting {cert.subject.rfc4514_string()}: its members are verified without TOFU.")
    return 0


def cmd_crl_update(args: argparse.Namespace) -> int:
    crl = _trust(args).update_crl(_read(args.crl))
    print(f"Stored the CRL of {crl.issuer.rfc4514_string()} ({len(list(crl))} revoked).")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from qcall import config
    from qcall.identity import Identity

    identity = Identity.load(config.qcall_home(args.home))
    member = _trust(args).install(_read(args.certificate), identity.public_key)
    print(f"Installed: you are {member.describe()}, serial {member.serial_hex}.")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    trust = _trust(args)
    for path in args.certificates:
        member = trust.import_member(_read(path), path)
        print(f"Imported {member.describe()} (serial {member.serial_hex})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from qcall.org import certificate_fingerprint

    trust = _trust(args)
    out: dict[str, Any] = {"authorities": [], "certificate": None}
    for ca in trust.authorities():
        crl = trust.crl_for(ca)
        out["authorities"].append(
            {
                "name": ca.subject.rfc4514_string(),
                "sha256": certificate_fingerprint(ca).hex(),
                "crl_updated": crl.last_update_utc.isoformat() if crl else None,
            }
        )
    own = trust.own_certificate()
    if own is not None:
        member = trust.validate(own, datetime.datetime.now(datetime.UTC))
        out["certificate"] = member.to_json()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for a in out["authorities"]:
        print(f"trusted: {a['name']}  CRL of {a['crl_updated'] or 'NONE'}")
    if out["certificate"]:
        c = out["certificate"]
        print(f"you:     {c['name']} of {c['organisation']}, serial {c['serial']}, "
              f"until {c['not_after'][:10]}")  # fmt: skip
    return 0
