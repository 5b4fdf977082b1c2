"""Short-lived TURN credentials: coturn's shared-secret REST scheme (``use-auth-secret``).

The signaling server and the TURN server share a secret. For each registered
user the signaling server makes (draft-uberti-behave-turn-rest-00, section 2.2,
as coturn implements it)::

    username   = "<expiry Unix seconds>:<name>"
    credential = base64(HMAC-SHA1(secret, username))

and sends them in ``registered.turn``. The TURN server recomputes the HMAC and
refuses a username whose expiry has passed, so a credential leaked from a
client is worth ``ttl`` seconds at most and the signaling server needs no
per-user state on the TURN server. (HMAC-SHA1 is what coturn checks; it keys a
MAC here, where SHA-1's collision weakness does not apply.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Sequence

from qcall.signaling.messages import TurnCredentials

__all__ = ["rest_credentials", "turn_issuer"]

#: Default lifetime of credentials, seconds (a call set up within it keeps its allocation).
DEFAULT_TTL = 3600


def rest_credentials(
    secret: bytes, name: str, urls: Sequence[str], now: float, ttl: int = DEFAULT_TTL
) -> TurnCredentials:
    """Credentials for ``name`` valid until ``now + ttl`` (Unix seconds)."""
    expires = int(now) + ttl
    username = f"{expires}:{name}"
    mac = hmac.new(secret, username.encode(), hashlib.sha1).digest()
    return TurnCredentials(tuple(urls), username, base64.b64encode(mac).decode(), expires)


def turn_issuer(
    secret: bytes, urls: Sequence[str], ttl: int = DEFAULT_TTL
) -> Callable[[str, float], TurnCredentials]:
    """``issue(name, now)`` for :class:`~qcall.signaling.protocol.SignalingProtocol`."""
    if not secret:
        raise ValueError("the TURN secret is empty")
    frozen = tuple(urls)

    def issue(name: str, now: float) -> TurnCredentials:
        return rest_credentials(secret, name, frozen, now, ttl)

    return issue
