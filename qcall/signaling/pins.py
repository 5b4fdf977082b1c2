"""Pinned names of a signaling server, without any I/O (Sans-I/O).

The first identity that registers a name is pinned to it (docs/signaling.md,
"Registration"). :class:`PinRegistry` holds those pins and enforces the
limits of docs/signaling.md, "Limits":

* at most ``max_identities`` names pinned at once (``server_full``);
* at most ``max_names_per_key`` names pinned to one identity key
  (``too_many_names``), so one key cannot take the whole name space;
* at most ``max_new_names_per_address`` new names per client address in each
  fixed window of ``new_names_window`` seconds (``too_many_identities``), so
  fresh keys (an ML-DSA-65 key pair costs about 80 µs) do not get round the
  per-key limit;
* a pin whose name has not been registered for ``pin_ttl`` seconds expires:
  the name is free again and its old key no longer counts.

A pin stores the identity fingerprint (SHA-256 of the public key,
:func:`qcall.identity.fingerprint`), not the 1952-byte key: comparing
fingerprints is comparing keys (SHA-256 collision resistance), for 1/20 of
the memory. Pins live in memory only and go with the process; time is the
``now`` argument (the protocol's monotonic clock), so expiry never depends on
the wall clock.

The protocol calls :meth:`~PinRegistry.refusal` then :meth:`~PinRegistry.pin`
for a new name, :meth:`~PinRegistry.in_use` when a name registers,
:meth:`~PinRegistry.idle` when it goes offline, and :meth:`~PinRegistry.expire`
when :meth:`~PinRegistry.next_expiry` is reached.
"""

from __future__ import annotations

from qcall.typing import PeerId

__all__ = ["PinRegistry"]


class PinRegistry:
    """Name → identity fingerprint, with per-key and per-address limits and expiry.

    Args:
        max_identities: names pinned at once.
        max_names_per_key: names pinned to one fingerprint.
        max_new_names_per_address: new names per address per window.
        new_names_window: length of that window in seconds.
        pin_ttl: seconds after which the pin of a name that stayed offline expires.
    """

    def __init__(
        self,
        max_identities: int,
        max_names_per_key: int,
        max_new_names_per_address: int,
        new_names_window: float,
        pin_ttl: float,
    ) -> None:
        self.max_identities = max_identities
        self.max_names_per_key = max_names_per_key
        self.max_new_names_per_address = max_new_names_per_address
        self.new_names_window = new_names_window
        self.pin_ttl = pin_ttl
        self._pins: dict[PeerId, str] = {}
        self._names_per_key: dict[str, int] = {}
        # Offline names by the time they went offline; insertion order is time
        # order (``now`` never goes back), so the first entry expires first.
        self._idle: dict[PeerId, float] = {}
        self._window_end = float("-inf")
        self._new_per_address: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pins)

    def fingerprint(self, name: PeerId) -> str | None:
        """Return the fingerprint pinned to ``name``, or ``None``."""
        return self._pins.get(name)

    def refusal(self, fp: str, address: str | None, now: float) -> str | None:
        """Return the error code refusing a new pin for key ``fp``, or ``None``.

        ``address`` ``None`` (a shell that knows no address) skips the
        per-address limit.
        """
        if len(self._pins) >= self.max_identities:
            return "server_full"
        if self._names_per_key.get(fp, 0) >= self.max_names_per_key:
            return "too_many_names"
        if address is not None:
            self._roll_window(now)
            if self._new_per_address.get(address, 0) >= self.max_new_names_per_address:
                return "too_many_identities"
        return None

    def pin(self, name: PeerId, fp: str, address: str | None, now: float) -> None:
        """Pin a new ``name`` to ``fp`` (after :meth:`refusal` returned ``None``)."""
        self._pins[name] = fp
        self._names_per_key[fp] = self._names_per_key.get(fp, 0) + 1
        if address is not None:
            self._roll_window(now)
            self._new_per_address[address] = self._new_per_address.get(address, 0) + 1

    def move(self, name: PeerId, fp: str) -> None:
        """Re-pin ``name`` (pinned) to the key ``fp``: its old key signed the move."""
        old = self._pins[name]
        left = self._names_per_key.get(old, 1) - 1
        if left:
            self._names_per_key[old] = left
        else:
            self._names_per_key.pop(old, None)
        self._pins[name] = fp
        self._names_per_key[fp] = self._names_per_key.get(fp, 0) + 1

    def in_use(self, name: PeerId) -> None:
        """``name`` registered: its pin does not expire while it is online."""
        self._idle.pop(name, None)

    def idle(self, name: PeerId, now: float) -> None:
        """``name`` went offline at ``now``: its pin expires at ``now + pin_ttl``."""
        self._idle.pop(name, None)  # re-inserted last: the order stays the time order
        self._idle[name] = now

    def next_expiry(self) -> float | None:
        """Return when the next pin expires, or ``None`` if every name is online."""
        for since in self._idle.values():
            return since + self.pin_ttl
        return None

    def expire(self, now: float) -> list[PeerId]:
        """Release every pin unused for ``pin_ttl`` seconds; return their names."""
        gone: list[PeerId] = []
        while self._idle:
            name, since = next(iter(self._idle.items()))
            if since + self.pin_ttl > now:
                break
            del self._idle[name]
            fp = self._pins.pop(name)
            left = self._names_per_key[fp] - 1
            if left:
                self._names_per_key[fp] = left
            else:
                del self._names_per_key[fp]
            gone.append(name)
        return gone

    def _roll_window(self, now: float) -> None:
        """Start a new fixed window (and forget the counts) once the old one is over."""
        if now >= self._window_end:
            self._window_end = now + self.new_names_window
            self._new_per_address.clear()
