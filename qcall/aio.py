"""Small asyncio helpers for qcall's servers and clients.

:class:`AsyncResource` is the one async-context-manager mixin (``async with obj``
runs :meth:`~AsyncResource.start`, then :meth:`~AsyncResource.close`), and
:func:`start_site` the aiohttp start-up every HTTP server repeats (listen, learn the
port picked for port 0). The seal log's server and client use them; the older
servers and clients can adopt them without changing behaviour.
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Self

from aiohttp import web

__all__ = ["AsyncResource", "http_url", "start_site"]


class AsyncResource:
    """Mixin: ``async with resource:`` starts it and always closes it."""

    async def start(self) -> None:
        """Open the resource (default: nothing to do)."""

    async def close(self) -> None:
        """Release the resource; safe to call twice."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


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
