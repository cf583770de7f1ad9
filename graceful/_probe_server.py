"""The probe port: ``/readyz`` and ``/livez`` on one selector thread, whatever its clients do.

Why not ``http.server``: the probe port is reachable by whoever can reach the host (``run()``
and the hosts bind every interface, since the kubelet probes the pod's IP), and the stdlib's
``ThreadingHTTPServer`` gives each connection a thread of its own that waits for a request
without a timeout. 800 idle connections held 800 threads (+21 MB) for as long as the client
liked; under a container's pids limit, 200 of them left no thread for ``/readyz`` nor for the
shutdown itself (issue #27: SIGTERM failed with "can't start new thread", the shutdown
listeners never ran). A probe costs microseconds to answer; nothing about it needs a thread.

So one thread answers every connection, from a selector (epoll on Linux), with non-blocking
sockets, and nothing is held per client without a bound:

* a whole request (line and headers) within :attr:`ProbeServer.TIMEOUT` of the connection,
  else it is closed: an idle or slow client (slowloris) costs a socket for 5 s, not a thread
  for ever;
* at most :attr:`ProbeServer.MAX_REQUEST` bytes of it (431 past that);
* at most :attr:`ProbeServer.MAX_CONNECTIONS` open at once: at the cap the *oldest* is closed
  to make room, rather than the new one refused, so a prober that connects and asks at once
  (the kubelet, a balancer's check) is answered however many idle connections are open. Every
  connection open is one that has not yet sent a whole request (each is answered at once, then
  closed), so the oldest is the idle one that has had the longest to speak;
* the answer is one ``send()`` of under 200 bytes, ``Connection: close``; a client that does
  not read it is bounded by the same timeout.

``GET`` or ``HEAD`` of ``/readyz`` or ``/livez`` (a query string is ignored); any other path is
404, any other method 405, anything that is not HTTP/1.x 400. Each answer is computed from the
lifecycle at the moment the request is whole (two attribute reads), never cached. A client
that resets early (HAProxy resets once it has the status line) is counted and logged at DEBUG,
never a traceback; so is a connection closed at the timeout or at the cap (the first time the
cap is reached it is a WARNING: someone holds many connections to the probe port open).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import threading
import time

from ._drain_delay import drain_delay_of
from ._lifecycle import Lifecycle, State
from ._settings import ENV_PROBE_HOST, ENV_PROBE_PORT

__all__ = ["PROBE_PATHS", "ProbeServer"]

log = logging.getLogger("graceful")

PROBE_PATHS = ("/readyz", "/livez")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_PEER_ERRORS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
        "EINTR",
    )
    if hasattr(errno, name)
)
"""What ``accept()`` reports of the connection being accepted (Linux passes a pending network
error of the new socket on), not of the listening socket: take the next one."""
_LISTENER, _WAKE = object(), object()


def _http_date() -> str:
    """Now, as HTTP says it (RFC 9110's IMF-fixdate), with no locale: ``strftime`` has one."""
    t = time.gmtime()
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Connection:
    """One client: what it has sent so far, what is left to send it, and until when."""

    __slots__ = ("deadline", "out", "peer", "received", "sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.received = bytearray()
        self.out: bytes | None = None


class ProbeServer:
    """``/readyz`` and ``/livez`` on ``host:port``, one daemon thread (``serve_probes()``).

    ``GET /readyz`` (or ``HEAD``): 200 while ready, 503 from the start of wrap-up. ``GET
    /livez``: 200 until the lifecycle has stopped. Another path: 404; another method: 405.
    ``host`` is an IPv4 or IPv6 address or a name (the first address it resolves to is bound).
    A context manager; ``close()`` is idempotent and returns at once.

    The bounds below are class attributes (a subclass may change them); why each, in the
    module's docstring.
    """

    TIMEOUT = 5.0
    """Seconds a connection has to send a whole request (and to take the answer), from accept."""
    MAX_CONNECTIONS = 256
    """Connections open at once; at the cap the oldest is closed for the new one."""
    MAX_REQUEST = 8192
    """Bytes of request line and headers; past it, 431."""
    BACKLOG = 1024
    """Connections the kernel queues before this thread accepts them (``somaxconn`` caps it).
    Generous: a burst of connections while this thread waits for a core must not overflow the
    queue, since a SYN dropped there is sent again only 1 s later, the kubelet's default probe
    timeout (``http.server`` queues 5: a tight loop of connects lost every sixth for 1 s)."""
    ACCEPT_PAUSE = 0.1
    """Seconds without accepting when ``accept()`` fails and no probe connection can be closed
    to help (out of file descriptors, say): the listening socket stays readable, so trying again
    at once would spin."""

    def __init__(self, lifecycle: Lifecycle, host: str, port: int, *, reuse_port: bool = False) -> None:
        self._lifecycle = lifecycle
        self._delay = drain_delay_of(lifecycle)
        self.host: str = host
        self._listener = self._bind(host or "0.0.0.0", port, reuse_port=reuse_port)
        self.port: int = self._listener.getsockname()[1]
        """The port answering (the one chosen when 0 was asked for)."""
        self._connections: collections.OrderedDict[int, _Connection] = collections.OrderedDict()
        self._selector = selectors.DefaultSelector()
        self._wake = socket.socketpair()
        """``close()`` wakes the loop through it at once: no poll interval."""
        for end in self._wake:
            end.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake[0], selectors.EVENT_READ, _WAKE)
        self._paused_until: float | None = None
        self._accept_failures = 0
        self.gone = 0
        """Clients that reset or broke the connection before their answer was sent."""
        self.timed_out = 0
        """Connections closed for not sending a whole request within :attr:`TIMEOUT`."""
        self.evicted = 0
        """Connections closed, oldest first, to make room at :attr:`MAX_CONNECTIONS`."""
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="graceful-probes", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:
            # "can't start new thread": the process is at its limit.
            self._selector.close()
            for sock in (self._listener, *self._wake):
                sock.close()
            raise RuntimeError(
                f"graceful cannot answer probes on {_where(host, self.port)}: no thread to answer "
                f"them ({exc}). The process is at its thread limit (a container's pids limit, "
                f"RLIMIT_NPROC): raise it, or find what holds its threads"
            ) from exc
        # An auto drain delay waits for a 503 answered to a probe.
        self._delay.probes_served(+1)

    def _bind(self, host: str, port: int, *, reuse_port: bool) -> socket.socket:
        """A listening, non-blocking socket on ``host:port``, of the family ``host`` names."""
        try:
            found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            raise RuntimeError(
                f"graceful cannot answer probes on {host!r}: {getattr(exc, 'strerror', None) or exc}. "
                f"Set {ENV_PROBE_HOST} (or serve_probes(host=...)) to an address of this host, such as "
                f"0.0.0.0, ::, 127.0.0.1 or ::1, or a name that resolves to one"
            ) from exc
        family, kind, proto, _, address = found[0]
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_port:
                # Several processes answer on one port (gunicorn's workers); SO_REUSEADDR: TIME_WAITs
                # may linger.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
                sock.listen(self.BACKLOG)
            else:
                # systemd's socket or the previous generation's (an upgrade in place), else one bound
                # with SO_REUSEADDR; remembered, so that an upgrade passes it on.
                sock.close()
                sock = self._lifecycle.listen((str(address[0]), int(address[1])), backlog=self.BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                what = f"Free that port or choose another ({ENV_PROBE_PORT}, or serve_probes(port=...))"
            else:
                what = f"Choose an address of this host ({ENV_PROBE_HOST}, or serve_probes(host=...))"
            raise RuntimeError(
                f"graceful cannot answer probes on {_where(host, port)}: {exc.strerror or exc}. {what}"
            ) from exc
        return sock

    # -- the public face --------------------------------------------------------------------

    def close(self) -> None:
        """Stop answering: the port refuses connections from now on. Idempotent."""
        # gunicorn may close it from its watcher thread and its main one.
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._delay.probes_served(-1)
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        # The thread closed every connection on its way out.
        self._listener.close()
        for end in self._wake:
            end.close()

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<graceful.readiness.ProbeServer {_where(self.host, self.port)}>"

    # -- the loop ---------------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer until ``close()``; every connection is closed on the way out."""
        selector = self._selector
        try:
            while True:
                for key, events in selector.select(self._next_timeout()):
                    if key.data is _WAKE:
                        return
                    try:
                        if key.data is _LISTENER:
                            self._accept()
                        elif events & selectors.EVENT_WRITE:
                            self._write(key.data)
                        else:
                            self._read(key.data)
                    except Exception:
                        # graceful's own bug: one connection lost, never the thread.
                        log.exception("probes: unexpected error; the probe port keeps answering")
                        if isinstance(key.data, _Connection):
                            self._drop(key.data)
                self._expire(time.monotonic())
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)
            selector.close()

    def _next_timeout(self) -> float | None:
        """Until the oldest connection's deadline (they are in deadline order) or the pause's end."""
        ends = [self._paused_until] if self._paused_until is not None else []
        if self._connections:
            ends.append(next(iter(self._connections.values())).deadline)
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _expire(self, now: float) -> None:
        while self._connections:
            oldest = next(iter(self._connections.values()))
            if oldest.deadline > now:
                break
            self.timed_out += 1
            log.debug(
                "probes: closed the connection from %s:%s: no whole request within %g s; %d so far",
                *oldest.peer[:2],
                self.TIMEOUT,
                self.timed_out,
            )
            self._drop(oldest)
        if self._paused_until is not None and self._paused_until <= now:
            self._paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)

    def _accept(self) -> None:
        # A few at a time, then a turn for the connections already open.
        for _ in range(64):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _PEER_ERRORS:
                    # That connection failed before it was accepted.
                    continue
                self._cannot_accept(exc)
                if self._paused_until is not None:
                    return
                continue
            sock.setblocking(False)
            if len(self._connections) >= self.MAX_CONNECTIONS:
                self._evict_oldest()
            connection = _Connection(sock, peer, time.monotonic() + self.TIMEOUT)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict_oldest(self) -> None:
        oldest = next(iter(self._connections.values()))
        self.evicted += 1
        if self.evicted == 1:
            log.warning(
                "probes: %d connections open to the probe port, the most it keeps: closing the oldest "
                "(from %s:%s) for each new one, so that /readyz keeps answering. Something holds "
                "connections to it open; the next ones are said at DEBUG",
                len(self._connections),
                *oldest.peer[:2],
            )
        else:
            log.debug(
                "probes: closed the oldest connection (from %s:%s) at the cap of %d; %d so far",
                *oldest.peer[:2],
                self.MAX_CONNECTIONS,
                self.evicted,
            )
        self._drop(oldest)

    def _cannot_accept(self, exc: OSError) -> None:
        """``accept()`` failed for want of something (most often file descriptors): close the
        oldest probe connection to free one, or stop accepting for a moment (the listening
        socket stays readable, so trying again at once would spin)."""
        if exc.errno in _OUT_OF_FILES and self._connections:
            self._evict_oldest()
            return
        self._accept_failures += 1
        say = log.warning if self._accept_failures == 1 else log.debug
        say("probes: cannot accept a connection (%s); trying again in %g s", exc, self.ACCEPT_PAUSE)
        self._selector.unregister(self._listener)
        self._paused_until = time.monotonic() + self.ACCEPT_PAUSE

    def _read(self, connection: _Connection) -> None:
        try:
            chunk = connection.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._went_away(connection, exc)
            return
        if not chunk:
            # Closed before a whole request: nothing was asked, nothing to say.
            self._drop(connection)
            return
        received = connection.received
        received += chunk
        end = received.find(b"\r\n\r\n")
        if end < 0:
            end = received.find(b"\n\n")
        if end < 0:
            if len(received) > self.MAX_REQUEST:
                self._answer(connection, 431, "request too large\n", b"HTTP/1.1", body=True)
            return
        self._respond(connection, bytes(received[:end]))

    def _respond(self, connection: _Connection, head: bytes) -> None:
        """Answer the request whose line and headers are ``head`` (the headers are not needed)."""
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
            self._answer(connection, 400, "graceful probes: GET /readyz or /livez, HTTP/1.x\n", b"HTTP/1.1")
            return
        method, target, version = parts
        if method not in (b"GET", b"HEAD"):
            self._answer(connection, 405, "graceful probes: GET or HEAD\n", version, allow=True)
            return
        if target.startswith((b"http://", b"https://")):
            # Absolute-form: the path after the authority.
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        path = target.split(b"?", 1)[0]
        body = method == b"GET"
        if path == b"/readyz":
            # What readiness.is_ready() says.
            ok = self._delay.ready and not self._lifecycle.is_stopping()
            if not ok:
                # In a wrap-up: the balancer has been told.
                self._delay.probe_refused()
            self._answer(
                connection, 200 if ok else 503, "ready\n" if ok else "not ready\n", version, body=body
            )
        elif path == b"/livez":
            # What readiness.is_live() says.
            ok = self._lifecycle.state() is not State.STOPPED
            self._answer(connection, 200 if ok else 503, "live\n" if ok else "stopped\n", version, body=body)
        else:
            self._answer(connection, 404, "graceful probes: /readyz and /livez\n", version, body=body)

    def _answer(
        self,
        connection: _Connection,
        status: int,
        text: str,
        version: bytes,
        *,
        body: bool = True,
        allow: bool = False,
    ) -> None:
        data = text.encode()
        head = [
            f"{'HTTP/1.0' if version == b'HTTP/1.0' else 'HTTP/1.1'} {status} {_REASONS[status]}",
            f"Date: {_http_date()}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(data)}",
            "Cache-Control: no-store",
            *(["Allow: GET, HEAD"] if allow else []),
            "Connection: close",
            "\r\n",
        ]
        connection.out = "\r\n".join(head).encode("ascii") + (data if body else b"")
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        out = connection.out or b""
        try:
            sent = connection.sock.send(out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._went_away(connection, exc)
            return
        connection.out = out[sent:]
        if not connection.out:
            self._finish(connection)

    def _finish(self, connection: _Connection) -> None:
        """All sent: end the connection so the client reads the whole answer (a close with
        unread bytes from the client would send an RST that can overtake the answer)."""
        sock = connection.sock
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            # What it sent past its request, if any: a few reads, no more.
            for _ in range(16):
                if not sock.recv(4096):
                    break
        self._drop(connection)

    def _went_away(self, connection: _Connection, exc: OSError) -> None:
        """A client reset or broke the connection: counted, one DEBUG line, never a traceback.
        Everything on this socket is graceful's own, so it can only be the client going away."""
        self.gone += 1
        log.debug(
            "probes: client %s:%s went away early (%s: %s); %d so far",
            *connection.peer[:2],
            type(exc).__name__,
            exc,
            self.gone,
        )
        self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        if self._connections.pop(connection.sock.fileno(), None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()
