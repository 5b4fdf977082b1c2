"""Trusted-node key relay: one-time-pad hop by hop over a QKD topology (pure).

Point-to-point QKD links give each pair of *adjacent* nodes a shared secret
(the link key). Two distant nodes get a common key ``K`` by relaying it
through trusted nodes (the model of the Beijing–Shanghai backbone and of
ETSI GS QKD 002 / ITU-T Y.3800 key relay): the source node draws ``K``;
for each hop ``u → v`` on the route, ``u`` sends ``K ⊕ k_uv`` and ``v``
recovers ``K`` with its own copy of the link key ``k_uv``. Each hop spends
``|K|`` bits of its link key, and every trusted node on the route sees ``K``
in clear: that is the trust assumption (see ``docs/relay.md``).

This module is Sans-I/O. It holds, per link, the key buffer at *each* end
(:class:`LinkKeyBuffer`): a link's two ends each derive their own copy of
every block (BB84 post-processing runs as a protocol between them), so the
relay reads pads from the sender's copy and the receiver's copy separately;
a disagreement is detected at that hop, not at the destination. The shell
(:mod:`qcall.qkd.network`) deposits link keys, reports alarms, and hands
relayed keys to the end KMEs.

Routing (:meth:`TrustedNodeRelay.route`): Dijkstra over usable links (up:
neither alarmed nor cut, at least ``|K|`` bits at both ends) with per-hop cost
``1 + LOW_KEY_WEIGHT · |K| / available_bits + HEALTH_WEIGHT · QBER / 11 %``:
hop count first, steering away from links whose buffers run low and from
links whose QBER creeps towards the alarm threshold. Each key is routed on
its own, so a pair's keys spread over several paths as pools drain. When no usable route exists,
:class:`~qcall.exceptions.RelayError` names the hop that failed on the
topology's default (fewest-hop) route.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qcall.exceptions import KeyExhaustedError, RelayError
from qcall.qkd.topology import Link, Topology

__all__ = [
    "HEALTH_WEIGHT",
    "LOW_KEY_WEIGHT",
    "Hop",
    "LinkKeyBuffer",
    "LinkState",
    "RelayedKey",
    "TrustedNodeRelay",
    "xor_bytes",
]

#: Weight of the "low key" term of a hop's routing cost (see module docstring).
LOW_KEY_WEIGHT = 8.0

#: Weight of the "link health" term: a link at the 11 % alarm threshold costs this
#: many extra hops.
HEALTH_WEIGHT = 2.0


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """Return ``a ⊕ b`` (equal lengths): the one-time pad."""
    if len(a) != len(b):
        raise ValueError(f"one-time pad needs equal lengths, not {len(a)} and {len(b)}")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


class LinkState(enum.IntEnum):
    """State of a QKD link as the relay sees it."""

    #: Delivering key; usable for relaying.
    LINK_UP = 0
    #: QBER above threshold: an eavesdropper is suspected; not used for relaying.
    LINK_ALARM = 1
    #: The fibre is cut (or the link taken out of service): not used for relaying.
    LINK_DOWN = 2


@dataclass(eq=False)
class LinkKeyBuffer:
    """Link key held at both ends of one QKD link.

    ``a`` and ``b`` are the link's ends (:class:`~qcall.qkd.topology.Link`).
    Each end has its own buffer; bits are consumed exactly once, from the
    front of both buffers at the same time. Key bytes never appear in the
    repr.

    Attributes:
        deposited_bits: total bits deposited (per end).
        consumed_bits: total bits spent on relaying (per end).
        relayed_keys: number of relayed keys that used this link.
        capacity_bits: maximum bits held per end; extra deposits are dropped.
    """

    link: str
    a: str
    b: str
    capacity_bits: int | None = None
    deposited_bits: int = 0
    consumed_bits: int = 0
    dropped_bits: int = 0
    relayed_keys: int = 0
    state: LinkState = LinkState.LINK_UP
    qber: float | None = None
    _at_a: bytearray = field(default_factory=bytearray, repr=False)
    _at_b: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def available_bits(self) -> int:
        """Bits that both ends still hold."""
        return 8 * min(len(self._at_a), len(self._at_b))

    @property
    def alarmed(self) -> bool:
        """Whether the link is in alarm (not usable)."""
        return self.state is LinkState.LINK_ALARM

    @property
    def cut(self) -> bool:
        """Whether the link is cut (not usable)."""
        return self.state is LinkState.LINK_DOWN

    @property
    def up(self) -> bool:
        """Whether the link may carry relayed key."""
        return self.state is LinkState.LINK_UP

    @property
    def space_bits(self) -> int | None:
        """Bits that can still be deposited before the buffer is full (None: unbounded)."""
        if self.capacity_bits is None:
            return None
        return max(0, self.capacity_bits - self.available_bits)

    def deposit(self, key_at_a: bytes, key_at_b: bytes) -> int:
        """Append one block of link key, as derived by each end.

        Args:
            key_at_a: the block as end ``a`` derived it.
            key_at_b: the block as end ``b`` derived it (same length).

        Returns:
            The number of bits stored (less than offered when the buffer fills).

        Raises:
            RelayError: the two ends offered different lengths.
        """
        if len(key_at_a) != len(key_at_b):
            raise RelayError(
                f"link {self.link!r}: ends deposited {len(key_at_a)} and {len(key_at_b)} bytes",
                hop=self.link,
            )
        size = len(key_at_a)
        if self.capacity_bits is not None:
            room = max(0, self.capacity_bits // 8 - min(len(self._at_a), len(self._at_b)))
            size = min(size, room)
        self._at_a += key_at_a[:size]
        self._at_b += key_at_b[:size]
        self.deposited_bits += 8 * size
        self.dropped_bits += 8 * (len(key_at_a) - size)
        return 8 * size

    def take(self, size: int) -> tuple[bytes, bytes]:
        """Consume ``size`` bytes from both ends; return (copy at a, copy at b).

        Raises:
            KeyExhaustedError: fewer than ``size`` bytes are left.
        """
        if size < 0:
            raise ValueError("size must be >= 0")
        if 8 * size > self.available_bits:
            raise KeyExhaustedError(
                f"link {self.link!r}: {self.available_bits} bits left, {8 * size} needed"
            )
        pad_a = bytes(self._at_a[:size])
        pad_b = bytes(self._at_b[:size])
        # Erase what was used: the pad is used once, then gone from both ends.
        del self._at_a[:size]
        del self._at_b[:size]
        self.consumed_bits += 8 * size
        return pad_a, pad_b

    def pad_at(self, node: str, pads: tuple[bytes, bytes]) -> bytes:
        """Pick, from a :meth:`take` result, the copy held by ``node``."""
        if node == self.a:
            return pads[0]
        if node == self.b:
            return pads[1]
        raise ValueError(f"node {node!r} is not an end of link {self.link!r}")

    def set_alarm(self, qber: float | None) -> None:
        """Mark the link alarmed (QBER over threshold): no relaying over it."""
        self.state = LinkState.LINK_ALARM
        self.qber = qber

    def clear_alarm(self, qber: float | None = None) -> None:
        """Mark the link up again (a later block passed parameter estimation)."""
        if self.state is LinkState.LINK_ALARM:
            self.state = LinkState.LINK_UP
        self.qber = qber

    def set_cut(self, cut: bool) -> None:
        """Mark the fibre cut (``True``) or repaired (``False``: the link is up again)."""
        self.state = LinkState.LINK_DOWN if cut else LinkState.LINK_UP


@dataclass(frozen=True)
class Hop:
    """One hop of a relayed key: ``sender`` sent ``K ⊕ pad`` to ``receiver``."""

    link: str
    sender: str
    receiver: str
    bits: int


@dataclass(frozen=True)
class RelayedKey:
    """A key relayed end to end; the key bytes are kept out of the repr."""

    route: tuple[str, ...]
    hops: tuple[Hop, ...]
    key_at_source: bytes = field(repr=False)
    key_at_destination: bytes = field(repr=False)

    @property
    def bits(self) -> int:
        """Size of the relayed key in bits."""
        return 8 * len(self.key_at_source)


class TrustedNodeRelay:
    """Relay state of a whole topology: one :class:`LinkKeyBuffer` per link.

    Args:
        topology: the network.
        random_bytes: source of the keys that source nodes draw (``os.urandom``).
        capacity_bits: per-link buffer size per end (None: unbounded).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        capacity_bits: int | None = None,
    ) -> None:
        self.topology = topology
        self._random_bytes = random_bytes
        self.buffers: dict[str, LinkKeyBuffer] = {
            link.name: LinkKeyBuffer(link.name, link.a, link.b, capacity_bits=capacity_bits)
            for link in topology.links.values()
        }

    # --- link inputs -------------------------------------------------------------

    def buffer(self, link: str) -> LinkKeyBuffer:
        """Return the buffer of ``link`` (``"B-A"`` also finds ``"A-B"``)."""
        return self.buffers[self.topology.link(link).name]

    def deposit(self, link: str, key_at_a: bytes, key_at_b: bytes) -> int:
        """Add a block of link key; see :meth:`LinkKeyBuffer.deposit`."""
        return self.buffer(link).deposit(key_at_a, key_at_b)

    def set_alarm(self, link: str, qber: float | None = None) -> None:
        """Report an eavesdropper alarm on ``link``; routes avoid it from now on."""
        self.buffer(link).set_alarm(qber)

    def clear_alarm(self, link: str, qber: float | None = None) -> None:
        """Report that ``link`` delivers key again."""
        self.buffer(link).clear_alarm(qber)

    def set_cut(self, link: str, cut: bool = True) -> None:
        """Report that ``link`` is cut (or, with ``cut=False``, repaired)."""
        self.buffer(link).set_cut(cut)

    @property
    def alarmed_links(self) -> list[str]:
        """Names of links in alarm."""
        return [name for name, buf in self.buffers.items() if buf.alarmed]

    @property
    def down_links(self) -> list[str]:
        """Names of links that are not up: in alarm or cut."""
        return [name for name, buf in self.buffers.items() if not buf.up]

    # --- routing ----------------------------------------------------------------------

    def _usable(self, link: Link, bits: int) -> bool:
        buf = self.buffers[link.name]
        return buf.up and buf.available_bits >= bits

    def _cost(self, link: Link, bits: int) -> float:
        buf = self.buffers[link.name]
        health = HEALTH_WEIGHT * min(1.0, (buf.qber or 0.0) / 0.11)
        return (
            1.0
            + LOW_KEY_WEIGHT * bits / max(buf.available_bits, 1)
            + health
            + link.length_km * 1e-9
        )

    def _dijkstra(
        self, source: str, target: str, weight: Callable[[Link], float | None]
    ) -> list[str] | None:
        return self.topology.path(source, target, weight)

    def default_route(self, source: str, target: str) -> list[str] | None:
        """The fewest-hop route ignoring key levels and alarms (shortest fibre on ties)."""
        return self._dijkstra(source, target, lambda link: 1.0 + link.length_km * 1e-6)

    def live_route(self, source: str, target: str) -> list[str]:
        """The fewest-hop route that avoids alarmed and cut links, ignoring key levels.

        Raises:
            RelayError: every route crosses an alarmed or cut link (``hop`` names one).
        """
        path = self._dijkstra(
            source,
            target,
            lambda link: 1.0 + link.length_km * 1e-6 if self.buffers[link.name].up else None,
        )
        if path is None:
            raise self._explain(source, target, 8, set())
        return path

    def route(
        self, source: str, target: str, bits: int, *, exclude: Iterable[str] = ()
    ) -> list[str]:
        """Choose the route for a ``bits``-bit key from ``source`` to ``target``.

        Args:
            source: node that draws the key.
            target: node that must receive it.
            bits: key size; every hop needs at least this much link key.
            exclude: link names not to use.

        Returns:
            The node names from ``source`` to ``target``.

        Raises:
            RelayError: no usable route; ``hop`` names the failed link on the
                default route (alarmed, else the first one short of key).
        """
        for node in (source, target):
            if node not in self.topology.nodes:
                raise RelayError(f"unknown node {node!r}")
        if bits <= 0 or bits % 8:
            raise ValueError("bits must be a positive multiple of 8")
        banned = set(exclude)

        def weight(link: Link) -> float | None:
            if link.name in banned or not self._usable(link, bits):
                return None
            return self._cost(link, bits)

        path = self._dijkstra(source, target, weight)
        if path is not None:
            return path
        raise self._explain(source, target, bits, banned)

    def _explain(self, source: str, target: str, bits: int, banned: set[str]) -> RelayError:
        default = self.default_route(source, target)
        if default is None:
            return RelayError(f"no fibre path from {source!r} to {target!r}")
        hops = self.topology.path_links(default)
        for link in hops:
            buf = self.buffers[link.name]
            if buf.alarmed:
                qber = f" (QBER {buf.qber:.1%})" if buf.qber is not None else ""
                return RelayError(
                    f"hop {link.name!r} is in eavesdropper alarm{qber}; "
                    f"no other route from {source!r} to {target!r}",
                    hop=link.name,
                )
            if buf.cut:
                return RelayError(
                    f"hop {link.name!r} is cut; no other route from {source!r} to {target!r}",
                    hop=link.name,
                )
        for link in hops:
            buf = self.buffers[link.name]
            if buf.available_bits < bits:
                return RelayError(
                    f"hop {link.name!r} is out of key ({buf.available_bits} bits, "
                    f"{bits} needed); no other route from {source!r} to {target!r}",
                    hop=link.name,
                )
        excluded = next((link.name for link in hops if link.name in banned), None)
        return RelayError(
            f"no usable route from {source!r} to {target!r} (link {excluded!r} excluded)",
            hop=excluded,
        )

    # --- relaying --------------------------------------------------------------------

    def relay(
        self,
        source: str,
        target: str,
        size: int,
        *,
        route: list[str] | None = None,
        key: bytes | None = None,
    ) -> RelayedKey:
        """Relay a fresh ``size``-byte key from ``source`` to ``target``.

        The source draws ``K``; at each hop ``u → v`` the link key is consumed
        from both ends (|K| bits each), ``u`` sends ``K ⊕ pad_u`` and ``v``
        computes ``K ⊕ pad_u ⊕ pad_v``. The simulation checks at each hop
        that ``v`` recovered what ``u`` held (a deployment authenticates
        each hop with a MAC keyed from link key, e.g. Wegman–Carter).

        Args:
            source: node drawing the key (the master SAE's KME node).
            target: node receiving it (the slave SAE's KME node).
            size: key size in bytes.
            route: a route from :meth:`route`; chosen here when omitted.
            key: the key to relay, when ``source`` did not draw it but received
                it over a hop run elsewhere (:mod:`qcall.qkd.site`); default: drawn here.

        Returns:
            The :class:`RelayedKey`, with the key as each end holds it.

        After calling this method: hand ``key_at_source`` to the source KME
        and ``key_at_destination`` to the target KME under one key_ID.

        Raises:
            RelayError: no usable route, or a hop's two copies disagree
                (``hop`` names the link; its pad bits are spent anyway).
        """
        bits = 8 * size
        path = route if route is not None else self.route(source, target, bits)
        if path[0] != source or path[-1] != target:
            raise RelayError(f"route {path} does not join {source!r} to {target!r}")
        links = self.topology.path_links(path)
        for link in links:  # check everything before consuming anything
            if not self._usable(link, bits):
                raise self._explain(source, target, bits, set())
        key = self._random_bytes(size) if key is None else bytes(key)
        if len(key) != size:
            raise ValueError("random_bytes returned the wrong size")
        held = key
        hops: list[Hop] = []
        for u, link in zip(path, links, strict=False):
            v = link.other(u)
            buf = self.buffers[link.name]
            pads = buf.take(size)
            buf.relayed_keys += 1
            ciphertext = xor_bytes(held, buf.pad_at(u, pads))  # what goes on the wire
            received = xor_bytes(ciphertext, buf.pad_at(v, pads))
            hops.append(Hop(link.name, u, v, bits))
            if not hmac.compare_digest(received, held):
                raise RelayError(
                    f"hop {link.name!r}: the two ends' link keys differ", hop=link.name
                )
            held = received  # trusted node v now holds K in clear
        return RelayedKey(tuple(path), tuple(hops), key, held)

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per-link accounting (no key bytes), for status displays."""
        return {
            name: {
                "state": buf.state.name,
                "available_bits": buf.available_bits,
                "deposited_bits": buf.deposited_bits,
                "consumed_bits": buf.consumed_bits,
                "relayed_keys": buf.relayed_keys,
                "qber": buf.qber,
            }
            for name, buf in self.buffers.items()
        }
