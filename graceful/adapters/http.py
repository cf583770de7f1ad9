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
4. at the wrap-up timeout each request still running is logged (method, path, client, how long
   it had run), every idle connection is closed, the lifecycle is marked failed (exit code 1)
   and the drain returns, so the shutdown phase starts. A thread cannot be stopped: each handler
   still running is *abandoned*, left to finish or to end with the process. Its socket is left
   open under it (shut, it would only turn the handler's next write into an error and a
   traceback): a handler that finishes during the shutdown phase still answers, and otherwise
   its client sees the connection closed, with no response or a short one, when the process
   exits. Handler threads are made daemons (``daemon_threads``), so one of them never holds the
   exit, and ``server_close()`` does not wait for them;
5. at the force-quit deadline, if the process is still there (a stuck shutdown listener), each
   request still running is logged again and its connection is shut down.

Upgraded and hijacked connections (a handler that answered ``101 Switching Protocols``, a
WebSocket written by hand, or a ``CONNECT`` tunnel) never end by themselves, and a standard
library server does not know their protocol: it cannot send a WebSocket its 1001 close frame
as the uvicorn and aiohttp adapters do, and cutting the socket would be a reset, not a
goodbye. So the adapter names each one in the drain log when the drain starts (what it is,
method, path, client, how long it has been open), keeps waiting for its handler under the
wrap-up timeout (a handler ends it the protocol's way once ``graceful.is_stopping()`` is true),
counts those that ended, and names each again when the wrap-up timeout abandons it (and once
more if the deadline cuts it). Nothing is waited on silently.

A pause (SIGTSTP) does the same without a deadline. A handler that calls ``server.shutdown()``
asks graceful for a shutdown instead (``serve_forever()`` is not what runs the loop here).

Listening sockets that outlive the process (``graceful.listen``, contract section 11): a server
built with ``bind_and_activate=False`` is bound by ``serve()`` through ``listen()`` (systemd's
socket, the previous generation's, or a new one; then what ``server_bind()`` does after its bind
is done too: ``server_address``, and ``server_name``/``server_port`` for ``http.server``, the
WSGI environ for ``wsgiref``); a server bound already is left as it is. The listening socket is
non-blocking: during an upgrade in place two processes accept on it, and a blocking
``accept()`` whose connection the other process took would hang the loop. At a hand-over to a
new generation (``_upgrade``), step 2 closes this process's fd only (the new one keeps the
socket: nothing is refused, so the backlog is left to it), and step 3 lets a kept-alive
connection send one more request, answered with ``Connection: close``, rather than closing it
under a client that may be sending on it (``LINGER``).

A client that goes away early (a balancer resetting its pooled connections) is counted and
logged at DEBUG, never a traceback: ``handle_error`` is overridden on the server *instance*,
and ``_inflight`` says how it is told from a handler's own failing call to a backend, which is
still reported. Only the error path changes: a request served costs what it cost.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import TCPServer, ThreadingMixIn

from .._checks import TYPE_CHECKING
from .._drain_delay import drain_delay_of
from .._lifecycle import on_force_quit, report_progress
from .._service import Context
from .._sockets import is_listening
from .._upgrade import LINGER, handing_over
from ._inflight import AT_WRAP_UP, GONE, TIMED_OUT, Request, cut_at_wrap_up, describe_client, peer_gone

monotonic = time.monotonic

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .._drain_delay import Traffic
    from .._lifecycle import Lifecycle

log = logging.getLogger("graceful")

__all__ = ["IDLE_GRACE", "HTTPServerService", "adapt"]

IDLE_GRACE = 1.0
"""Seconds a connection accepted during the drain may stay silent before it is closed."""


def _request(handler: Any, started: float) -> Request:
    """The request ``handler`` is answering, for a log line (made only when one is written)."""
    return Request(handler.command, handler.path, handler.address_string(), started)


