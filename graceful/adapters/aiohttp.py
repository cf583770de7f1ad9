"""aiohttp ``web.Application`` / ``web.AppRunner`` under ``graceful.run``.

Why: ``web.run_app`` owns the loop and the signals (``loop.add_signal_handler``, which also
takes over the wakeup fd), so it cannot share a process with other servers or with graceful's
signal routing, and its 60 s ``shutdown_timeout`` knows nothing of the platform's grace
period. Here the app runs on graceful's loop with aiohttp's signal handling off, and is drained
with aiohttp's own cleanup: ``on_shutdown`` and ``on_cleanup`` still run.

* serve: ``AppRunner.setup()``, then the runner's request handler is wrapped (``Server.request_handler``,
  outside the app and its middlewares) so that each request under way is recorded: a middleware
  would cost aiohttp's middleware dispatch on every request (about 7 % of a trivial one's
  instructions, measured in benchmarks/_serving_callgrind.py);
  (``on_startup``) and a ``TCPSite`` on ``host``/``port``; "started" once the site listens.
* wrap-up: the drain delay (still serving); every site stops (the listening socket closes, a
  new connection is refused at once); then ``AppRunner.cleanup()``: idle keep-alive
  connections close, ``on_shutdown`` runs, requests in flight finish (their responses say
  ``Connection: close``), ``on_cleanup`` runs. Wrap-up waits for the requests until graceful's
  wrap-up timeout; aiohttp's own per-connection ``shutdown_timeout`` is off unless
  ``shutdown_timeout=`` is given (one that differs from the wrap-up timeout is said at start:
  the shorter governs), and a pause (SIGTSTP) has no timeout.
* wrap-up timeout: each request still running is logged (method, path, client, age) and its
  handler's task is cancelled: one whose response was not prepared yet is answered 503
  (``Connection: close``), one under way has its connection closed (its client sees the body
  cut short). The lifecycle is marked failed (exit code 1) and the cleanup goes on
  (``on_cleanup`` runs), so the shutdown phase starts.
* long-lived connections: at wrap-up, once the sites have stopped and before the cleanup
  (which would wait for them), each open ``WebSocketResponse`` is closed with
  code 1001 (Going Away: its client reconnects elsewhere; a handler in ``async for msg in ws``
  leaves its loop; the client's answer is waited for until the wrap-up timeout at most) and each streaming response still being written (prepared, its handler not
  returned, no ``Content-Length``: a download of announced length is left to finish) is told to
  end: its handler's task is cancelled (asyncio's way to tell a coroutine to stop, as aiohttp's
  own ``handler_cancellation`` does when a client leaves: its ``finally`` and ``except
  CancelledError`` still run and may write a last event), then the wrapper writes the final
  chunk (``write_eof()``) and returns the response, so the client sees a clean end of stream.
  Handlers that check ``graceful.is_stopping()`` or await ``graceful.wait_for_wrap_up_async()``
  end on their own first. A WebSocket handler's send after the close fails with
  ``ConnectionResetError``: the wrapper drops it. Both counts are logged with the drain.
* deadline: each request still under way is logged (method, path, client, age) and its
  connection is closed: what a cut handler that goes on anyway, or a hung ``on_cleanup``, left
  there. A request that ``shutdown_timeout=`` cancels is logged the same way.
* sockets: the site is a ``SockSite`` on the socket ``graceful.listen()`` gives (systemd's, the
  previous generation's during an upgrade in place, or a new one); with no ``host``, one on
  ``0.0.0.0`` and one on ``::`` (as ``TCPSite`` binds every interface), on the same port.
  ``reuse_port=`` or ``reuse_address=`` in the site options keep aiohttp's own ``TCPSite``: the
  caller chose how to bind. At a hand-over to a new generation (``_upgrade``) the cleanup waits
  up to ``LINGER`` s for kept-alive connections to send one more request, answered with
  ``Connection: close``, before aiohttp closes the idle ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from asyncio import current_task
from functools import partial

from aiohttp import web

from .._checks import TYPE_CHECKING, port_from_env
from .._drain_delay import drain_delay_of
from .._lifecycle import on_force_quit
from .._service import Context
from .._upgrade import LINGER, handing_over
from ._inflight import (
    AT_WRAP_UP,
    CUT_WAIT,
    InFlight,
    Request,
    cut_at_wrap_up,
    log_ended_long_lived,
    say_which_timeout_governs,
    uncancel,
    wait_within_wrap_up,
)

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["DEFAULT_PORT", "AiohttpService", "adapt"]

DEFAULT_PORT = 8080
"""The port when neither ``port=`` nor the ``PORT`` environment variable says (as ``run_app``)."""


class _LongLived:
    """A response its handler has prepared while it runs (a stream, a WebSocket...), and
    whether wrap-up ended it. Made by ``on_response_prepare``: a request that is answered
    when its handler returns never gets one."""

    __slots__ = ("closing", "ended", "response", "task")

    def __init__(self, task: asyncio.Task[Any], response: web.StreamResponse) -> None:
        self.task = task
        """The task that runs the handler (aiohttp: one a request)."""
        self.response: web.StreamResponse | None = response
        self.ended = False
        self.closing: asyncio.Future[bool] | None = None
        """Our 1001 close of a WebSocket, once under way."""

    @property
    def kind(self) -> str | None:
        """ "websocket", "stream" (a body under way, of no announced length), or None."""
        response = self.response
        if response is None or self.ended or not response.prepared:
            return None
        if isinstance(response, web.WebSocketResponse):
            return None if response.closed else "websocket"
        return "stream" if response.content_length is None else None


def _tracked(request: web.BaseRequest, started: float) -> Request:
    """The request as the logs name it (made when needed: aiohttp computes path and client)."""
    return Request(request.method, request.path, request.remote or "?", started)


def _port_from_env() -> int:
    port = port_from_env("PORT", DEFAULT_PORT, zero=True)
    assert port is not None
    return port


class AiohttpService:
    """An aiohttp app (or an ``AppRunner`` not yet set up) served on ``host``:``port``.

    Args:
        app: a ``web.Application``, or a ``web.AppRunner`` made with ``handle_signals=False``
            and not yet set up.
        host: the address to listen on; None (the default) is every interface, as
            ``web.run_app``.
        port: the port; None reads the ``PORT`` environment variable, else 8080. 0 picks a
            free port (``service.port`` says which once started).
        shutdown_timeout: seconds aiohttp gives each request at wrap-up before cancelling it;
            None (the default): graceful's wrap-up timeout alone bounds the drain.
        name: the name in graceful's logs and report.
        site_options: passed to ``web.TCPSite`` (``reuse_port=True``, ``backlog=``,
            ``ssl_context=``...).

    Raises:
        TypeError: ``app`` is neither an Application nor an AppRunner.
        ValueError: the runner handles signals itself, or is already set up; ``PORT`` is not
            a port number.
    """

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

    def __init__(
        self,
        app: web.Application | web.AppRunner,
        *,
        host: str | None = None,
        port: int | None = None,
        shutdown_timeout: float | None = None,
        name: str | None = None,
        **site_options: Any,
    ) -> None:
        if isinstance(app, web.AppRunner):
            if app._handle_signals:
                raise ValueError(
                    "this AppRunner handles signals itself (handle_signals=True); create it with "
                    "handle_signals=False so that graceful routes the signals"
                )
            if app.server is not None:
                raise ValueError("this AppRunner is already set up: pass it to graceful before setup()")
            self.runner = app
        elif isinstance(app, web.Application):
            self.runner = web.AppRunner(app, handle_signals=False)
        else:
            raise TypeError(
                f"AiohttpService takes a web.Application or web.AppRunner, not {type(app).__name__}"
            )
        if self.runner.app.frozen:
            raise ValueError(
                "this aiohttp Application is already running elsewhere (frozen): pass a fresh one"
            )
        self.host, self.site_options = host, site_options
        self.port = _port_from_env() if port is None else port
        self.shutdown_timeout = shutdown_timeout
        self.name = name or f"aiohttp {host or '*'}:{self.port}"
        self.in_flight = InFlight(self.name)
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._long_lived: dict[object, _LongLived] = {}
        """The responses the running handlers prepared, by the handler's task."""
        self._prepare_done: asyncio.Future[None] | None = None
        self._handler: Any = None
        """The runner's own request handler, wrapped by ``_track``."""
        self._cut_tasks: set[object] = set()
        self._cleanup: asyncio.Future[None] | None = None
        """The runner's cleanup, when a cut handler holds it past the wrap-up: close() waits."""
        """The handlers' tasks cancelled at the wrap-up timeout."""
        self.runner.app.on_response_prepare.append(self._prepared)

    def _prepared(self, request: web.Request, response: web.StreamResponse) -> asyncio.Future[None]:
        """aiohttp's ``on_response_prepare``: remember the response a running handler prepares.

        It runs for every response, so it is a plain function returning a future already done
        (awaiting one costs no coroutine). A response prepared after its handler returned (the
        usual case) is no longer in flight: nothing to remember.
        """
        task = current_task()
        if task in self.in_flight and task not in self._long_lived:
            self._long_lived[task] = _LongLived(task, response)  # type: ignore[arg-type]
        # Made by serve(), before any request.
        assert self._prepare_done is not None
        return self._prepare_done

    async def _track(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request, around the app's own handling (its middlewares included)."""
        handler = self._handler
        # Set by serve(), before the site listens.
        assert handler is not None
        task: asyncio.Task[Any] = current_task()  # type: ignore[assignment]
        # A Request only when one is logged.
        tracked = partial(_tracked, request, time.monotonic())
        self.in_flight.add(task, tracked)
        try:
            response: web.StreamResponse = await handler(request)
            entry = self._long_lived.get(task)
            # On return aiohttp 3.9 would close with 1000: our 1001 close goes first.
            if entry is not None and entry.closing is not None:
                await asyncio.wait({entry.closing})
            if self._draining and not response.prepared:
                # Answered with Connection: close.
                response.force_close()
            return response
        except ConnectionResetError:
            entry = self._long_lived.get(task)
            # A send after our 1001 close.
            if entry is not None and entry.ended and entry.response is not None:
                return entry.response
            raise
        except asyncio.CancelledError:
            entry = self._long_lived.get(task)
            # Cut at the wrap-up timeout.
            if task in self._cut_tasks and uncancel(task) == 0:
                if entry is None or entry.response is None or not entry.response.prepared:
                    return _unavailable()
                # A response under way: aiohttp closes the connection, the body cut short.
                raise
            if entry is not None and entry.ended and entry.response is not None and uncancel(task) == 0:
                # The final chunk: a clean end of stream, unless the client left meanwhile.
                with contextlib.suppress(ConnectionError):
                    await entry.response.write_eof()
                return entry.response
            if self._draining:
                # shutdown_timeout= cancelled it.
                log.error(  # noqa: TRY400 - a cancellation: its traceback says nothing useful
                    "%s: dropped request %s (cancelled while draining)", self.name, tracked().describe()
                )
            raise
        finally:
            self.in_flight.discard(task)
            if self._long_lived:
                self._long_lived.pop(task, None)

    async def serve(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        self.in_flight.lifecycle = ctx.lifecycle
        self._done = asyncio.Event()
        self._prepare_done = self._loop.create_future()
        self._prepare_done.set_result(None)
        on_force_quit(ctx.lifecycle, self._forced, name=f"cut requests still running on {self.name}")
        say_which_timeout_governs(
            ctx.lifecycle,
            self.name,
            "aiohttp's shutdown_timeout",
            self.shutdown_timeout,
            "leave shutdown_timeout= out",
        )
        await self.runner.setup()
        server = self.runner.server
        # setup() made it.
        assert server is not None
        self._handler = server.request_handler
        # Connections take it when they open: before start().
        server.request_handler = self._track
        for site in self._sites(ctx):
            await site.start()
            log.info("%s: listening on %s", self.name, site.name)
        addresses = self.runner.addresses
        if addresses:
            self.port = addresses[0][1]
        ctx.started()
        await self._done.wait()

    def _sites(self, ctx: Context) -> list[web.BaseSite]:
        """A ``SockSite`` on each socket ``graceful.listen()`` gives (see the module docstring)."""
        options = dict(self.site_options)
        if options.get("reuse_port") is not None or options.get("reuse_address") is not None:
            return [web.TCPSite(self.runner, self.host, self.port, **options)]
        # 128: TCPSite's default.
        backlog = options.pop("backlog", 128)
        if self.host:
            return [
                web.SockSite(
                    self.runner, ctx.lifecycle.listen((self.host, self.port), backlog=backlog), **options
                )
            ]
        first = ctx.lifecycle.listen(("0.0.0.0", self.port), backlog=backlog)
        sites: list[web.BaseSite] = [web.SockSite(self.runner, first, **options)]
        try:
            second = ctx.lifecycle.listen(("::", first.getsockname()[1]), backlog=backlog)
        except OSError as exc:
            # No IPv6 here.
            log.debug("%s: not listening on IPv6 (%s)", self.name, exc)
        else:
            sites.append(web.SockSite(self.runner, second, **options))
        return sites

    async def _linger(self) -> None:
        """At a hand-over: up to ``LINGER`` s for kept-alive connections to end by themselves."""
        server = self.runner.server
        loop = asyncio.get_running_loop()
        end = loop.time() + LINGER
        while server is not None and server.connections and loop.time() < end:
            await asyncio.sleep(0.005)

    async def wrap_up(self, ctx: Context) -> None:
        if self._done is None or self._done.is_set():
            return
        # The drain delay: not-ready to probes, still serving.
        await drain_delay_of(ctx.lifecycle).wait_said_async()
        self._draining = True
        for site in list(self.runner.sites):
            # The listening socket closes: new connections are refused.
            await site.stop()
        websockets, streams = await self._end_long_lived(ctx.wrap_up_remaining())
        log_ended_long_lived(self.name, websockets, streams)
        log.info("%s: stopped accepting; draining %d request(s)", self.name, len(self.in_flight))
        if handing_over(ctx.lifecycle):
            await self._linger()
        # aiohttp's per-connection timeout (None: wait until graceful's wrap-up timeout).
        self.runner._shutdown_timeout = self.shutdown_timeout  # type: ignore[assignment]
        # on_shutdown, the drain, on_cleanup.
        cleanup = asyncio.ensure_future(self.runner.cleanup())
        if not await wait_within_wrap_up(ctx, cleanup):
            self._cut_at_wrap_up(ctx)
            remaining = ctx.remaining()
            wait = CUT_WAIT if remaining is None else min(CUT_WAIT, remaining)
            if not (await asyncio.wait({cleanup}, timeout=wait))[0]:
                # A handler caught the cut's cancellation and goes on, and aiohttp's cleanup waits
                # for it: the rest of the cleanup goes on in close(), in the shutdown phase, so
                # that the shutdown listeners are not held; the deadline bounds it.
                self._cleanup = cleanup
                return
        self._done.set()
        # An on_shutdown/on_cleanup handler that raised fails the sequence.
        cleanup.result()

    def _cut_at_wrap_up(self, ctx: Context) -> None:
        """The wrap-up timeout has come: name each request still running and cancel its handler
        (``_track`` answers 503 if no response was prepared yet; aiohttp closes the connection of
        one under way), so that the cleanup goes on and the shutdown phase starts (the lifecycle
        is marked failed: exit code 1)."""
        running = self.in_flight.under_way()
        count = self.in_flight.log_dropped(AT_WRAP_UP, running)
        if count:
            cut_at_wrap_up(ctx.lifecycle, self.name, f"{count} request(s) cut")
        for task in running:
            if isinstance(task, asyncio.Task) and not task.done():
                self._cut_tasks.add(task)
                task.cancel("graceful: cut at the wrap-up timeout")

    async def _end_long_lived(self, budget: float | None) -> tuple[int, int]:
        """Close each open WebSocket with 1001 and end each stream; (WebSockets, streams) ended.

        Streams: their handler's task is cancelled, and the wrapper writes the final chunk.
        WebSockets: the close frames go out together; waits (within ``budget``) for the clients'
        replies, as ``ws.close()`` does (bounded by the response's own close timeout).
        ``budget`` None: no deadline (a pause).
        """
        closing: list[asyncio.Future[bool]] = []
        streams = 0
        for entry in list(self._long_lived.values()):
            kind, response = entry.kind, entry.response
            if kind is None or response is None:
                continue
            entry.ended = True
            if isinstance(response, web.WebSocketResponse):
                message = b"server going away"
                entry.closing = asyncio.ensure_future(response.close(code=1001, message=message))
                closing.append(entry.closing)
            else:
                streams += 1
                entry.task.cancel()
        if closing:
            done, _ = await asyncio.wait(closing, timeout=None if budget is None else max(budget, 0.0))
            for future in done:
                if not future.cancelled() and future.exception() is not None:
                    log.debug("%s: closing a WebSocket: %r", self.name, future.exception())
        return len(closing), streams

    async def close(self, ctx: Context) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is None or self._done is None:
            return
        done = bool((await asyncio.wait({cleanup}, timeout=ctx.remaining()))[0])
        if not done:
            log.warning(
                "%s: %d request(s) still running when the budget ran out", self.name, len(self.in_flight)
            )
        self._done.set()
        if done:
            cleanup.result()

    def _forced(self) -> None:
        """At the deadline (a helper thread): name every dropped request, then cut them."""
        self.in_flight.cut_at_deadline(self._loop, self._cut)

    def _cut(self) -> None:
        server = self.runner.server
        for connection in server.connections if server is not None else ():
            connection.force_close()


UNAVAILABLE = "Service Unavailable: the server stopped before this request was answered\n"
"""The body of the 503 a request cut at the wrap-up timeout gets, when no response was prepared."""


def _unavailable() -> web.Response:
    """The answer (``Connection: close``) to a request cut at the wrap-up timeout before its
    response was prepared."""
    response = web.Response(status=503, text=UNAVAILABLE)
    response.force_close()
    return response


def adapt(obj: object) -> AiohttpService | None:
    """The service for a ``web.Application`` or ``web.AppRunner``; None for anything else.

    It listens where ``web.run_app`` would: every interface, on ``PORT`` (else 8080); for
    another address, pass ``AiohttpService(app, host=..., port=...)`` to ``graceful.run``.
    """
    if isinstance(obj, (web.Application, web.AppRunner)):
        return AiohttpService(obj)
    return None
