"""The transparency log server: an aiohttp HTTPS shell around :class:`TransparencyLog`.

Usage::

    log = TransparencyLog.open("/var/lib/qcall-seal-log")
    async with LogServer(log, "127.0.0.1", 0, server_tls_context(cert, key)) as server:
        print(server.url)        # https://127.0.0.1:PORT

The API, in the style of CT (RFC 6962 §4) and Rekor, under ``/seal-log/v1/``
(docs/seal.md §9); every answer is JSON, errors ``{"error": "..."}``:

=================================  =========================================================
``POST add-entry``                 ``{"statement", "signature", "chain"}`` (base64) → receipt
``POST add-entries``               ``{"entries": [...]}`` (≤ 256) → ``{"results": [...]}``
``GET get-sth``                    the latest signed tree head
``GET get-sth-consistency``        ``?first=M&second=N`` → ``{"consistency": [hex]}``
``GET get-proof-by-hash``          ``?hash=HEX&tree_size=N`` → ``{"leaf_index", "audit_path"}``
``GET get-entries``                ``?start=A&end=B`` (inclusive, ≤ 256) → leaf inputs + chains
``GET get-public-key``             the log's key (``log.pub``)
=================================  =========================================================

**Group commit.** Admission (signature and certificate checks) runs in the
request handler; admitted entries queue for one writer task that takes every
queued entry (up to ``max_batch``), appends them to the tree, signs one tree
head, and writes entries and head in one SQLite transaction in a worker
thread. Only then are the waiting requests answered, each with a receipt under
that head: an acknowledged entry is always on disk. A failed write answers 503
to that batch and leaves the log as it was; other requests are still served.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import ssl
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from qcall._aio import AsyncService, http_url, start_site
from qcall.exceptions import ConfigError, LogError, LogStorageError, SealFormatError
from qcall.seal.log import AddResult, Submission, TransparencyLog
from qcall.seal.statement import SignedStatement, Statement, b64decode

__all__ = ["API", "LogServer", "server_tls_context"]

logger = logging.getLogger(__name__)

#: Path prefix of the API.
API: Final = "/seal-log/v1"
#: Largest request body.
MAX_BODY: Final = 8 * 1024 * 1024
#: Most entries per ``add-entries`` or ``get-entries``.
MAX_ENTRIES: Final = 256
MAX_CHAIN: Final = 4


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context (TLS ≥ 1.2; clients are authenticated by their entries).

    Raises:
        ConfigError: a file is missing or unreadable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from exc
    return ctx


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message[:500]}, status)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405, 413) as JSON; never crash on a request."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except LogError as exc:
        return _error(exc.status or 500, str(exc))
    except Exception:
        logger.exception("! seal log request %s %s failed", request.method, request.path)
        return _error(500, "internal log error")


def parse_submission(obj: object) -> Submission:
    """An ``add-entry`` body (hostile).

    Raises:
        SealFormatError: naming the field.
    """
    if not isinstance(obj, dict):
        raise SealFormatError("the body must be a JSON object")
    statement = Statement.parse(b64decode(obj.get("statement"), "statement", 1 << 16))
    signature = b64decode(obj.get("signature"), "signature", 8192)
    chain = obj.get("chain")
    if not isinstance(chain, list) or not 1 <= len(chain) <= MAX_CHAIN:
        raise SealFormatError(f"field 'chain' must list 1..{MAX_CHAIN} certificates")
    ders = tuple(b64decode(c, "chain", 65536) for c in chain)
    return Submission(SignedStatement(statement, signature), ders)


def submission_json(sub: Submission) -> dict[str, Any]:
    """The ``add-entry`` body for ``sub``."""
    return {
        "statement": base64.b64encode(sub.signed.statement.encode()).decode(),
        "signature": base64.b64encode(sub.signed.signature).decode(),
        "chain": [base64.b64encode(c).decode() for c in sub.chain],
    }


class LogServer(AsyncService):
    """Serve a :class:`TransparencyLog` over HTTP(S) (see the module docstring).

    Args:
        log: the open log.
        host, port: where to listen (port 0: any free port).
        ssl_context: :func:`server_tls_context`; ``None`` serves plain HTTP (tests).
        max_batch: most entries written in one transaction.
    """

    def __init__(
        self,
        log: TransparencyLog,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_batch: int = 512,
    ) -> None:
        self.log = log
        self.host = host
        self._port = port
        self.ssl_context = ssl_context
        self.max_batch = max_batch
        self._runner: web.AppRunner | None = None
        self._queue: list[tuple[Submission, asyncio.Future[AddResult]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "seal-log-writer")
        #: Transactions written (for tests and the benchmark).
        self.batches = 0
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
        r = self.app.router
        r.add_post(f"{API}/add-entry", self._add_entry)
        r.add_post(f"{API}/add-entries", self._add_entries)
        r.add_get(f"{API}/get-sth", self._get_sth)
        r.add_get(f"{API}/get-sth-consistency", self._get_consistency)
        r.add_get(f"{API}/get-proof-by-hash", self._get_proof)
        r.add_get(f"{API}/get-entries", self._get_entries)
        r.add_get(f"{API}/get-public-key", self._get_public_key)

    def __repr__(self) -> str:
        return f"LogServer({self.log!r}, url={self.url if self._runner else None!r})"

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; afterwards :attr:`url` is set."""
        self._runner, self._port = await start_site(
            self.app, self.host, self._port, self.ssl_context
        )
        self._writer = asyncio.create_task(self._write_loop())
        logger.info("= seal log %r serving %s", self.log.log_key.name, self.url)

    async def close(self) -> None:
        """Stop listening; requests still queued get 503."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(LogError("the log is shutting down", status=503))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return http_url(self.host, self._port, self.ssl_context is not None)

    # --- group commit -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                items = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                batch = self.log.prepare([sub for sub, _ in items], self.log.now_ms())
                try:
                    await loop.run_in_executor(self._executor, self.log.write, batch)
                except LogStorageError as exc:
                    self.log.abort(batch)
                    logger.error("! seal log write failed: %s", exc)
                    for _, fut in items:
                        if not fut.done():
                            fut.set_exception(LogError("log storage failed", status=503))
                    continue
                self.log.commit(batch)
                self.batches += 1
                for (_, fut), result in zip(items, batch.results, strict=True):
                    if not fut.done():
                        fut.set_result(result)

    def _enqueue(self, sub: Submission) -> asyncio.Future[AddResult]:
        fut: asyncio.Future[AddResult] = asyncio.get_running_loop().create_future()
        self._queue.append((sub, fut))
        self._wake.set()
        return fut

    def _answer(self, result: AddResult) -> dict[str, Any]:
        if result.error is not None:
            return {"error": str(result.error), "status": result.error.status}
        receipt = self.log.receipt(result.index, result.timestamp)
        return {"receipt": receipt.to_json(), "duplicate": result.duplicate}

    # --- handlers -----------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, RecursionError):
            raise LogError("the request body is not valid JSON", status=400) from None

    def _admit(self, obj: object) -> Submission:
        try:
            sub = parse_submission(obj)
        except SealFormatError as exc:
            raise LogError(f"malformed entry: {exc}", status=400) from None
        self.log.check_submission(sub, self.log.now_ms())
        return sub

    async def _add_entry(self, request: web.Request) -> web.Response:
        sub = self._admit(await self._body(request))
        result = await self._enqueue(sub)
        answer = self._answer(result)
        if "error" in answer:
            return _error(answer["status"] or 500, answer["error"])
        return _json(answer)

    async def _add_entries(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_ENTRIES:
            raise LogError(f"field 'entries' must list 1..{MAX_ENTRIES} entries", status=400)
        pending: list[asyncio.Future[AddResult] | LogError] = []
        for obj in entries:
            try:
                pending.append(self._enqueue(self._admit(obj)))
            except LogError as exc:
                pending.append(exc)
        results = []
        for item in pending:
            if isinstance(item, LogError):
                results.append({"error": str(item), "status": item.status})
            else:
                try:
                    results.append(self._answer(await item))
                except LogError as exc:
                    results.append({"error": str(exc), "status": exc.status})
        return _json({"results": results})

    async def _get_sth(self, request: web.Request) -> web.Response:
        return _json(self.log.head.to_json())

    def _int(self, request: web.Request, name: str) -> int:
        values = request.query.getall(name, [])
        if len(values) != 1 or not values[0].isascii() or not values[0].isdigit():
            raise LogError(f"query parameter {name!r} must be one integer", status=400)
        if len(values[0]) > 19:
            raise LogError(f"query parameter {name!r} is too large", status=400)
        return int(values[0])

    async def _get_consistency(self, request: web.Request) -> web.Response:
        first, second = self._int(request, "first"), self._int(request, "second")
        proof = self.log.consistency(first, second)
        return _json({"consistency": [h.hex() for h in proof]})

    async def _get_proof(self, request: web.Request) -> web.Response:
        raw = request.query.get("hash", "")
        try:
            leaf = bytes.fromhex(raw)
        except ValueError:
            leaf = b""
        if len(leaf) != 32:
            raise LogError("query parameter 'hash' must be 64 hex digits", status=400)
        index, proof = self.log.proof_by_hash(leaf, self._int(request, "tree_size"))
        return _json({"leaf_index": index, "audit_path": [h.hex() for h in proof]})

    async def _get_entries(self, request: web.Request) -> web.Response:
        start, end = self._int(request, "start"), self._int(request, "end")
        size = self.log.head.tree_size
        if not start <= end or start >= size:
            raise LogError(f"need start <= end and start < tree size {size}", status=400)
        end = min(end, size - 1, start + MAX_ENTRIES - 1)
        out = []
        certificates: dict[bytes, str] = {}
        for row in self.log.store.entries(start, end + 1):
            chain = []
            for fpr in row.chain:
                if fpr not in certificates:
                    der = self.log.store.certificate(fpr) or b""
                    certificates[fpr] = base64.b64encode(der).decode()
                chain.append(certificates[fpr])
            out.append({"leaf_input": base64.b64encode(row.leaf).decode(), "chain": chain})
        return _json({"entries": out})

    async def _get_public_key(self, request: web.Request) -> web.Response:
        return _json(self.log.log_key.to_json())
