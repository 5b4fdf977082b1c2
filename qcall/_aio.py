"""``async with`` for qcall's clients and servers, written once.

Every client and server has an ``async close()`` that is safe to call twice; most
also have an ``async start()`` without arguments. Mix one of these in and
``async with obj as it:`` hands ``obj`` over and closes it at the end, whatever
happened inside:

* :class:`AsyncClosing` — entering does nothing: the object is ready once made
  (a key source), or is started with arguments inside the block (the signaling
  server's ``start(host, port)``);
* :class:`AsyncService` — entering awaits ``obj.start()`` first (a KME server, a
  phone, a proxy).

Both check their host class with ``mypy`` through protocols (``close``, and
``start`` for :class:`AsyncService`) rather than abstract methods, so a class keeps
its own base classes and docstrings for ``start`` and ``close``.

:func:`start_site` is the aiohttp start-up every HTTP server repeats (listen,
learn the port picked for port 0), and :func:`http_url` the URL it answers on.
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Protocol, TypeVar

from aiohttp import web

__all__ = ["AsyncClosing", "AsyncService", "http_url", "start_site"]


class _Closable(Protocol):
    async def close(self) -> None: ...


class _Startable(_Closable, Protocol):
    async def start(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)
_S = TypeVar("_S", bound=_Startable)


class AsyncClosing:
    """Mixin: ``async with obj`` gives ``obj`` and awaits ``obj.close()`` on the way out."""

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self: _Closable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncService(AsyncClosing):
    """Mixin: like :class:`AsyncClosing`, and entering awaits ``obj.start()`` first."""

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self


async def start_site(
    app: web.Application, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: any free port); return the runner and the port.

    Raises:
        OSError: the address is in use or not available (the runner is cleaned up).
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        if isinstance(address, tuple):
            port = int(address[1])
            break
    return runner, port


def http_url(host: str, port: int, tls: bool) -> str:
    """``https://host:port`` (IPv6 literals in brackets)."""
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{host}:{port}"
