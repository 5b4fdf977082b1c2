"""``qcall init``: set up a qcall home — identity and a commented ``config.toml``.

::

    qcall init                                   # asks a few questions
    qcall init --name alice --signaling ws://server:8765 --simulated --yes
    qcall init --name alice --signaling wss://server:8443 --signaling-ca server-ca.pem \\
        --kme https://kme-a:8443 --cert alice.pem --key alice.key --ca kme-ca.pem --yes

It asks (or takes from flags): the user's name (creating the ML-DSA identity if
the home has none), the signaling server and, for ``wss://``, the CA of its
certificate, and where QKD keys come from: an ETSI GS QKD 014 KME (URL, client
certificate, key, CA), the simulated network of ``qcall network`` (its
``network.json``), or none (post-quantum only). With ``--yes``, or when standard
input is not a terminal, it asks nothing: flags and defaults only.

File names are written relative to the home when they are inside it, else
absolute; the config's relative names are read against its folder
(docs/configuration.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcall.cli.settings import DEFAULT_SIGNALING
from qcall.exceptions import ConfigError

__all__ = ["register", "render_config"]

_SOURCES = ("kme", "simulated", "none")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "init",
        help="set up qcall: your identity and a commented config.toml",
        description=(
            "Create your identity (if none) and write HOME/config.toml: the signaling server, "
            "and where QKD keys come from (a KME, the simulated network, or none). Asks for "
            "what the flags do not give, unless --yes or standard input is not a terminal."
        ),
    )
    parser.add_argument("--name", help="your name, as peers will know you")
    parser.add_argument("--signaling", metavar="URL", help=f"server ({DEFAULT_SIGNALING})")
    parser.add_argument("--signaling-ca", metavar="FILE", help="CA of a wss:// server")
    keys = parser.add_argument_group("QKD keys (one of)")
    keys.add_argument("--kme", metavar="URL", help="your site's ETSI GS QKD 014 KME")
    keys.add_argument("--cert", metavar="FILE", help="your SAE client certificate for the KME")
    keys.add_argument("--key", metavar="FILE", help="its private key")
    keys.add_argument("--ca", metavar="FILE", help="CA that signed the KME's certificate")
    keys.add_argument(
        "--network",
        metavar="FILE",
        help="network.json of `qcall network` (the simulated network; implies --simulated)",
    )
    keys.add_argument(
        "--simulated",
        action="store_true",
        help="use the simulated network (default network.json: HOME/network/hefei-metro)",
    )
    keys.add_argument("--no-qkd", action="store_true", help="no QKD: post-quantum (pqc) only")
    parser.add_argument("--sae", metavar="ID", help="your SAE ID at the KME (default: your name)")
    parser.add_argument("--yes", action="store_true", help="ask nothing: flags and defaults")
    parser.add_argument("--force", action="store_true", help="replace an existing config.toml")
    parser.set_defaults(func=run)


Ask = Callable[[str, str], str]


def _ask_terminal(question: str, default: str) -> str:
    shown = f" [{default}]" if default else ""
    print(f"{question}{shown}: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:  # end of input
        raise ConfigError("qcall init: input ended before the questions were answered")
    return answer.strip() or default


def _no_ask(_question: str, default: str) -> str:
    return default


def _path_text(name: str, home: Path) -> str:
    """A file name as the config stores it: relative to the home if inside it, else absolute."""
    path = Path(name).expanduser().absolute()
    try:
        return str(path.relative_to(home.absolute()))
    except ValueError:
        return str(path)


def _existing_file(name: str, what: str) -> str:
    if not name:
        raise ConfigError(f"{what}: no file given")
    if not Path(name).expanduser().is_file():
        raise ConfigError(f"{what} {name} does not exist")
    return name


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def gather(
    args: argparse.Namespace, home: Path, current_name: str | None, ask: Ask
) -> dict[str, Any]:
    """The answers, from flags first, then ``ask(question, default)``.

    Raises:
        ConfigError: an answer is invalid (names it, and the file for a file).
    """
    from qcall.identity import validate_name

    answers: dict[str, Any] = {}
    name = args.name or current_name or ask("Your name (as peers will know you)", "")
    if not name:
        raise ConfigError("qcall init: give your name (--name NAME)")
    answers["name"] = validate_name(name)
    signaling = args.signaling or ask("Signaling server URL", DEFAULT_SIGNALING)
    if not signaling.lower().startswith(("ws://", "wss://")):
        raise ConfigError(f"signaling server {signaling!r}: give a ws:// or wss:// URL")
    answers["signaling"] = signaling
    ca = args.signaling_ca
    if ca is None and signaling.lower().startswith("wss://"):
        ca = ask("CA certificate of the signaling server (empty: the system's CAs)", "")
    if ca:
        if not signaling.lower().startswith("wss://"):
            raise ConfigError("--signaling-ca is for a wss:// server")
        answers["signaling_ca"] = _path_text(_existing_file(ca, "signaling CA file"), home)
    if args.kme or args.cert or args.key or args.ca:
        source = "kme"
    elif args.network or args.simulated:
        source = "simulated"
    elif args.no_qkd:
        source = "none"
    else:
        source = ask(
            "QKD keys from: kme (an ETSI 014 key manager), simulated (`qcall network`), "
            "none (post-quantum only)",
            "simulated",
        ).lower()
        if source not in _SOURCES:
            raise ConfigError(f"QKD keys from {source!r}: answer one of {', '.join(_SOURCES)}")
    answers["source"] = source
    if source == "kme":
        url = args.kme or ask("KME URL", "")
        if not url.lower().startswith("https://"):
            raise ConfigError(f"KME URL {url!r}: an ETSI 014 KME is reached over https://")
        answers["kme"] = url
        for flag, question in (
            ("cert", "Your SAE client certificate (PEM)"),
            ("key", "Its private key (PEM)"),
            ("ca", "CA certificate of the KME (PEM)"),
        ):
            value = getattr(args, flag) or ask(question, "")
            answers[flag] = _path_text(_existing_file(value, f"--{flag} file"), home)
    elif source == "simulated":
        default = str(home / "network" / "hefei-metro" / "network.json")
        network = args.network or ask("network.json of `qcall network`", default)
        answers["network"] = _path_text(network, home)
    sae = args.sae or answers["name"]
    if sae != answers["name"]:
        answers["sae_id"] = sae
    return answers


def render_config(answers: dict[str, Any]) -> str:
    """The commented ``config.toml`` for ``answers`` (every setting explained)."""
    q = _toml_string
    lines = [
        f"# qcall configuration of {answers['name']}, written by `qcall init`.",
        "# Flags of `qcall call` / `qcall listen` override these settings.",
        "# Relative file names are read from this file's folder. docs/configuration.md",
        "",
        "# The signaling server: presence and call set-up (ws:// or wss:// with TLS).",
        f"signaling = {q(answers['signaling'])}",
    ]
    if "signaling_ca" in answers:
        lines += [
            "# The CA that signed the wss:// server's certificate (default: the system's CAs).",
            f"signaling_ca = {q(answers['signaling_ca'])}",
        ]
    if "sae_id" in answers:
        lines += [
            "# Your SAE ID at your KME (default: your name).",
            f"sae_id = {q(answers['sae_id'])}",
        ]
    source = answers["source"]
    lines += [
        "",
        "# hybrid: QKD + ML-KEM keys (needs a key source below); pqc: ML-KEM only.",
        f"policy = {q('pqc' if source == 'none' else 'hybrid')}",
        "# Accept an ML-KEM-only call when QKD keys are unavailable (shown on screen).",
        "allow_pqc_only = false",
        "# Seconds between in-call rekeys (a fresh ML-KEM exchange and QKD key each time).",
        "rekey_interval = 30",
    ]
    if source == "simulated":
        lines += [
            "",
            "# QKD keys from the simulated network that `qcall network` runs: its network.json",
            "# names each user's KME and certificates. Two users share keys when they use",
            "# the same network.",
            f"network = {q(answers['network'])}",
        ]
    elif source == "kme":
        lines += [
            "",
            "# QKD keys from an ETSI GS QKD 014 key manager (KME), over mutual TLS.",
            "[key_source]",
            'type = "etsi014"',
            f"url = {q(answers['kme'])}",
            f"cert = {q(answers['cert'])}   # your SAE client certificate",
            f"key = {q(answers['key'])}   # its private key (mode 0600)",
            f"ca = {q(answers['ca'])}   # the CA that signed the KME's certificate",
        ]
    else:
        lines += ["", "# No QKD key source: calls use ML-KEM (post-quantum) keys only."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qcall init``."""
    from qcall import config
    from qcall.cli.settings import load_config
    from qcall.identity import Identity

    home = config.qcall_home(args.home)
    file = home / "config.toml"
    if file.exists() and not args.force:
        raise ConfigError(f"{file} exists; give --force to replace it")
    current = Identity.load(home) if Identity.exists(home) else None
    interactive = not args.yes and sys.stdin.isatty()
    answers = gather(
        args, home, current.name if current else None, _ask_terminal if interactive else _no_ask
    )
    if current is not None and current.name != answers["name"]:
        raise ConfigError(
            f"the identity in {home} is {current.name!r}, not {answers['name']!r}: "
            "use another --home, or `qcall identity new --force` to replace it"
        )
    text = render_config(answers)
    config.atomic_write(file, text.encode(), mode=0o644)
    load_config(file, home)  # what we wrote reads back (a bug here must not go unnoticed)
    if current is None:
        identity = Identity.generate(answers["name"])
        identity.save(home)
        fingerprint = identity.to_public_dict()["fingerprint"]
        print(f"created identity {identity.name}: fingerprint {fingerprint}")
    print(f"wrote {file}")
    if answers["source"] == "simulated" and not Path(home / answers["network"]).exists():
        print(
            f"note: start the simulated network before calling: qcall network --topology "
            f"hefei-metro --state {Path(home / answers['network']).parent}"
        )
    return 0
