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
  them and runs the lifespan shutdown. Wrap-up waits for all of it within the budget. uvicorn's
  own shutdown sleeps 0.1 s and then polls its connections every 0.1 s; graceful runs the same
  steps looking every 5 ms, so the drain ends within 5 ms of the last response, not ~0.2 s.
* long-lived connections: at wrap-up, before uvicorn's own shutdown (which would close them
  with 1012), each accepted WebSocket gets a close frame with code 1001 (Going Away: its client
  reconnects elsewhere) and its app a ``websocket.disconnect``; each streaming response (one
  that has sent a body with ``more_body`` and announced no ``Content-Length``) is ended with a
  last empty chunk, so its client sees a clean end of stream, and its app receives
  ``http.disconnect``. What the app sends after that is dropped. A response of announced length
  (a download) is not ended early, which would truncate it: it drains like any request. Both
  counts are logged with the drain.
* deadline: every request still under way is logged (method, path, client, age), uvicorn is
  told to force-exit and its connections are cut. A request that uvicorn's own
  ``timeout_graceful_shutdown`` cancels is logged the same way.
* sockets: uvicorn is handed the socket ``graceful.listen()`` gives for its ``host``/``port``
  (or ``uds``) and ``backlog`` (``Server.serve(sockets=[...])``, as gunicorn's uvicorn worker
  does): systemd's socket, the previous generation's during an upgrade in place, or a new one.
  A ``Config(fd=...)`` is uvicorn's own. At a hand-over to a new generation (``_upgrade``),
  closing the listener closes this process's fd only; a kept-alive connection is not closed
  under a client that may be sending on it: its next request is answered with ``Connection:
  close`` (the middleware), and only the connections still idle after ``LINGER`` s are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from functools import partial
from time import monotonic

import uvicorn

from .._checks import TYPE_CHECKING
from .._drain_delay import drain_delay_of
from .._lifecycle import on_force_quit
from .._service import Context
from .._sockets import describe
from .._upgrade import LINGER, handing_over
from ._inflight import InFlight, Request, log_ended_long_lived

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")
_uvicorn_log = logging.getLogger("uvicorn.error")  # where uvicorn's own shutdown lines go
_LOOK = 0.005  # s: how often the drain looks at uvicorn's connections (uvicorn: 0.1 s)

__all__ = ["UvicornService", "adapt"]


