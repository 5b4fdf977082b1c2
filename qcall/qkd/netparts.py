"""Parts of the simulated QKD network: link simulators, their runtimes, SAE credentials.

Split out of :mod:`qcall.qkd.network` (which re-exports the public names):
the :class:`LinkSimulator` protocol that both link fidelities implement
(:class:`qcall.qkd.sim.SimulatedLink`, ``protocol``; :class:`qcall.qkd.sim.ModelLink`,
``model``), :func:`default_link_factory` choosing between them per link, the
per-link and per-pair runtime records, and :class:`KeyRouteLog`, which
remembers the links each relayed key crossed so that keys relayed over a link
that later raises an alarm or is cut can be withdrawn before any call uses
them (docs/relay.md, *Rerouting*).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qcall.exceptions import ConfigError
from qcall.qkd.topology import FIDELITIES, Link

__all__ = [
    "MAX_RETRY_SECONDS",
    "BlockResult",
    "KeyRouteLog",
    "LinkFactory",
    "LinkRuntime",
    "LinkSimulator",
    "PairRuntime",
    "SAECredentials",
    "default_link_factory",
    "kme_id_for",
    "modelled_seconds",
    "pct",
    "result_qber",
]

#: Longest wait before a failed or alarmed link tries its next block.
MAX_RETRY_SECONDS = 30.0


class BlockResult(Protocol):
    """What a link simulator's ``run_block`` returns (see :mod:`qcall.qkd.sim`)."""

    @property
    def alice_key(self) -> bytes: ...

    @property
    def bob_key(self) -> bytes: ...


class LinkSimulator(Protocol):
    """The part of :class:`qcall.qkd.sim.SimulatedLink` the network uses."""

    def run_block(self) -> BlockResult: ...

    def set_eavesdropper(self, fraction: float) -> None: ...

    def expected_secret_key_rate(self) -> float: ...


#: ``make_link(link, seed)`` builds the simulator of one topology link.
LinkFactory = Callable[[Link, int | None], LinkSimulator]


def kme_id_for(node: str) -> str:
    """Return the KME ID of a node (``Gaoxin_AP01`` → ``KME-Gaoxin-AP01``).

    Node names have no ``-`` (see :mod:`qcall.qkd.topology`), so this is
    one-to-one; ``_`` is not allowed in ETSI 014 IDs here.
    """
    return "KME-" + node.replace("_", "-")


@dataclass(frozen=True)
class SAECredentials:
    """What an SAE needs to reach its KME; ``as_config()`` feeds ``open_key_source``."""

    sae_id: str
    node: str
    kme_id: str
    url: str
    cert: Path
    key: Path
    ca: Path

    def as_config(self) -> dict[str, str]:
        """Return the ``etsi014`` key source configuration (see :mod:`qcall.qkd.client`)."""
        return {
            "type": "etsi014",
            "url": self.url,
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
        }


