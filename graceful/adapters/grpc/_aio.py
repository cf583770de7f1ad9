"""``grpc.aio.Server`` under ``graceful.run``: the same steps as ``_sync``, on the asyncio loop.

Why a module of its own: a grpc.aio server belongs to the event loop it was made on, which may
not be ``run()``'s loop. Every step that touches the server runs on the server's loop, wherever
that loop runs, and the waits that may block run in threads of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import grpc
import grpc.aio

from ..._checks import TYPE_CHECKING
from ..._drain_delay import drain_delay_of
from ..._lifecycle import on_force_quit
from ..._service import Context
from ._health import check_health, end_sync_watches, not_serving
from ._tracking import CUT_WAIT, GRACE_MARGIN, AioRpcInterceptor, cut_rpcs_at_wrap_up, log_dropped

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

log = logging.getLogger("graceful")


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

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

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
        check_health(health)
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
        on_force_quit(ctx.lifecycle, self._cut, name=f"cancel RPCs of {self.name}")
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
        # On this loop: no thread, woken by a probe's 503.
        await drain_delay_of(ctx.lifecycle).wait_said_async()
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
        for pending in not_serving(self.health):
            await pending

    async def _stop(self, ctx: Context) -> None:
        if self._stopped:
            return
        self._stopped = True
        remaining = ctx.remaining()
        budget = 0.0 if remaining is None else remaining
        wrap_up = ctx.wrap_up_remaining()
        # A grace past the budget: grpc's own cancel never comes first.
        stopping = asyncio.ensure_future(
            self._on_server_loop(self._stop_on_server_loop(budget + GRACE_MARGIN))
        )
        done, _ = await asyncio.wait({stopping}, timeout=budget if wrap_up is None else min(wrap_up, budget))
        if done:
            return
        cut_rpcs_at_wrap_up(ctx.lifecycle, self.name, self.interceptor, None)
        # A shorter grace stops it sooner: each RPC is cancelled now (on the server's loop).
        cutting = asyncio.ensure_future(self._on_server_loop(self.server.stop(0)))
        done, _ = await asyncio.wait({stopping, cutting}, timeout=min(CUT_WAIT, ctx.remaining() or 0.0))
        if cutting in done and not cutting.cancelled() and cutting.exception() is not None:
            log.debug("%s: stop(0): %r", self.name, cutting.exception())
        if stopping not in done:
            log.warning("%s: RPCs still running after stop(0)", self.name)

    async def _stop_on_server_loop(self, grace: float) -> None:
        if self.interceptor is not None:
            self.interceptor.end_health_watches()
        if self.health is not None:
            # A sync servicer on a grpc.aio server.
            end_sync_watches(self.health)
        stopping = asyncio.ensure_future(self.server.stop(grace))
        # The stop runs to its first wait: no new RPC is taken from here on.
        await asyncio.sleep(0)
        log.info("%s: stopped accepting; waiting for the RPCs in flight", self.name)
        await stopping

    async def _on_server_loop(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` on the server's loop, wherever that loop runs."""
        if self._loop is None or self._loop is asyncio.get_running_loop():
            return await coro
        # Not graceful._aio.run_awaitable: that blocks a plain thread until the result; here the
        # caller is a coroutine on run()'s loop, which must not block, so it awaits an asyncio
        # future (wrap_future) of the run on the server's loop instead.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(coro), self._loop))

    def _cut(self) -> None:
        log_dropped(self.name, self.interceptor, None)
        loop, server = self._loop, self.server
        if server is not None and loop is not None and not loop.is_closed():
            # Not graceful._aio.run_awaitable: a force-quit hook shares 2 s with the others, so
            # the wait is bounded (CUT_WAIT, which run_awaitable cannot do), and the stop must
            # run on the server's own loop or not at all (never on a fresh loop, as
            # run_awaitable does when that loop is not running).
            try:
                stopping = asyncio.run_coroutine_threadsafe(server.stop(0), loop)
            except RuntimeError:
                # The loop closed in between.
                return
            try:
                stopping.result(CUT_WAIT)
            except Exception:
                # The exit comes next, whatever happened.
                log.debug("%s: stop(0) did not finish before the exit", self.name, exc_info=True)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    """A coroutine of any awaitable: ``run_coroutine_threadsafe`` takes coroutines only."""
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
        # RuntimeError: the loop closed meanwhile, nobody waits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(finish, error)

    threading.Thread(target=work, name="graceful-grpc-wait", daemon=True).start()
    await done
