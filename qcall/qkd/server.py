"""An ETSI GS QKD 014 KME server: the aiohttp shell around :class:`qcall.qkd.kme.KME`.

Usage::

    kme = KME("KME_A")
    kme.supply("alice", "bob", random_keys(100), role="local")
    ctx = server_ssl_context("kme/KME_A.pem", "kme/KME_A.key", "ca.pem")
    async with KMEServer(kme, "127.0.0.1", 0, ctx) as server:
        print(server.url)            # https://127.0.0.1:PORT
        ...

The calling SAE is identified by its TLS client certificate (mutual TLS,
ETSI GS QKD 014 clause 4.3): SAN URI ``urn:qcall:sae:<ID>``, else the subject
CN (:func:`qcall.qkd.pki.peer_identity`). A connection without a valid
certificate is refused in the TLS handshake; a valid certificate of an SAE
that is not attached to the KME gets HTTP 401.

Every answer is JSON. Errors carry the spec's Error object (6.5): 400 for a
bad request (malformed JSON or HTTP included, a request line longer than
64 KiB, more key_IDs than ``max_key_per_request``), 401, and 503 for an empty
pool or any unexpected server-side failure; the server keeps serving other
clients. A request is served whole or refused: never cut short.

With a :class:`~qcall.qkd.kmestore.DurableKME`, every answer that hands out
keys waits until their consumption is on disk (``await kme.store.commit()``,
group commit): mark consumed durably, then answer (docs/faults.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.typedefs import Handler

from qcall._aio import AsyncService
from qcall.exceptions import KMEError, KMEStateError
from qcall.qkd.etsi014 import (
    API_PREFIX,
    UNTAGGED,
    error_body,
    key_ids_application,
    parse_key_ids,
    parse_key_request,
    validate_key_id,
)
from qcall.qkd.kme import KME
from qcall.qkd.kmestore import DurableKME
from qcall.qkd.pki import peer_identity
from qcall.typing import KeyId, SAEId

__all__ = ["KMEServer"]

logger = logging.getLogger(__name__)

#: Largest request body accepted, in bytes.
MAX_BODY: Final = 64 * 1024

#: Longest request line (and header line) accepted, in bytes: a ``GET dec_keys``
#: may carry as many key_IDs as a POST body (about 1,480).
MAX_LINE: Final = MAX_BODY

#: ``identify(request)`` returns the authenticated SAE ID of the caller, or None.
Identify = Callable[[web.Request], SAEId | None]


def identify_by_certificate(request: web.Request) -> SAEId | None:
    """Return the SAE ID of the caller's verified TLS client certificate."""
    transport = request.transport
    if transport is None:
        return None
    return peer_identity(transport.get_extra_info("peercert"))


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str, details: list[object] | None = None) -> web.Response:
    return _json_response(error_body(message, details), status)


@web.middleware
async def _spec_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own HTTP errors (404 unknown path, 405 method, ...) as JSON.

    Every answer of the API is then JSON, errors the spec's Error object
    (ETSI GS QKD 014, 6.5), as clients expect (found by tests/test_fuzz_kme_server.py).
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


