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
  them and runs the lifespan shutdown. Wrap-up waits for the requests until graceful's wrap-up
  timeout. uvicorn's own shutdown sleeps 0.1 s and then polls its connections every 0.1 s;
  graceful runs the same steps looking every 5 ms, so the drain ends within 5 ms of the last
  response, not ~0.2 s.
* long-lived connections: at wrap-up, before uvicorn's own shutdown (which would close them
  with 1012), each accepted WebSocket gets a close frame with code 1001 (Going Away: its client
  reconnects elsewhere) and its app a ``websocket.disconnect``; each streaming response (one
  that has sent a body with ``more_body`` and announced no ``Content-Length``) is ended with a
  last empty chunk, so its client sees a clean end of stream, and its app receives
  ``http.disconnect``. An app that is not waiting on ``receive()`` then would never hear it (a
  raw stream or a WebSocket that only sends: issue #27, item 8, held the process to the
  deadline; Starlette's streams listen, uvicorn's HTTP being ASGI 2.3): its task is cancelled,
  as aiohttp does, and the middleware takes the cancellation as the end. What the app sends after that is dropped.
  A response of announced length (a download) is not ended early, which would truncate it: it
  drains like any request. Both counts are logged with the drain.
* wrap-up timeout: each request still running is logged (method, path, client, age) and cut
  as uvicorn's own ``timeout_graceful_shutdown`` would (its task cancelled): answered 503 if its
  response had not started, its connection aborted if it had (the client sees it short). The
  lifecycle is marked failed (exit code 1), uvicorn's lifespan shutdown still runs, and the
  shutdown phase starts. A ``timeout_graceful_shutdown`` that differs is said at start.
* deadline: every request still under way (a handler that went on after its cut) is logged,
  uvicorn is told to force-exit and its connections are cut. A request that uvicorn's own
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
_uvicorn_log = logging.getLogger("uvicorn.error")
"""uvicorn's logger: where the adapter writes uvicorn's own shutdown lines."""
_LOOK = 0.005
"""Seconds between two looks of the drain at uvicorn's connections (uvicorn: 0.1 s)."""

__all__ = ["UvicornService", "adapt"]


