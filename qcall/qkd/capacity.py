"""Key economics of a QKD network: how many calls a route sustains, and admitting them (pure).

The planner answers the operator's question "can this route carry these
calls?" from the simulated (analytic) link key rates:

* :func:`link_rates` — the secret key rate of every link of a topology, in
  bit/s, from :meth:`LinkParams.expected_secret_key_rate` (decoy-state BB84,
  GLLP; docs/qkd-simulation.md), or :func:`simulated_link_rates` — the rate
  each link delivered over a run of model-fidelity blocks
  (:class:`~qcall.qkd.sim.ModelLink`, key after authentication costs);
* :func:`route_key_rate` — the end-to-end key rate two nodes can share
  through trusted relays: every relayed key of ``|K|`` bits spends ``|K|``
  bits of link key on each hop (docs/relay.md), so the sustainable rate is
  the *maximum flow* between the two nodes in the graph whose edge
  capacities are the link rates (the relay spreads keys over several routes
  by pool level, :mod:`qcall.qkd.relay`). It assumes the pair has the
  network to itself; :meth:`CapacityPlanner.capacity` says so in its result;
* :class:`CallMode` — the key one call spends per second in a mode:
  ``aes`` (a 256-bit QKD key at set-up and one per rekey every ``N`` s, the
  hybrid call of docs/calls.md) or ``otp`` (every media bit one-time padded
  and every packet authenticated with a one-time Wegman–Carter key and
  mask, at a fixed low Opus bitrate, both directions; docs/otp.md);
* :class:`CapacityPlanner` — per pair: route rate, calls sustainable in each
  mode (``floor(utilisation · rate / per_call_rate)``), the table printed by
  ``qcall network capacity``;
* :class:`CallAdmission` — a pure admission controller over the planner:
  a call offered above a route's capacity is refused, or downgraded to the
  policy's fallback mode, with a message naming the route, the mode and the
  capacity; it never lets a call run on key the route cannot supply (the
  alternative, reusing key, is never an option anywhere in qcall).

Everything here is pure and deterministic: no clock, no I/O.

Example::

    from qcall.qkd.capacity import CallMode, CapacityPlanner
    from qcall.qkd.topology import load_topology

    planner = CapacityPlanner(load_topology("national"))
    cap = planner.capacity("Beijing", "Yaohai_AP01", CallMode.aes(60.0))
    cap.calls, cap.route_rate_bps
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qcall.exceptions import CapacityError, TopologyError
from qcall.qkd.sim.model import LinkParams
from qcall.qkd.topology import Link, Topology

__all__ = [
    "DEFAULT_UTILISATION",
    "Admission",
    "CallAdmission",
    "CallMode",
    "Capacity",
    "CapacityPlanner",
    "link_key_rate",
    "link_rates",
    "max_flow",
    "route_key_rate",
    "simulated_link_rates",
]

#: Share of a route's key rate the planner lets calls spend: the rest absorbs
#: the statistical fluctuation of the link rates (blocks of 2^18 sifted bits
#: vary by a few per cent) and the relay's rounding to whole keys.
DEFAULT_UTILISATION = 0.9

#: Size of one QKD key drawn by a call (set-up or rekey), bits.
CALL_KEY_BITS = 256


def link_key_rate(link: Link, **overrides: Any) -> float:
    """Analytic secret key rate of one link in bit/s (defaults of :class:`LinkParams`).

    Args:
        link: the fibre.
        overrides: other :class:`LinkParams` fields (``pulse_rate_hz``, ...).
    """
    return LinkParams(length_km=link.length_km, **overrides).expected_secret_key_rate()


def link_rates(topology: Topology, **overrides: Any) -> dict[str, float]:
    """The analytic key rate (bit/s) of every link of ``topology``, by link name.

    Links of equal length share one computation.
    """
    cache: dict[float, float] = {}
    rates: dict[str, float] = {}
    for link in topology.links.values():
        if link.length_km not in cache:
            cache[link.length_km] = link_key_rate(link, **overrides)
        rates[link.name] = cache[link.length_km]
    return rates


def simulated_link_rates(
    topology: Topology, *, blocks: int = 20, seed: int = 0, **overrides: Any
) -> dict[str, float]:
    """The key rate (bit/s) every link delivered over ``blocks`` model-fidelity blocks.

    Delivered key per simulated second (what reaches the relay buffers, after
    the 256 bits per block that repay the authentication pad). Seeded, so
    the same topology gives the same table.

    Args:
        topology: the network.
        blocks: blocks simulated per link (each costs tens of microseconds).
        seed: base seed (link ``i`` uses ``seed * 100_003 + i``).
        overrides: other :class:`LinkParams` fields.
    """
    from qcall.qkd.sim import ModelLink

    rates: dict[str, float] = {}
    for index, link in enumerate(topology.links.values()):
        sim = ModelLink(
            link.name, LinkParams(length_km=link.length_km, **overrides), seed * 100_003 + index
        )
        bits = seconds = 0.0
        for _ in range(blocks):
            block = sim.run_block()
            bits += block.final_bits
            seconds += block.duration_s
        rates[link.name] = bits / seconds if seconds else 0.0
    return rates


def max_flow(
    topology: Topology,
    source: str,
    target: str,
    capacity: Mapping[str, float],
) -> float:
    """Maximum flow from ``source`` to ``target`` over undirected links (Edmonds–Karp).

    Args:
        topology: the graph.
        source: first node.
        target: last node.
        capacity: link name → capacity (missing or ≤ 0: the link is unusable).

    Returns:
        The flow value (0 when no path has capacity; ``inf`` when
        ``source == target``).

    Raises:
        TopologyError: an unknown node.
    """
    for node in (source, target):
        if node not in topology.nodes:
            raise TopologyError(f"unknown node {node!r} in topology {topology.name!r}")
    if source == target:
        return math.inf
    # Residual capacities of both directed arcs of each undirected link.
    residual: dict[tuple[str, str], float] = {}
    adjacent: dict[str, list[str]] = collections.defaultdict(list)
    for link in topology.links.values():
        cap = capacity.get(link.name, 0.0)
        if not cap > 0.0:
            continue
        for u, v in ((link.a, link.b), (link.b, link.a)):
            residual[(u, v)] = residual.get((u, v), 0.0) + cap
            adjacent[u].append(v)
    total = 0.0
    while True:
        parent: dict[str, str] = {source: source}
        queue = collections.deque([source])
        while queue and target not in parent:
            u = queue.popleft()
            for v in adjacent[u]:
                if v not in parent and residual[(u, v)] > 1e-9:
                    parent[v] = u
                    queue.append(v)
        if target not in parent:
            return total
        path: list[tuple[str, str]] = []
        v = target
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[arc] for arc in path)
        for u, w in path:
            residual[(u, w)] -= push
            residual[(w, u)] += push
        total += push


def route_key_rate(
    topology: Topology, source: str, target: str, rates: Mapping[str, float]
) -> float:
    """End-to-end key rate (bit/s) ``source`` and ``target`` can share via trusted relays.

    The max-flow of the link rates (see the module docstring). Two SAEs on
    one node share key without relaying: ``inf``.
    """
    return max_flow(topology, source, target, rates)


@dataclass(frozen=True)
class CallMode:
    """The key a call spends in one mode.

    Build with :meth:`aes` or :meth:`otp`.

    Attributes:
        name: ``aes-60s``, ``otp-8k``...
        kind: ``"aes"`` or ``"otp"``.
        setup_bits: QKD key drawn when the call is set up.
        bits_per_second: QKD key spent per second while the call runs (both
            directions together).
    """

    name: str
    kind: str
    setup_bits: int
    bits_per_second: float

    def __post_init__(self) -> None:
        if self.kind not in ("aes", "otp"):
            raise ValueError(f"CallMode.kind must be 'aes' or 'otp', not {self.kind!r}")
        if self.setup_bits < 0:
            raise ValueError("CallMode.setup_bits must be >= 0")
        if not (self.bits_per_second > 0 and math.isfinite(self.bits_per_second)):
            raise ValueError("CallMode.bits_per_second must be positive and finite")

    @classmethod
    def aes(cls, rekey_seconds: float, key_bits: int = CALL_KEY_BITS) -> CallMode:
        """Hybrid AES-GCM SRTP call: one QKD key at set-up and one per rekey.

        Args:
            rekey_seconds: seconds between rekeys (``N``).
            key_bits: bits per QKD key (256, docs/key-schedule.md).
        """
        if not (rekey_seconds > 0 and math.isfinite(rekey_seconds)):
            raise ValueError("rekey_seconds must be positive")
        return cls(f"aes-{rekey_seconds:g}s", "aes", key_bits, key_bits / rekey_seconds)

    @classmethod
    def otp(
        cls,
        opus_bitrate: int = 8000,
        frame_ms: int = 20,
        mac_key_bits: int = 256,
        directions: int = 2,
    ) -> CallMode:
        """One-time-pad call at a fixed Opus bitrate.

        Each packet of each direction spends its payload's length of pad and
        ``mac_key_bits`` for its one-time MAC (a 128-bit polynomial-hash key
        and a 128-bit mask, docs/otp.md), so per second:
        ``directions · (opus_bitrate + mac_key_bits · 1000 / frame_ms)``.

        Args:
            opus_bitrate: constant Opus bitrate, bit/s.
            frame_ms: packet duration (one Opus frame per packet).
            mac_key_bits: one-time MAC key + mask per packet.
            directions: 2 for a call, 1 for a one-way stream.
        """
        if opus_bitrate <= 0 or frame_ms <= 0 or mac_key_bits < 0 or directions not in (1, 2):
            raise ValueError("opus_bitrate and frame_ms must be positive, directions 1 or 2")
        packets = 1000.0 / frame_ms
        payload = math.ceil(opus_bitrate * frame_ms / 8000) * 8  # whole bytes per packet
        rate = directions * (payload + mac_key_bits) * packets
        return cls(f"otp-{opus_bitrate / 1000:g}k", "otp", 0, rate)

    def calls(self, rate_bps: float, utilisation: float = DEFAULT_UTILISATION) -> int:
        """Calls sustainable on ``rate_bps`` of key: ``floor(utilisation · rate / per-call)``."""
        if math.isinf(rate_bps):
            return 10**9  # same-node SAEs: no relayed key, bounded by the KME only
        return max(0, math.floor(utilisation * rate_bps / self.bits_per_second + 1e-9))


@dataclass(frozen=True)
class Capacity:
    """What the planner found for one pair and one mode.

    Attributes:
        source, target: the two nodes.
        mode: the call mode.
        route_rate_bps: end-to-end key rate (max-flow of the link rates).
        calls: simultaneous calls sustainable in ``mode``.
        hops, route_km: the shortest route's hop count and fibre length (for display).
        bottleneck: a link of least rate on the shortest route.
    """

    source: str
    target: str
    mode: CallMode
    route_rate_bps: float
    calls: int
    hops: int
    route_km: float
    bottleneck: str | None


@dataclass
class CapacityPlanner:
    """Sustainable calls per pair of nodes, from the simulated link rates.

    Args:
        topology: the network.
        rates: link name → key rate in bit/s (default: :func:`link_rates`).
        utilisation: share of the route's rate calls may spend (0 < u ≤ 1).
    """

    topology: Topology
    rates: Mapping[str, float] = field(default_factory=dict)
    utilisation: float = DEFAULT_UTILISATION
    _flows: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.utilisation <= 1.0:
            raise ValueError("utilisation must be in (0, 1]")
        if not self.rates:
            self.rates = link_rates(self.topology)

    def route_rate(self, source: str, target: str) -> float:
        """End-to-end key rate between two nodes (cached; symmetric)."""
        key = (source, target) if source <= target else (target, source)
        if key not in self._flows:
            self._flows[key] = route_key_rate(self.topology, source, target, self.rates)
        return self._flows[key]

    def capacity(self, source: str, target: str, mode: CallMode) -> Capacity:
        """Calls in ``mode`` that the route ``source`` ↔ ``target`` sustains.

        Raises:
            TopologyError: unknown node.
        """
        rate = self.route_rate(source, target)
        path = self.topology.shortest_path(source, target) or [source]
        hops = self.topology.path_links(path) if len(path) > 1 else []
        bottleneck = min(hops, key=lambda link: self.rates.get(link.name, 0.0), default=None)
        return Capacity(
            source=source,
            target=target,
            mode=mode,
            route_rate_bps=rate,
            calls=mode.calls(rate, self.utilisation),
            hops=len(hops),
            route_km=math.fsum(link.length_km for link in hops),
            bottleneck=None if bottleneck is None else bottleneck.name,
        )

    def table(
        self, pairs: Iterable[tuple[str, str]], modes: Iterable[CallMode]
    ) -> list[list[Capacity]]:
        """One row per pair, one :class:`Capacity` per mode."""
        mode_list = list(modes)
        return [[self.capacity(a, b, mode) for mode in mode_list] for a, b in pairs]


@dataclass(frozen=True)
class Admission:
    """The answer to one offered call.

    Attributes:
        call_id: the call.
        admitted: whether the call may run.
        mode: the mode it runs in (the fallback when downgraded; None if refused).
        message: what to tell the user (always set when refused or downgraded).
    """

    call_id: str
    admitted: bool
    mode: CallMode | None
    message: str = ""

    @property
    def downgraded(self) -> bool:
        """Admitted, but not in the mode asked for."""
        return self.admitted and bool(self.message)


class CallAdmission:
    """Admission control of calls against route capacity (pure).

    Each admitted call reserves its mode's ``bits_per_second`` on its route
    (the pair of nodes); a call is admitted only while the reserved total
    stays within ``utilisation`` × the route's key rate. Above that, the
    call is downgraded to ``fallback`` if the policy names one and it fits,
    else refused. Nothing here hands out key: the KMEs do, and a KME with no
    key left answers 503 rather than reuse any (ETSI GS QKD 014, 5.2).

    Args:
        planner: the capacity planner (its rates and utilisation are used).
    """

    def __init__(self, planner: CapacityPlanner) -> None:
        self.planner = planner
        self._calls: dict[str, tuple[tuple[str, str], CallMode]] = {}
        self._reserved: dict[tuple[str, str], float] = collections.defaultdict(float)

    def __repr__(self) -> str:
        return f"CallAdmission(calls={len(self._calls)})"

    @staticmethod
    def _route(source: str, target: str) -> tuple[str, str]:
        return (source, target) if source <= target else (target, source)

    def reserved_bps(self, source: str, target: str) -> float:
        """Key rate reserved by admitted calls on a route."""
        return self._reserved.get(self._route(source, target), 0.0)

    def active(self, source: str, target: str) -> int:
        """Admitted calls on a route."""
        route = self._route(source, target)
        return sum(1 for r, _ in self._calls.values() if r == route)

    def _fits(self, route: tuple[str, str], mode: CallMode) -> bool:
        budget = self.planner.utilisation * self.planner.route_rate(*route)
        return self._reserved[route] + mode.bits_per_second <= budget * (1 + 1e-9)

    def offer(
        self,
        call_id: str,
        source: str,
        target: str,
        mode: CallMode,
        *,
        fallback: CallMode | None = None,
    ) -> Admission:
        """Offer a call; return whether (and in which mode) it may run.

        Raises:
            CapacityError: ``call_id`` is already admitted.
            TopologyError: unknown node.
        """
        if call_id in self._calls:
            raise CapacityError(f"call {call_id!r} is already admitted")
        route = self._route(source, target)
        if self._fits(route, mode):
            self._admit(call_id, route, mode)
            return Admission(call_id, True, mode)
        cap = mode.calls(self.planner.route_rate(*route), self.planner.utilisation)
        why = (
            f"route {source}–{target} is at capacity for {mode.name} calls "
            f"({self.active(source, target)} active; it sustains {cap} from "
            f"{self.planner.route_rate(*route) / 1e3:.1f} kbit/s of key)"
        )
        if fallback is not None and self._fits(route, fallback):
            self._admit(call_id, route, fallback)
            return Admission(call_id, True, fallback, f"{why}: downgraded to {fallback.name}")
        return Admission(call_id, False, None, f"{why}: call refused")

    def _admit(self, call_id: str, route: tuple[str, str], mode: CallMode) -> None:
        self._calls[call_id] = (route, mode)
        self._reserved[route] += mode.bits_per_second

    def release(self, call_id: str) -> None:
        """The call ended: free its reservation (unknown IDs are ignored)."""
        entry = self._calls.pop(call_id, None)
        if entry is not None:
            route, mode = entry
            self._reserved[route] = max(0.0, self._reserved[route] - mode.bits_per_second)
