"""The RPCs under way, so the ones dropped at the deadline can be named in the log.

Why: gRPC offers no way to list the RPCs a server is running; only an interceptor the server
was made with sees each one start and end. Both servers (``grpc.Server`` and ``grpc.aio``) use
the same record, and the grpc.aio interceptor also ends the health ``Watch`` streams at the stop,
since the grpc.aio health servicer offers no other way to end them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import grpc
import grpc.aio

from ..._checks import TYPE_CHECKING
from .._inflight import AT_WRAP_UP, InFlight, Request, cut_at_wrap_up

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from typing import Any

    from ..._lifecycle import Lifecycle

log = logging.getLogger("graceful")

GRACE_MARGIN = 1.0
"""Seconds grpc's own grace outlasts graceful's deadline: graceful's wrap-up timeout (or, in the
end, the deadline) comes first, so the RPCs still running are named in the log before
``stop(0)`` cancels them."""

CUT_WAIT = 0.5
"""Seconds the force-quit hook waits for ``stop(0)`` to send the cancellations out."""

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class _Tracking:
    """What both interceptors share: the RPCs under way, each named by method, peer and age."""

    def __init__(self) -> None:
        self.in_flight = InFlight("grpc")

    def _start(self, method: str, context: Any) -> object:
        key = object()
        try:
            peer = str(context.peer())
        except Exception:  # noqa: BLE001 - a peer is only for the log line
            peer = "?"
        self.in_flight.add(key, Request("RPC", method, peer))
        return key

    def _wrap(self, handler: Any, method: str) -> Any:
        """The same method handler, its behaviour recording the RPC while it runs."""
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        kind = next((k for k in _BEHAVIOURS if getattr(handler, k, None) is not None), None)
        if kind is None:
            return handler
        behaviour = getattr(handler, kind)
        if getattr(behaviour, "experimental_non_blocking", False):
            # It answers through a callback after returning (the sync health Watch).
            return handler
        if inspect.isasyncgenfunction(behaviour):
            tracked = self._async_stream(behaviour, method)
        elif inspect.iscoroutinefunction(behaviour):
            tracked = self._async(behaviour, method)
        elif kind.endswith("_stream"):
            tracked = self._sync_stream(behaviour, method)
        else:
            tracked = self._sync(behaviour, method)
        return handler._replace(**{kind: tracked})

    def _sync(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def tracked(request: Any, context: Any) -> Any:
            key = self._start(method, context)
            try:
                return behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _sync_stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def tracked(request: Any, context: Any) -> Iterator[Any]:
            key = self._start(method, context)
            try:
                yield from behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _async(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: Any) -> Any:
            key = self._start(method, context)
            try:
                return await behaviour(request, context)
            finally:
                self.in_flight.discard(key)

        return tracked

    def _async_stream(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: Any) -> AsyncIterator[Any]:
            key = self._start(method, context)
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                self.in_flight.discard(key)

        return tracked


class RpcInterceptor(_Tracking, grpc.ServerInterceptor):  # type: ignore[misc]
    """A ``grpc.ServerInterceptor`` that records each RPC under way (see :func:`interceptor`)."""

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return self._wrap(continuation(handler_call_details), handler_call_details.method)


class AioRpcInterceptor(_Tracking, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A ``grpc.aio.ServerInterceptor`` that records each RPC under way (see :func:`aio_interceptor`).

    It also ends the health service's ``Watch`` streams when the server stops: the grpc.aio
    health servicer offers no other way to end them, and each would hold the drain open.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closing: asyncio.Event | None = None

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        watch = getattr(handler, "unary_stream", None)
        if method == HEALTH_WATCH and inspect.iscoroutinefunction(watch):
            handler = handler._replace(unary_stream=self._until_closing(handler.unary_stream))
        return self._wrap(handler, method)

    def _until_closing(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """A ``Watch`` that returns (the stream ends with OK) once the server starts stopping."""

        async def watch(request: Any, context: Any) -> None:
            if self._closing is None:
                self._closing = asyncio.Event()
            closing = asyncio.ensure_future(self._closing.wait())
            watching = asyncio.ensure_future(behaviour(request, context))
            try:
                await asyncio.wait({closing, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (closing, watching):
                    task.cancel()
                await asyncio.gather(closing, watching, return_exceptions=True)

        return watch

    def end_health_watches(self) -> None:
        """End the health ``Watch`` streams under way (call on the server's loop)."""
        if self._closing is None:
            self._closing = asyncio.Event()
        self._closing.set()


def interceptor() -> RpcInterceptor:
    """The interceptor that lets a ``grpc.Server`` name the RPCs dropped at the deadline.

    Create the server with it; graceful finds it there::

        server = grpc.server(pool, interceptors=[graceful.adapters.grpc.interceptor()])
        graceful.run(server)
    """
    return RpcInterceptor()


def aio_interceptor() -> AioRpcInterceptor:
    """The same for ``grpc.aio`` (it also ends the health ``Watch`` streams at the stop).

    Pass it to the service too, since a grpc.aio server keeps its list out of reach::

        tracking = graceful.adapters.grpc.aio_interceptor()
        server = grpc.aio.server(interceptors=[tracking])
        graceful.run(GrpcAioService(server, interceptor=tracking))
    """
    return AioRpcInterceptor()


def log_dropped(
    name: str, tracking: _Tracking | None, active: int | None, why: str = "at the force-quit deadline"
) -> int | None:
    """Name each RPC still running, or say how many (``active``) or that some may be; ``why``
    says when. Returns how many were named or counted, None when that is unknown."""
    if tracking is not None:
        tracking.in_flight.server_name = name
        return tracking.in_flight.log_dropped(why)
    if active:
        log.error(
            "%s: %d RPC(s) still running are cancelled %s "
            "(create the server with graceful.adapters.grpc.interceptor() to have each named)",
            name,
            active,
            why,
        )
        return active
    if active is None:
        log.error(
            "%s: RPCs still running, if any, are cancelled %s "
            "(add graceful.adapters.grpc.aio_interceptor() to have each named)",
            name,
            why,
        )
    return active


def cut_rpcs_at_wrap_up(
    lifecycle: Lifecycle, name: str, tracking: _Tracking | None, active: int | None
) -> None:
    """The stop has not finished by the wrap-up timeout: name the RPCs it waits for and mark the
    lifecycle failed (exit code 1). The caller then cancels them (``stop(0)``)."""
    count = log_dropped(name, tracking, active, AT_WRAP_UP)
    cut_at_wrap_up(lifecycle, name, f"{count} RPC(s) cut" if count else "the RPCs still running cut")
