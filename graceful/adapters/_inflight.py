"""The requests a web adapter is answering, so that none is dropped without a log line naming it.

Why: at the wrap-up timeout (and, for what is still there, at the force-quit deadline) a
server's requests are cut; the operator must learn which requests were lost (method, path,
client, how long each had run), not only how many. Every web adapter records each request here
when it starts and removes it when it ends.

The wrap-up timeout (contract section 10) ends the wrap-up phase; ``run()``'s own steps are not
abandoned there by the core, so each web adapter bounds its drain by it
(``Context.wrap_up_remaining()``), names what it cuts (``log_dropped(AT_WRAP_UP)``) and marks the
lifecycle failed (``cut_at_wrap_up``): exit code 1, and the shutdown phase starts; the deadline
stays armed for a process that the code of a cut request, still running in a thread, would hold. A stuck
request would otherwise hold every shutdown listener until the deadline (exit 70).

A client that went away early is told apart from a real error here too. Behind a load balancer
clients leave all the time (the balancer resets its pooled keep-alive connections, a health
check closes once it has the status line), and the standard library prints a traceback for
each. But the same exceptions (``ConnectionResetError`` and its kin) also come from a handler's
own call to a backend, which *is* an error. So an exception counts as "the client went away"
only when the client's own socket shows the peer gone: the kernel's TCP state on Linux, else a
peek that consumes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time

from .._checks import TYPE_CHECKING
from .._drain_delay import drain_delay_of
from .._lifecycle import keep_deadline_armed, record_failure, report_progress

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from .._drain_delay import Traffic
    from .._lifecycle import Lifecycle
    from .._service import Context

__all__ = [
    "AT_WRAP_UP",
    "CUT_WAIT",
    "GONE",
    "PAUSED_LOOK",
    "TIMED_OUT",
    "InFlight",
    "Request",
    "cut_at_wrap_up",
    "describe_client",
    "log_ended_long_lived",
    "peer_gone",
    "say_which_timeout_governs",
    "uncancel",
    "wait_within_wrap_up",
]

log = logging.getLogger("graceful")

AT_WRAP_UP = "at the wrap-up timeout"
"""How the log lines say when a request was cut: at the wrap-up timeout, not the deadline."""

CUT_WAIT = 0.5
"""Seconds a cut at the wrap-up timeout waits for the cancelled request tasks to end (one loop
turn each, unless a handler catches the cancellation and goes on: then the shutdown phase
starts all the same, and the deadline bounds that handler)."""

PAUSED_LOOK = 0.5
"""Seconds between looks at the wrap-up timeout while there is none (a pause): a shutdown asked
for during the pause starts it, and the drain under way is bounded from then on."""


class Request:
    """One request under way."""

    __slots__ = ("client", "method", "path", "started")

    def __init__(self, method: str, path: str, client: str, started: float | None = None) -> None:
        self.method = method
        self.path = path
        self.client = client
        self.started = time.monotonic() if started is None else started
        """When it began, on ``time.monotonic()``'s scale."""

    def describe(self) -> str:
        return (
            f"{self.method} {self.path} from {self.client} (running {time.monotonic() - self.started:.3f} s)"
        )


class InFlight:
    """A thread-safe set of requests under way, keyed by whatever the adapter likes."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        self._requests: dict[object, Request | Callable[[], Request]] = {}
        self._lifecycle: Lifecycle | None = None
        self._traffic: Traffic | None = None

    @property
    def lifecycle(self) -> Lifecycle | None:
        """Set by the adapter's ``serve()``: each request is an arrival an ``auto`` drain delay
        watches, and one ending while the lifecycle stops is drain progress."""
        return self._lifecycle

    @lifecycle.setter
    def lifecycle(self, lifecycle: Lifecycle | None) -> None:
        self._lifecycle = lifecycle
        self._traffic = None if lifecycle is None else drain_delay_of(lifecycle).traffic

    # Every request passes through add() and discard(): one dict store each, atomic under the
    # GIL (and in free-threaded builds, whose dicts lock themselves), so no lock of our own.
    def add(self, key: object, request: Request | Callable[[], Request]) -> None:
        """``request``, or what makes it when it is needed (at the deadline, rarely): an adapter
        whose framework computes the method, path or client on access passes that."""
        self._requests[key] = request
        traffic = self._traffic
        if traffic is not None:
            # What an auto drain delay watches (arrived(), inline).
            traffic.last = traffic.now()

    def discard(self, key: object) -> None:
        ended = self._requests.pop(key, None)
        lifecycle = self._lifecycle
        if ended is not None and lifecycle is not None and lifecycle.stopping:
            # The drain moves: systemd gives more time.
            report_progress(lifecycle)

    def requests(self) -> list[Request]:
        # One C call: a consistent copy.
        items = list(self._requests.values())
        return [item if isinstance(item, Request) else item() for item in items]

    def __contains__(self, key: object) -> bool:
        return key in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def under_way(self) -> list[object]:
        """The keys of the requests under way (a copy)."""
        return list(self._requests)

    def cut_at_deadline(self, loop: Any, cut: Callable[[], object]) -> None:
        """At the deadline (a helper thread): name every dropped request, then run ``cut`` on
        ``loop``, the asyncio loop that owns the connections (skipped once it has closed)."""
        self.log_dropped()
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed in between.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(cut)

    def log_dropped(
        self, why: str = "at the force-quit deadline", keys: Iterable[object] | None = None
    ) -> int:
        """Log one line per request still under way (or per one of ``keys`` still under way);
        returns how many."""
        if keys is None:
            requests = self.requests()
        else:
            found = [self._requests.get(key) for key in keys]
            requests = [item if isinstance(item, Request) else item() for item in found if item is not None]
        for request in requests:
            log.error("%s: dropped request %s %s", self.server_name, request.describe(), why)
        return len(requests)


def cut_at_wrap_up(lifecycle: Lifecycle, server_name: str, what: str) -> None:
    """``what`` (say "2 request(s) cut") of the server was cut at the wrap-up timeout: the
    lifecycle is marked failed (exit code 1), and the force-quit deadline stays armed once the
    sequence is over, since the code of what was cut may go on in a thread that holds the exit."""
    happened = f"server {server_name!r}: {what} {AT_WRAP_UP}"
    record_failure(lifecycle, happened)
    keep_deadline_armed(lifecycle, happened)


async def wait_within_wrap_up(ctx: Context, future: Any) -> bool:
    """Wait for ``future`` (an asyncio task or future, not cancelled here) until the wrap-up
    timeout; True once it is done, False when the wrap-up timeout came first.

    In a pause there is no timeout: it waits on, looking every ``PAUSED_LOOK`` s whether a
    shutdown has started one.
    """
    # Not at import: the stdlib adapter imports this module too.
    import asyncio

    while True:
        left = ctx.wrap_up_remaining()
        done, _ = await asyncio.wait({future}, timeout=PAUSED_LOOK if left is None else left)
        if done:
            return True
        if left is not None:
            return False


def uncancel(task: Any) -> int:
    """Undo one ``cancel()`` of ``task``; how many remain (Python 3.10 keeps no count: 0)."""
    undo = getattr(task, "uncancel", None)
    return int(undo()) if undo is not None else 0


def log_ended_long_lived(name: str, websockets: int, streams: int) -> None:
    """The drain log's line for the long-lived connections an adapter ended (contract section 8)."""
    if websockets or streams:
        log.info(
            "%s: closed %d WebSocket(s) with 1001 (going away), ended %d stream(s)", name, websockets, streams
        )


