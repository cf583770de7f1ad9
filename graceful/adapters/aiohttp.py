"""aiohttp ``web.Application`` / ``web.AppRunner`` under ``graceful.run``.

Why: ``web.run_app`` owns the loop and the signals (``loop.add_signal_handler``, which also
takes over the wakeup fd), so it cannot share a process with other servers or with graceful's
signal routing, and its 60 s ``shutdown_timeout`` knows nothing of the platform's grace
period. Here the app runs on graceful's loop with aiohttp's signal handling off, and is drained
with aiohttp's own cleanup: ``on_shutdown`` and ``on_cleanup`` still run.

* serve: a middleware (outermost) records each request under way; ``AppRunner.setup()``
  (``on_startup``) and a ``TCPSite`` on ``host``/``port``; "started" once the site listens.
* wrap-up: the drain delay (still serving); every site stops (the listening socket closes, a
  new connection is refused at once); then ``AppRunner.cleanup()``: idle keep-alive
  connections close, ``on_shutdown`` runs, requests in flight finish (their responses say
  ``Connection: close``), ``on_cleanup`` runs. Wrap-up waits for it within the budget.
* deadline: each request still under way is logged (method, path, client, age).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .._service import Context
from ..readiness import drain_delay_left
from ._inflight import InFlight, Request

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["AiohttpService", "adapt"]


class AiohttpService:
    """An aiohttp app (or an ``AppRunner`` not yet set up) served on ``host``:``port``.

    ``host=None`` listens on every interface, as ``web.run_app`` does; ``port`` defaults to
    8080, as there. ``site_options`` go to ``web.TCPSite`` (``reuse_port=True``, ``backlog``,
    ``ssl_context``...).
    """

    def __init__(
        self,
        app: web.Application | web.AppRunner,
        *,
        host: str | None = None,
        port: int = 8080,
        name: str | None = None,
        **site_options: Any,
    ) -> None:
        if isinstance(app, web.AppRunner):
            if app._handle_signals:
                raise ValueError(
                    "this AppRunner handles signals itself (handle_signals=True); create it with "
                    "handle_signals=False so that graceful routes the signals"
                )
            self.runner = app
        elif isinstance(app, web.Application):
            self.runner = web.AppRunner(app, handle_signals=False)
        else:
            raise TypeError(
                f"AiohttpService takes a web.Application or web.AppRunner, not {type(app).__name__}"
            )
        self.host, self.port, self.site_options = host, port, site_options
        self.name = name or f"aiohttp {host or '*'}:{port}"
        self.in_flight = InFlight(self.name)
        self._draining = False
        self.runner.app.middlewares.insert(0, self._track)
        self._done: asyncio.Event | None = None

    @web.middleware
    async def _track(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = object()
        self.in_flight.add(key, Request(request.method, request.path, request.remote or "?"))
        try:
            response: web.StreamResponse = await handler(request)
            if self._draining and not response.prepared:
                response.force_close()  # answered with Connection: close
            return response
        finally:
            self.in_flight.discard(key)

    async def serve(self, ctx: Context) -> None:
        self._done = asyncio.Event()
        ctx.lifecycle.on_force_quit(self.in_flight.log_dropped, name=f"log requests dropped by {self.name}")
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, **self.site_options)
        await site.start()
        ctx.started()
        await self._done.wait()

    async def wrap_up(self, ctx: Context) -> None:
        if self._done is None or self._done.is_set():
            return
        await asyncio.sleep(drain_delay_left(ctx.lifecycle))  # not-ready, still serving
        self._draining = True
        for site in list(self.runner.sites):
            await site.stop()  # the listening socket closes: new connections are refused
        log.info("%s: stopped accepting; draining %d request(s)", self.name, len(self.in_flight))
        cleanup = asyncio.ensure_future(self.runner.cleanup())  # on_shutdown, drain, on_cleanup
        done, _ = await asyncio.wait({cleanup}, timeout=ctx.remaining())
        if not done:
            log.warning(
                "%s: %d request(s) still running when the budget ran out", self.name, len(self.in_flight)
            )
        self._done.set()
        if done:
            cleanup.result()  # an on_shutdown/on_cleanup handler that raised fails the sequence

    async def close(self, ctx: Context) -> None:
        return None


def adapt(obj: object) -> AiohttpService | None:
    """The service for a ``web.Application`` or ``web.AppRunner``; None for anything else."""
    if isinstance(obj, (web.Application, web.AppRunner)):
        return AiohttpService(obj)
    return None
