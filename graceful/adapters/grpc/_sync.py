"""``grpc.Server`` (the thread-pool server) under ``graceful.run``.

Why: its stop is easy to get wrong: ``stop(grace)`` returns at once (the returned event says
when it is done) and ``wait_for_termination()`` returns True on *timeout*. This service waits
for both properly, and finds the health servicer and the interceptor on the server itself.
"""

from __future__ import annotations

import inspect
import logging
import threading

import grpc
import grpc.aio

from ..._checks import TYPE_CHECKING
from ..._drain_delay import drain_delay_of
from ..._lifecycle import on_force_quit
from ..._service import Context
from ._health import check_health, end_sync_watches, found_health, not_serving
from ._tracking import CUT_WAIT, GRACE_MARGIN, RpcInterceptor, cut_rpcs_at_wrap_up, log_dropped

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")


def _found_interceptor(server: Any) -> RpcInterceptor | None:
    pipeline = getattr(getattr(server, "_state", None), "interceptor_pipeline", None)
    for candidate in getattr(pipeline, "interceptors", ()):
        if isinstance(candidate, RpcInterceptor):
            return candidate
    return None


class GrpcService:
    """A ``grpc.Server``: health NOT_SERVING, drain delay, ``stop(grace)`` waited for.

    Args:
        server: the server, handlers and ports added, not started.
        health: the ``HealthServicer`` to turn NOT_SERVING; by default the one the server serves.
        interceptor: the :func:`interceptor` the server was made with; by default found there.
        name: for the log (default ``"grpc"``).
    """

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

    def __init__(
        self,
        server: Any,
        *,
        health: Any = None,
        interceptor: RpcInterceptor | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(server, grpc.Server) or isinstance(server, grpc.aio.Server):
            raise TypeError(
                f"GrpcService takes a grpc.Server (grpc.server(...)), not {type(server).__name__}"
            )
        check_health(health)
        if inspect.iscoroutinefunction(getattr(health, "enter_graceful_shutdown", None)):
            raise TypeError(
                "health= for a grpc.Server takes grpc_health.v1.health.HealthServicer; the grpc.aio "
                "one (health.aio.HealthServicer) goes with a grpc.aio server and GrpcAioService"
            )
        self.server = server
        self.health = health if health is not None else found_health(server)
        self.interceptor = interceptor if interceptor is not None else _found_interceptor(server)
        self.name = name or "grpc"
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def serve(self, ctx: Context) -> None:
        on_force_quit(ctx.lifecycle, self._cut, name=f"cancel RPCs of {self.name}")
        if self.interceptor is not None:
            self.interceptor.in_flight.server_name = self.name
            self.interceptor.in_flight.lifecycle = ctx.lifecycle
        self.server.start()
        ctx.started()
        # No timeout: it returns only once stopped.
        self.server.wait_for_termination()

    def wrap_up(self, ctx: Context) -> None:
        if self.health is not None:
            not_serving(self.health)
            log.info("%s: health service NOT_SERVING", self.name)
        drain_delay_of(ctx.lifecycle).wait_said()
        if ctx.remaining() is None:
            log.info("%s: paused; still serving the RPCs that come until shutdown", self.name)
            return
        self._stop(ctx)

    def close(self, ctx: Context) -> None:
        # After a pause the stop comes now; otherwise it is done already.
        if ctx.entered:
            self._stop(ctx)

    def _stop(self, ctx: Context) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self.health is not None:
            end_sync_watches(self.health)
        remaining = ctx.remaining()
        budget = 0.0 if remaining is None else remaining
        wrap_up = ctx.wrap_up_remaining()
        # A grace past the budget: grpc's own cancel never comes first.
        done = self.server.stop(budget + GRACE_MARGIN)
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        if done.wait(budget if wrap_up is None else min(wrap_up, budget)):
            return
        cut_rpcs_at_wrap_up(ctx.lifecycle, self.name, self.interceptor, self._active())
        # A shorter grace stops it sooner: each RPC is cancelled now.
        self.server.stop(0)
        if not done.wait(min(CUT_WAIT, max(0.0, (ctx.remaining() or 0.0)))):
            log.warning("%s: RPCs still running after stop(0)", self.name)

    def _active(self) -> int | None:
        states = getattr(getattr(self.server, "_state", None), "rpc_states", None)
        return len(states) if isinstance(states, (set, dict, list)) else None

    def _cut(self) -> None:
        log_dropped(self.name, self.interceptor, self._active())
        self.server.stop(0).wait(CUT_WAIT)
