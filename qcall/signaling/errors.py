"""Signaling wire error codes and the client exceptions they map to.

Kept apart from :mod:`qcall.signaling.messages` (which re-exports both names).
"""

from __future__ import annotations

from qcall.exceptions import (
    PeerUnavailableError,
    SignalingAuthError,
    SignalingError,
    SignalingLimitError,
    SignalingProtocolError,
    SignalingRateLimitError,
)

__all__ = ["ERROR_CODES", "error_for"]

#: Wire error codes: code -> (exception class raised by the client, meaning).
ERROR_CODES: dict[str, tuple[type[SignalingError], str]] = {
    "bad_message": (SignalingProtocolError, "malformed JSON, unknown type, bad or missing field"),
    "too_big": (SignalingProtocolError, "message larger than the server's maximum size"),
    "bad_state": (SignalingProtocolError, "message not valid in the current call/session state"),
    "unknown_call": (SignalingProtocolError, "no such call, or you are not a party to it"),
    "auth_required": (SignalingAuthError, "register first"),
    "auth_failed": (SignalingAuthError, "registration signature, nonce or key invalid"),
    "auth_timeout": (SignalingAuthError, "no valid registration in time; connection closed"),
    "name_taken": (SignalingAuthError, "this name is pinned to another public key"),
    "replaced": (SignalingAuthError, "the same identity registered on another connection"),
    "rate_limited": (SignalingRateLimitError, "too many messages; this one was dropped"),
    "unavailable": (PeerUnavailableError, "the peer is offline"),
    "server_full": (SignalingLimitError, "the server holds too many connections or identities"),
    "too_many_connections": (
        SignalingLimitError,
        "too many connections waiting to register (from this address); the oldest was closed",
    ),
    "too_many_names": (SignalingLimitError, "this identity key has as many names as allowed"),
    "too_many_identities": (
        SignalingLimitError,
        "too many new names registered from this address lately; try again later",
    ),
    "too_many_watched": (SignalingLimitError, "the watch list is longer than the server allows"),
    "too_many_invites": (PeerUnavailableError, "the callee has too many unanswered invitations"),
    "cluster_unavailable": (SignalingError, "the service's shared state is unreachable"),
    "server_error": (SignalingError, "internal server error"),
}


def error_for(code: str, text: str) -> SignalingError:
    """Return the exception matching a wire error ``code`` (its ``code`` set to it)."""
    cls = ERROR_CODES.get(code, (SignalingError, ""))[0]
    exc = cls(f"signaling server: {text} ({code})")
    exc.code = code
    return exc
