"""``http.server``, ``socketserver`` and ``wsgiref`` servers, drained without losing a request.

Why: the standard library's ``ThreadingHTTPServer`` answers each connection on a *daemon*
thread that ``server_close()`` does not join, so a stock shutdown drops every request in
flight; ``serve_forever()`` also only notices ``shutdown()`` every 0.5 s. This adapter runs
its own accept loop (woken at once by a socket pair), tracks every connection and every request
itself, and drains in the order every graceful web adapter follows:

1. wait out the drain delay (``graceful.readiness``): still serving, already not-ready;
2. stop accepting: connections already queued in the backlog are accepted and served, then the
   listening socket closes, so a new connection is refused at once instead of hanging;
3. idle keep-alive connections are closed; a request in flight finishes and its response says
   ``Connection: close``; a connection accepted but silent for ``IDLE_GRACE`` s is closed;
4. at the force-quit deadline each request still running is logged (method, path, client, how
   long it had run) and its connection is shut down.

A pause (SIGTSTP) does the same without a deadline. A handler that calls ``server.shutdown()``
asks graceful for a shutdown instead (``serve_forever()`` is not what runs the loop here).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from socketserver import TCPServer

from .._service import Context
from ._drain import wait_drain_delay_said
from ._inflight import Request

monotonic = time.monotonic

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .._lifecycle import Lifecycle

log = logging.getLogger("graceful")

__all__ = ["IDLE_GRACE", "HTTPServerService", "adapt"]

IDLE_GRACE = 1.0
"""Seconds a connection accepted during the drain may stay silent before it is closed."""


class _Tracker:
    """Every open connection, and when the request it is answering began, if any.

    A request's start and end are single dict stores, atomic under the GIL and written by the
    connection's own thread only: no lock on the per-request path. The lock guards what
    changes the dicts' keys (a connection opens or closes) and every read that iterates.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.open: dict[Any, float | None] = {}  # handler -> when its current request began
        self.served: dict[Any, int] = {}  # handler -> requests answered so far
        self.draining = False
        self.lifecycle: Lifecycle | None = None  # set by serve()

    def opened(self, handler: Any) -> None:
        with self._lock:
            self.open[handler] = None
            self.served[handler] = 0

    def closed(self, handler: Any) -> None:
        with self._lock:
            self.open.pop(handler, None)
            self.served.pop(handler, None)
            self._idle.notify_all()

    def in_flight(self) -> list[Request]:
        with self._lock:
            running = [(h, started) for h, started in self.open.items() if started is not None]
        requests = []
        for handler, started in running:
            request = Request(handler.command, handler.path, handler.address_string())
            request.started = started
            requests.append(request)
        return requests

    def idle(self, *, fresh_too: bool) -> list[Any]:
        """Connections with no request under way (``fresh_too``: also those never used)."""
        with self._lock:
            return [h for h, r in self.open.items() if r is None and (fresh_too or self.served.get(h, 0))]

    def wait_empty(self, timeout: float | None) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: not self.open, timeout)


def _shut(handler: Any) -> None:
    with contextlib.suppress(OSError):
        handler.connection.shutdown(socket.SHUT_RDWR)