# -- clients that went away -------------------------------------------------------------------

# What a client going away raises on our side of its socket: a reset (RST) read or written, a
# write after it closed (EPIPE), an abort (Windows). ConnectionRefusedError, the fourth
# ConnectionError, only comes from connect(): the user's handler calling a backend.
GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
"""The socket option for Linux's ``struct tcp_info`` (the state first); None elsewhere."""
TCP_CLOSE = 7
"""The ``tcpi_state`` of a connection reset while our end is still open."""
TIMED_OUT = "Request timed out: %r"
"""``BaseHTTPRequestHandler``'s line for a request that timed out (3.6 to 3.13 alike)."""


def describe_client(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return repr(address) if address else "(unnamed socket)"


def peer_gone(sock: object) -> bool:
    """The peer has closed or reset ``sock``: end of stream or an error waits on it.

    A live connection, merely quiet or with bytes still to read, is not gone. On Linux the
    kernel's TCP state says it first (CLOSE: reset, even with unread bytes left before the
    reset); else a peek at the raw socket (a TLS socket's bytes too, undecrypted) without
    consuming anything or blocking.
    """
    if not isinstance(sock, socket.socket):
        # A datagram server's (data, socket): no connection to lose.
        return False
    try:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp and TCP_INFO is not None and sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] == TCP_CLOSE:
            return True
        # poll() has no FD_SETSIZE limit: a busy server has fds over 1024.
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and not socket.socket.recv(sock, 1, socket.MSG_PEEK)
    except GONE:
        return True
    except (OSError, ValueError):
        # Closed already, or not a stream: cannot tell, so not gone.
        return False


def say_which_timeout_governs(
    lifecycle: Lifecycle, name: str, option: str, grace: float | None, leave_out: str
) -> None:
    """One WARNING at start when a server's own drain timeout (``option``, e.g. "uvicorn's
    timeout_graceful_shutdown", ``grace`` seconds) differs from graceful's wrap-up timeout:
    both cut the requests still running, the first wins. ``leave_out`` says how to unset it.

    The server counts from its own shutdown, which starts once a fixed drain delay is over.
    """
    if grace is None:
        return
    server = option.split("'", 1)[0]
    wrap_up = lifecycle.wrap_up_timeout
    delay = drain_delay_of(lifecycle).setting
    after = 0.0 if delay.auto else delay.seconds
    since = f" (counted after the {after:g} s drain delay)" if after else ""
    how = "GRACEFUL_WRAP_UP_TIMEOUT or graceful.set_wrap_up_timeout()"
    if after + grace < wrap_up:
        log.warning(
            "%s: %s (%g s%s) ends before graceful's wrap-up timeout (%g s): %s's governs, it "
            "cancels the requests still running first (each named, exit code 0). To let graceful's "
            "decide (each named, exit code 1), %s; to keep %s's, set %s to %g",
            name, option, grace, since, wrap_up, server, leave_out, server, how, after + grace,
        )  # fmt: skip
    elif after + grace > wrap_up:
        log.warning(
            "%s: %s (%g s%s) ends after graceful's wrap-up timeout (%g s): graceful's governs, it "
            "cuts the requests still running first, so %s's never applies. %s, or give the drain "
            "longer with %s (below the force-quit budget)",
            name, option, grace, since, wrap_up, server, leave_out[:1].upper() + leave_out[1:], how,
        )  # fmt: skip
