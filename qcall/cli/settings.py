"""Settings of ``qcall call``, ``listen``, ``phone`` and the messaging verbs.

Settings come from flags, else from a TOML config file (``--config``, default
``HOME/config.toml``), else from defaults; see docs/calls.md. Example::


    signaling = "wss://signal.example:8443"
    signaling_ca = "signal-ca.pem"  # CA of a wss:// server (default: the system's)
    sae_id = "alice"              # this user's SAE ID at its KME (default: user name)
    policy = "hybrid"             # or "pqc"
    allow_pqc_only = false
    rekey_interval = 30
    ice_policy = "all"            # or "relay": media only through a TURN server

    [key_source]                  # any qcall key source (docs/key-sources.md)
    type = "etsi014"
    url = "https://kme.example:8443"
    cert = "alice.pem"
    key = "alice.key"
    ca = "ca.pem"

Relative paths in the file (``network``, ``signaling_ca``, the key source's
``cert``/``key``/``ca``/``path``) are taken from the config file's folder;
``qcall init`` writes a commented one (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from qcall.exceptions import ConfigError

__all__ = [
    "DEFAULT_SIGNALING",
    "ice_servers_config",
    "key_source_config",
    "load_config",
    "pick",
    "resolve_paths",
    "signaling_tls",
]

DEFAULT_SIGNALING = "ws://127.0.0.1:8765"
_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "signaling": str,
    "signaling_ca": str,
    "sae_id": str,
    "policy": str,
    "allow_pqc_only": bool,
    "rekey_interval": (int, float),
    "fresh_kem": bool,
    "qkd_prefetch": int,  # QKD keys held per peer for our calls (docs/qkd-keys.md); 0: off
    "qkd_prefetch_max_age": (int, float),  # seconds a held key may wait before it is wiped
    "srtp_profile": str,
    "key_source": dict,
    "network": str,
    "ice_servers": list,
    "ice_policy": str,  # "all" or "relay" (--ice-policy)
    "messaging": dict,  # qcall send/inbox/chat (qcall/cli/messaging.py)
}
#: URL schemes of RTCIceServer ``urls`` (RFC 7064 STUN, RFC 7065 TURN).
_ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def load_config(path: str | Path | None, home: Path) -> dict[str, Any]:
    """Read the TOML config; unknown keys and wrong types are errors naming the key."""
    explicit = path is not None
    file = Path(path) if path else home / "config.toml"
    if not file.exists():
        if explicit:
            raise ConfigError(f"config file {file} does not exist")
        return {}
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    except ValueError as exc:  # TOMLDecodeError, or an integer beyond Python's digit limit
        raise ConfigError(f"{file} is not valid TOML: {exc}") from exc
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise ConfigError(f"{file} is not valid TOML: nested too deeply") from None
    for key, value in data.items():
        expected = _CONFIG_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{file}: unknown setting {key!r} (known: {sorted(_CONFIG_KEYS)})")
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(f"{file}: setting {key!r} has the wrong type")
    return resolve_paths(data, file.parent)


#: Settings holding a file name, and the key source's options that do.
_PATH_KEYS = ("network", "signaling_ca")
_SOURCE_PATH_KEYS = ("cert", "key", "ca", "path")


def resolve_paths(conf: dict[str, Any], base: Path) -> dict[str, Any]:
    """Return ``conf`` with its relative file names taken from ``base`` (the config's folder).

    ``~`` is expanded; absolute names are kept; a ``keyfile:PATH`` URL is resolved too.
    """

    def fix(name: Any) -> Any:
        if not isinstance(name, str) or not name:
            return name
        try:
            path = Path(name).expanduser()
        except RuntimeError:  # ~user of no such user: left as it is, fails when opened
            path = Path(name)
        return str(path if path.is_absolute() else base / path)

    out = dict(conf)
    for key in _PATH_KEYS:
        if key in out:
            out[key] = fix(out[key])
    source = out.get("key_source")
    if isinstance(source, dict):
        source = dict(source)
        for key in _SOURCE_PATH_KEYS:
            if key in source:
                source[key] = fix(source[key])
        url = source.get("url")
        if isinstance(url, str) and url.startswith("keyfile:") and not url.startswith("keyfile://"):
            source["url"] = "keyfile:" + fix(url[len("keyfile:") :])
        out["key_source"] = source
    return out


def signaling_tls(url: str, ca: str | None) -> Any:
    """The TLS context for a ``wss://`` signaling URL (``None`` for ``ws://``).

    Args:
        url: the signaling server URL.
        ca: a PEM file with the CA that signed the server's certificate;
            ``None``: the system's trust store.

    Raises:
        ConfigError: ``ca`` given for a ``ws://`` URL, or unreadable / not a certificate.
    """
    import ssl

    if not url.lower().startswith("wss://"):
        if ca:
            raise ConfigError(
                f"--signaling-ca / signaling_ca is for a wss:// server, but the URL is {url}"
            )
        return None
    if ca and not Path(ca).is_file():
        raise ConfigError(f"signaling CA file {ca} does not exist")
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"signaling CA file {ca}: not a PEM certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def pick(args: argparse.Namespace, conf: dict[str, Any], flag: str, key: str, default: Any) -> Any:
    value = getattr(args, flag, None)
    if value is not None:
        return value
    return conf.get(key, default)


def key_source_config(args: argparse.Namespace, conf: dict[str, Any], sae: str) -> Any:
    """The key source the flags or config name, or ``None``."""
    if args.kme:
        return {"type": "etsi014", "url": args.kme, "cert": args.cert, "key": args.key,
                "ca": args.ca}
    if args.key_source:
        return args.key_source
    network = args.network or conf.get("network")
    if network:
        try:
            data = json.loads(Path(network).read_text(encoding="utf-8"))
            creds = data["saes"][sae]
            return {"type": "etsi014", "url": creds["url"], "cert": creds["cert"],
                    "key": creds["key"], "ca": creds["ca"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{network}: no usable entry for SAE {sae!r} ({exc})") from exc
    return conf.get("key_source")


def ice_servers_config(args: argparse.Namespace, conf: dict[str, Any]) -> list[dict[str, str]]:
    """STUN/TURN servers from ``--ice-server`` URLs, else the config's ``[[ice_servers]]``.

    Each entry is a W3C ``RTCIceServer`` dictionary: ``urls`` (a ``stun:``,
    ``stuns:``, ``turn:`` or ``turns:`` URL), optional ``username`` and ``credential``.

    Raises:
        ConfigError: a bad entry (names it and the field).
    """
    flags = getattr(args, "ice_server", None)
    entries: list[Any] = [{"urls": url} for url in flags] if flags else conf.get("ice_servers", [])
    servers: list[dict[str, str]] = []
    for index, entry in enumerate(entries):
        where = f"ice_servers[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table with urls, username, credential")
        for name, value in entry.items():
            if name not in ("urls", "username", "credential") or not isinstance(value, str):
                raise ConfigError(f"{where}.{name}: unknown field or not a string")
        urls = entry.get("urls", "")
        if not urls.startswith(_ICE_SCHEMES):
            raise ConfigError(f"{where}.urls: {urls!r} is not a stun:/stuns:/turn:/turns: URL")
        if urls.startswith("turn") and not ("username" in entry and "credential" in entry):
            raise ConfigError(f"{where}: a TURN server needs username and credential")
        servers.append(dict(entry))
    return servers
