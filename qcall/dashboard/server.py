"""The operations view's HTTP server: the page, a Server-Sent Events stream, the eve switch.

A deliberately small HTTP/1.1 server on asyncio streams (no framework, nothing
from a CDN: the page and its script are package data in ``qcall/data/dashboard``):

=========================  ==================================================
``GET /``                  the page (HTML + inline SVG map)
``GET /dashboard.js|.css`` its script and style
``GET /api/topology``      nodes with map coordinates, links (JSON)
``GET /api/status``        the latest snapshot (JSON, :mod:`qcall.dashboard.view`)
``GET /events``            ``text/event-stream``: one ``data:`` snapshot per tick
``POST /api/eve``          ``{"link": NAME, "fraction": F}``: eavesdropper on (F > 0) or off
=========================  ==================================================

One producer task takes a snapshot every ``interval`` seconds (0.25 s) and
hands it to every connected stream, so an eavesdropper switched on shows within
one tick. Bad requests get 400/404/405 with a one-line reason; the server keeps
serving other clients. It binds to 127.0.0.1 by default: the eve switch is an
operator's test control of a *simulated* network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from importlib import resources
from typing import Any, Final, Protocol

from qcall.dashboard.view import DashboardView
from qcall.exceptions import ConfigError, QCallError
from qcall.qkd.topology import Topology

__all__ = ["DashboardServer", "Network", "parse_listen"]

logger = logging.getLogger(__name__)

MAX_REQUEST: Final = 16 * 1024
_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class Network(Protocol):
    """What the dashboard needs of a network (:class:`~qcall.qkd.network.SimulatedNetwork`)."""

    topology: Topology

    def status(self) -> dict[str, Any]: ...

    def set_eavesdropper(self, link: str, fraction: float = 1.0) -> None: ...


def parse_listen(spec: str) -> tuple[str, int]:
    """Parse ``[HOST]:PORT`` (``:8080`` means 127.0.0.1:8080).

    Raises:
        ConfigError: malformed address or port.
    """
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--dashboard {spec!r}: expected [HOST]:PORT, e.g. :8080")
    return host or "127.0.0.1", int(port)


class DashboardServer:
    """Serve the operations view of ``network`` on ``host:port`` (port 0: any free port).

    Use ``async with DashboardServer(net, "127.0.0.1", 0) as server: server.url``.
    """

    def __init__(
        self, network: Network, host: str = "127.0.0.1", port: int = 8080, interval: float = 0.25
    ) -> None:
        self.network = network
        self.host = host
        self.port = port
        self.interval = interval
        self.view = DashboardView(network.topology)
        self._static = json.dumps(self.view.static()).encode()
        self._latest: dict[str, Any] = self.view.snapshot(network.status(), time.monotonic())
        self._streams: set[asyncio.Queue[bytes]] = set()
        self._server: asyncio.Server | None = None
        self._producer: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port/`` of the running server."""
        return f"http://{self.host}:{self.port}/"

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen and start the snapshot producer."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._producer = asyncio.ensure_future(self._produce())
        logger.info("= dashboard on %s", self.url)

    async def close(self) -> None:
        """Stop listening, end the streams."""
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
        for queue in self._streams:
            queue.put_nowait(b"")
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _produce(self) -> None:
        while True:
            self._latest = self.view.snapshot(self.network.status(), time.monotonic())
            data = b"data: " + json.dumps(self._latest).encode() + b"\n\n"
            for queue in self._streams:
                if queue.qsize() < 8:  # a slow client skips ticks, never blocks others
                    queue.put_nowait(data)
            await asyncio.sleep(self.interval)

    # --- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            if len(head) > MAX_REQUEST:
                raise ValueError("request head too large")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if not 0 <= length <= MAX_REQUEST:
                raise ValueError("bad content-length")
            body = await reader.readexactly(length) if length else b""
            path = target.split("?", 1)[0]
            if path == "/events" and method == "GET":
                await self._stream(writer)
                return
            status, ctype, payload = self._route(method, path, body)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, payload = 400, "text/plain", b"malformed request\n"
        except ConnectionError:
            writer.close()
            return
        with contextlib.suppress(ConnectionError):
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        writer.close()

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if path in _STATIC or path.startswith("/api/"):
            if path == "/api/eve":
                if method != "POST":
                    return 405, "text/plain", b"use POST\n"
                return self._eve(body)
            if method != "GET":
                return 405, "text/plain", b"use GET\n"
        if path in _STATIC:
            name, ctype = _STATIC[path]
            data = resources.files("qcall").joinpath("data", "dashboard", name).read_bytes()
            return 200, ctype, data
        if path == "/api/topology":
            return 200, "application/json", self._static
        if path == "/api/status":
            return 200, "application/json", json.dumps(self._latest).encode()
        return 404, "text/plain", b"not found\n"

    def _eve(self, body: bytes) -> tuple[int, str, bytes]:
        try:
            request = json.loads(body)
            link = request["link"]
            fraction = float(request.get("fraction", 1.0))
            if not isinstance(link, str):
                raise TypeError("link must be a string")
            self.network.set_eavesdropper(link, fraction)
        except (ValueError, KeyError, TypeError) as exc:
            return 400, "text/plain", f"bad eavesdropper request: {exc}\n".encode()
        except QCallError as exc:
            return 400, "text/plain", f"{exc}\n".encode()
        self._latest = self.view.snapshot(self.network.status(), time.monotonic())
        return 200, "application/json", json.dumps({"link": link, "fraction": fraction}).encode()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        queue.put_nowait(b"data: " + json.dumps(self._latest).encode() + b"\n\n")
        self._streams.add(queue)
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-store\r\nConnection: keep-alive\r\n\r\n"
            )
            while data := await queue.get():
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._streams.discard(queue)
            writer.close()