class _LongLived:
    """One HTTP request or WebSocket, and how to end it the way its protocol wants.

    Every HTTP request gets one, so it is cheap until it matters: the future that wakes a
    pending ``receive()`` is made only when the app waits on ``receive()`` past the body.
    """

    __slots__ = (
        "_ended",
        "cancels",
        "cut",
        "headers",
        "is_ended",
        "kind",
        "listening",
        "open",
        "send",
        "started",
        "task",
    )

    def __init__(self, kind: str, send: Any, task: asyncio.Task[Any] | None) -> None:
        self.kind = kind
        """``"websocket"`` or ``"http"``."""
        self.send = send
        """The server's send, not the app's wrapped one."""
        self.task = task
        """The task that runs the app for this request (uvicorn: one a request)."""
        self.open = False
        """An accepted WebSocket, or a response body under way."""
        self.started = False
        """The response's start (status, headers) was sent."""
        self.is_ended = False
        """Ended at wrap-up."""
        self.cut = False
        """Cut at the wrap-up timeout."""
        self.cancels = 0
        """How many times the adapter cancelled its task (ended, cut)."""
        self.listening = 0
        """``receive()`` calls pending past the body: the app hears a disconnect."""
        self.headers: Any = ()
        """The response's, read only if it streams: a download is not ended."""
        self._ended: asyncio.Future[None] | None = None

    def ended(self) -> asyncio.Future[None]:
        """Done once wrap-up has ended this connection (made on first use)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self.is_ended:
                self._ended.set_result(None)
        return self._ended

    async def end(self) -> None:
        """End it the protocol's way: a WebSocket's close frame (1001), a stream's last chunk.

        An app waiting on ``receive()`` hears the disconnect and returns by itself. One that is
        not (it only sends: a raw ASGI stream that never reads, a WebSocket ticker) would never
        hear it: its task is cancelled, the way aiohttp tells a handler to stop, and the middleware takes that cancellation as its end (its
        ``finally`` blocks run; what it sends then goes nowhere).
        """
        self.is_ended = True
        # Read now: once woken, the app may stop listening to end itself.
        hears = self.listening > 0
        if self._ended is not None and not self._ended.done():
            # The app's pending receive() hears the disconnect.
            self._ended.set_result(None)
        try:
            if self.kind == "websocket":
                await self.send({"type": "websocket.close", "code": 1001, "reason": "server going away"})
            else:
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not hears:
                self.cancel()

    def cancel(self, why: str = "graceful: the connection was ended") -> asyncio.Task[Any] | None:
        """Cancel the app's task; the task, or None if it is over. The middleware counts the
        cancellations that are the adapter's, to tell them from uvicorn's and asyncio's own."""
        task = self.task
        if task is None or task.done():
            return None
        self.cancels += 1
        task.cancel(why)
        return task

    def ours(self) -> bool:
        """In the app's ``except CancelledError``: the cancellation was the adapter's alone
        (each of its ``cancel()`` undone; any other left, it is not ours to swallow)."""
        if not self.cancels:
            return False
        left = 0
        for _ in range(self.cancels):
            left = uncancel(self.task)
        return left == 0

    def cut_now(self) -> asyncio.Task[Any] | None:
        """At the wrap-up timeout: stop it whatever it is doing; its task, if still running.

        A response under way is cut (its connection aborted first, so that uvicorn takes the
        app's end as a client gone); one not started yet is answered 503 by the middleware.
        """
        # What the app sends from now on goes nowhere.
        self.cut = self.is_ended = True
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self.started:
            self.abort()
        return self.cancel("graceful: cut at the wrap-up timeout")

    def tracked_send(self, track: _Track) -> Any:
        """The WebSocket's send: an accepted one is long-lived until it closes."""

        async def send(message: Any) -> None:
            if self.is_ended:
                # Ended at wrap-up: the app's later messages go nowhere.
                return
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
            if not body_read:
                # The request body: no race needed, uvicorn's own receive() says http.disconnect
                # once the last chunk is sent. Waiting here is listening all the same.
                self.listening += 1
                try:
                    message = await receive()
                finally:
                    self.listening -= 1
                body_read = message["type"] != "http.request" or not message.get("more_body")
                return message
            if self.is_ended:
                return self.gone()
            pending = asyncio.ensure_future(receive())
            self.listening += 1
            try:
                await asyncio.wait({pending, self.ended()}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.listening -= 1
                if not pending.done():
                    pending.cancel()
            return pending.result() if pending.done() and not pending.cancelled() else self.gone()

        return tracked

    def abort(self) -> None:
        """Close the connection at once (a response under way is cut: its client sees it short).

        The transport is uvicorn's cycle's (``send`` is its bound method); the connection lost
        first, uvicorn takes the app's return as a client gone, with no error line.
        """
        transport = getattr(getattr(self.send, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()


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

    async def end_long_lived(self, ctx: Context) -> tuple[int, int]:
        """Close each open WebSocket with 1001 and end each stream, all at once; (WebSockets,
        streams) ended.

        Waited for until the wrap-up timeout at most: a WebSocket close that waits for its
        client's answer (uvicorn's ``websockets`` legacy protocol does) holds no longer, and
        uvicorn's shutdown closes such connections next anyway.
        """
        ending = [item for item in self.long_lived if item.open and not item.is_ended]
        self.long_lived.clear()
        if ending:
            together = asyncio.gather(*(self._end(item) for item in ending))
            await wait_within_wrap_up(ctx, together)
        websockets = sum(item.kind == "websocket" for item in ending)
        return websockets, len(ending) - websockets

    async def _end(self, item: _LongLived) -> None:
        try:
            await item.end()
        except Exception as exc:  # noqa: BLE001 - a client already gone is no failure
            log.debug("%s: ending a %s: %r", self.in_flight.server_name, item.kind, exc)

    def cut(self) -> list[asyncio.Task[Any]]:
        """At the wrap-up timeout: cut every request still under way; the tasks cancelled."""
        cut = (stream.cut_now() for stream in self.in_flight.under_way() if isinstance(stream, _LongLived))
        return [task for task in cut if task is not None]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            socket = _LongLived("websocket", send, asyncio.current_task())
            try:
                await self.app(scope, socket.tracked_receive(receive), socket.tracked_send(self))
            except asyncio.CancelledError:
                # Ours if it was closed with 1001 at wrap-up while it was not listening.
                if not socket.ours():
                    raise
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stream = _LongLived("http", send, asyncio.current_task())
        in_flight, draining, long_lived = self.in_flight, self.draining, self.long_lived
        # A Request only when one is logged.
        request = partial(_request, scope, monotonic())
        in_flight.add(stream, request)

        def tracked_send(message: Any) -> Any:
            """Returns the server's send, awaited by the app."""
            if stream.is_ended:
                # Ended at wrap-up (or cut): the app's later messages go nowhere.
                return _nothing()
            kind = message["type"]
            if kind == "http.response.start":
                stream.started = True
                stream.headers = message.get("headers", ())
                if draining.is_set():
                    headers = list(stream.headers)
                    if not any(name.lower() == b"connection" for name, _ in headers):
                        message = {**message, "headers": [*headers, (b"connection", b"close")]}
            elif kind == "http.response.body":
                if message.get("more_body"):
                    # A download is not ended early.
                    if not stream.open and not _sized(stream.headers):
                        stream.open = True
                        long_lived.add(stream)
                elif stream.open:
                    stream.open = False
                    long_lived.discard(stream)
            return send(message)

        try:
            await self.app(scope, stream.tracked_receive(receive), tracked_send)
        except asyncio.CancelledError:
            # Ended at wrap-up (its last chunk is sent), or cut.
            if stream.ours():
                if stream.cut and not stream.started:
                    await _unavailable(send)
                return
            if draining.is_set():
                # uvicorn's own timeout_graceful_shutdown cancelled it.
                log.error(  # noqa: TRY400 - a cancellation: its traceback says nothing useful
                    "%s: dropped request %s (cancelled while draining)",
                    in_flight.server_name,
                    request().describe(),
                )
            raise
        finally:
            in_flight.discard(stream)


UNAVAILABLE = b"Service Unavailable: the server stopped before this request was answered\n"
"""The body of the 503 a request cut at the wrap-up timeout gets, when no response had started."""


async def _unavailable(send: Any) -> None:
    """Answer 503 (``Connection: close``): the request was cut before its response started."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(UNAVAILABLE)).encode()),
        (b"connection", b"close"),
    ]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": UNAVAILABLE})
    except Exception as exc:  # noqa: BLE001 - the client went away meanwhile: nothing to answer
        log.debug("answering 503 to a request cut at the wrap-up timeout: %r", exc)


class UvicornService:
    """A ``uvicorn.Server``: uvicorn's own graceful exit, driven by graceful.

    Leave uvicorn's ``timeout_graceful_shutdown`` unset to let graceful's wrap-up timeout bound
    the drain (each request still running then is named and cut, exit code 1); set it shorter
    to make uvicorn cancel slow requests earlier (each is named too, and the exit stays 0). A
    value that differs from the wrap-up timeout is said at start (one WARNING): the shorter one
    governs.
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
        self._lifecycle: Any = None
        """Set by ``serve()``."""
        self._cutting = False
        """Cut at the wrap-up timeout: the drain waits for no request task."""

    async def serve(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        self.in_flight.lifecycle = ctx.lifecycle
        self._draining, self._done, self._exit = asyncio.Event(), asyncio.Event(), asyncio.Event()
        on_force_quit(ctx.lifecycle, self._forced, name=f"cut requests still running on {self.name}")
        say_which_timeout_governs(
            ctx.lifecycle,
            self.name,
            "uvicorn's timeout_graceful_shutdown",
            self.server.config.timeout_graceful_shutdown,
            "leave timeout_graceful_shutdown unset",
        )
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
        except SystemExit as exc:
            # uvicorn's way to say its startup failed. After an OSError, it could not bind:
            # run() logs that in one line.
            if isinstance(exc.__context__, OSError):
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
        else:
            # As uvicorn: a socket file's mode is kept, a new one is 0o666.
            mode = os.stat(config.uds).st_mode if os.path.exists(config.uds) else 0o666
            sock = ctx.lifecycle.listen(config.uds, backlog=config.backlog)
            os.chmod(config.uds, mode)
        # uvicorn logs its address only when it binds it itself
        _uvicorn_log.info("Uvicorn running on %s://%s", "https" if config.is_ssl else "http", describe(sock))
        return [sock]

    async def _serve_without_signal_handlers(self, sockets: list[Any] | None) -> None:
        """``Server.serve()`` minus ``capture_signals()``: graceful owns the signals."""
        # uvicorn >= 0.29 has it; before, capture_signals is replaced below.
        inner = getattr(self.server, "_serve", None)
        if inner is not None:
            await inner(sockets=sockets)
            return
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        await self.server.serve(sockets=sockets)

    async def _main_loop(self) -> None:
        """uvicorn's loop, woken by wrap-up instead of polling ``should_exit`` every 0.1 s."""
        assert self._exit is not None
        counter = 0
        # on_tick(0 mod 10): the once-a-second work, at each turn.
        while not await self.server.on_tick(counter):
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
        """Until uvicorn has no connection, then no request task, left (or is told to force-exit).

        Once the wrap-up timeout has cut the requests, a task that ignores its cancellation is
        not waited for (it was named; the deadline names it again if it is still there)."""
        server, state = self.server, self.server.server_state
        while state.connections and not server.force_exit:
            await asyncio.sleep(_LOOK)
        while state.tasks and not server.force_exit and not self._cutting:
            await asyncio.sleep(_LOOK)
        for listener in server.servers:
            await listener.wait_closed()

    async def wrap_up(self, ctx: Context) -> None:
        if self._done is None or self._draining is None or self._done.is_set():
            return
        # The drain delay: not-ready to probes, still serving.
        await drain_delay_of(ctx.lifecycle).wait_said_async()
        self._draining.set()
        for listener in getattr(self.server, "servers", ()):
            # Refuse new connections now, not at uvicorn's next tick.
            listener.close()
        # Before uvicorn's own shutdown would close them with 1012.
        if self._track is not None:
            websockets, streams = await self._track.end_long_lived(ctx)
            log_ended_long_lived(self.name, websockets, streams)
        self.server.should_exit = True
        if self._exit is not None:
            self._exit.set()
        log.info("%s: stopped accepting; draining %d request(s)", self.name, len(self.in_flight))
        done = asyncio.ensure_future(self._done.wait())
        try:
            if await wait_within_wrap_up(ctx, done):
                return
            await self._cut_at_wrap_up(ctx)
            # uvicorn's own last steps (the lifespan shutdown): the app's cleanup, not a request
            finished, _ = await asyncio.wait({done}, timeout=ctx.remaining())
            if not finished:
                log.warning(
                    "%s: %d request(s) still running when the budget ran out", self.name, len(self.in_flight)
                )
        finally:
            done.cancel()

    async def _cut_at_wrap_up(self, ctx: Context) -> None:
        """The wrap-up timeout has come: name each request still running and cut it, so that
        the shutdown phase starts (the lifecycle is marked failed: exit code 1).

        As uvicorn's own ``timeout_graceful_shutdown`` does, each request's task is cancelled:
        one whose response had not started is answered 503 (``Connection: close``), one under
        way has its connection aborted (its client sees the response cut short). Then what is
        still open (a response its client does not read, a WebSocket close nobody answers) is
        closed. uvicorn's lifespan shutdown still runs.
        """
        count = self.in_flight.log_dropped(AT_WRAP_UP)
        if count:
            cut_at_wrap_up(ctx.lifecycle, self.name, f"{count} request(s) cut")
        self._cutting = True
        tasks = self._track.cut() if self._track is not None else []
        if tasks:
            # One loop turn each, unless one catches the cancellation and goes on.
            remaining = ctx.remaining()
            await asyncio.wait(tasks, timeout=CUT_WAIT if remaining is None else min(CUT_WAIT, remaining))
        left = [c for c in list(self.server.server_state.connections) if getattr(c, "transport", None)]
        for connection in left:
            connection.transport.abort()
        if left:
            log.warning("%s: closed %d connection(s) still open %s", self.name, len(left), AT_WRAP_UP)

    async def close(self, ctx: Context) -> None:
        return None

    def _forced(self) -> None:
        """At the deadline (a helper thread): name every dropped request, then cut them."""
        self.in_flight.cut_at_deadline(self._loop, self._cut)

    def _cut(self) -> None:
        # uvicorn stops waiting and skips the lifespan shutdown.
        self.server.force_exit = True
        for connection in list(self.server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


def adapt(obj: object) -> UvicornService | None:
    """The service for a ``uvicorn.Server``; None for anything else."""
    if isinstance(obj, uvicorn.Server):
        return UvicornService(obj)
    return None
