"""The requests a web adapter is answering, so that none is dropped without a log line naming it.

Why: at the force-quit deadline a server's connections are cut; the operator must learn which
requests were lost (method, path, client, how long each had run), not only how many. Every
web adapter records each request here when it starts and removes it when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import time

from .._checks import TYPE_CHECKING
from ..readiness import traffic

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .._drain_delay import Traffic
    from .._lifecycle import Lifecycle

__all__ = [
    "InFlight",
    "Request",
    "log_ended_long_lived",
]

log = logging.getLogger("graceful")


class Request:
    """One request under way."""

    __slots__ = ("client", "method", "path", "started")

    def __init__(self, method: str, path: str, client: str, started: float | None = None) -> None:
        self.method = method
        self.path = path
        self.client = client
        self.started = time.monotonic() if started is None else started  # on time.monotonic's scale

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
        self._traffic = None if lifecycle is None else traffic(lifecycle)

    # Every request passes through add() and discard(): one dict store each, atomic under the
    # GIL (and in free-threaded builds, whose dicts lock themselves), so no lock of our own.
    def add(self, key: object, request: Request | Callable[[], Request]) -> None:
        """``request``, or what makes it when it is needed (at the deadline, rarely): an adapter
        whose framework computes the method, path or client on access passes that."""
        self._requests[key] = request
        traffic = self._traffic
        if traffic is not None:
            traffic.last = traffic.now()  # what an auto drain delay watches (arrived(), inline)

    def discard(self, key: object) -> None:
        ended = self._requests.pop(key, None)
        lifecycle = self._lifecycle
        if ended is not None and lifecycle is not None and lifecycle.stopping:
            lifecycle.report_progress()  # the drain moves: systemd gives more time

    def requests(self) -> list[Request]:
        items = list(self._requests.values())  # one C call: a consistent copy
        return [item if isinstance(item, Request) else item() for item in items]

    def __contains__(self, key: object) -> bool:
        return key in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def cut_at_deadline(self, loop: Any, cut: Callable[[], object]) -> None:
        """At the deadline (a helper thread): name every dropped request, then run ``cut`` on
        ``loop``, the asyncio loop that owns the connections (skipped once it has closed)."""
        self.log_dropped()
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(cut)

    def log_dropped(self, why: str = "at the force-quit deadline") -> int:
        """Log one line per request still under way; returns how many."""
        requests = self.requests()
        for request in requests:
            log.error("%s: dropped request %s %s", self.server_name, request.describe(), why)
        return len(requests)


def log_ended_long_lived(name: str, websockets: int, streams: int) -> None:
    """The drain log's line for the long-lived connections an adapter ended (contract section 8)."""
    if websockets or streams:
        log.info(
            "%s: closed %d WebSocket(s) with 1001 (going away), ended %d stream(s)", name, websockets, streams
        )