def _has_input(handler: Any) -> bool:
    """Bytes (or EOF) waiting on the connection: a request is arriving, do not cut it."""
    try:
        readable, _, _ = select.select([handler.connection], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


def _said_connection(handler: Any) -> bool:
    """The response's headers so far include a ``Connection`` header (checked while draining)."""
    return any(line[:11].lower() == b"connection:" for line in getattr(handler, "_headers_buffer", ()))


def _tracked_handler(base: type, tracker: _Tracker) -> type:
    """A subclass of the server's handler class that reports to ``tracker``."""

    class Tracked(base):  # type: ignore[misc]
        def setup(self) -> None:
            super().setup()
            tracker.opened(self)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                tracker.closed(self)

    if not issubclass(base, BaseHTTPRequestHandler):
        return Tracked  # a plain socketserver handler: connections only
    http_base: type[BaseHTTPRequestHandler] = base
    opened, served = tracker.open, tracker.served

    class TrackedHTTP(Tracked):
        # Every request passes here: the base class's methods are called directly (no super()),
        # and what only matters while draining is checked after one attribute read.
        def handle_one_request(self) -> None:
            if tracker.draining and tracker.served.get(self, 0):
                self.close_connection = True  # keep-alive ends: answered one, take no more
                return
            try:
                http_base.handle_one_request(self)
            finally:
                if opened.get(self) is not None:  # a request was under way, and is answered
                    opened[self] = None
                    served[self] += 1
                    lifecycle = tracker.lifecycle
                    if lifecycle is not None and lifecycle.stopping:
                        lifecycle.report_progress()  # the drain moves: systemd gives more time

        def parse_request(self) -> bool:
            ok: bool = http_base.parse_request(self)
            if ok:
                opened[self] = monotonic()  # a request is under way
            return ok

        def end_headers(self) -> None:
            if tracker.draining and not _said_connection(self):
                self.send_header("Connection", "close")
                self.close_connection = True
            http_base.end_headers(self)

    TrackedHTTP.__name__ = TrackedHTTP.__qualname__ = base.__name__
    return TrackedHTTP


def _track(factory: Any, tracker: _Tracker) -> Any:
    """The handler class (or ``functools.partial`` of one, as ``http.server`` docs suggest)."""
    if isinstance(factory, functools.partial) and isinstance(factory.func, type):
        return functools.partial(_tracked_handler(factory.func, tracker), *factory.args, **factory.keywords)
    if isinstance(factory, type):
        return _tracked_handler(factory, tracker)
    raise TypeError(
        f"graceful cannot track the requests of a server whose RequestHandlerClass is "
        f"{factory!r}: use a handler class, or functools.partial(HandlerClass, ...)"
    )


class HTTPServerService:
    """Any ``socketserver.TCPServer`` (UDP and Unix servers included): ``http.server``, ``wsgiref``, your own TCP server."""

    def __init__(self, server: TCPServer, name: str | None = None) -> None:
        if not isinstance(server, TCPServer):
            raise TypeError(f"HTTPServerService takes a socketserver server, not {type(server).__name__}")
        self.server = server
        self.name = name or type(server).__name__
        self.tracker = _Tracker()
        server.RequestHandlerClass = _track(server.RequestHandlerClass, self.tracker)
        self._widen_backlog()
        self._wake: tuple[socket.socket, socket.socket] | None = None  # made by serve()
        self._stop = threading.Event()
        self._loop_left = threading.Event()
        self._ctx: Context | None = None

    def _widen_backlog(self) -> None:
        """socketserver listens with a backlog of 5: a burst of clients would see SYNs dropped
        and retried seconds later. Listen again with the system's maximum (Linux adjusts it)."""
        sock = self.server.socket
        if sock.type == socket.SOCK_STREAM and self.server.request_queue_size < socket.SOMAXCONN:
            with contextlib.suppress(OSError):
                sock.listen(socket.SOMAXCONN)

    # -- serve --------------------------------------------------------------------------------

    def serve(self, ctx: Context) -> None:
        self._ctx = ctx
        self.tracker.lifecycle = ctx.lifecycle
        ctx.lifecycle.on_force_quit(self._drop_the_rest, name=f"drop requests of {self.name}")
        self.server.shutdown = self._shutdown_asked  # type: ignore[method-assign]
        self._wake = socket.socketpair()
        wake_r = self._wake[0]
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.server.socket, selectors.EVENT_READ)
                selector.register(wake_r, selectors.EVENT_READ)
                ctx.started()
                while not self._stop.is_set():
                    for key, _ in selector.select():
                        if key.fileobj is self.server.socket and not self._stop.is_set():
                            self.server._handle_request_noblock()  # type: ignore[attr-defined]
                    self.server.service_actions()
                self._accept_backlog(selector, wake_r)
        finally:
            self._close_listener()
            self._loop_left.set()

    def _accept_backlog(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> None:
        """Serve the connections the kernel already accepted for us, then stop listening."""
        selector.unregister(wake_r)
        limit = 2 * int(getattr(self.server, "request_queue_size", 5))  # bounded under a stream
        while limit and selector.select(0):
            self.server._handle_request_noblock()  # type: ignore[attr-defined]
            limit -= 1

    def _close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.server.socket.close()
        for end in self._wake or ():
            end.close()

    def _shutdown_asked(self) -> None:
        """``server.shutdown()`` called by user code: a shutdown of the whole process."""
        if self._ctx is not None:
            self._ctx.lifecycle.shutdown(f"{self.name}.shutdown() was called", wait=False)

    # -- wrap-up: stop accepting, drain -------------------------------------------------------

    def wrap_up(self, ctx: Context) -> None:
        wait_drain_delay_said(ctx.lifecycle)
        self.tracker.draining = True
        self._stop.set()
        if self._wake is not None:
            with contextlib.suppress(OSError):  # closed already: the loop has left
                self._wake[1].send(b"\0")
        if not self._drain(ctx):
            if not self._loop_left.is_set():
                log.warning("%s: the accept loop did not stop within the budget", self.name)
            left = self.tracker.in_flight()
            log.warning("%s: %d request(s) still running when the budget ran out", self.name, len(left))

    def _drain(self, ctx: Context) -> bool:
        """Until the accept loop has left and every connection is closed, close the idle ones.

        Idle connections are closed while the loop is still leaving too: a single-threaded
        server's loop is itself busy with a keep-alive connection until that one closes.
        True once drained; False when the budget ran out.
        """
        listening_closed: float | None = None
        while True:
            if listening_closed is None and self._loop_left.is_set():
                listening_closed = time.monotonic()
                log.info(
                    "%s: stopped accepting; draining %d connection(s)", self.name, len(self.tracker.open)
                )
            fresh_too = listening_closed is not None and time.monotonic() - listening_closed >= IDLE_GRACE
            for handler in self.tracker.idle(fresh_too=fresh_too):
                if not _has_input(handler):
                    _shut(handler)
            remaining = ctx.remaining()
            step = 0.05 if remaining is None else min(0.05, max(remaining, 0.0))
            if listening_closed is None:
                self._loop_left.wait(step)
            elif self.tracker.wait_empty(step):
                return True
            if remaining is not None and remaining <= 0:
                return False

    def close(self, ctx: Context) -> None:
        with contextlib.suppress(OSError):
            self.server.server_close()

    def _drop_the_rest(self) -> None:
        for request in self.tracker.in_flight():
            log.error("%s: dropped request %s at the force-quit deadline", self.name, request.describe())
        for handler in list(self.tracker.open):
            _shut(handler)


def adapt(obj: object) -> HTTPServerService | None:
    """The service for a ``socketserver``/``http.server``/``wsgiref`` server; else None."""
    if isinstance(obj, TCPServer):
        return HTTPServerService(obj)
    return None
