"""QKD network topologies: trusted nodes, fibre links, and where KMEs and SAEs live.

A topology is a small graph. Each *node* is a trusted site (a relay, a core
switch, an access point); each *link* is a fibre with a length, over which a
point-to-point QKD link runs. Some nodes host a KME (an ETSI GS QKD 014 key
manager reachable by applications), and a KME-hosting node may serve SAEs
(secure application entities, ETSI GS QKD 014 section 4). The file format
is documented in ``docs/topology.md``; three topologies ship with qcall:
``beijing-hefei``, ``hefei-metro`` and ``national`` (see :func:`bundled_topologies`).

Everything here is pure: :func:`parse_topology` takes a ``dict`` (from TOML or
JSON), :func:`load_topology` only adds reading the file. Input is treated as
hostile: every problem raises :class:`~qcall.exceptions.TopologyError`
naming the offending entry.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qcall.exceptions import TopologyError

__all__ = [
    "Link",
    "Node",
    "Topology",
    "bundled_topologies",
    "load_topology",
    "parse_topology",
]

#: Node names: letters, digits and ``_`` (they appear in link names ``A-B``).
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: SAE IDs: ETSI GS QKD 014 leaves them free-form; like :mod:`qcall.qkd.etsi014`, URL-safe.
_SAE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:@\-]{0,63}$")
#: Link names: like node names, plus ``-``.
_LINK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,130}$")

#: Limits that keep a hostile file from exhausting memory or time.
MAX_NODES = 10_000
MAX_LINKS = 50_000
MAX_LENGTH_KM = 1_000.0
MAX_FILE_BYTES = 4 * 1024 * 1024

_TOP_KEYS = frozenset({"name", "description", "max_hop_km", "nodes", "links", "source"})
_NODE_KEYS = frozenset({"name", "kind", "kme", "saes", "lat", "lon", "metro"})
_LINK_KEYS = frozenset({"name", "a", "b", "length_km", "fidelity"})

#: Link fidelities (see :mod:`qcall.qkd.sim.modellink`).
FIDELITIES = ("protocol", "model")


@dataclass(frozen=True)
class Node:
    """A trusted node.

    Attributes:
        name: unique node name (``[A-Za-z][A-Za-z0-9_]*``).
        kind: free-form role shown to users (``relay``, ``core``, ``access``…).
        kme: whether this node hosts a KME that SAEs can reach.
        saes: SAE IDs served by this node's KME.
        metro: the metro network the node belongs to (``None``: a backbone relay).
    """

    name: str
    kind: str = "relay"
    kme: bool = False
    saes: tuple[str, ...] = ()
    metro: str | None = None


@dataclass(frozen=True)
class Link:
    """A fibre between two nodes carrying one point-to-point QKD link.

    Attributes:
        name: unique link name, by default ``"A-B"``.
        a: first end (the BB84 transmitter, "Alice", of the link).
        b: second end (the receiver, "Bob", of the link).
        length_km: fibre length in kilometres (> 0).
        fidelity: how a simulated network runs this link: ``"protocol"``
            (full BB84 post-processing), ``"model"`` (analytic rate with
            fluctuations) or ``None`` (the network's default).
    """

    name: str
    a: str
    b: str
    length_km: float
    fidelity: str | None = None

    def other(self, node: str) -> str:
        """Return the end of this link that is not ``node``."""
        if node == self.a:
            return self.b
        if node == self.b:
            return self.a
        raise TopologyError(f"node {node!r} is not an end of link {self.name!r}")


@dataclass(frozen=True)
class Topology:
    """A validated QKD network graph (build it with :func:`parse_topology`)."""

    name: str
    nodes: Mapping[str, Node]
    links: Mapping[str, Link]
    description: str = ""
    max_hop_km: float | None = None
    _adjacency: Mapping[str, tuple[Link, ...]] = field(default_factory=dict, repr=False)
    _sae_nodes: Mapping[str, str] = field(default_factory=dict, repr=False)

    # --- queries -----------------------------------------------------------------

    @property
    def total_length_km(self) -> float:
        """Total fibre length of all links."""
        return math.fsum(link.length_km for link in self.links.values())

    @property
    def metros(self) -> dict[str, list[str]]:
        """Metro network name → its nodes, in file order (nodes without ``metro`` left out)."""
        found: dict[str, list[str]] = {}
        for node in self.nodes.values():
            if node.metro is not None:
                found.setdefault(node.metro, []).append(node.name)
        return found

    @property
    def kme_nodes(self) -> list[str]:
        """Names of the nodes that host a KME, in file order."""
        return [n.name for n in self.nodes.values() if n.kme]

    @property
    def sae_ids(self) -> list[str]:
        """All SAE IDs, in file order."""
        return list(self._sae_nodes)

    def sae_node(self, sae_id: str) -> str:
        """Return the node whose KME serves ``sae_id``.

        Raises:
            TopologyError: the SAE is not in this topology.
        """
        try:
            return self._sae_nodes[sae_id]
        except KeyError:
            raise TopologyError(f"unknown SAE {sae_id!r} in topology {self.name!r}") from None

    def links_of(self, node: str) -> tuple[Link, ...]:
        """Links that end at ``node``."""
        if node not in self.nodes:
            raise TopologyError(f"unknown node {node!r} in topology {self.name!r}")
        return self._adjacency.get(node, ())

    def link(self, name: str) -> Link:
        """Return the link called ``name``; ``"B-A"`` finds link ``"A-B"`` too.

        Raises:
            TopologyError: no such link.
        """
        found = self.links.get(name)
        if found is None and name.count("-") == 1:
            a, b = name.split("-")
            found = self.link_between(a, b)
        if found is None:
            raise TopologyError(f"unknown link {name!r} in topology {self.name!r}")
        return found

    def link_between(self, a: str, b: str) -> Link | None:
        """Return the link joining ``a`` and ``b``, if any."""
        for link in self._adjacency.get(a, ()):
            if link.other(a) == b:
                return link
        return None

    def shortest_path(
        self, source: str, target: str, *, exclude: Iterable[str] = ()
    ) -> list[str] | None:
        """Return the node list of the shortest path by fibre length, or None.

        Args:
            source: first node.
            target: last node.
            exclude: link names that may not be used.
        """
        banned = set(exclude)
        return self.path(
            source, target, lambda link: None if link.name in banned else link.length_km
        )

    def path(
        self, source: str, target: str, weight: Callable[[Link], float | None]
    ) -> list[str] | None:
        """Dijkstra: the node list of the cheapest path, or None if there is none.

        Args:
            source: first node.
            target: last node.
            weight: the non-negative cost of a link, or ``None`` for a link that
                may not be used.

        Raises:
            TopologyError: ``source`` or ``target`` is not a node.
        """
        for node in (source, target):
            if node not in self.nodes:
                raise TopologyError(f"unknown node {node!r} in topology {self.name!r}")
        best: dict[str, float] = {source: 0.0}
        previous: dict[str, str] = {}
        heap: list[tuple[float, str]] = [(0.0, source)]
        done: set[str] = set()
        while heap:
            dist, node = heapq.heappop(heap)
            if node in done:
                continue
            done.add(node)
            if node == target:
                break
            for link in self._adjacency.get(node, ()):
                cost = weight(link)
                if cost is None:
                    continue
                other = link.other(node)
                candidate = dist + cost
                if candidate < best.get(other, math.inf):
                    best[other] = candidate
                    previous[other] = node
                    heapq.heappush(heap, (candidate, other))
        if target not in best:
            return None
        path = [target]
        while path[-1] != source:
            path.append(previous[path[-1]])
        path.reverse()
        return path

    def path_links(self, path: list[str]) -> list[Link]:
        """Return the links along a node path.

        Raises:
            TopologyError: two consecutive nodes are not linked.
        """
        hops: list[Link] = []
        for u, v in itertools.pairwise(path):
            link = self.link_between(u, v)
            if link is None:
                raise TopologyError(f"no link between {u!r} and {v!r}")
            hops.append(link)
        return hops

    def component(self, start: str) -> set[str]:
        """Nodes reachable from ``start``."""
        seen = {start}
        stack = [start]
        while stack:
            node = stack.pop()
            for link in self._adjacency.get(node, ()):
                other = link.other(node)
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return seen

    def serving_links(self) -> set[str]:
        """Links that lie on some path between SAE-serving nodes.

        Iteratively prunes leaf nodes that serve no SAE: a link to such a
        dead end never carries relayed key, so a simulator may leave it idle.
        """
        degree = {name: len(self._adjacency.get(name, ())) for name in self.nodes}
        sae_nodes = set(self._sae_nodes.values())
        removed: set[str] = set()
        live_links = set(self.links)
        stack = [n for n, d in degree.items() if d <= 1 and n not in sae_nodes]
        while stack:
            node = stack.pop()
            if node in removed:
                continue
            removed.add(node)
            for link in self._adjacency.get(node, ()):
                if link.name not in live_links:
                    continue
                live_links.discard(link.name)
                other = link.other(node)
                degree[other] -= 1
                if degree[other] <= 1 and other not in sae_nodes and other not in removed:
                    stack.append(other)
        return live_links

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())


# --- parsing ------------------------------------------------------------------------


def _require(cond: bool, text: str) -> None:
    if not cond:
        raise TopologyError(text)


def _check_keys(entry: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(str(key) for key in set(entry) - allowed)
    if unknown:
        raise TopologyError(f"{where}: unknown field {unknown[0][:40]!r}")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where} must be a number, not {type(value).__name__}")
    number = float(value)
    _require(math.isfinite(number), f"{where} must be finite")
    return number


def _string(value: object, where: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise TopologyError(f"{where} must be a string, not {type(value).__name__}")
    if pattern is not None and not pattern.match(value):
        raise TopologyError(f"{where} {value[:70]!r} is not a valid name")
    return value


def _parse_node(index: int, entry: object) -> Node:
    where = f"nodes[{index}]"
    if not isinstance(entry, Mapping):
        raise TopologyError(f"{where} must be a table/object")
    _check_keys(entry, _NODE_KEYS, where)
    name = _string(entry.get("name"), f"{where}.name", _NAME_RE)
    where = f"node {name!r}"
    kind = _string(entry.get("kind", "relay"), f"{where}: kind")
    _require(len(kind) <= 32, f"{where}: kind is too long")
    kme = entry.get("kme", False)
    _require(isinstance(kme, bool), f"{where}: kme must be true or false")
    raw_saes = entry.get("saes", [])
    _require(isinstance(raw_saes, list), f"{where}: saes must be a list")
    saes = tuple(_string(s, f"{where}: saes entry", _SAE_RE) for s in raw_saes)
    _require(not saes or kme, f"{where}: has SAEs {list(saes)} but hosts no KME (set kme = true)")
    for key in ("lat", "lon"):
        if key in entry:
            _number(entry[key], f"{where}: {key}")
    metro = None
    if "metro" in entry:
        metro = _string(entry["metro"], f"{where}: metro", _NAME_RE)
    return Node(name=name, kind=kind, kme=bool(kme), saes=saes, metro=metro)


def _parse_link(index: int, entry: object, nodes: Mapping[str, Node]) -> Link:
    where = f"links[{index}]"
    if not isinstance(entry, Mapping):
        raise TopologyError(f"{where} must be a table/object")
    _check_keys(entry, _LINK_KEYS, where)
    a = _string(entry.get("a"), f"{where}.a", _NAME_RE)
    b = _string(entry.get("b"), f"{where}.b", _NAME_RE)
    name = _string(entry.get("name", f"{a}-{b}"), f"{where}.name", _LINK_RE)
    where = f"link {name!r}"
    for end in (a, b):
        _require(end in nodes, f"{where}: unknown node {end!r}")
    _require(a != b, f"{where}: both ends are node {a!r}")
    _require("length_km" in entry, f"{where}: missing length_km")
    length = _number(entry["length_km"], f"{where}: length_km")
    _require(length > 0, f"{where}: length_km must be positive, not {length:g}")
    _require(length <= MAX_LENGTH_KM, f"{where}: length_km {length:g} exceeds {MAX_LENGTH_KM:g}")
    fidelity = None
    if "fidelity" in entry:
        fidelity = _string(entry["fidelity"], f"{where}: fidelity")
        _require(
            fidelity in FIDELITIES,
            f"{where}: fidelity must be one of {', '.join(FIDELITIES)}, not {fidelity[:20]!r}",
        )
    return Link(name=name, a=a, b=b, length_km=length, fidelity=fidelity)


def parse_topology(data: object, *, name: str | None = None) -> Topology:
    """Validate a decoded topology document (see ``docs/topology.md``).

    Args:
        data: the TOML/JSON document as a ``dict``.
        name: fallback topology name when the document has none.

    Returns:
        The validated :class:`Topology`.

    Raises:
        TopologyError: naming the bad entry — unknown node, duplicate node,
            link or SAE, non-positive length, hop longer than ``max_hop_km``,
            SAEs on a node without KME, SAEs that cannot reach each other.
    """
    if not isinstance(data, Mapping):
        raise TopologyError("a topology must be a table/object at top level")
    _check_keys(data, _TOP_KEYS, "topology")
    top_name = _string(data.get("name", name or "topology"), "topology name")
    _require(0 < len(top_name) <= 64, "topology name must have 1 to 64 characters")
    description = _string(data.get("description", ""), "description")
    _string(data.get("source", ""), "source")
    max_hop: float | None = None
    if "max_hop_km" in data:
        max_hop = _number(data["max_hop_km"], "max_hop_km")
        _require(max_hop > 0, "max_hop_km must be positive")

    raw_nodes = data.get("nodes")
    _require(isinstance(raw_nodes, list) and bool(raw_nodes), "nodes must be a non-empty list")
    assert isinstance(raw_nodes, list)
    _require(len(raw_nodes) <= MAX_NODES, f"too many nodes (> {MAX_NODES})")
    nodes: dict[str, Node] = {}
    sae_nodes: dict[str, str] = {}
    for index, entry in enumerate(raw_nodes):
        node = _parse_node(index, entry)
        _require(node.name not in nodes, f"duplicate node {node.name!r}")
        nodes[node.name] = node
        for sae in node.saes:
            _require(
                sae not in sae_nodes,
                f"duplicate SAE {sae!r} (on nodes {sae_nodes.get(sae)!r} and {node.name!r})",
            )
            sae_nodes[sae] = node.name

    raw_links = data.get("links", [])
    _require(isinstance(raw_links, list), "links must be a list")
    _require(len(raw_links) <= MAX_LINKS, f"too many links (> {MAX_LINKS})")
    links: dict[str, Link] = {}
    pairs: dict[frozenset[str], str] = {}
    adjacency: dict[str, list[Link]] = {n: [] for n in nodes}
    for index, entry in enumerate(raw_links):
        link = _parse_link(index, entry, nodes)
        _require(link.name not in links, f"duplicate link {link.name!r}")
        pair = frozenset((link.a, link.b))
        _require(
            pair not in pairs,
            f"link {link.name!r} duplicates link {pairs.get(pair)!r} ({link.a}–{link.b})",
        )
        if max_hop is not None:
            _require(
                link.length_km <= max_hop,
                f"link {link.name!r}: {link.length_km:g} km exceeds max_hop_km {max_hop:g}",
            )
        links[link.name] = link
        pairs[pair] = link.name
        adjacency[link.a].append(link)
        adjacency[link.b].append(link)

    topology = Topology(
        name=top_name,
        nodes=nodes,
        links=links,
        description=description,
        max_hop_km=max_hop,
        _adjacency={n: tuple(ls) for n, ls in adjacency.items()},
        _sae_nodes=sae_nodes,
    )
    # Every SAE must be able to reach every other SAE through the fibre.
    if sae_nodes:
        first_sae, first_node = next(iter(sae_nodes.items()))
        reachable = topology.component(first_node)
        for sae, sae_node in sae_nodes.items():
            _require(
                sae_node in reachable,
                f"SAE {sae!r} on node {sae_node!r} is disconnected from SAE {first_sae!r}",
            )
    return topology


def _decode(text: str, suffix: str, where: str) -> object:
    try:
        if suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise TopologyError(f"{where}: cannot parse: {exc}") from exc
    except RecursionError:
        raise TopologyError(f"{where}: cannot parse: nested too deeply") from None


def bundled_topologies() -> list[str]:
    """Names of the topologies shipped in ``qcall/data/topologies``."""
    folder = resources.files("qcall") / "data" / "topologies"
    return sorted(
        {
            entry.name.rsplit(".", 1)[0]
            for entry in folder.iterdir()
            if entry.name.endswith((".toml", ".json"))
        }
    )


def load_topology(name_or_path: str | Path) -> Topology:
    """Load a bundled topology by name (``beijing-hefei``) or a ``.toml``/``.json`` file.

    Raises:
        TopologyError: the file is missing, unreadable, too big or invalid.
    """
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".json"):
        folder = resources.files("qcall") / "data" / "topologies"
        for suffix in (".toml", ".json"):
            candidate = folder / f"{name_or_path}{suffix}"
            if candidate.is_file():
                text = candidate.read_text(encoding="utf-8")
                return parse_topology(_decode(text, suffix, str(name_or_path)))
        known = ", ".join(bundled_topologies())
        raise TopologyError(f"unknown topology {str(name_or_path)!r} (bundled: {known})")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TopologyError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"cannot read topology {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: not UTF-8 text") from exc
    return parse_topology(_decode(text, path.suffix, str(path)), name=path.stem)
