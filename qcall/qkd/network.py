"""The simulated QKD network: links, trusted-node relay and ETSI 014 KMEs in one process.

:class:`SimulatedNetwork` is the asyncio shell that brings a
:class:`~qcall.qkd.topology.Topology` to life on one machine:

* every link that can carry relayed key (:meth:`Topology.serving_links`) runs
  a :class:`~qcall.qkd.sim.SimulatedLink`: BB84 blocks, one after the other,
  in a worker thread. A block of ``P`` pulses stands for ``P / pulse_rate``
  seconds of the modelled device; the link deposits the block's key only
  when ``P / (pulse_rate · speedup)`` seconds of wall time have passed, so a
  link fills its buffer at the model's secret key rate times ``speedup``
  (or slower, when this machine cannot run the post-processing that fast;
  the live view shows both);
* the pure :class:`~qcall.qkd.relay.TrustedNodeRelay` holds each link's key
  at both ends and keeps the KME pool of every ordered SAE pair topped up:
  it relays a fresh key from the master SAE's node to the slave SAE's node
  and supplies it, under one new key_ID, to both KMEs;
* every KME-hosting node gets a :class:`~qcall.qkd.server.KMEServer` with
  mutual TLS (certificates from :func:`~qcall.qkd.pki.create_pki`), so any
  ETSI GS QKD 014 client reaches the simulated network exactly as it would
  reach a real device.

``DIR/network.json`` tells clients where to connect (see ``docs/relay.md``).
An eavesdropper (:meth:`SimulatedNetwork.set_eavesdropper`) makes the link's
next blocks fail parameter estimation (:class:`~qcall.exceptions.LinkAlarmError`):
the relay stops using the link and every pair whose default route crosses it
shows the alarm in its KME Status ``status_extension``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qcall.config import atomic_write
from qcall.exceptions import (
    ConfigError,
    LinkAlarmError,
    QKDError,
    RelayError,
)
from qcall.qkd.kme import KME, PoolRole
from qcall.qkd.kmestore import DurableKME, commit_all
from qcall.qkd.netparts import (
    MAX_RETRY_SECONDS,
    BlockResult,
    KeyRouteLog,
    LinkFactory,
    LinkRuntime,
    LinkSimulator,
    PairRuntime,
    SAECredentials,
    default_link_factory,
    kme_id_for,
    modelled_seconds,
    pct,
    result_qber,
)
from qcall.qkd.pki import create_pki, server_ssl_context
from qcall.qkd.relay import TrustedNodeRelay
from qcall.qkd.server import KMEServer
from qcall.qkd.topology import Topology, load_topology

__all__ = [
    "MAX_RETRY_SECONDS",
    "LinkSimulator",
    "SAECredentials",
    "SimulatedNetwork",
    "default_link_factory",
    "kme_id_for",
]

#: Old private name, kept for :mod:`qcall.qkd.site`.
_LinkRuntime = LinkRuntime

logger = logging.getLogger(__name__)

#: Name of the file written in the state directory.
NETWORK_FILE = "network.json"


class SimulatedNetwork:
    """A running simulated QKD network; use :meth:`start` as an async context manager.

    Args:
        topology: the network (or the name/path of a topology file).
        state_dir: where the PKI and ``network.json`` are written.
        host: address the KME servers listen on.
        speedup: factor applied to the model's key rate (wall time per block
            is the modelled time divided by ``speedup``).
        key_size: bits per relayed key (the KMEs' key size).
        pool_target: keys per ordered SAE pair that the relay keeps in the KMEs.
        link_capacity_bits: link key buffered per link end before the link idles.
        link_factory: builds each link's simulator (default: real BB84).
        seed: base seed of the link simulators (None: fresh randomness).
        workers: threads running BB84 blocks.
        relay_interval: seconds between relay top-up rounds.
        durable_kmes: keep every KME's pools in ``state_dir/kme/<KME ID>.state``
            (:class:`~qcall.qkd.kmestore.DurableKME`): a killed network restarts
            with every unused key, and never serves a consumed one (docs/faults.md).
        alarm_retry: seconds before a link retries after an alarmed or failed
            block; doubled after each further failure, up to 30 s.
    """

    def __init__(
        self,
        topology: Topology | str | Path,
        state_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        speedup: float = 1.0,
        key_size: int = 256,
        pool_target: int = 32,
        link_capacity_bits: int = 1 << 20,
        link_factory: LinkFactory | None = None,
        seed: int | None = None,
        workers: int | None = None,
        relay_interval: float = 0.05,
        alarm_retry: float = 1.0,
        durable_kmes: bool = False,
    ) -> None:
        if not isinstance(topology, Topology):
            topology = load_topology(topology)
        if not speedup > 0:
            raise ConfigError("speedup must be positive")
        if key_size <= 0 or key_size % 8:
            raise ConfigError("key_size must be a positive multiple of 8")
        if pool_target < 1:
            raise ConfigError("pool_target must be at least 1")
        if link_capacity_bits < key_size:
            raise ConfigError("link_capacity_bits must hold at least one key")
        self.topology = topology
        self.state_dir = Path(state_dir)
        self.host = host
        self.speedup = float(speedup)
        self.key_size = key_size
        self.pool_target = pool_target
        self.relay_interval = relay_interval
        self.durable_kmes = durable_kmes
        self.alarm_retry = alarm_retry
        self.relay = TrustedNodeRelay(topology, capacity_bits=link_capacity_bits)
        self._link_factory = link_factory
        self._seed = seed
        self._workers = workers or min(4, os.cpu_count() or 1)
        self.kmes: dict[str, KME] = {
            node: KME(kme_id_for(node), key_size=key_size) for node in topology.kme_nodes
        }
        self._servers: dict[str, KMEServer] = {}
        self._credentials: dict[str, SAECredentials] = {}
        self._links: dict[str, LinkRuntime] = {}
        self._pairs: list[PairRuntime] = []
        self.key_routes = KeyRouteLog()
        self._default_routes: dict[tuple[str, str], list[str]] = {}
        #: Keys withdrawn from the KME pools because their route lost a link.
        self.withdrawn_keys = 0
        for master in sorted(topology.sae_ids):
            for slave in sorted(topology.sae_ids):
                if master != slave:
                    self._pairs.append(
                        PairRuntime(
                            master, slave, topology.sae_node(master), topology.sae_node(slave)
                        )
                    )
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._closing = False
        self.started_at = 0.0
        self.debug = logger.isEnabledFor(logging.DEBUG)

    def __repr__(self) -> str:
        return f"SimulatedNetwork({self.topology.name!r}, kmes={len(self.kmes)})"

    # --- lifecycle -------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, topology: Topology | str | Path, state_dir: str | os.PathLike[str], **options: Any
    ) -> AsyncIterator[SimulatedNetwork]:
        """Run a network for the duration of an ``async with`` block.

        ``options`` are those of :class:`SimulatedNetwork`. Example::

            async with SimulatedNetwork.start("beijing-hefei", state) as net:
                await net.wait_ready()
                creds = net.sae_credentials("alice")
        """
        net = cls(topology, state_dir, **options)
        await net.open()
        try:
            yield net
        finally:
            await net.close()

    async def open(self) -> None:
        """Create the PKI, start the KME servers and the link and relay tasks.

        Raises:
            ConfigError: the state directory or the PKI cannot be written.
            OSError: a KME server cannot listen on ``host``.
        """
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.state_dir}: {exc.strerror}") from exc
        if self.durable_kmes:
            self._open_durable_kmes()
        loop = asyncio.get_running_loop()
        pki = await loop.run_in_executor(
            None,
            create_pki,
            self.state_dir / "pki",
            [kme.kme_id for kme in self.kmes.values()],
            self.topology.sae_ids,
        )
        self.started_at = time.monotonic()
        for pair in self._pairs:
            self._add_pools(pair)
        try:
            for node, kme in self.kmes.items():
                paths = pki.kmes[kme.kme_id]
                ctx = server_ssl_context(paths.cert, paths.key, pki.ca_cert)
                server = KMEServer(kme, self.host, 0, ctx)
                await server.start()
                self._servers[node] = server
        except BaseException:
            await self._close_servers()
            raise
        for sae in self.topology.sae_ids:
            node = self.topology.sae_node(sae)
            paths = pki.saes[sae]
            self._credentials[sae] = SAECredentials(
                sae_id=sae,
                node=node,
                kme_id=kme_id_for(node),
                url=self._url(node),
                cert=paths.cert,
                key=paths.key,
                ca=pki.ca_cert,
            )
        self._write_network_file()

        factory = self._link_factory or default_link_factory()
        serving = self.topology.serving_links()
        for index, link in enumerate(self.topology.links.values()):
            sim = None
            if link.name in serving:
                seed = None if self._seed is None else self._seed * 100_003 + index
                sim = factory(link, seed)
            runtime = LinkRuntime(link, sim)
            if sim is not None:
                runtime.model_rate = sim.expected_secret_key_rate()
            self._links[link.name] = runtime
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="qkd-link")
        for runtime in self._links.values():
            if runtime.sim is not None:
                self._tasks.append(asyncio.create_task(self._link_loop(runtime)))
        self._tasks.append(asyncio.create_task(self._relay_loop()))
        logger.info(
            "= network %s: %d KMEs, %d active links",
            self.topology.name,
            len(self.kmes),
            sum(1 for r in self._links.values() if r.sim is not None),
        )

    async def close(self) -> None:
        """Stop every task and server; safe to call twice."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._close_servers()
        for kme in self.kmes.values():
            if isinstance(kme, DurableKME):
                kme.close()
        if self._executor is not None:
            # Blocks already running finish in their thread; nothing waits for them.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _open_durable_kmes(self) -> None:
        kme_dir = self.state_dir / "kme"
        try:
            kme_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {kme_dir}: {exc.strerror}") from exc
        for node, kme in list(self.kmes.items()):
            if not isinstance(kme, DurableKME):
                path = kme_dir / f"{kme.kme_id}.state"
                self.kmes[node] = DurableKME.open(path, kme.kme_id, key_size=self.key_size)

    async def _close_servers(self) -> None:
        for server in self._servers.values():
            await server.close()
        self._servers.clear()

    def _add_pools(self, pair: PairRuntime) -> None:
        master_kme = self.kmes[pair.master_node]
        slave_kme = self.kmes[pair.slave_node]
        if master_kme is slave_kme:
            master_kme.add_pair(pair.master, pair.slave, PoolRole.LOCAL)
        else:
            master_kme.add_pair(
                pair.master, pair.slave, PoolRole.MASTER, peer_kme_id=slave_kme.kme_id
            )
            slave_kme.add_pair(
                pair.master, pair.slave, PoolRole.SLAVE, peer_kme_id=master_kme.kme_id
            )

    def _write_network_file(self) -> None:
        doc = {
            "topology": self.topology.name,
            "description": self.topology.description,
            "speedup": self.speedup,
            "key_size": self.key_size,
            "ca_cert": str(self.state_dir / "pki" / "ca.pem"),
            "kmes": {
                kme.kme_id: {
                    "node": node,
                    "url": self._url(node),
                    "saes": list(self.topology.nodes[node].saes),
                }
                for node, kme in self.kmes.items()
            },
            "saes": {
                sae: {
                    "sae_id": c.sae_id,
                    "node": c.node,
                    "kme_id": c.kme_id,
                    "url": c.url,
                    "cert": str(c.cert),
                    "key": str(c.key),
                    "ca": str(c.ca),
                }
                for sae, c in self._credentials.items()
            },
        }
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.network_file, text.encode(), mode=0o644)

    def _url(self, node: str) -> str:
        """URL of a node's KME as clients should use it.

        A wildcard listen address (``0.0.0.0``, ``::``) is advertised as the
        loopback address, which the KME certificates name.
        """
        port = self._servers[node].port
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    @property
    def network_file(self) -> Path:
        """Path of ``network.json``."""
        return self.state_dir / NETWORK_FILE

    # --- queries -----------------------------------------------------------------------

    def kme_url(self, node_or_kme_id: str) -> str:
        """Return the base URL of a node's KME (by node name or KME ID).

        Raises:
            ConfigError: the node hosts no KME, or the network is not running.
        """
        for node, kme in self.kmes.items():
            if node_or_kme_id in (node, kme.kme_id) and node in self._servers:
                return self._url(node)
        raise ConfigError(f"no running KME at {node_or_kme_id!r}")

    def sae_credentials(self, sae_id: str) -> SAECredentials:
        """Return the URL, certificate, key and CA files of an SAE.

        Raises:
            ConfigError: unknown SAE, or the network is not running.
        """
        try:
            return self._credentials[sae_id]
        except KeyError:
            raise ConfigError(f"no SAE {sae_id!r} in the running network") from None

    def route(self, sae_a: str, sae_b: str) -> list[str]:
        """Return the route (node names) that keys from ``sae_a`` to ``sae_b`` take.

        The route of the last relayed key if there was one, else the
        fewest-hop route avoiding alarmed links.

        Raises:
            TopologyError: unknown SAE.
            RelayError: every route crosses an alarmed link.
        """
        source, target = self.topology.sae_node(sae_a), self.topology.sae_node(sae_b)
        for pair in self._pairs:
            if (pair.master, pair.slave) == (sae_a, sae_b) and pair.last_route:
                return list(pair.last_route)
        return self.relay.live_route(source, target)

    def cut_link(self, link: str, cut: bool = True) -> None:
        """Cut the fibre of ``link`` (or repair it, with ``cut=False``).

        A cut link stops producing key and carries no relayed key; keys in
        the KME pools that were relayed over it are withdrawn where the pair
        has another route, so its next key (a call's next rekey) takes that
        route (:meth:`_withdraw_over`).

        Raises:
            TopologyError: unknown link.
        """
        name = self.topology.link(link).name
        self.relay.set_cut(name, cut)
        self._links[name].last_error = "fibre cut" if cut else None
        logger.info("! link %s %s", name, "cut" if cut else "repaired")
        if cut:
            self._withdraw_over(name)
        self._update_alarms()
        self._changed.set()

    def _withdraw_over(self, link: str) -> None:
        """Withdraw the pool keys relayed over ``link`` of every pair that has another route.

        Withdrawn keys are erased at both KMEs before any SAE received a byte
        of them (:meth:`KME.withdraw`), so the pair's next key — a call's
        next rekey — is relayed over a route without ``link``. A pair with no
        other route keeps them: they were distilled before the alarm or the
        cut, from blocks that passed parameter estimation.
        """
        for (master, slave), key_ids in self.key_routes.crossing(link).items():
            pair = next(p for p in self._pairs if (p.master, p.slave) == (master, slave))
            try:
                self.relay.live_route(pair.master_node, pair.slave_node)
            except RelayError:
                # No other route: keep the keys (each block they came from passed
                # parameter estimation before the alarm); the relay stops.
                continue
            gone = self.kmes[pair.master_node].withdraw(master, slave, key_ids)
            if pair.slave_node != pair.master_node:
                self.kmes[pair.slave_node].withdraw(master, slave, gone)
            self.key_routes.forget(master, slave, key_ids)
            pair.withdrawn += len(gone)
            self.withdrawn_keys += len(gone)
            if gone:
                logger.info(
                    "! %s->%s: %d keys relayed over %s withdrawn", master, slave, len(gone), link
                )

    def set_eavesdropper(self, link: str, fraction: float = 1.0) -> None:
        """Switch an intercept-resend eavesdropper on (or off, with 0) on ``link``.

        Raises:
            TopologyError: unknown link.
            ConfigError: the link is not simulated (it serves no route) or
                ``fraction`` is outside [0, 1].
        """
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"eavesdropper fraction must be in [0, 1], not {fraction}")
        runtime = self._links[self.topology.link(link).name]
        if runtime.sim is None:
            raise ConfigError(f"link {runtime.link.name!r} carries no relayed key; not simulated")
        runtime.sim.set_eavesdropper(fraction)
        runtime.eve_fraction = fraction
        logger.info("! eavesdropper on link %s: fraction %.2f", runtime.link.name, fraction)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every ordered SAE pair has at least one key in its KMEs.

        Raises:
            TimeoutError: not ready within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``predicate()`` is true; it is checked after each link or relay event.

        Raises:
            TimeoutError: not true within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def pair_status(self, master: str, slave: str) -> dict[str, Any]:
        """Status of one ordered SAE pair (keys delivered, route, error, alarm)."""
        for pair in self._pairs:
            if (pair.master, pair.slave) == (master, slave):
                return self._pair_json(pair)
        raise ConfigError(f"no SAE pair {master!r} -> {slave!r}")

    def status(self) -> dict[str, Any]:
        """Return a JSON-able snapshot: links, pairs, KMEs (no key bytes)."""
        now = time.monotonic()
        links = {}
        for name, runtime in self._links.items():
            buf = self.relay.buffers[name]
            links[name] = {
                "length_km": runtime.link.length_km,
                "active": runtime.sim is not None,
                "fidelity": getattr(runtime.sim, "fidelity", "protocol") if runtime.sim else None,
                "state": buf.state.name,
                "qber": runtime.qber,
                "model_rate_bps": runtime.model_rate,
                "target_rate_bps": runtime.model_rate * self.speedup,
                "rate_bps": runtime.rate(now),
                "available_bits": buf.available_bits,
                "consumed_bits": buf.consumed_bits,
                "deposited_bits": buf.deposited_bits,
                "relayed_keys": buf.relayed_keys,
                "blocks": runtime.blocks,
                "alarms": runtime.alarms,
                "eve_fraction": runtime.eve_fraction,
                "error": runtime.last_error,
            }
        return {
            "topology": self.topology.name,
            "uptime_s": now - self.started_at if self.started_at else 0.0,
            "speedup": self.speedup,
            "links": links,
            "pairs": [self._pair_json(p) for p in self._pairs],
            "withdrawn_keys": self.withdrawn_keys,
            "key_usage": self.key_usage(),
        }

    def key_usage(self) -> list[dict[str, Any]]:
        """Key handed out by every KME, per application and SAE pair, with the pair's route.

        Rows of :meth:`qcall.qkd.kme.KME.usage` plus ``"kme"`` (the counting
        KME's ID) and ``"route"`` (the node names of the pair's last relayed
        key, or None). Both KMEs of a pair count: the master's ``enc_keys``
        and the slave's ``dec_keys``.
        """
        routes = {(p.master, p.slave): p.last_route for p in self._pairs}
        rows: list[dict[str, Any]] = []
        for kme in self.kmes.values():
            for row in kme.usage():
                route = routes.get((row["master"], row["slave"]))
                rows.append({**row, "kme": kme.kme_id, "route": list(route) if route else None})
        return rows

    def _pair_json(self, pair: PairRuntime) -> dict[str, Any]:
        master_kme = self.kmes[pair.master_node]
        return {
            "master": pair.master,
            "slave": pair.slave,
            "stored_keys": master_kme.stored_key_count(pair.master, pair.slave),
            "delivered": pair.delivered,
            "route": list(pair.last_route) if pair.last_route else None,
            "error": pair.error,
            "failed_hop": pair.failed_hop,
            "alarm": pair.alarm,
            "withdrawn": pair.withdrawn,
        }

    def links_view(self) -> Iterable[LinkRuntime]:
        """The link runtimes, in topology order (for live displays)."""
        return self._links.values()

    # --- link tasks -----------------------------------------------------------------------

    async def _link_loop(self, runtime: LinkRuntime) -> None:
        assert runtime.sim is not None
        sim = runtime.sim
        name = runtime.link.name
        buf = self.relay.buffers[name]
        loop = asyncio.get_running_loop()
        failed_in_a_row = 0
        while True:
            # A full buffer idles a protocol link (it saves a core); a model link
            # costs nothing and keeps running, so its QBER watch never pauses.
            model = getattr(sim, "fidelity", "protocol") == "model"
            if buf.cut or (buf.space_bits == 0 and not model):
                await asyncio.sleep(self.relay_interval)
                continue
            started = time.monotonic()
            result: BlockResult | None = None
            try:
                assert self._executor is not None
                if model:
                    result = sim.run_block()  # tens of microseconds: no thread needed
                else:
                    result = await loop.run_in_executor(self._executor, sim.run_block)
            except LinkAlarmError as exc:
                runtime.alarms += 1
                runtime.qber = exc.qber
                runtime.last_error = "eavesdropper alarm"
                first = not buf.alarmed
                self.relay.set_alarm(name, exc.qber)
                if first:
                    logger.warning("! link %s alarm: QBER %s", name, pct(exc.qber))
                    self._withdraw_over(name)  # each pair's next key takes another route
                self._update_alarms()  # KME Status shows it from now on
            except QKDError as exc:
                # A lost block (PostProcessingError), or no authentication key left
                # (KeyExhaustedError): key already buffered stays good.
                runtime.failures += 1
                runtime.last_error = f"{type(exc).__name__}: {exc}"[:120]
                logger.info("! link %s block failed: %s", name, exc)
            except Exception:
                if self._closing:  # the executor was shut down under us
                    return
                logger.exception("! link %s stopped", name)
                runtime.last_error = "internal error; link stopped"
                return
            runtime.blocks += 1
            # The block stands for its modelled duration; wait for it, divided by speedup.
            wait = modelled_seconds(sim, result) / self.speedup
            if result is None:
                # Back off after failed blocks: an attacked link spends authentication
                # key on every aborted block and must not burn it all at once.
                failed_in_a_row += 1
                backoff = self.alarm_retry * 2 ** min(failed_in_a_row - 1, 16)
                wait = max(wait, min(backoff, MAX_RETRY_SECONDS))
            else:
                failed_in_a_row = 0
            remaining = started + wait - time.monotonic()
            if model and buf.space_bits == 0:
                remaining = max(remaining, self.relay_interval)  # only watching the QBER
            # Always yield: a model block may stand for less time than it took.
            await asyncio.sleep(max(0.0, remaining))
            if result is not None:
                qber = result_qber(result)
                runtime.qber = qber
                runtime.last_error = None
                if buf.alarmed:
                    logger.info("= link %s delivers again", name)
                    self.relay.clear_alarm(name, qber)
                    self._update_alarms()
                else:
                    buf.qber = qber
                # Alice of the BB84 link is end ``a``, Bob is end ``b``.
                stored = buf.deposit(result.alice_key, result.bob_key)
                runtime.history.append((time.monotonic(), stored))
            self._changed.set()

    # --- relay task -------------------------------------------------------------------------

    async def _relay_loop(self) -> None:
        while True:
            moved = self.top_up()
            if moved and self.durable_kmes:
                await commit_all(self.kmes.values())  # relayed keys on disk
            self._update_alarms()
            if all(p.delivered > 0 for p in self._pairs):
                self._ready.set()
            self._changed.set()  # wake wait_for(): pair errors and alarms may have changed
            await asyncio.sleep(0 if moved else self.relay_interval)

    def top_up(self, max_keys: int = 64) -> int:
        """Relay keys until every pair's pool holds ``pool_target`` keys (at most ``max_keys``).

        Returns:
            The number of keys relayed and supplied.
        """
        size = self.key_size // 8
        moved = 0
        # Emptiest pools first, then round robin, one key per pair per round, so
        # no pair starves the others (with hundreds of pairs, ``max_keys`` stops
        # a call before every pair had its turn).
        wanting = sorted(
            self._pairs,
            key=lambda p: self.kmes[p.master_node].stored_key_count(p.master, p.slave),
        )
        while wanting and moved < max_keys:
            still: list[PairRuntime] = []
            for pair in wanting:
                if moved < max_keys and self._relay_one(pair, size):
                    moved += 1
                    still.append(pair)
            wanting = still
        return moved

    def _relay_one(self, pair: PairRuntime, size: int) -> bool:
        """Relay one key for ``pair`` if its pools want one; return whether it did."""
        master_kme = self.kmes[pair.master_node]
        slave_kme = self.kmes[pair.slave_node]
        if (
            master_kme.stored_key_count(pair.master, pair.slave) >= self.pool_target
            or master_kme.free(pair.master, pair.slave) < 1
            or slave_kme.free(pair.master, pair.slave) < 1
        ):
            return False
        try:
            relayed = self.relay.relay(pair.master_node, pair.slave_node, size)
        except RelayError as exc:
            if pair.error != str(exc):
                level = logging.WARNING if exc.hop in self.relay.alarmed_links else logging.INFO
                logger.log(level, "! %s->%s: %s", pair.master, pair.slave, exc)
            pair.error, pair.failed_hop = str(exc), exc.hop
            return False
        key_id = str(uuid.uuid4())
        if master_kme is slave_kme:
            master_kme.supply(
                pair.master, pair.slave, [(key_id, relayed.key_at_source)], role="local"
            )
        else:
            master_kme.supply(
                pair.master,
                pair.slave,
                [(key_id, relayed.key_at_source)],
                role="master",
                peer_kme_id=slave_kme.kme_id,
            )
            slave_kme.supply(
                pair.master,
                pair.slave,
                [(key_id, relayed.key_at_destination)],
                role="slave",
                peer_kme_id=master_kme.kme_id,
            )
        if self.debug:
            logger.debug(
                "> %s->%s key %s via %d hops", pair.master, pair.slave, key_id, len(relayed.hops)
            )
        pair.delivered += 1
        pair.last_route = relayed.route
        self.key_routes.record(pair.master, pair.slave, key_id, (h.link for h in relayed.hops))
        pair.error = pair.failed_hop = None
        return True

    def _default_hops(self, pair: PairRuntime) -> list[str]:
        """Link names of the pair's fewest-hop route (cached: it ignores link state)."""
        key = (pair.master_node, pair.slave_node)
        hops = self._default_routes.get(key)
        if hops is None:
            default = self.relay.default_route(*key) or []
            hops = [link.name for link in self.topology.path_links(default)]
            self._default_routes[key] = hops
        return hops

    def _update_alarms(self) -> None:
        """Show link alarms and cuts in the Status of the KMEs of every affected pair."""
        down = set(self.relay.down_links)
        for pair in self._pairs:
            text: str | None = None
            qber: float | None = None
            if down:
                hit = [h for h in self._default_hops(pair) if h in down]
                if pair.last_route:
                    used = self.topology.path_links(list(pair.last_route))
                    hit += [h.name for h in used if h.name in down and h.name not in hit]
                if hit:
                    link = hit[0]
                    try:
                        live = self.relay.live_route(pair.master_node, pair.slave_node)
                    except RelayError as exc:
                        link = exc.hop or link
                        what = self._what(link)
                        text = f"{what} link {link}; relay stopped"
                    else:
                        what = self._what(link)
                        text = f"{what} link {link}; rerouted ({len(live) - 1} hops)"
                    qber = self.relay.buffers[link].qber
            if text != pair.alarm:
                pair.alarm = text
                for node in {pair.master_node, pair.slave_node}:
                    self.kmes[node].set_alarm(pair.master, pair.slave, text, qber=qber)

    def _what(self, link: str) -> str:
        return "fibre cut on" if self.relay.buffers[link].cut else "eavesdropper alarm on"