class _SpecErrorProtocol(web.RequestHandler):
    """aiohttp's HTTP/1.1 connection, answering what it cannot parse with the Error JSON.

    aiohttp refuses a request line longer than ``max_line_size`` (an over-long
    ``GET dec_keys``) or malformed HTTP before any handler or middleware runs,
    in plain text; an ETSI 014 client expects the Error object (6.5) instead
    (found by an audit: hardening issue, point 12).
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("response already sent, cannot send an error")
        if isinstance(exc, LineTooLong):
            text = (
                f"request line or header longer than {exc.args[1]} bytes "
                "(send many key_IDs with POST)"
            )
        elif status >= 500:
            logger.error("! request from %s failed", request.remote, exc_info=exc)
            status, text = 503, "internal KME error"
        else:
            text = "malformed HTTP request"
        logger.debug("! %s from %s: %s", status, request.remote, type(exc).__name__)
        response = _error(status, text)
        response.force_close()
        return response


class KMEServer(AsyncService):
    """Serve a :class:`KME` over HTTPS (ETSI GS QKD 014 clause 5).

    Args:
        kme: the pure KME state.
        host: address to listen on.
        port: TCP port; 0 picks a free one (see :attr:`port`, :attr:`url`).
        ssl_context: a server context requiring client certificates
            (:func:`qcall.qkd.pki.server_ssl_context`); ``None`` serves plain
            HTTP, which only makes sense with ``identify`` in benchmarks.
        identify: how to find the caller's SAE ID (default: client certificate).
        clock: the time source passed to the KME as ``now``.
        expire_interval: seconds between calls to :meth:`KME.expire`
            (only when the KME has a ``key_lifetime``).
        debug: log every request at DEBUG level (key IDs only); default:
            whether this module's logger has DEBUG enabled at construction.
    """

    def __init__(
        self,
        kme: KME,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        *,
        identify: Identify | None = None,
        clock: Callable[[], float] = time.monotonic,
        expire_interval: float = 1.0,
        debug: bool | None = None,
    ) -> None:
        self.kme = kme
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self._identify = identify or identify_by_certificate
        self._clock = clock
        self._expire_interval = expire_interval
        self.debug = logger.isEnabledFor(logging.DEBUG) if debug is None else debug
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._expirer: asyncio.Task[None] | None = None
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[_spec_errors])
        p = API_PREFIX
        self.app.router.add_get(p + "/{sae}/status", self._status)
        self.app.router.add_post(p + "/{sae}/enc_keys", self._enc_keys_post)
        self.app.router.add_get(p + "/{sae}/enc_keys", self._enc_keys_get)
        self.app.router.add_post(p + "/{sae}/dec_keys", self._dec_keys_post)
        self.app.router.add_get(p + "/{sae}/dec_keys", self._dec_keys_get)

    def __repr__(self) -> str:
        return f"KMEServer({self.kme.kme_id!r}, url={self.url if self._runner else None!r})"

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening. After this, :attr:`port` and :attr:`url` are set."""
        runner = web.AppRunner(self.app, handle_signals=False)
        await runner.setup()
        server = runner.server
        assert server is not None  # set by setup()
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {  # as AppRunner passes them, plus our line limits
            "access_log": None,
            "max_line_size": MAX_LINE,
            "max_field_size": MAX_LINE,
        }

        def connection() -> _SpecErrorProtocol:
            return _SpecErrorProtocol(server, loop=loop, **options)

        try:
            self._listener = await loop.create_server(
                connection, self.host, self._port, ssl=self.ssl_context
            )
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(self._listener.sockets[0].getsockname()[1])
        if self.kme.key_lifetime is not None:
            self._expirer = asyncio.create_task(self._expire_loop())
        logger.info("= KME %s serving %s", self.kme.kme_id, self.url)

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
            self._expirer = None
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the open connections
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None

    @property
    def port(self) -> int:
        """The TCP port (the real one once started with port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the KME, e.g. ``https://127.0.0.1:8443``."""
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self._expire_interval)
            erased = self.kme.expire(self._clock())
            if isinstance(self.kme, DurableKME):
                with contextlib.suppress(KMEStateError):  # requests report it (503)
                    await self.kme.store.commit()
            if erased:
                logger.info("= KME %s erased %d expired keys", self.kme.kme_id, erased)

    # --- handlers -------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> SAEId | web.Response:
        """Return the caller's SAE ID, or the 401 answer (checked before the body)."""
        caller = self._identify(request)
        if caller is None:
            return _error(401, "no valid SAE certificate")
        if not self.kme.is_attached(caller):
            return _error(401, "SAE is not registered at this KME")
        return caller

    async def _dispatch(
        self, request: web.Request, caller: SAEId, method: str, arg: Any
    ) -> web.Response:
        """Run one KME method; map qcall errors to the spec's Error answers.

        A durable KME's consumption of the keys is on disk before they are sent.
        """
        sae = request.match_info["sae"]
        kme = self.kme
        try:
            if method == "status":
                return _json_response(kme.status(caller, sae).to_json())
            if method == "enc_keys":
                container = kme.enc_keys(caller, sae, parse_key_request(arg), self._clock())
            else:
                ids, application = arg
                container = kme.dec_keys(
                    caller, sae, ids, self._clock(), application=application
                )
        except KMEError as exc:
            if self.debug:
                logger.debug("! %s %s from %s: %s", kme.kme_id, method, caller, exc)
            return _error(exc.status or 400, exc.message or str(exc), exc.details or None)
        except Exception:  # never let one request take the server down
            logger.exception("! %s %s from %s failed", kme.kme_id, method, caller)
            return _error(503, "internal KME error")
        if isinstance(kme, DurableKME):
            try:
                await kme.store.commit()
            except KMEStateError as exc:  # the keys stay consumed, never sent: no reuse
                logger.error("! %s %s from %s: %s", kme.kme_id, method, caller, exc)
                return _error(503, "KME state storage failed")
        if self.debug:
            ids = [k.key_id for k in container.keys]
            logger.debug("> %s %s %s->%s %s", kme.kme_id, method, caller, sae, ids)
        return _json_response(container.to_json())

    async def _read_json(self, request: web.Request) -> Any:
        """Return the decoded body, or an error Response for a bad one."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(400, f"request body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(raw) if raw else {}
        except (ValueError, RecursionError):
            return _error(400, "request body is not valid JSON")

    async def _status(self, request: web.Request) -> web.Response:
        caller = self._authorize(request)
        if isinstance(caller, web.Response):
            return caller
        return await self._dispatch(request, caller, "status", None)

    async def _enc_keys_post(self, request: web.Request) -> web.Response:
        caller = self._authorize(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self._read_json(request)
        if isinstance(data, web.Response):
            return data
        return await self._dispatch(request, caller, "enc_keys", data)

    async def _enc_keys_get(self, request: web.Request) -> web.Response:
        caller = self._authorize(request)
        if isinstance(caller, web.Response):
            return caller
        query = request.query
        for name in query:
            if name not in ("number", "size"):
                return _error(400, f"unknown query parameter {name[:40]!r}")
        fields: dict[str, int] = {}
        for name in ("number", "size"):
            values = query.getall(name, [])
            if len(values) > 1:
                return _error(400, f"{name} given more than once")
            if values:
                value = values[0]
                if not (value.isascii() and value.isdigit() and len(value) < 10):
                    return _error(400, f"invalid Key request: {name} must be an integer")
                fields[name] = int(value)
        return await self._dispatch(request, caller, "enc_keys", fields)

    async def _dec_keys_post(self, request: web.Request) -> web.Response:
        caller = self._authorize(request)
        if isinstance(caller, web.Response):
            return caller
        data = await self._read_json(request)
        if isinstance(data, web.Response):
            return data
        try:
            ids = parse_key_ids(data)
            application = key_ids_application(data)
        except KMEError as exc:
            return _error(400, exc.message or str(exc), exc.details or None)
        return await self._dispatch(request, caller, "dec_keys", (ids, application))

    async def _dec_keys_get(self, request: web.Request) -> web.Response:
        caller = self._authorize(request)
        if isinstance(caller, web.Response):
            return caller
        query = request.query
        for name in query:
            if name != "key_ID":
                return _error(400, f"unknown query parameter {name[:40]!r}")
        values = query.getall("key_ID", [])
        if not values:
            return _error(400, "key_ID is missing")
        if len(values) > self.kme.max_key_per_request:  # refuse, never serve a part
            return _error(
                400,
                f"{len(values)} key_IDs requested, max_key_per_request is "
                f"{self.kme.max_key_per_request}",
            )
        ids: list[KeyId] = []
        for i, value in enumerate(values):
            try:
                ids.append(validate_key_id(value, f"key_ID[{i}]"))
            except ValueError as exc:
                return _error(400, f"invalid Key IDs: {exc}")
        if len(set(ids)) != len(ids):
            return _error(400, "invalid Key IDs: duplicate key_ID")
        return await self._dispatch(request, caller, "dec_keys", (ids, UNTAGGED))
