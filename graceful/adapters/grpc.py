"""gRPC servers (``grpc.Server`` and ``grpc.aio.Server``) under ``graceful.run``.

Why: grpcio has no signal handling of its own, and its stop is easy to get wrong:
``Server.stop(grace)`` returns at once (the returned event says when it is done),
``wait_for_termination()`` returns True on *timeout*, and Ctrl-C does not get through during
an RPC (grpc #40834). Load balancers and gRPC clients ask the standard health service whether
to send traffic, so it must say NOT_SERVING before the port closes; and a client watching it
(``Health/Watch``, gRPC's client-side health checking) holds a stream open that would keep
``stop(grace)`` waiting for the whole grace.

* serve: ``start()`` (ports were added by the caller), "started", then block until the server
  has terminated.
* wrap-up: the health service (given, or found among a sync server's handlers) turns every
  service it knows NOT_SERVING (``enter_graceful_shutdown()``: for good, as graceful's own
  readiness); the drain delay (still serving, already not-serving to probes). In a pause that
  is all: the server keeps serving RPCs that still come, and the shutdown that follows stops it.
  At shutdown: the health ``Watch`` streams end (after their NOT_SERVING), then
  ``stop(grace=remaining budget + GRACE_MARGIN)``, *waited for*: new RPCs are refused, RPCs in
  flight, unary and streaming, complete.
* deadline: each RPC still running is logged (method, peer, age) when the server has this
  module's interceptor (gRPC offers no other way to see them; without it a sync server's count
  is logged), then ``stop(0)`` cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from typing import Any

log = logging.getLogger("graceful")

__all__ = [
    "AioRpcInterceptor",
    "GrpcAioService",
    "GrpcService",
    "RpcInterceptor",
    "adapt",
    "aio_interceptor",
    "interceptor",
]

GRACE_MARGIN = 1.0
"""Seconds grpc's own grace outlasts graceful's deadline: the deadline comes first, so the RPCs
still running are named in the log before ``stop(0)`` cancels them."""

CUT_WAIT = 0.5
"""Seconds the force-quit hook waits for ``stop(0)`` to send the cancellations out."""

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


# -- tracking RPCs in flight ------------------------------------------------------------------------


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
            return handler  # answers through a callback after returning (the sync health Watch)
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


# -- the health service -----------------------------------------------------------------------------


def _check_health(health: Any) -> None:
    if health is not None and not (
        callable(getattr(health, "enter_graceful_shutdown", None)) or callable(getattr(health, "set", None))
    ):
        raise TypeError(
            f"health= takes a grpc_health.v1.health.HealthServicer (or its grpc.aio twin), not "
            f"{type(health).__name__}: an object with enter_graceful_shutdown() or set(service, status)"
        )


def _not_serving(health: Any) -> list[Any]:
    """Every service the health servicer knows, "" included, to NOT_SERVING.

    Returns what is left to await (the grpc.aio servicer's methods are coroutines).
    """
    enter = getattr(health, "enter_graceful_shutdown", None)
    if callable(enter):
        results = [enter()]
    else:
        from grpc_health.v1 import health_pb2

        services = list(getattr(health, "_server_status", None) or [""])
        results = [health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING) for service in services]
    return [result for result in results if inspect.isawaitable(result)]


def _end_sync_watches(health: Any) -> None:
    """End the sync health servicer's ``Watch`` streams (each has had its NOT_SERVING)."""
    lock = getattr(health, "_lock", None)
    callbacks = getattr(health, "_send_response_callbacks", None)
    if lock is None or not isinstance(callbacks, dict):
        return
    with lock:
        ending = [callback for group in callbacks.values() for callback in group]
    for callback in ending:
        try:
            callback(None)  # None ends the stream with status OK
        except Exception:  # a watcher already gone
            log.debug("ending a health Watch stream failed", exc_info=True)


def _found_health(server: Any) -> Any:
    """The health servicer a sync server serves, if it was added the standard way."""
    state = getattr(server, "_state", None)
    handlers = [getattr(state, "registered_method_handlers", None) or {}]
    handlers += [
        getattr(generic, "_method_handlers", None) or {} for generic in getattr(state, "generic_handlers", ())
    ]
    for table in handlers:
        handler = table.get(HEALTH_CHECK) if isinstance(table, dict) else None
        servicer = getattr(getattr(handler, "unary_unary", None), "__self__", None)
        if callable(getattr(servicer, "enter_graceful_shutdown", None)) or callable(
            getattr(servicer, "set", None)
        ):
            return servicer
    return None


def _found_interceptor(server: Any) -> RpcInterceptor | None:
    pipeline = getattr(getattr(server, "_state", None), "interceptor_pipeline", None)
    for candidate in getattr(pipeline, "interceptors", ()):
        if isinstance(candidate, RpcInterceptor):
            return candidate
    return None


def _log_dropped(name: str, tracking: _Tracking | None, active: int | None) -> None:
    if tracking is not None:
        tracking.in_flight.server_name = name
        tracking.in_flight.log_dropped()
    elif active:
        log.error(
            "%s: %d RPC(s) still running are cancelled at the force-quit deadline "
            "(create the server with graceful.adapters.grpc.interceptor() to have each named)",
            name,
            active,
        )
    elif active is None:
        log.error(
            "%s: RPCs still running, if any, are cancelled at the force-quit deadline "
            "(add graceful.adapters.grpc.aio_interceptor() to have each named)",
            name,
        )


# -- grpc.Server ------------------------------------------------------------------------------------


class GrpcService:
    """A ``grpc.Server``: health NOT_SERVING, drain delay, ``stop(grace)`` waited for.

    Args:
        server: the server, handlers and ports added, not started.
        health: the ``HealthServicer`` to turn NOT_SERVING; by default the one the server serves.
        interceptor: the :func:`interceptor` the server was made with; by default found there.
        name: for the log (default ``"grpc"``).
    """

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
        _check_health(health)
        if inspect.iscoroutinefunction(getattr(health, "enter_graceful_shutdown", None)):
            raise TypeError(
                "health= for a grpc.Server takes grpc_health.v1.health.HealthServicer; the grpc.aio "
                "one (health.aio.HealthServicer) goes with a grpc.aio server and GrpcAioService"
            )
        self.server = server
        self.health = health if health is not None else _found_health(server)
        self.interceptor = interceptor if interceptor is not None else _found_interceptor(server)
        self.name = name or "grpc"
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def serve(self, ctx: Context) -> None:
        ctx.lifecycle.on_force_quit(self._cut, name=f"cancel RPCs of {self.name}")
        if self.interceptor is not None:
            self.interceptor.in_flight.server_name = self.name
            self.interceptor.in_flight.lifecycle = ctx.lifecycle
        self.server.start()
        ctx.started()
        self.server.wait_for_termination()  # no timeout: it returns only once stopped

    def wrap_up(self, ctx: Context) -> None:
        if self.health is not None:
            _not_serving(self.health)
            log.info("%s: health service NOT_SERVING", self.name)
        wait_drain_delay(ctx.lifecycle)
        if ctx.remaining() is None:
            log.info("%s: paused; still serving the RPCs that come until shutdown", self.name)
            return
        self._stop(ctx)

    def close(self, ctx: Context) -> None:
        if ctx.entered:  # after a pause the stop comes now; otherwise it is done already
            self._stop(ctx)

    def _stop(self, ctx: Context) -> None:
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self.health is not None:
            _end_sync_watches(self.health)
        remaining = ctx.remaining()
        budget = 0.0 if remaining is None else remaining
        done = self.server.stop(budget + GRACE_MARGIN)
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        if not done.wait(budget):
            log.warning("%s: RPCs still running when the budget ran out", self.name)

    def _active(self) -> int | None:
        states = getattr(getattr(self.server, "_state", None), "rpc_states", None)
        return len(states) if isinstance(states, (set, dict, list)) else None

    def _cut(self) -> None:
        _log_dropped(self.name, self.interceptor, self._active())
        self.server.stop(0).wait(CUT_WAIT)


# -- grpc.aio.Server --------------------------------------------------------------------------------


class GrpcAioService:
    """A ``grpc.aio.Server``: the same steps on the asyncio loop.

    A ``grpc.aio`` server belongs to the event loop it was made on. Best, pass a function that
    builds the server (handlers and ports added): it is called on ``run()``'s loop. A server made
    outside any running loop (at module level) lives on a loop of its own: it is served on that
    loop in a thread of its own, which works the same but keeps its handlers off ``run()``'s loop.

    Args:
        server: a ``grpc.aio.Server`` (not started), or a function that builds one.
        health: the ``grpc_health.v1.health.aio.HealthServicer`` to turn NOT_SERVING.
        interceptor: the :func:`aio_interceptor` the server was made with.
        name: for the log (default ``"grpc.aio"``).
    """

    def __init__(
        self,
        server: Any,
        *,
        health: Any = None,
        interceptor: AioRpcInterceptor | None = None,
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
        _check_health(health)
        self.server: Any = None if self._make is not None else server
        self.health, self.interceptor = health, interceptor
        self.name = name or "grpc.aio"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: threading.Thread | None = None
        self._stopped = False

    async def serve(self, ctx: Context) -> None:
        if self._make is not None:
            self.server = self._make()
            if not isinstance(self.server, grpc.aio.Server):
                raise TypeError(
                    f"the function given to GrpcAioService returned {type(self.server).__name__}, "
                    "not a grpc.aio.Server"
                )
        if self.interceptor is not None:
            self.interceptor.in_flight.server_name = self.name
            self.interceptor.in_flight.lifecycle = ctx.lifecycle
        here = asyncio.get_running_loop()
        own = getattr(self.server, "_loop", None)
        self._loop = own if isinstance(own, asyncio.AbstractEventLoop) else here
        ctx.lifecycle.on_force_quit(self._cut, name=f"cancel RPCs of {self.name}")
        if self._loop is not here:
            log.info(
                "%s: the server was made outside graceful.run()'s loop: serving it on its own", self.name
            )
            # Its loop runs in a thread of its own until close(): wrap-up and close run there.
            self._own_loop = threading.Thread(
                target=self._loop.run_forever, name=f"graceful-{self.name}-loop", daemon=True
            )
            self._own_loop.start()
        await self._on_server_loop(self._serve(ctx))

    async def _serve(self, ctx: Context) -> None:
        await self.server.start()
        ctx.started()
        await self.server.wait_for_termination()

    async def wrap_up(self, ctx: Context) -> None:
        if self.server is None:
            return
        if self.health is not None:
            await self._on_server_loop(self._health_not_serving())
            log.info("%s: health service NOT_SERVING", self.name)
        if drain_delay_left(ctx.lifecycle) > 0:
            await _in_thread(wait_drain_delay, ctx.lifecycle)
        if ctx.remaining() is None:
            log.info("%s: paused; still serving the RPCs that come until shutdown", self.name)
            return
        await self._stop(ctx)

    async def close(self, ctx: Context) -> None:
        if self.server is not None:
            await self._stop(ctx)
        loop, thread = self._loop, self._own_loop
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            await _in_thread(thread.join, ctx.remaining())

    async def _health_not_serving(self) -> None:
        for pending in _not_serving(self.health):
            await pending

    async def _stop(self, ctx: Context) -> None:
        if self._stopped:
            return
        self._stopped = True
        remaining = ctx.remaining()
        budget = 0.0 if remaining is None else remaining
        stopping = asyncio.ensure_future(
            self._on_server_loop(self._stop_on_server_loop(budget + GRACE_MARGIN))
        )
        done, _ = await asyncio.wait({stopping}, timeout=budget)
        if not done:
            log.warning("%s: RPCs still running when the budget ran out", self.name)

    async def _stop_on_server_loop(self, grace: float) -> None:
        if self.interceptor is not None:
            self.interceptor.end_health_watches()
        if self.health is not None:
            _end_sync_watches(self.health)  # a sync servicer on a grpc.aio server
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)  # the stop runs to its first wait: no new RPC is taken from here on
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        await stopping

    async def _on_server_loop(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` on the server's loop, wherever that loop runs."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(coro), self._loop))

    def _cut(self) -> None:
        _log_dropped(self.name, self.interceptor, None)
        loop, server = self._loop, self.server
        if server is not None and loop is not None and not loop.is_closed():
            try:
                stopping = asyncio.run_coroutine_threadsafe(server.stop(0), loop)
            except RuntimeError:  # the loop closed in between
                return
            try:
                stopping.result(CUT_WAIT)
            except Exception:  # the exit comes next, whatever happened
                log.debug("%s: stop(0) did not finish before the exit", self.name, exc_info=True)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def _in_thread(fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` in a thread of its own, not the loop's default executor: RPC handlers may
    keep every thread of that one busy, and the drain must not queue behind them."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def work() -> None:
        error: BaseException | None = None
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(finish, error)

    threading.Thread(target=work, name="graceful-grpc-wait", daemon=True).start()
    await done


def adapt(obj: object) -> GrpcService | GrpcAioService | None:
    """The service for a ``grpc.Server`` or ``grpc.aio.Server``; None for anything else."""
    if isinstance(obj, grpc.aio.Server):
        return GrpcAioService(obj)
    if isinstance(obj, grpc.Server):
        return GrpcService(obj)
    return None
