"""One site of a simulated QKD network split across two hosts.

:class:`~qcall.qkd.network.SimulatedNetwork` runs a whole topology in one
process. For a call between two machines, each machine runs only its own
part: the topology is cut at one **split link** whose removal leaves two
connected parts, and :class:`NetworkSite` runs one of them — its nodes, the
links between them, its KMEs — plus its end of the split link. The two sites
share one TCP connection (mutual TLS with the KMEs' certificates) that
carries, in the frames of :mod:`qcall.qkd.sitewire`:

* the split link's BB84: the transmitter site (the link's ``a`` end) runs
  the optical model and :class:`~qcall.qkd.sim.link.AliceEnd`, the receiver
  site runs :class:`~qcall.qkd.sim.link.BobEnd`; Bob's detector record and
  every post-processing message cross the wire, authenticated by the
  link's pre-shared key (``PSK``: 32-byte MAC key and 4096 bytes of
  one-time pad, provisioned on both hosts like a real link's initial
  authentication key), ending each block with Wegman–Carter tags;
* the trusted-node relay across it: a key for an SAE pair whose master is
  on this site is drawn at the master's node, relayed over local links to
  the split link, sent across as ``K ⊕ pad`` with an HMAC keyed by link key,
  relayed on at the other site to the slave's node, and stored under one
  key_ID in both KMEs once the other site confirms (docs/relay.md,
  "Two hosts").

Example (one process per host)::

    async with NetworkSite.start("beijing-hefei", "Jinan-Taian", "Beijing", state,
                                 pki_dir=bundle / "pki", psk_file=psk,
                                 listen=("0.0.0.0", 7400)) as site:
        await site.wait_ready()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qcall.config import atomic_write
from qcall.exceptions import ConfigError, QKDError, RelayError, SiteLinkError
from qcall.qkd.kme import PoolRole
from qcall.qkd.network import (
    MAX_RETRY_SECONDS,
    SAECredentials,
    SimulatedNetwork,
    _LinkRuntime,
    default_link_factory,
    kme_id_for,
)
from qcall.qkd.pki import client_ssl_context, server_ssl_context
from qcall.qkd.relay import xor_bytes
from qcall.qkd.server import KMEServer
from qcall.qkd.sim.bb84 import OpticalLayer
from qcall.qkd.sim.channel import ALICE, BOB, TAG_BITS, ChannelEnd
from qcall.qkd.sim.link import Abort
from qcall.qkd.sim.model import LinkParams
from qcall.qkd.sitelink import (
    PEER_TIMEOUT,
    PSK_BYTES,
    BlockEnd,
    CrossPair,
    SiteConnection,
    SplitLinkState,
    alice_block,
    bob_block,
    create_psk,
    split_sides,
)
from qcall.qkd.sitewire import (
    PROTOCOL_VERSION,
    FrameReader,
    Hello,
    Optics,
    PadBook,
    RelayKey,
    RelayResult,
    SiteMessage,
    encode_frame,
)
from qcall.qkd.topology import Topology, load_topology

__all__ = ["PSK_BYTES", "NetworkSite", "create_psk", "split_sides"]

logger = logging.getLogger(__name__)

#: Bytes of link key per relayed key beyond the key itself: the hop's HMAC key.
MAC_KEY_BYTES = 32


class NetworkSite(SimulatedNetwork):
    """One host's part of a split topology; use :meth:`start` as an async context manager.

    Args:
        topology: the whole network (name or path, or a :class:`Topology`).
        split: the link between the two sites (its ``a`` end is the BB84 transmitter).
        site: any node of this site's part (e.g. ``Beijing``).
        state_dir: where ``network.json`` is written.
        pki_dir: CA and KME/SAE certificates (``qcall pki init``), the same CA on both hosts.
        psk_file: the split link's pre-shared secret (:func:`create_psk`), same on both hosts.
        listen: ``(host, port)`` to accept the other site on, or
        connect: ``(host, port)`` of the other site (exactly one of the two).
        tls: mutual TLS on the site link with this site's KME certificate.
        link_delay: seconds each outgoing frame is held (user-space one-way delay).
        link_overrides: :class:`~qcall.qkd.sim.LinkParams` fields for every link.
        options: the other :class:`~qcall.qkd.network.SimulatedNetwork` options.
    """

    def __init__(
        self,
        topology: Topology | str | Path,
        split: str,
        site: str,
        state_dir: str | os.PathLike[str],
        *,
        pki_dir: str | os.PathLike[str],
        psk_file: str | os.PathLike[str],
        listen: tuple[str, int] | None = None,
        connect: tuple[str, int] | None = None,
        tls: bool = True,
        link_delay: float = 0.0,
        link_overrides: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(topology, Topology):
            topology = load_topology(topology)
        if (listen is None) == (connect is None):
            raise ConfigError("give exactly one of listen and connect")
        if options.get("durable_kmes"):
            # Not silently ignored: a site would need to commit both KMEs' pools
            # across two hosts before confirming a relay (not implemented).
            raise ConfigError("durable KMEs are not supported by network sites")
        if site not in topology.nodes:
            raise ConfigError(f"site node {site!r} is not in topology {topology.name!r}")
        side_a, side_b = split_sides(topology, split)
        overrides = dict(link_overrides or {})
        options.setdefault("link_factory", default_link_factory(**overrides))
        super().__init__(topology, state_dir, **options)
        self.split = topology.link(split)
        self.local_nodes = side_a if site in side_a else side_b
        self.remote_nodes = side_b if site in side_a else side_a
        self.transmitter = self.split.a in self.local_nodes
        self.border = self.split.a if self.transmitter else self.split.b
        self.remote_border = self.split.other(self.border)
        self.out_direction, self.in_direction = ("ab", "ba") if self.transmitter else ("ba", "ab")
        local_kmes = [n for n in topology.kme_nodes if n in self.local_nodes]
        remote_kmes = [n for n in topology.kme_nodes if n in self.remote_nodes]
        if not local_kmes or not remote_kmes:
            raise ConfigError(f"each side of {self.split.name!r} needs a KME node")
        self.identity_kme = kme_id_for(local_kmes[0])
        self.peer_kme = kme_id_for(remote_kmes[0])
        self.kmes = {n: k for n, k in self.kmes.items() if n in self.local_nodes}
        all_pairs = self._pairs
        self._pairs = [
            p
            for p in all_pairs
            if p.master_node in self.local_nodes and p.slave_node in self.local_nodes
        ]
        self.cross_pairs = [
            CrossPair(
                p.master, p.slave, p.master_node, p.slave_node, p.master_node in self.local_nodes
            )
            for p in all_pairs
            if (p.master_node in self.local_nodes) != (p.slave_node in self.local_nodes)
        ]
        self.pki_dir = Path(pki_dir)
        self.psk_file = Path(psk_file)
        self.listen, self.connect = listen, connect
        self.tls = tls
        self.link_delay = link_delay
        self.pads = PadBook()
        self.params = LinkParams(length_km=self.split.length_km, **overrides)
        self.cross = SplitLinkState()
        self._conn: SiteConnection | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[Any]] = set()
        self._pending: dict[int, asyncio.Future[RelayResult]] = {}
        self._relay_ids = 0
        self._next_block = 0
        self._last_block = -1
        self._finished_block = -1
        self._deposited = asyncio.Event()
        seed = self._seed
        ss = np.random.SeedSequence(None if seed is None else seed * 7 + 1)
        s_opt, s_alice, s_bob = ss.spawn(3)
        self._optics = OpticalLayer(self.params, np.random.default_rng(s_opt))
        self._alice_rng = np.random.default_rng(s_alice)
        self._bob_rng = np.random.default_rng(s_bob)
        self._channel: ChannelEnd | None = None
        # The split link's protocol steps get their own thread: behind the local
        # links' BB84 blocks (seconds each) in the shared pool, its ~150 round
        # trips per block would each wait for a whole block.
        self._split_executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        side = "transmitter" if self.transmitter else "receiver"
        return f"NetworkSite({self.topology.name!r}, split={self.split.name!r}, {side})"

    @classmethod
    @contextlib.asynccontextmanager
    async def start(  # type: ignore[override]
        cls,
        topology: Topology | str | Path,
        split: str,
        site: str,
        state_dir: str | os.PathLike[str],
        **options: Any,
    ) -> AsyncIterator[NetworkSite]:
        """Run this site for the duration of an ``async with`` block."""
        net = cls(topology, split, site, state_dir, **options)
        await net.open()
        try:
            yield net
        finally:
            await net.close()

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Start the local KMEs, links and relay, and the link to the other site.

        Raises:
            ConfigError: missing certificates or PSK, or the state directory cannot be written.
            OSError: cannot listen.
        """
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            psk = self.psk_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{exc.filename}: {exc.strerror}") from exc
        if len(psk) != PSK_BYTES:
            raise ConfigError(f"{self.psk_file}: a split-link PSK has {PSK_BYTES} bytes")
        self._channel = ChannelEnd(ALICE if self.transmitter else BOB, psk[:32], psk[32:])
        ca = self._pki_file("ca.pem")
        self.started_at = time.monotonic()
        for pair in self._pairs:
            self._add_pools(pair)
        for cp in self.cross_pairs:
            node = cp.master_node if cp.outgoing else cp.slave_node
            other = cp.slave_node if cp.outgoing else cp.master_node
            role = PoolRole.MASTER if cp.outgoing else PoolRole.SLAVE
            self.kmes[node].add_pair(cp.master, cp.slave, role, peer_kme_id=kme_id_for(other))
        try:
            for node, kme in self.kmes.items():
                ctx = server_ssl_context(
                    self._pki_file(f"kme/{kme.kme_id}.pem"),
                    self._pki_file(f"kme/{kme.kme_id}.key"),
                    ca,
                )
                server = KMEServer(kme, self.host, 0, ctx)
                await server.start()
                self._servers[node] = server
        except BaseException:
            await self._close_servers()
            raise
        for sae in self.topology.sae_ids:
            node = self.topology.sae_node(sae)
            if node in self.local_nodes:
                self._credentials[sae] = SAECredentials(
                    sae, node, kme_id_for(node), self._url(node),
                    self._pki_file(f"sae/{sae}.pem"), self._pki_file(f"sae/{sae}.key"), ca,
                )  # fmt: skip
        self._write_site_file()
        serving = self.topology.serving_links()
        factory = self._link_factory or default_link_factory()
        for index, link in enumerate(self.topology.links.values()):
            if link.a in self.local_nodes and link.b in self.local_nodes:
                sim = None
                if link.name in serving:
                    sim = factory(
                        link, None if self._seed is None else self._seed * 100_003 + index
                    )
                runtime = _LinkRuntime(link, sim)
                if sim is not None:
                    runtime.model_rate = sim.expected_secret_key_rate()
                self._links[link.name] = runtime
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="qkd-link")
        self._split_executor = ThreadPoolExecutor(1, thread_name_prefix="qkd-split")
        for runtime in self._links.values():
            if runtime.sim is not None:
                self._tasks.append(asyncio.create_task(self._link_loop(runtime)))
        self._tasks.append(asyncio.create_task(self._site_relay_loop()))
        if self.listen is not None:
            ssl_ctx = self._ssl(server=True)
            self._server = await asyncio.start_server(
                self._accept, self.listen[0], self.listen[1], ssl=ssl_ctx
            )
        else:
            self._tasks.append(asyncio.create_task(self._connect_loop()))
        logger.info("= site %s of %s: %d KMEs, %d local links, split link %s",
                    self.border, self.topology.name, len(self.kmes), len(self._links),
                    self.split.name)  # fmt: skip

    async def close(self) -> None:
        """Stop the site link, the tasks and the KME servers; safe to call twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._conn is not None:
            self._conn.writer.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        await super().close()
        if self._split_executor is not None:
            self._split_executor.shutdown(wait=False, cancel_futures=True)
            self._split_executor = None

    @property
    def is_ready(self) -> bool:
        """Whether every pair of this site has had a key (see :meth:`wait_ready`)."""
        return self._ready.is_set()

    @property
    def listen_port(self) -> int:
        """The port accepting the other site (with ``listen``)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _pki_file(self, name: str) -> Path:
        path = self.pki_dir / name
        if not path.exists():
            raise ConfigError(f"{path} is missing (qcall pki init / qcall network-site init)")
        return path

    def _ssl(self, *, server: bool) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        args = (
            self._pki_file(f"kme/{self.identity_kme}.pem"),
            self._pki_file(f"kme/{self.identity_kme}.key"),
            self._pki_file("ca.pem"),
        )
        return server_ssl_context(*args) if server else client_ssl_context(*args)

    def _write_site_file(self) -> None:
        doc = {
            "topology": self.topology.name,
            "site": sorted(self.local_nodes),
            "split_link": self.split.name,
            "speedup": self.speedup,
            "key_size": self.key_size,
            "ca_cert": str(self._pki_file("ca.pem")),
            "kmes": {kme.kme_id: {"node": node, "url": self._url(node), "saes": sorted(kme.saes)}
                     for node, kme in self.kmes.items()},
            "saes": {sae: {"sae_id": c.sae_id, "node": c.node, "kme_id": c.kme_id, "url": c.url,
                           "cert": str(c.cert), "key": str(c.key), "ca": str(c.ca)}
                     for sae, c in self._credentials.items()},
        }  # fmt: skip
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.network_file, text.encode(), mode=0o644)

    # --- the connection to the other site ------------------------------------------------

    async def _connect_loop(self) -> None:
        assert self.connect is not None
        host, port = self.connect
        retry = 0.2
        while True:
            try:
                ctx = self._ssl(server=False)
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=self.peer_kme.lower() if ctx else None
                )
            except (OSError, ssl.SSLError) as exc:
                self.cross.error = f"cannot reach the other site: {exc}"[:160]
                await asyncio.sleep(retry)
                retry = min(2 * retry, 5.0)
                continue
            retry = 0.2
            await self._session(reader, writer)
            await asyncio.sleep(retry)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._conn is not None:
            logger.warning("! a second site connection refused")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)  # close() cancels it
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            # close() ended it. End quietly: asyncio's stream callback logs a
            # handler task that ends cancelled as an error (Python 3.11).
            pass
        finally:
            self._sessions.discard(task)

    def _check_peer_certificate(self, writer: asyncio.StreamWriter) -> None:
        if not self.tls:
            return
        cert = writer.get_extra_info("peercert") or {}
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        if names != [self.peer_kme]:
            raise SiteLinkError(f"the other site presents {names}, not {self.peer_kme!r}")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one connection: hello, then the split link and relay hops until it fails."""
        conn = SiteConnection(writer, self.link_delay)
        tasks: list[asyncio.Task[None]] = []
        try:
            self._check_peer_certificate(writer)
            frames = FrameReader()
            assert self._channel is not None
            ch = self._channel
            writer.write(encode_frame(Hello(PROTOCOL_VERSION, self.topology.name, self.split.name,
                                            self.border, ch.send_seq, ch.recv_seq)))  # fmt: skip
            hello = None
            async with asyncio.timeout(PEER_TIMEOUT):
                while hello is None:
                    data = await reader.read(65536)
                    if not data:
                        raise SiteLinkError("the other site closed the connection")
                    messages = frames.feed(data)
                    if messages:
                        hello = messages.pop(0)
                        for extra in messages:
                            self._dispatch(conn, extra)
            if not isinstance(hello, Hello):
                raise SiteLinkError("the other site did not start with Hello")
            if hello.version != PROTOCOL_VERSION:
                raise SiteLinkError(f"Hello.version {hello.version} unsupported")
            if (hello.topology, hello.split, hello.node) != (
                self.topology.name,
                self.split.name,
                self.remote_border,
            ):
                raise SiteLinkError(
                    f"the other site runs {hello.topology!r}/{hello.split!r} at {hello.node!r}; "
                    f"expected {self.topology.name!r}/{self.split.name!r} at {self.remote_border!r}"
                )
            # Counters only move forward: frames of an aborted block cannot be replayed.
            ch.recv_seq = max(ch.recv_seq, hello.send_seq)
            ch.send_seq = max(ch.send_seq, hello.recv_seq)
            ch.reset_transcript()
            self._conn = conn
            self.cross.connected = True
            self.cross.connections += 1
            logger.info("= site link to %s up", hello.node)
            tasks = [
                asyncio.create_task(
                    conn.read_loop(reader, frames, lambda msg: self._dispatch(conn, msg))
                ),
                asyncio.create_task(conn.write_loop()),
                asyncio.create_task(self._receive_relays(conn)),
                asyncio.create_task(
                    self._alice_loop(conn) if self.transmitter else self._bob_loop(conn)
                ),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except (QKDError, OSError, ssl.SSLError, TimeoutError) as exc:
            # SiteLinkError, PostProcessingError (incl. a failed MAC), KeyExhaustedError
            # (authentication pad spent by aborted blocks): drop the connection; the
            # next one starts a fresh block with counters moved forward.
            self.cross.error = f"{type(exc).__name__}: {exc}"[:160]
            logger.warning("! site link: %s", self.cross.error)
        finally:
            for task in tasks:
                task.cancel()
            # Not suppress(BaseException): a cancel of this task must not be swallowed.
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._conn is conn:
                self._conn = None
            self.cross.connected = False
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(RelayResult(0, False, "site link lost"))
            self._pending.clear()
            if self._channel is not None:
                self._channel.reset_transcript()
            writer.close()
            try:
                # A TLS close waits for the peer's close_notify (30 s by default):
                # a peer that is gone must not hold up a reconnection or close().
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:
                writer.transport.abort()

    def _dispatch(self, conn: SiteConnection, msg: SiteMessage) -> None:
        """Route one received message: relay hops, their answers, or the split link's BB84."""
        if isinstance(msg, RelayKey):
            conn.relays.put_nowait(msg)
        elif isinstance(msg, RelayResult):
            fut = self._pending.pop(msg.relay_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Hello):
            raise SiteLinkError("unexpected Hello")
        else:
            conn.inbox.put_nowait(msg)

    # --- the split link's BB84 ---------------------------------------------------------------

    async def _alice_loop(self, conn: SiteConnection) -> None:
        """Transmitter: one block after another, at the model's pace × speedup."""
        assert self._channel is not None and self._split_executor is not None
        cap = self.relay.buffers[self.split.name].capacity_bits or (1 << 20)
        failed_in_a_row = 0
        while True:
            if min(self.pads.available_bits("ab"), self.pads.available_bits("ba")) >= cap // 2:
                await asyncio.sleep(self.relay_interval)
                continue
            started = time.monotonic()
            block = self._next_block
            self._next_block += 1
            params = self.params
            end = await alice_block(conn, self._channel, self._optics, params, self._alice_rng,
                                    block, self._split_executor, self._finish_block)  # fmt: skip
            wait = params.default_block_pulses() / params.pulse_rate_hz / self.speedup
            if end.decision is Abort.ALARM:
                # Each aborted block spends authentication pad: back off as the
                # single-process network does (docs/relay.md, "Failed blocks").
                failed_in_a_row += 1
                backoff = self.alarm_retry * 2 ** min(failed_in_a_row - 1, 16)
                wait = max(wait, min(backoff, MAX_RETRY_SECONDS))
            else:
                failed_in_a_row = 0
            remaining = started + wait - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)

    async def _bob_loop(self, conn: SiteConnection) -> None:
        """Receiver: each detector record that arrives starts a block."""
        assert self._channel is not None and self._split_executor is not None
        while True:
            optics = await conn.expect(Optics, None)
            if optics.block <= self._last_block:
                raise SiteLinkError(f"Optics.block {optics.block} is not new")
            self._last_block = optics.block
            await bob_block(conn, self._channel, optics, self.params, self._bob_rng,
                            self._split_executor, self._finish_block)  # fmt: skip

    def _finish_block(self, end: BlockEnd) -> None:
        """Account one authenticated block at this end: alarm, or refill the pad and deposit."""
        assert self._channel is not None
        block, decision, qber, verified, key = (
            end.block, end.decision, end.qber, end.verified, end.key
        )  # fmt: skip
        self._finished_block = block
        self.cross.blocks += 1
        self.cross.error = None  # connected and authenticated: what failed before is over
        self.cross.qber = qber
        if decision is Abort.ALARM:
            self.cross.alarms += 1
            if not self.cross.alarm:
                logger.warning("! split link %s alarm: QBER %.1f%%", self.split.name, 100 * qber)
            self.cross.alarm = True
            self._set_cross_alarm(
                f"eavesdropper alarm on link {self.split.name}; relay stopped", qber
            )
            return
        if self.cross.alarm:
            self.cross.alarm = False
            self._set_cross_alarm(None, qber)
        refill = min(len(key), (2 * TAG_BITS + 7) // 8) if verified else 0
        if refill:
            self._channel.replenish(key[:refill])
        if verified and len(key) > refill:
            self.pads.deposit(block, key[refill:])
            self._deposited.set()
        elif decision is Abort.CONTINUE and not verified:
            self.cross.failures += 1
        self._changed.set()

    def _set_cross_alarm(self, text: str | None, qber: float | None) -> None:
        for cp in self.cross_pairs:
            node = cp.master_node if cp.outgoing else cp.slave_node
            self.kmes[node].set_alarm(cp.master, cp.slave, text, qber=qber)

    def set_eavesdropper(self, link: str, fraction: float = 1.0) -> None:
        """Like :meth:`SimulatedNetwork.set_eavesdropper`; the split link's at its transmitter.

        Raises:
            ConfigError: the link is not simulated on this site, or a bad fraction.
        """
        if self.topology.link(link).name != self.split.name:
            super().set_eavesdropper(link, fraction)
            return
        if not self.transmitter:
            raise ConfigError(
                f"the split link's optics run at {self.split.a}'s site; set Eve there"
            )
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"eavesdropper fraction must be in [0, 1], not {fraction}")
        self.params = self.params.replace(eve_fraction=fraction)
        self._optics.params = self.params
        logger.info("! eavesdropper on split link %s: fraction %.2f", self.split.name, fraction)

    # --- the relay across the split link ------------------------------------------------------

    async def _site_relay_loop(self) -> None:
        while True:
            moved = self.top_up()
            self._update_alarms()
            for cp in self.cross_pairs:
                if cp.outgoing:
                    for _ in range(self.pool_target):
                        if not await self._relay_across(cp):
                            break
                        moved += 1
            done = [p.delivered > 0 for p in self._pairs]
            done += [
                cp.delivered > 0 if cp.outgoing else cp.received > 0 for cp in self.cross_pairs
            ]
            if all(done):
                self._ready.set()
            self._changed.set()
            await asyncio.sleep(0 if moved else self.relay_interval)

    async def _relay_across(self, cp: CrossPair) -> bool:
        """Relay one key for an outgoing pair if its pool wants one; return whether it did."""
        size = self.key_size // 8
        kme = self.kmes[cp.master_node]
        conn = self._conn
        if (
            kme.stored_key_count(cp.master, cp.slave) >= self.pool_target
            or kme.free(cp.master, cp.slave) < 1
        ):
            return False
        if conn is None:
            cp.error = f"split link {self.split.name} down"
            return False
        if self.cross.alarm:
            cp.error = f"hop {self.split.name!r} is in eavesdropper alarm"
            return False
        if self.pads.available_bits(self.out_direction) < 8 * (size + MAC_KEY_BYTES):
            cp.error = f"hop {self.split.name!r} is out of key"
            return False
        route: list[str] = [cp.master_node]
        if cp.master_node == self.border:
            key = at_source = os.urandom(size)
        else:
            try:
                relayed = self.relay.relay(cp.master_node, self.border, size)
            except RelayError as exc:
                cp.error = str(exc)
                return False
            key, at_source, route = (
                relayed.key_at_destination,
                relayed.key_at_source,
                list(relayed.route),
            )
        block, offset, pad = self.pads.take_next(self.out_direction, size + MAC_KEY_BYTES)
        self._relay_ids += 1
        msg = RelayKey(self._relay_ids, str(uuid.uuid4()), cp.master, cp.slave, block, offset,
                       xor_bytes(key, pad[:size]), b"")  # fmt: skip
        tag = hmac.new(pad[size:], msg.header() + msg.ciphertext, hashlib.sha256).digest()
        msg = dataclasses.replace(msg, tag=tag)
        fut: asyncio.Future[RelayResult] = asyncio.get_running_loop().create_future()
        self._pending[msg.relay_id] = fut
        conn.send(msg)
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                result = await fut
        except TimeoutError:
            result = RelayResult(msg.relay_id, False, "no answer from the other site")
        finally:
            self._pending.pop(msg.relay_id, None)
        if not result.ok:
            cp.error = f"{self.remote_border}: {result.reason}"
            return False
        kme.supply(cp.master, cp.slave, [(msg.key_id, at_source)], role="master",
                   peer_kme_id=kme_id_for(cp.slave_node))  # fmt: skip
        if self.debug:
            logger.debug(
                "> %s->%s key %s across %s", cp.master, cp.slave, msg.key_id, self.split.name
            )
        cp.delivered += 1
        cp.error = None
        cp.last_route = (*route, self.remote_border)
        return True

    async def _receive_relays(self, conn: SiteConnection) -> None:
        while True:
            msg = await conn.relays.get()
            try:
                reason = await self._accept_relay(msg)
            except (QKDError, ValueError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            conn.send(RelayResult(msg.relay_id, reason is None, reason or ""))

    async def _accept_relay(self, msg: RelayKey) -> str | None:
        """Complete an incoming relay; return ``None`` if stored, else why not."""
        size = self.key_size // 8
        wanted = (msg.master, msg.slave)
        cp = next(
            (p for p in self.cross_pairs if not p.outgoing and (p.master, p.slave) == wanted), None
        )
        if cp is None:
            return f"no pair {msg.master}->{msg.slave} ends at this site"
        if len(msg.ciphertext) != size:
            return f"key size {8 * len(msg.ciphertext)} bits, not {self.key_size}"
        # The block may still be on its way into our PadBook (deposit races the relay).
        async with asyncio.timeout(PEER_TIMEOUT):
            while not self.pads.has_block(self.in_direction, msg.block) and (
                msg.block > self._finished_block
            ):
                self._deposited.clear()
                await self._deposited.wait()
        pad = self.pads.take_at(self.in_direction, msg.block, msg.offset, size + MAC_KEY_BYTES)
        expected = hmac.new(pad[size:], msg.header() + msg.ciphertext, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, msg.tag):
            cp.error = f"hop {self.split.name!r}: authentication failed"
            return "hop authentication failed (link keys differ or message altered)"
        key = xor_bytes(msg.ciphertext, pad[:size])
        at_destination = key
        if cp.slave_node != self.border:
            try:
                relayed = self.relay.relay(self.border, cp.slave_node, size, key=key)
            except RelayError as exc:
                cp.error = str(exc)
                return str(exc)
            at_destination = relayed.key_at_destination
        kme = self.kmes[cp.slave_node]
        if kme.free(cp.master, cp.slave) < 1:
            return f"slave pool {cp.master}->{cp.slave} is full"
        kme.supply(cp.master, cp.slave, [(msg.key_id, at_destination)], role="slave",
                   peer_kme_id=kme_id_for(cp.master_node))  # fmt: skip
        cp.received += 1
        cp.error = None
        return None

    # --- queries --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Like :meth:`SimulatedNetwork.status`, plus the split link and the cross-site pairs."""
        out = super().status()
        out["site"] = sorted(self.local_nodes)
        out["split_link"] = {
            "name": self.split.name,
            "length_km": self.split.length_km,
            "end": "transmitter" if self.transmitter else "receiver",
            "available_bits": {d: self.pads.available_bits(d) for d in PadBook.DIRECTIONS},
            "deposited_bits": self.pads.deposited_bits,
            "consumed_bits": self.pads.consumed_bits,
            **dataclasses.asdict(self.cross),
        }
        for cp in self.cross_pairs:
            node = cp.master_node if cp.outgoing else cp.slave_node
            out["pairs"].append({
                "master": cp.master, "slave": cp.slave,
                "stored_keys": self.kmes[node].stored_key_count(cp.master, cp.slave),
                "delivered": cp.delivered if cp.outgoing else cp.received,
                "role": "master" if cp.outgoing else "slave",
                "route": list(cp.last_route) if cp.last_route else None,
                "error": cp.error, "failed_hop": None,
                "alarm": self.split.name + " in eavesdropper alarm" if self.cross.alarm else None,
            })  # fmt: skip
        return out

    def route(self, sae_a: str, sae_b: str) -> list[str]:
        """The default route of keys from ``sae_a`` to ``sae_b`` (across both sites)."""
        source, target = self.topology.sae_node(sae_a), self.topology.sae_node(sae_b)
        path = self.relay.default_route(source, target)
        if path is None:
            raise RelayError(f"no fibre path from {source!r} to {target!r}")
        return path
