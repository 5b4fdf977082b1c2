"""The quantum layer: QKD key sources, ETSI GS QKD 014 client and KME, simulated links.

Public API (imported lazily, so ``import qcall.qkd.sim`` stays cheap):

* :class:`KeySource`, :func:`open_key_source`, :func:`register_key_source`,
  :class:`ETSI014Client` — :mod:`qcall.qkd.client`
* :class:`KeyFileSource`, :class:`KeyFile` — :mod:`qcall.qkd.keyfile`
* :class:`QKDKey`, :class:`KeyStatus`, :class:`KeyRequest` — :mod:`qcall.qkd.etsi014`
* :class:`KME`, :class:`PoolRole`, :func:`random_keys` — :mod:`qcall.qkd.kme`
* :class:`KMEServer` — :mod:`qcall.qkd.server`
* :func:`create_pki`, :func:`server_ssl_context`, :func:`client_ssl_context` —
  :mod:`qcall.qkd.pki`
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "KME",
    "ETSI014Client",
    "KMEServer",
    "KeyFile",
    "KeyFileSource",
    "KeyRequest",
    "KeySource",
    "KeyStatus",
    "PoolRole",
    "QKDKey",
    "client_ssl_context",
    "create_pki",
    "open_key_source",
    "random_keys",
    "register_key_source",
    "server_ssl_context",
]

_WHERE = {
    "KME": "kme",
    "PoolRole": "kme",
    "random_keys": "kme",
    "ETSI014Client": "client",
    "KeySource": "client",
    "open_key_source": "client",
    "register_key_source": "client",
    "KMEServer": "server",
    "KeyFile": "keyfile",
    "KeyFileSource": "keyfile",
    "KeyRequest": "etsi014",
    "KeyStatus": "etsi014",
    "QKDKey": "etsi014",
    "client_ssl_context": "pki",
    "create_pki": "pki",
    "server_ssl_context": "pki",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qcall.qkd' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qcall.qkd.{module}"), name)