@dataclass(eq=False)
class LinkRuntime:
    """What the network tracks of one link (counters, last QBER, deposit history)."""

    link: Link
    sim: LinkSimulator | None
    model_rate: float = 0.0
    blocks: int = 0
    alarms: int = 0
    failures: int = 0
    qber: float | None = None
    eve_fraction: float = 0.0
    last_error: str | None = None
    history: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=64)
    )

    def rate(self, now: float, window: float = 30.0) -> float:
        """Measured deposit rate in bits/s over the last ``window`` seconds."""
        recent = [(t, b) for t, b in self.history if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(b for _, b in recent[1:]) / span if span > 0 else 0.0


@dataclass(eq=False)
class PairRuntime:
    """What the network tracks of one ordered SAE pair."""

    master: str
    slave: str
    master_node: str
    slave_node: str
    delivered: int = 0
    last_route: tuple[str, ...] | None = None
    error: str | None = None
    failed_hop: str | None = None
    alarm: str | None = None
    withdrawn: int = 0


def default_link_factory(*, fidelity: str | None = None, **overrides: Any) -> LinkFactory:
    """Return a factory of simulated links, each at its fidelity.

    Args:
        fidelity: ``"protocol"`` (every link runs the full BB84 simulation,
            :class:`qcall.qkd.sim.SimulatedLink`), ``"model"`` (every link
            produces key at the analytic rate with fluctuations,
            :class:`qcall.qkd.sim.ModelLink`), or ``None``: each link's
            ``fidelity`` field in the topology, ``protocol`` where it has none.
        overrides: :class:`~qcall.qkd.sim.LinkParams` fields for every link
            (for example ``block_pulses`` to make blocks small in tests).

    Raises:
        ConfigError: an unknown fidelity.
    """
    from qcall.qkd.sim import LinkParams, ModelLink, SimulatedLink

    if fidelity is not None and fidelity not in FIDELITIES:
        raise ConfigError(f"fidelity must be one of {', '.join(FIDELITIES)}, not {fidelity!r}")

    def make(link: Link, seed: int | None) -> LinkSimulator:
        params = LinkParams(length_km=link.length_km, **overrides)
        chosen = fidelity or link.fidelity or "protocol"
        simulator: LinkSimulator
        if chosen == "model":
            simulator = ModelLink(link.name, params, seed=seed)
        else:
            simulator = SimulatedLink(link.name, params, seed=seed)
        return simulator

    return make



def pct(value: float | None) -> str:
    """A QBER for logs: ``2.3%``, or ``?``."""
    return "?" if value is None else f"{value:.1%}"


def result_qber(result: BlockResult) -> float | None:
    """The QBER a block reports, if it reports one."""
    value = getattr(result, "qber", None)
    return float(value) if isinstance(value, int | float) else None


def modelled_seconds(sim: LinkSimulator, result: BlockResult | None) -> float:
    """Device time a block stands for: pulses / pulse rate."""
    pulses = getattr(result, "pulses", None)
    params = getattr(sim, "params", None)
    rate = getattr(params, "pulse_rate_hz", None)
    if not isinstance(pulses, int) and params is not None:
        block = getattr(params, "default_block_pulses", None)
        pulses = block() if callable(block) else None
    if isinstance(pulses, int) and isinstance(rate, int | float) and rate > 0:
        return pulses / float(rate)
    return 0.0


class KeyRouteLog:
    """The links each relayed key crossed, per ordered SAE pair (bounded, pure).

    The network records every key it relays; when a link raises an
    eavesdropper alarm or is cut, :meth:`crossing` names the keys still to be
    withdrawn from the KME pools so that the pair's *next* key is relayed
    over another route.

    Args:
        limit: keys remembered per pair (the oldest are forgotten first; a
            pool holds far fewer).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._routes: dict[tuple[str, str], collections.OrderedDict[str, frozenset[str]]] = {}

    def __repr__(self) -> str:
        return f"KeyRouteLog(pairs={len(self._routes)})"

    def record(self, master: str, slave: str, key_id: str, links: Iterable[str]) -> None:
        """Remember that ``key_id`` of ``master`` → ``slave`` crossed ``links``."""
        routes = self._routes.setdefault((master, slave), collections.OrderedDict())
        routes[key_id] = frozenset(links)
        while len(routes) > self.limit:
            routes.popitem(last=False)

    def crossing(self, link: str) -> dict[tuple[str, str], list[str]]:
        """Key_IDs, per pair, whose route crossed ``link`` (oldest first)."""
        found: dict[tuple[str, str], list[str]] = {}
        for pair, routes in self._routes.items():
            hit = [key_id for key_id, links in routes.items() if link in links]
            if hit:
                found[pair] = hit
        return found

    def forget(self, master: str, slave: str, key_ids: Iterable[str]) -> None:
        """Drop keys that were withdrawn or can no longer be (already handed out)."""
        routes = self._routes.get((master, slave))
        if routes is not None:
            for key_id in key_ids:
                routes.pop(key_id, None)

    def links_of(self, master: str, slave: str, key_id: str) -> frozenset[str] | None:
        """The links a relayed key crossed, if it is still remembered."""
        routes = self._routes.get((master, slave))
        return None if routes is None else routes.get(key_id)