class _LongLived:
    """One WebSocket or streaming response, and how to end it the way its protocol wants.

    Every HTTP request gets one, so it is cheap until it matters: the future that wakes a
    pending ``receive()`` is made only when the app waits on ``receive()`` past the body.
    """

    __slots__ = ("_ended", "headers", "is_ended", "kind", "open", "send")

    def __init__(self, kind: str, send: Any) -> None:
        self.kind = kind  # "websocket" or "http"
        self.send = send  # the server's send: not the app's wrapped one
        self.open = False  # accepted WebSocket, or a response body under way
        self.is_ended = False  # ended at wrap-up
        self.headers: Any = ()  # the response's, read only if it streams: a download is not ended
        self._ended: asyncio.Future[None] | None = None

    def ended(self) -> asyncio.Future[None]:
        """Done once wrap-up has ended this connection (made on first use)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self.is_ended:
                self._ended.set_result(None)
        return self._ended

    async def end(self) -> None:
        self.is_ended = True
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)  # the app's pending receive() hears the disconnect
        if self.kind == "websocket":
            await self.send({"type": "websocket.close", "code": 1001, "reason": "server going away"})
        else:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def tracked_send(self, track: _Track) -> Any:
        """The WebSocket's send: an accepted one is long-lived until it closes."""

        async def send(message: Any) -> None:
            if self.is_ended:
                return  # ended at wrap-up: the app's later messages go nowhere
            kind = message["type"]
            if kind == "websocket.accept":
                self.open = True
                track.long_lived.add(self)
            elif kind == "websocket.close":
                self.open = False
                track.long_lived.discard(self)
            await self.send(message)

        return send

    def gone(self) -> dict[str, Any]:
        """What a ``receive()`` pending when the connection was ended returns."""
        if self.kind == "websocket":
            return {"type": "websocket.disconnect", "code": 1001}
        return {"type": "http.disconnect"}

    def tracked_receive(self, receive: Any) -> Any:
        body_read = self.kind == "websocket"

        async def tracked() -> Any:
            nonlocal body_read
            if not body_read:  # the request body comes at once: no race needed
                message = await receive()
                body_read = message["type"] != "http.request" or not message.get("more_body")
                return message
            if self.is_ended:
                return self.gone()
            pending = asyncio.ensure_future(receive())
            try:
                await asyncio.wait({pending, self.ended()}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not pending.done():
                    pending.cancel()
            return pending.result() if pending.done() and not pending.cancelled() else self.gone()

        return tracked


def _sized(headers: Any) -> bool:
    """A response of announced length (a download): it drains like any request."""
    return any(name.lower() == b"content-length" for name, _ in headers)


async def _nothing() -> None:
    return None


def _request(scope: Any, started: float) -> Request:
    client = scope.get("client") or ("?", 0)
    return Request(scope.get("method", "?"), scope.get("path", "?"), str(client[0]), started)


class _Track:
    """ASGI middleware: each HTTP request is in ``in_flight`` while the app answers it.

    Every request passes here: one ``send`` wrapper does all the per-message work (the
    ``Connection: close`` while draining, a stream's start and end), and the rest is made
    only when it is needed.
    """

    def __init__(self, app: Any, in_flight: InFlight, draining: asyncio.Event) -> None:
        self.app = app
        self.in_flight = in_flight
        self.draining = draining
        self.long_lived: set[_LongLived] = set()

    async def end_long_lived(self) -> tuple[int, int]:
        """Close each open WebSocket with 1001 and end each stream; (WebSockets, streams) ended."""
        ending = [item for item in self.long_lived if item.open and not item.is_ended]
        self.long_lived.clear()
        for item in ending:
            try:
                await item.end()
            except Exception as exc:  # noqa: BLE001 - a client already gone is no failure
                log.debug("%s: ending a %s: %r", self.in_flight.server_name, item.kind, exc)
        websockets = sum(item.kind == "websocket" for item in ending)
        return websockets, len(ending) - websockets

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            socket = _LongLived("websocket", send)
            await self.app(scope, socket.tracked_receive(receive), socket.tracked_send(self))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stream = _LongLived("http", send)
        in_flight, draining, long_lived = self.in_flight, self.draining, self.long_lived
        request = partial(_request, scope, monotonic())  # a Request only when one is logged
        in_flight.add(stream, request)

        def tracked_send(message: Any) -> Any:  # returns the server's send, awaited by the app
            if stream.is_ended:
                return _nothing()  # ended at wrap-up: the app's later messages go nowhere
            kind = message["type"]
            if kind == "http.response.start":
                stream.headers = message.get("headers", ())
                if draining.is_set():
                    headers = list(stream.headers)
                    if not any(name.lower() == b"connection" for name, _ in headers):
                        message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif kind == "http.response.body":
                if message.get("more_body"):
                    if not stream.open and not _sized(stream.headers):  # a download is not ended early
                        stream.open = True
                        long_lived.add(stream)
                elif stream.open:
                    stream.open = False
                    long_lived.discard(stream)
            return send(message)

        try:
            await self.app(scope, stream.tracked_receive(receive), tracked_send)
        except asyncio.CancelledError:
            if draining.is_set():  # uvicorn's own timeout_graceful_shutdown cancelled it
                log.error(  # noqa: TRY400 - a cancellation: its traceback says nothing useful
                    "%s: dropped request %s (cancelled while draining)",
                    in_flight.server_name,
                    request().describe(),
                )
            raise
        finally:
            in_flight.discard(stream)


class UvicornService:
    """A ``uvicorn.Server``: uvicorn's own graceful exit, driven by graceful.

    Leave uvicorn's ``timeout_graceful_shutdown`` unset to let graceful's force-quit deadline
    bound the drain (each request still running then is logged, exit code 70); set it to make
    uvicorn cancel slow requests earlier (each is logged too, and the exit stays 0).
    """

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

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
        self._track: _Track | None = None
        self._lifecycle: Any = None  # set by serve()

    async def serve(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        self.in_flight.lifecycle = ctx.lifecycle
        self._draining, self._done, self._exit = asyncio.Event(), asyncio.Event(), asyncio.Event()
        on_force_quit(ctx.lifecycle, self._forced, name=f"cut requests still running on {self.name}")
        server, config = self.server, self.server.config
        if not config.loaded:
            config.load()
        self._track = _Track(config.loaded_app, self.in_flight, self._draining)
        config.loaded_app = self._track
        startup = server.startup

        async def startup_then_say_started(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            if server.started and not server.should_exit:
                ctx.started()

        server.startup = startup_then_say_started  # type: ignore[method-assign]
        server.main_loop = self._main_loop  # type: ignore[method-assign]
        server.shutdown = self._shutdown  # type: ignore[method-assign]
        self._lifecycle = ctx.lifecycle
        try:
            await self._serve_without_signal_handlers(self._listen(ctx))
        except SystemExit as exc:  # uvicorn's way to say its startup failed
            if isinstance(exc.__context__, OSError):  # it could not bind: run() logs that in one line
                raise exc.__context__ from None
            raise RuntimeError(
                f"{self.name} could not start (uvicorn exited with {exc.code}): the lifespan "
                "startup failed or the address is in use; uvicorn's log above says which"
            ) from None
        finally:
            self._done.set()

    def _listen(self, ctx: Context) -> list[Any] | None:
        """The listening socket for uvicorn's ``host``/``port`` or ``uds``, through
        ``graceful.listen()``; None for a ``Config(fd=...)``, which uvicorn opens itself."""
        config = self.server.config
        if config.fd is not None:
            return None
        if config.uds is None:
            sock = ctx.lifecycle.listen((config.host, config.port), backlog=config.backlog)
        else:  # as uvicorn: a socket file's mode is kept, a new one is 0o666
            mode = os.stat(config.uds).st_mode if os.path.exists(config.uds) else 0o666
            sock = ctx.lifecycle.listen(config.uds, backlog=config.backlog)
            os.chmod(config.uds, mode)
        # uvicorn logs its address only when it binds it itself
        _uvicorn_log.info("Uvicorn running on %s://%s", "https" if config.is_ssl else "http", describe(sock))
        return [sock]

    async def _serve_without_signal_handlers(self, sockets: list[Any] | None) -> None:
        """``Server.serve()`` minus ``capture_signals()``: graceful owns the signals."""
        inner = getattr(self.server, "_serve", None)  # uvicorn >= 0.29
        if inner is not None:
            await inner(sockets=sockets)
            return
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        await self.server.serve(sockets=sockets)

    async def _main_loop(self) -> None:
        """uvicorn's loop, woken by wrap-up instead of polling ``should_exit`` every 0.1 s."""
        assert self._exit is not None
        counter = 0
        while not await self.server.on_tick(counter):  # on_tick(0 mod 10): the once-a-second work
            counter = (counter + 10) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    async def _shutdown(self, sockets: Any = None) -> None:
        """uvicorn's ``Server.shutdown()``, minus its sleeps: the drain ends when the last
        connection does, not up to 0.2 s later.

        The same steps in the same order: stop listening, ask every connection to shut down
        (an idle one closes now, a busy one after its response), wait for the connections and
        then for the request tasks, bounded by ``timeout_graceful_shutdown`` (past it the
        tasks are cancelled, and the middleware logs each request so dropped), then the
        lifespan shutdown unless ``force_exit``. uvicorn sleeps 0.1 s before its first look
        and then looks every 0.1 s; this looks every 5 ms (uvicorn has no event to wait on):
        a few wake-ups while a drain is under way, nothing while serving.
        """
        server, state = self.server, self.server.server_state
        _uvicorn_log.info("Shutting down")
        for listener in server.servers:
            listener.close()
        for sock in sockets or ():
            sock.close()
        if self._lifecycle is not None and handing_over(self._lifecycle):
            await self._linger()
        for connection in list(state.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._drained(), server.config.timeout_graceful_shutdown)
        except asyncio.TimeoutError:
            _uvicorn_log.error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded", len(state.tasks)
            )
            for task in state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not server.force_exit:
            await server.lifespan.shutdown()

    async def _linger(self) -> None:
        """At a hand-over: up to ``LINGER`` s for the kept-alive connections to end by
        themselves (each response now says ``Connection: close``), before the rest are closed."""
        server, state = self.server, self.server.server_state
        loop = asyncio.get_running_loop()
        end = loop.time() + LINGER
        while state.connections and loop.time() < end and not server.force_exit:
            await asyncio.sleep(_LOOK)

    async def _drained(self) -> None:
        """Until uvicorn has no connection, then no request task, left (or is told to force-exit)."""
        server, state = self.server, self.server.server_state
        for pending in (state.connections, state.tasks):
            while pending and not server.force_exit:
                await asyncio.sleep(_LOOK)
        for listener in server.servers:
            await listener.wait_closed()

    async def wrap_up(self, ctx: Context) -> None:
        if self._done is None or self._draining is None or self._done.is_set():
            return
        await drain_delay_of(ctx.lifecycle).wait_said_async()  # not-ready, still serving
        self._draining.set()
        for listener in getattr(self.server, "servers", ()):
            listener.close()  # refuse new connections now, not at uvicorn's next tick
        if self._track is not None:  # before uvicorn's own shutdown would close them with 1012
            websockets, streams = await self._track.end_long_lived()
            log_ended_long_lived(self.name, websockets, streams)
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
