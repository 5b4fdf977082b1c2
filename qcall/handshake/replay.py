"""Replay protection for offers: a timestamp window plus a bounded nonce cache.

Pure: time is passed in. One :class:`ReplayCache` is shared by all the callee
sessions of a client (``docs/handshake.md`` §4.3).
"""

from __future__ import annotations

from collections import OrderedDict

from qcall.exceptions import ReplayError

__all__ = ["ReplayCache"]


class ReplayCache:
    """Remember offer nonces for as long as their timestamps are acceptable.

    An offer is fresh when ``|now - timestamp| <= window`` and its nonce is not
    cached. The cache holds at most ``max_entries`` nonces; when it is full the
    oldest is evicted and the *horizon* moves up to its timestamp: offers not
    newer than the horizon are refused from then on, so an evicted nonce can
    never be replayed.

    Args:
        window: accepted clock difference in seconds (default ±60 s).
        max_entries: bound on the memory used.
    """

    def __init__(self, window: float = 60.0, max_entries: int = 4096) -> None:
        if window <= 0 or max_entries < 1:
            raise ValueError("window and max_entries must be positive")
        self.window = window
        self.max_entries = max_entries
        self._nonces: OrderedDict[bytes, float] = OrderedDict()  # nonce → timestamp
        self._horizon = float("-inf")

    def check(self, nonce: bytes, timestamp: float, now: float) -> None:
        """Raise :class:`ReplayError` if the offer is stale or its nonce was seen.

        Does not remember the nonce: call :meth:`add` once the offer is authenticated.
        """
        if abs(now - timestamp) > self.window:
            raise ReplayError(
                f"offer timestamp is {now - timestamp:+.1f} s from now (window ±{self.window:g} s)"
            )
        if timestamp <= self._horizon:
            raise ReplayError("offer is older than the replay cache horizon")
        if nonce in self._nonces:
            raise ReplayError("offer nonce was already seen (replayed offer)")

    def add(self, nonce: bytes, timestamp: float, now: float) -> None:
        """Remember ``nonce``; expire entries that left the window; evict if full."""
        self._expire(now)
        while len(self._nonces) >= self.max_entries:
            _, ts = self._nonces.popitem(last=False)
            self._horizon = max(self._horizon, ts)
        self._nonces[nonce] = timestamp

    def _expire(self, now: float) -> None:
        # Entries are stored in arrival order; timestamps are roughly ordered,
        # so scan from the oldest until one is still inside the window.
        while self._nonces:
            nonce, ts = next(iter(self._nonces.items()))
            if ts >= now - self.window:
                break
            del self._nonces[nonce]

    def __len__(self) -> int:
        return len(self._nonces)