class _Tracker:
    """Every open connection, and when the request it is answering began, if any.

    A request's start and end are single dict stores, atomic under the GIL and written by the
    connection's own thread only: no lock on the per-request path. The lock guards what
    changes the dicts' keys (a connection opens or closes) and every read that iterates.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.open: dict[Any, float | None] = {}
        """Handler -> when its current request began (None between requests)."""
        self.served: dict[Any, int] = {}
        """Handler -> requests answered so far."""
        self.upgraded: dict[Any, str] = {}
        """Handler -> what it became (``"tunnel"``, ...)."""
        self.draining = False
        self.linger = False
        """A hand-over: kept-alive connections get one more request (with ``Connection: close``)."""
        self.lifecycle: Lifecycle | None = None
        """Set by ``serve()``."""
        self.traffic: Traffic | None = None
        """Set by ``serve()``."""
        self.gone = 0
        """Clients that went away early."""
        self.name = ""
        """The service's, for the log lines (set by ``HTTPServerService``)."""

    def client_gone(self, client: object, why: str) -> None:
        """Count a client that closed or reset early; one DEBUG line, never a traceback."""
        with self._lock:
            self.gone += 1
            count = self.gone
        log.debug(
            "%s: client %s went away early (%s); %d so far", self.name, describe_client(client), why, count
        )

    def opened(self, handler: Any) -> None:
        with self._lock:
            self.open[handler] = None
            self.served[handler] = 0

    def closed(self, handler: Any) -> None:
        with self._lock:
            self.open.pop(handler, None)
            self.served.pop(handler, None)
            self.upgraded.pop(handler, None)
            self._idle.notify_all()

    def upgrade(self, handler: Any, what: str | None) -> None:
        """The connection left HTTP (101, a CONNECT tunnel): it lasts as long as its handler
        (``what`` None: its handler has returned)."""
        with self._lock:
            if what is None:
                self.upgraded.pop(handler, None)
            else:
                self.upgraded[handler] = what

    def long_lived(self) -> list[tuple[str, Request]]:
        """(what it became, its request) for each upgraded connection still open."""
        with self._lock:
            running = [(h, what, self.open.get(h)) for h, what in self.upgraded.items()]
        return [(what, _request(h, started)) for h, what, started in running if started is not None]

    def in_flight(self, *, upgraded_too: bool = True) -> list[Request]:
        with self._lock:
            running = [
                (h, started)
                for h, started in self.open.items()
                if started is not None and (upgraded_too or h not in self.upgraded)
            ]
        return [_request(h, started) for h, started in running]

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
        # A plain socketserver handler: connections only.
        return Tracked
    http_base: type[BaseHTTPRequestHandler] = base
    opened, served, upgraded = tracker.open, tracker.served, tracker.upgraded

    class TrackedHTTP(Tracked):
        # Every request passes here: the base class's methods are called directly (no super()),
        # and what only matters while draining is checked after one attribute read.
        def handle_one_request(self) -> None:
            if tracker.draining and tracker.served.get(self, 0) and not tracker.linger:
                # Keep-alive ends: answered one, take no more.
                self.close_connection = True
                return
            try:
                http_base.handle_one_request(self)
            finally:
                # A request was under way, and is answered.
                if opened.get(self) is not None:
                    opened[self] = None
                    served[self] += 1
                    lifecycle = tracker.lifecycle
                    if lifecycle is not None and lifecycle.stopping:
                        # The drain moves: systemd gives more time.
                        report_progress(lifecycle)
                    # The upgraded protocol has ended with its handler.
                    if self in upgraded:
                        tracker.upgrade(self, None)

        def parse_request(self) -> bool:
            ok: bool = http_base.parse_request(self)
            if ok:
                # A request is under way.
                opened[self] = monotonic()
                traffic = tracker.traffic
                if traffic is not None:
                    # What an auto drain delay watches (arrived(), inline).
                    traffic.last = traffic.now()
            return ok

        def send_response_only(self, code: int, message: str | None = None) -> None:
            # 101 Switching Protocols: the handler speaks another protocol now.
            if code == 101:
                protocol = self.headers.get("Upgrade")
                tracker.upgrade(
                    self, f"upgraded connection ({protocol})" if protocol else "upgraded connection"
                )
            elif code < 300 and self.command == "CONNECT":
                tracker.upgrade(self, "tunnel")
            http_base.send_response_only(self, code, message)

        def end_headers(self) -> None:
            # While draining, a response says ``Connection: close`` unless it closes already (the
            # handler said so, or the client did); not an upgraded connection's 101.
            if tracker.draining and not self.close_connection and self not in tracker.upgraded:
                self.send_header("Connection", "close")
                self.close_connection = True
            http_base.end_headers(self)

        def log_error(self, format: str, *args: Any) -> None:
            # Called on errors only. The stdlib's timeout line with no request under way: the
            # client kept its connection open and idle past ``timeout`` (a pooled keep-alive).
            if format == TIMED_OUT and tracker.open.get(self) is None:
                tracker.client_gone(self.client_address, "idle past the timeout")
                return
            super().log_error(format, *args)

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

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

    def __init__(self, server: TCPServer, name: str | None = None) -> None:
        if not isinstance(server, TCPServer):
            raise TypeError(f"HTTPServerService takes a socketserver server, not {type(server).__name__}")
        self.server = server
        self.name = name or type(server).__name__
        self.tracker = _Tracker()
        self.tracker.name = self.name
        server.RequestHandlerClass = _track(server.RequestHandlerClass, self.tracker)
        self._report_error: Callable[[Any, Any], None] = server.handle_error
        """The server's own ``handle_error``: the user's, if overridden."""
        if isinstance(server, ThreadingMixIn):
            # A handler abandoned at the wrap-up timeout must not hold the exit, nor server_close()
            # (which joins the threads that are not daemons): the drain has waited for the others.
            server.daemon_threads = True
        server.handle_error = self._handle_error  # type: ignore[method-assign]  # this instance only
        self._widen_backlog()
        self._wake: tuple[socket.socket, socket.socket] | None = None
        """The socket pair that wakes the accept loop at wrap-up; made by ``serve()``."""
        self._stop = threading.Event()
        self._loop_left = threading.Event()
        self._ctx: Context | None = None

    @property
    def clients_gone(self) -> int:
        """Clients that closed or reset their connection early (logged at DEBUG, not errors)."""
        return self.tracker.gone

    def _handle_error(self, request: Any, client_address: Any) -> None:
        """The server's ``handle_error``: a client gone is counted, anything else reported."""
        exc = sys.exc_info()[1]
        if isinstance(exc, GONE) and peer_gone(request):
            self.tracker.client_gone(client_address, f"{type(exc).__name__}: {exc}")
            return
        self._report_error(request, client_address)

    def _widen_backlog(self) -> None:
        """socketserver listens with a backlog of 5: a burst of clients would see SYNs dropped
        and retried seconds later. Listen again with the system's maximum (Linux adjusts it).
        Not a socket that is not listening yet: ``listen()`` on an unbound TCP socket binds it
        to a random port."""
        sock = self.server.socket
        if is_listening(sock) and self.server.request_queue_size < socket.SOMAXCONN:
            with contextlib.suppress(OSError):
                sock.listen(socket.SOMAXCONN)

    def _bind(self, ctx: Context) -> None:
        """A stream server built with ``bind_and_activate=False``: bound through ``listen()``.

        What ``server_bind()`` does after its bind is done here too (the socket is bound
        already: its ``bind()`` would fail). A subclass that overrides ``server_bind()`` is told
        that its override did not run."""
        server = self.server
        if server.socket.type != socket.SOCK_STREAM or not _unbound(server.socket):
            return
        sock = ctx.lifecycle.listen(server.server_address)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        if isinstance(server, HTTPServer) and sock.family != getattr(socket, "AF_UNIX", None):
            host, port = server.server_address[:2]
            server.server_name = socket.getfqdn(str(host))
            server.server_port = port
        # wsgiref's WSGIServer has one.
        setup_environ = getattr(server, "setup_environ", None)
        if callable(setup_environ):
            setup_environ()
        if getattr(type(server), "server_bind", None) not in _stdlib_binds():
            log.warning(
                "%s: graceful bound it with graceful.listen() (bind_and_activate=False) and did not "
                "call its own server_bind(); if that override does more than bind, bind the server "
                "yourself with graceful.listen()",
                self.name,
            )

    # -- serve --------------------------------------------------------------------------------

    def serve(self, ctx: Context) -> None:
        self._ctx = ctx
        self._bind(ctx)
        self._widen_backlog()
        # Two processes may accept on it: see the docstring.
        self.server.socket.setblocking(False)
        # Elsewhere than on Linux an accepted socket inherits O_NONBLOCK.
        if sys.platform != "linux":
            self.server.get_request = self._accept_blocking  # type: ignore[method-assign]
        self.tracker.lifecycle = ctx.lifecycle
        self.tracker.traffic = drain_delay_of(ctx.lifecycle).traffic
        on_force_quit(ctx.lifecycle, self._drop_the_rest, name=f"drop requests of {self.name}")
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

    def _accept_blocking(self) -> tuple[socket.socket, Any]:
        request, client = self.server.socket.accept()
        request.setblocking(True)
        return request, client

    def _accept_backlog(self, selector: selectors.BaseSelector, wake_r: socket.socket) -> None:
        """Serve the connections the kernel already accepted for us, then stop listening
        (not at a hand-over: the new generation accepts them, and nothing is closed for it)."""
        selector.unregister(wake_r)
        if self.tracker.linger:
            return
        # Bounded under a stream of new connections.
        limit = 2 * int(getattr(self.server, "request_queue_size", 5))
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
        drain_delay_of(ctx.lifecycle).wait_said()
        self.tracker.linger = handing_over(ctx.lifecycle)
        self.tracker.draining = True
        self._stop.set()
        if self._wake is not None:
            # Closed already: the loop has left.
            with contextlib.suppress(OSError):
                self._wake[1].send(b"\0")
        if not self._drain(ctx):
            self._abandon_at_wrap_up(ctx)

    def _abandon_at_wrap_up(self, ctx: Context) -> None:
        """The wrap-up timeout has come: name each request (and upgraded connection) still
        running, close the idle connections, mark the lifecycle failed and return (the module
        docstring says why the handlers' threads and sockets are left as they are)."""
        if not self._loop_left.is_set():
            # A one-thread server: its loop is the stuck handler.
            log.warning("%s: the accept loop did not stop by the wrap-up timeout", self.name)
        for what, request in self.tracker.long_lived():
            log.error("%s: abandoned %s %s %s", self.name, what, request.describe(), AT_WRAP_UP)
        requests = self.tracker.in_flight(upgraded_too=False)
        for request in requests:
            log.error("%s: abandoned request %s %s", self.name, request.describe(), AT_WRAP_UP)
        count = len(self.tracker.in_flight())
        if count:
            log.warning(
                "%s: a handler thread cannot be stopped: the %d abandoned above run on, and end "
                "with the process (their clients then see the connection closed)",
                self.name,
                count,
            )
            cut_at_wrap_up(ctx.lifecycle, self.name, f"{count} request(s) abandoned")
        for handler in self.tracker.idle(fresh_too=True):
            _shut(handler)

    def _drain(self, ctx: Context) -> bool:
        """Until the accept loop has left and every connection is closed, close the idle ones.

        Idle connections are closed while the loop is still leaving too: a single-threaded
        server's loop is itself busy with a keep-alive connection until that one closes.
        True once drained; False at the wrap-up timeout.
        """
        listening_closed: float | None = None
        # Now, not once the loop has left: a one-thread server's loop may be what runs one.
        named = self._name_long_lived()
        # At a hand-over: since when each was seen idle.
        idle_since: dict[Any, float] = {}
        while True:
            if listening_closed is None and self._loop_left.is_set():
                listening_closed = time.monotonic()
                log.info(
                    "%s: stopped accepting; draining %d connection(s) (%d client(s) had gone away early)",
                    self.name,
                    len(self.tracker.open),
                    self.tracker.gone,
                )
            fresh_too = listening_closed is not None and time.monotonic() - listening_closed >= IDLE_GRACE
            for handler in self._to_close(fresh_too, idle_since):
                if not _has_input(handler):
                    _shut(handler)
            # None in a pause: no bound (read each turn).
            remaining = ctx.wrap_up_remaining()
            step = 0.05 if remaining is None else min(0.05, max(remaining, 0.0))
            if listening_closed is None:
                self._loop_left.wait(step)
            elif self.tracker.wait_empty(step):
                if named:
                    log.info("%s: %d upgraded connection(s) ended during the drain", self.name, named)
                return True
            if remaining is not None and remaining <= 0:
                return False

    def _to_close(self, fresh_too: bool, idle_since: dict[Any, float]) -> list[Any]:
        """The idle connections to close now: all of them, or at a hand-over those idle for
        ``LINGER`` s (until then a request they send is answered with ``Connection: close``)."""
        idle = self.tracker.idle(fresh_too=fresh_too)
        if not self.tracker.linger:
            return idle
        now = time.monotonic()
        seen = {handler: idle_since.get(handler, now) for handler in idle}
        idle_since.clear()
        idle_since.update(seen)
        return [handler for handler, since in seen.items() if now - since >= LINGER]

    def _name_long_lived(self) -> int:
        """One line for each upgraded connection the drain now waits on; how many."""
        long_lived = self.tracker.long_lived()
        for what, request in long_lived:
            log.warning(
                "%s: waiting on %s %s: graceful cannot end a protocol it does not know; its handler "
                "ends it (graceful.is_stopping()), or the wrap-up timeout abandons it",
                self.name,
                what,
                request.describe(),
            )
        return len(long_lived)

    def close(self, ctx: Context) -> None:
        with contextlib.suppress(OSError):
            self.server.server_close()

    def _drop_the_rest(self) -> None:
        long_lived = self.tracker.long_lived()
        for what, request in long_lived:
            log.error("%s: cut %s %s at the force-quit deadline", self.name, what, request.describe())
        # The upgraded ones are named once, above, as what they are.
        for request in self.tracker.in_flight(upgraded_too=False):
            log.error("%s: dropped request %s at the force-quit deadline", self.name, request.describe())
        for handler in list(self.tracker.open):
            _shut(handler)


def _unbound(sock: socket.socket) -> bool:
    """Not bound yet (a server built with ``bind_and_activate=False``)."""
    if is_listening(sock):
        return False
    try:
        name = sock.getsockname()
    except OSError:
        return True
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return bool(name[1] == 0)
    return not name


def _stdlib_binds() -> tuple[object, ...]:
    """The standard library's ``server_bind`` methods: ``_bind()`` does what they do."""
    binds: list[object] = [TCPServer.server_bind, HTTPServer.server_bind]
    wsgiref = sys.modules.get("wsgiref.simple_server")
    if wsgiref is not None:
        binds.append(wsgiref.WSGIServer.server_bind)
    return tuple(binds)


def adapt(obj: object) -> HTTPServerService | None:
    """The service for a ``socketserver``/``http.server``/``wsgiref`` server; else None."""
    if isinstance(obj, TCPServer):
        return HTTPServerService(obj)
    return None
