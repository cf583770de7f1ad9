"""``uvicorn.Server`` (ASGI) under ``graceful.run``, with graceful owning the signals.

Why: ``uvicorn.run()`` installs its own SIGINT/SIGTERM handlers, replacing whatever was there
(uvicorn #1579), notices them only on its 0.1 s tick, and re-raises the signal at the end, so
the process exits with 143 instead of 0; two servers in one process hang on shutdown (#1773).
Here uvicorn installs no handler at all (its ``_serve()`` runs, not ``serve()`` and its
``capture_signals()``): graceful routes the signals and drives uvicorn's own graceful exit, so
its connection handling and the ASGI lifespan shutdown still run.

* serve: the app is wrapped in a small ASGI middleware that records each HTTP request under
  way; "started" is said once uvicorn's startup (lifespan startup included) has bound its
  sockets. uvicorn's main loop waits on an event here instead of polling every 0.1 s.
* wrap-up: the drain delay (still serving); then uvicorn's listening sockets are closed at
  once (a new connection is refused now, not on uvicorn's next tick), ``should_exit`` is set
  and uvicorn's main loop is woken: uvicorn closes idle keep-alive connections, closes the
  others once their response is sent (the middleware adds ``Connection: close``), waits for
  them and runs the lifespan shutdown. Wrap-up waits for all of it within the budget. uvicorn
  itself polls its connections every 0.1 s (and sleeps 0.1 s first), so the drain ends up to
  about 0.2 s after the last response.
* deadline: every request still under way is logged (method, path, client, age), uvicorn is
  told to force-exit and its connections are cut. A request that uvicorn's own
  ``timeout_graceful_shutdown`` cancels is logged the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn

from .._service import Context
from ..readiness import drain_delay_left
from ._inflight import InFlight, Request

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["UvicornService", "adapt"]


class _Track:
    """ASGI middleware: each HTTP request is in ``in_flight`` while the app answers it."""

    def __init__(self, app: Any, in_flight: InFlight, draining: asyncio.Event) -> None:
        self.app = app
        self.in_flight = in_flight
        self.draining = draining

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        key = object()
        request = Request(scope.get("method", "?"), scope.get("path", "?"), str(client[0]))
        self.in_flight.add(key, request)
        draining = self.draining

        async def send_saying_close(message: Any) -> None:
            if message["type"] == "http.response.start" and draining.is_set():
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, send_saying_close)
        except asyncio.CancelledError:
            if draining.is_set():  # uvicorn's own timeout_graceful_shutdown cancelled it
                log.error(  # noqa: TRY400 - a cancellation: its traceback says nothing useful
                    "%s: dropped request %s (cancelled while draining)",
                    self.in_flight.server_name,
                    request.describe(),
                )
            raise
        finally:
            self.in_flight.discard(key)


class UvicornService:
    """A ``uvicorn.Server``: uvicorn's own graceful exit, driven by graceful.

    Leave uvicorn's ``timeout_graceful_shutdown`` unset to let graceful's force-quit deadline
    bound the drain (each request still running then is logged, exit code 70); set it to make
    uvicorn cancel slow requests earlier (each is logged too, and the exit stays 0).
    """

    def __init__(self, server: uvicorn.Server, name: str | None = None) -> None:
        if not isinstance(server, uvicorn.Server):
            raise TypeError(
                f"UvicornService takes a uvicorn.Server, not {type(server).__name__}: "
                "wrap your app as uvicorn.Server(uvicorn.Config(app, host=..., port=...))"
            )
        self.server = server
        config = server.config
        self.name = name or f"uvicorn {config.host}:{config.port}"
        self.in_flight = InFlight(self.name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._exit: asyncio.Event | None = None

    async def serve(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        self.in_flight.lifecycle = ctx.lifecycle
        self._draining, self._done, self._exit = asyncio.Event(), asyncio.Event(), asyncio.Event()
        ctx.lifecycle.on_force_quit(self._forced, name=f"cut requests still running on {self.name}")
        server, config = self.server, self.server.config
        if not config.loaded:
            config.load()
        config.loaded_app = _Track(config.loaded_app, self.in_flight, self._draining)
        startup = server.startup

        async def startup_then_say_started(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            if server.started and not server.should_exit:
                ctx.started()

        server.startup = startup_then_say_started  # type: ignore[method-assign]
        server.main_loop = self._main_loop  # type: ignore[method-assign]
        try:
            await self._serve_without_signal_handlers()
        except SystemExit as exc:  # uvicorn's way to say its startup failed
            raise RuntimeError(
                f"{self.name} could not start (uvicorn exited with {exc.code}): the lifespan "
                "startup failed or the address is in use; uvicorn's log above says which"
            ) from None
        finally:
            self._done.set()

    async def _serve_without_signal_handlers(self) -> None:
        """``Server.serve()`` minus ``capture_signals()``: graceful owns the signals."""
        inner = getattr(self.server, "_serve", None)  # uvicorn >= 0.29
        if inner is not None:
            await inner()
            return
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        await self.server.serve()

    async def _main_loop(self) -> None:
        """uvicorn's loop, woken by wrap-up instead of polling ``should_exit`` every 0.1 s."""
        assert self._exit is not None
        counter = 0
        while not await self.server.on_tick(counter):  # on_tick(0 mod 10): the once-a-second work
            counter = (counter + 10) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    async def wrap_up(self, ctx: Context) -> None:
        if self._done is None or self._draining is None or self._done.is_set():
            return
        # Not-ready, still serving. A sleep on the loop, not wait_drain_delay() in the default
        # executor: the app's own run_in_executor() calls may have every executor thread busy.
        await asyncio.sleep(drain_delay_left(ctx.lifecycle))
        self._draining.set()
        for listener in getattr(self.server, "servers", ()):
            listener.close()  # refuse new connections now, not at uvicorn's next tick
        self.server.should_exit = True
        if self._exit is not None:
            self._exit.set()
        log.info("%s: stopped accepting; draining %d request(s)", self.name, len(self.in_flight))
        try:
            await asyncio.wait_for(self._done.wait(), ctx.remaining())
        except asyncio.TimeoutError:
            log.warning(
                "%s: %d request(s) still running when the budget ran out", self.name, len(self.in_flight)
            )

    async def close(self, ctx: Context) -> None:
        return None

    def _forced(self) -> None:
        """At the deadline (a helper thread): name every dropped request, then cut them."""
        self.in_flight.cut_at_deadline(self._loop, self._cut)

    def _cut(self) -> None:
        self.server.force_exit = True  # uvicorn stops waiting and skips the lifespan shutdown
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


def adapt(obj: object) -> UvicornService | None:
    """The service for a ``uvicorn.Server``; None for anything else."""
    if isinstance(obj, uvicorn.Server):
        return UvicornService(obj)
    return None
