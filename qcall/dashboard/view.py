"""What the operations view shows, computed from a network's status (pure; docs/dashboard.md).

:func:`layout` places the nodes on the map: from their ``lat``/``lon`` when the
topology gives them, else by a deterministic force-directed layout.
:class:`DashboardView` turns successive ``SimulatedNetwork.status()`` snapshots
into the JSON the page draws: nodes, links (key rate, QBER, pool level, colour),
alarms and active calls with their routes.

Link colours: ``red`` when an eavesdropper is switched on for the link or it is in
alarm (QBER above threshold), ``grey`` when it serves no route, ``orange`` when its
key buffer is empty, ``green`` otherwise.

A *call* is an SAE pair drawing key now: its KME pool shrank or was refilled by the
relay within the last :data:`ACTIVE_WINDOW` seconds (the network sees key
consumption, not signaling).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Final

from qcall.qkd.topology import Topology

__all__ = ["ACTIVE_WINDOW", "DashboardView", "layout"]

#: Seconds after its last key draw during which an SAE pair counts as in a call.
ACTIVE_WINDOW: Final = 10.0


def layout(
    topology: Topology, seed: int = 1, iterations: int = 120
) -> dict[str, tuple[float, float]]:
    """Map coordinates in [0, 1]² for every node (y grows downwards).

    Uses each node's ``lat``/``lon`` if the topology has them for all nodes;
    otherwise a Fruchterman–Reingold layout seeded with ``seed`` (deterministic).
    """
    nodes = list(topology.nodes)
    geo = {
        n: (getattr(topology.nodes[n], "lon", None), getattr(topology.nodes[n], "lat", None))
        for n in nodes
    }
    if nodes and all(lon is not None and lat is not None for lon, lat in geo.values()):
        raw = {n: (float(lon), -float(lat)) for n, (lon, lat) in geo.items()}  # type: ignore[arg-type]
        return _normalise(raw)
    rng = random.Random(seed)
    pos = {n: [rng.random(), rng.random()] for n in nodes}
    edges = [(link.a, link.b) for link in topology.links.values()]
    k = 1.0 / math.sqrt(max(1, len(nodes)))
    temp = 0.1
    for _ in range(iterations):
        disp = {n: [0.0, 0.0] for n in nodes}
        for i, a in enumerate(nodes):
            pa = pos[a]
            for b in nodes[i + 1 :]:
                pb = pos[b]
                dx, dy = pa[0] - pb[0], pa[1] - pb[1]
                d2 = dx * dx + dy * dy or 1e-9
                f = k * k / d2
                disp[a][0] += dx * f
                disp[a][1] += dy * f
                disp[b][0] -= dx * f
                disp[b][1] -= dy * f
        for a, b in edges:
            dx, dy = pos[a][0] - pos[b][0], pos[a][1] - pos[b][1]
            d = math.hypot(dx, dy) or 1e-9
            f = d / k
            disp[a][0] -= dx * f
            disp[a][1] -= dy * f
            disp[b][0] += dx * f
            disp[b][1] += dy * f
        for n in nodes:
            dx, dy = disp[n]
            d = math.hypot(dx, dy) or 1e-9
            step = min(d, temp)
            pos[n][0] += dx / d * step
            pos[n][1] += dy / d * step
        temp *= 0.97
    return _normalise({n: (p[0], p[1]) for n, p in pos.items()})


def _normalise(raw: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    if not raw:
        return {}
    xs = [p[0] for p in raw.values()]
    ys = [p[1] for p in raw.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys)) or 1.0
    return {
        n: (round((x - min(xs)) / span, 4), round((y - min(ys)) / span, 4))
        for n, (x, y) in raw.items()
    }


def _link_colour(link: Mapping[str, Any]) -> str:
    if link.get("eve_fraction") or link.get("state") == "LINK_ALARM":
        return "red"
    if not link.get("active", True):
        return "grey"
    if not link.get("available_bits"):
        return "orange"
    return "green"


class DashboardView:
    """Successive network snapshots in, the page's JSON out (keeps the pairs' recent activity).

    Args:
        topology: the network's topology.
        positions: node coordinates (default: :func:`layout`).
    """

    def __init__(
        self, topology: Topology, positions: Mapping[str, tuple[float, float]] | None = None
    ) -> None:
        self.topology = topology
        self.positions = dict(positions) if positions is not None else layout(topology)
        self._last: dict[tuple[str, str], tuple[int, int]] = {}
        self._active_at: dict[tuple[str, str], float] = {}

    def static(self) -> dict[str, Any]:
        """The parts that never change: nodes with coordinates, links' ends and lengths."""
        return {
            "topology": self.topology.name,
            "nodes": [
                {
                    "name": n,
                    "kind": node.kind,
                    "kme": node.kme,
                    "saes": list(node.saes),
                    "x": self.positions[n][0],
                    "y": self.positions[n][1],
                }
                for n, node in self.topology.nodes.items()
            ],
            "links": [
                {"name": link.name, "a": link.a, "b": link.b, "length_km": link.length_km}
                for link in self.topology.links.values()
            ],
        }

    def snapshot(self, status: Mapping[str, Any], now: float) -> dict[str, Any]:
        """The live part: link figures and colours, alarms, active calls with routes."""
        links = {}
        alarms = []
        for name, link in status.get("links", {}).items():
            colour = _link_colour(link)
            links[name] = {
                "colour": colour,
                "rate_bps": link.get("rate_bps", 0.0),
                "target_rate_bps": link.get("target_rate_bps", 0.0),
                "qber": link.get("qber"),
                "pool_bits": link.get("available_bits", 0),
                "eve": bool(link.get("eve_fraction")),
                "alarm": link.get("state") == "LINK_ALARM",
            }
            if link.get("state") == "LINK_ALARM":
                qber = link.get("qber")
                text = f"{name}: QBER {qber:.1%} above threshold" if qber is not None else name
                alarms.append(f"{text}: eavesdropper suspected, link stopped")
            elif link.get("eve_fraction"):
                alarms.append(
                    f"{name}: eavesdropper switched on (fraction {link['eve_fraction']:g})"
                )
        calls = []
        for pair in status.get("pairs", []):
            key = (pair["master"], pair["slave"])
            seen = (int(pair.get("stored_keys", 0)), int(pair.get("delivered", 0)))
            before = self._last.get(key)
            self._last[key] = seen
            if before is not None and (seen[0] < before[0] or seen[1] > before[1]):
                self._active_at[key] = now
            if pair.get("alarm"):
                alarms.append(f"{pair['master']} → {pair['slave']}: {pair['alarm']}")
            if now - self._active_at.get(key, -math.inf) <= ACTIVE_WINDOW:
                route = pair.get("route") or []
                calls.append(
                    {
                        "master": pair["master"],
                        "slave": pair["slave"],
                        "route": route,
                        "links": [link.name for link in self.topology.path_links(route)]
                        if route
                        else [],
                        "pool_keys": seen[0],
                    }
                )
        return {
            "uptime_s": status.get("uptime_s", 0.0),
            "links": links,
            "alarms": alarms,
            "calls": calls,
        }
