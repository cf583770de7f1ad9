"""gRPC servers (``grpc.Server`` and ``grpc.aio.Server``) under ``graceful.run``.

Why: grpcio has no signal handling of its own, and its stop is easy to get wrong:
``Server.stop(grace)`` returns at once (the returned event says when it is done),
``wait_for_termination()`` returns True on *timeout*, and Ctrl-C does not get through during
an RPC (grpc #40834). Load balancers ask the standard health service whether to send
traffic; ``HealthServicer.enter_graceful_shutdown()`` turns every service NOT_SERVING for good.

* serve: ``start()``, "started", then block until the server has terminated.
* wrap-up: the health service (if given) turns NOT_SERVING; the drain delay (still serving,
  already not-serving to probes); then ``stop(grace=remaining budget + GRACE_MARGIN)`` (a day
  during a pause),
  *waited for*: new RPCs are refused, RPCs in flight, streaming ones included, complete.
* deadline: each RPC still running is logged (method, age) when the server was built with
  ``RpcTracker``'s interceptor (gRPC offers no other way to see them), then ``stop(0)``
  cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
import grpc.aio

from .._service import Context
from ..readiness import drain_delay_left, wait_drain_delay
from ._inflight import InFlight, Request

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["GrpcAioService", "GrpcService", "RpcTracker", "adapt"]

PAUSE_GRACE = 24 * 3600.0
"""The grace a pause gives RPCs in flight: no deadline runs during a pause."""

GRACE_MARGIN = 1.0
"""Seconds grpc's own grace outlasts graceful's deadline: the deadline comes first, so the RPCs
still running are named in the log before ``stop(0)`` cancels them."""

_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class RpcTracker:
    """Records each RPC under way, so that the ones dropped at the deadline are named.

    Pass ``tracker.interceptor`` (sync servers) or ``tracker.aio_interceptor`` (``grpc.aio``)
    in the server's ``interceptors=[...]``, and the tracker to the service::

        tracker = RpcTracker()
        server = grpc.server(pool, interceptors=[tracker.interceptor])
        graceful.run(GrpcService(server, health=health, tracker=tracker))
    """

    def __init__(self) -> None:
        self.in_flight = InFlight("grpc")
        self.interceptor = _SyncInterceptor(self)
        self.aio_interceptor = _AioInterceptor(self)

    def wrap(self, handler: Any, method: str) -> Any:
        """The same method handler, its behaviour recording the RPC while it runs."""
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        kind = next(k for k in _BEHAVIOURS if getattr(handler, k) is not None)
        behaviour = getattr(handler, kind)
        track = self._track_async if asyncio.iscoroutinefunction(behaviour) else self._track_sync
        if kind.endswith("_stream") and not asyncio.iscoroutinefunction(behaviour):
            track = self._track_async_stream if _is_async_gen(behaviour) else self._track_sync_stream
        return handler._replace(**{kind: track(behaviour, method)})

    def _start(self, method: str, context: Any) -> tuple[object, Request]:
        key = object()
        peer = context.peer() if hasattr(context, "peer") else "?"
        request = Request("RPC", method, peer)
        self.in_flight.add(key, request)
        return key, request

    def _track_sync(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def tracked(request: Any, context: Any) -> Any:
            key, _ = self._start(method, context)
            try:
                return behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _track_sync_stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def tracked(request: Any, context: Any) -> Iterator[Any]:
            key, _ = self._start(method, context)
            try:
                yield from behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _track_async(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: Any) -> Any:
            key, _ = self._start(method, context)
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _track_async_stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: Any) -> Any:
            key, _ = self._start(method, context)
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                self.in_flight.discard(key)

        return tracked


def _is_async_gen(fn: object) -> bool:
    import inspect

    return inspect.isasyncgenfunction(fn)


class _SyncInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tracker: RpcTracker) -> None:
        self.tracker = tracker

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        return self.tracker.wrap(continuation(details), details.method)


class _AioInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, tracker: RpcTracker) -> None:
        self.tracker = tracker

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        return self.tracker.wrap(await continuation(details), details.method)


def _log_dropped(name: str, tracker: RpcTracker | None) -> None:
    if tracker is None:
        log.error("%s: RPCs still running are cancelled (add RpcTracker's interceptor to name them)", name)
    else:
        tracker.in_flight.server_name = name
        tracker.in_flight.log_dropped()


class GrpcService:
    """A ``grpc.Server``: health NOT_SERVING, drain delay, ``stop(grace)`` waited for."""

    def __init__(
        self, server: Any, *, health: Any = None, tracker: RpcTracker | None = None, name: str | None = None
    ) -> None:
        if not isinstance(server, grpc.Server):
            raise TypeError(
                f"GrpcService takes a grpc.Server (grpc.server(...)), not {type(server).__name__}"
            )
        self.server, self.health, self.tracker = server, health, tracker
        self.name = name or "grpc"
        self._stopped = threading.Event()

    def serve(self, ctx: Context) -> None:
        ctx.lifecycle.on_force_quit(self._cut, name=f"cancel RPCs of {self.name}")
        if self.tracker is not None:
            self.tracker.in_flight.lifecycle = ctx.lifecycle
        self.server.start()
        ctx.started()
        # Not wait_for_termination(): after stop() it lingers for about a second (measured),
        # and it returns True on *timeout*. Our own event is set once stop() has completed.
        self._stopped.wait()

    def wrap_up(self, ctx: Context) -> None:
        if self.health is not None:
            self.health.enter_graceful_shutdown()
            log.info("%s: health service NOT_SERVING", self.name)
        wait_drain_delay(ctx.lifecycle)
        remaining = ctx.remaining()
        stopped = self.server.stop(PAUSE_GRACE if remaining is None else remaining + GRACE_MARGIN)
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        if stopped.wait(ctx.remaining()):
            self._stopped.set()
        else:
            log.warning("%s: RPCs still running when the budget ran out", self.name)

    def close(self, ctx: Context) -> None:
        return None

    def _cut(self) -> None:
        _log_dropped(self.name, self.tracker)
        self.server.stop(0)
        self._stopped.set()


class GrpcAioService:
    """A ``grpc.aio.Server``: the same steps on the asyncio loop.

    A ``grpc.aio`` server belongs to the event loop it was made on, and ``run()`` makes the
    loop: pass a function that builds the server (ports and handlers added), and it is called
    on that loop. A server already made on the right loop is taken as it is.
    """

    def __init__(
        self,
        server: Any,
        *,
        health: Any = None,
        tracker: RpcTracker | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(server, grpc.aio.Server):
            self._make: Callable[[], Any] | None = None
        elif callable(server):
            self._make = server
        else:
            raise TypeError(
                f"GrpcAioService takes a grpc.aio.Server, or a function that builds one, not {type(server).__name__}"
            )
        self.server = None if self._make is not None else server
        self.health, self.tracker = health, tracker
        self.name = name or "grpc.aio"
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, ctx: Context) -> None:
        self._loop = asyncio.get_running_loop()
        if self.tracker is not None:
            self.tracker.in_flight.lifecycle = ctx.lifecycle
        if self._make is not None:
            self.server = self._make()
        if not isinstance(self.server, grpc.aio.Server):
            raise TypeError(
                f"the function given to GrpcAioService returned {type(self.server).__name__}, not a grpc.aio.Server"
            )
        server = self.server
        ctx.lifecycle.on_force_quit(self._cut, name=f"cancel RPCs of {self.name}")
        await server.start()
        ctx.started()
        await server.wait_for_termination()

    async def wrap_up(self, ctx: Context) -> None:
        if self.server is None:
            return
        if self.health is not None:
            result = self.health.enter_graceful_shutdown()
            if asyncio.iscoroutine(result):
                await result
            log.info("%s: health service NOT_SERVING", self.name)
        await asyncio.sleep(drain_delay_left(ctx.lifecycle))
        remaining = ctx.remaining()
        stopping = asyncio.ensure_future(
            self.server.stop(PAUSE_GRACE if remaining is None else remaining + GRACE_MARGIN)
        )
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        done, _ = await asyncio.wait({stopping}, timeout=ctx.remaining())
        if not done:
            log.warning("%s: RPCs still running when the budget ran out", self.name)

    async def close(self, ctx: Context) -> None:
        return None

    def _cut(self) -> None:
        _log_dropped(self.name, self.tracker)
        if self.server is not None and self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self._loop)


def adapt(obj: object) -> GrpcService | GrpcAioService | None:
    """The service for a ``grpc.Server`` or ``grpc.aio.Server``; None for anything else."""
    if isinstance(obj, grpc.aio.Server):
        return GrpcAioService(obj)
    if isinstance(obj, grpc.Server):
        return GrpcService(obj)
    return None
