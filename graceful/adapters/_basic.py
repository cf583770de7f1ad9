"""Adapters for the shapes every Python server comes in, with no library behind them.

* ``SocketServerService``: anything with ``serve_forever()`` + ``shutdown()`` (the
  ``socketserver`` family). Wrap-up stops the loop and closes the listening socket.
* ``StartStopService``: anything with a non-blocking ``start()`` and a ``stop()``.
* ``CallableService``: a blocking callable. It cannot be interrupted safely from outside, so
  it is expected to poll ``graceful.is_stopping()`` (or, if it takes one argument, its
  context's ``ctx.wrapping_up()``) and return; wrap-up waits for it.
* ``CoroutineService``: a coroutine or awaitable, run as a task on the main-thread loop.
  Wrap-up cancels it (the asyncio way to say "stop"; the coroutine may catch
  ``CancelledError`` to finish what it is doing) and waits for it within the budget.
* ``CoroutineFunctionService``: an ``async def`` handed over uncalled (``run(main)`` rather
  than ``run(main())``, the mistake everyone makes once). Called as late as ``serve()``, so a
  ``run()`` that fails its checks leaves no coroutine behind that was never awaited.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable

from .._checks import TYPE_CHECKING
from .._listeners import default_name
from .._service import Context

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = [
    "CallableService",
    "CoroutineFunctionService",
    "CoroutineService",
    "SocketServerService",
    "StartStopService",
    "takes_context",
]


def _wait_served(ctx: Context, what: str) -> None:
    if not ctx.wait_served(ctx.remaining()):
        log.error("%s %r did not return within the budget", what, ctx.name)


class SocketServerService:
    """``serve_forever()`` / ``shutdown()`` / ``server_close()``."""

    def __init__(self, server: Any, name: str | None = None) -> None:
        self.server = server
        self.name = name or type(server).__name__

    def serve(self, ctx: Context) -> None:
        ctx.started()
        self.server.serve_forever()

    def wrap_up(self, ctx: Context) -> None:
        # Returns once serve_forever() has left its loop.
        self.server.shutdown()
        close = getattr(self.server, "server_close", None)
        if close is not None:
            close()

    def close(self, ctx: Context) -> None:
        return None


class StartStopService:
    """A non-blocking ``start()``; ``stop()`` at wrap-up."""

    def __init__(self, server: Any, name: str | None = None) -> None:
        self.server = server
        self.name = name or type(server).__name__
        self._stopped = threading.Event()
        self._start_returned = threading.Event()

    def serve(self, ctx: Context) -> None:
        try:
            self.server.start()
        finally:
            self._start_returned.set()
        ctx.started()
        self._stopped.wait()

    def wrap_up(self, ctx: Context) -> None:
        # A stop that overtakes a start still under way (a signal during start-up) would leave
        # the server running: stop only once start() has returned, within the budget.
        self._start_returned.wait(ctx.remaining())
        try:
            self.server.stop()
        finally:
            self._stopped.set()

    def close(self, ctx: Context) -> None:
        return None


def takes_context(fn: Callable[..., object]) -> bool:
    """True if ``fn`` asks for its ``graceful.Context``: exactly one required positional
    parameter, named ``ctx`` or ``context`` or annotated ``Context``. Any other required
    parameter stays the ``TypeError`` it always was (``run(lambda port: ...)`` is a mistake)."""
    import inspect

    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        # A builtin without a signature: called with none.
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.default is p.empty and p.kind in positional]
    if len(required) != 1 or any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in parameters):
        return False
    only = required[0]
    annotation = only.annotation
    named = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return only.name in ("ctx", "context") or named.rsplit(".", 1)[-1] == "Context"


class CallableService:
    """A blocking callable that returns once it is told to stop.

    ``fn()`` polls ``graceful.is_stopping()`` (True for every service at once). ``fn(ctx)``, a
    callable with one parameter named ``ctx`` (or annotated ``graceful.Context``), is given its
    context and polls
    ``ctx.wrapping_up()``, True only when its own turn comes (after the services listed after
    it have drained): the way a worker fed by an API in the same ``run()`` takes every job the
    API accepted.
    """

    def __init__(
        self, fn: Callable[..., object], name: str | None = None, *, with_context: bool | None = None
    ) -> None:
        self.fn = fn
        self.name = name or default_name(fn)
        self.takes_context = takes_context(fn) if with_context is None else with_context

    def serve(self, ctx: Context) -> None:
        ctx.started()
        if self.takes_context:
            self.fn(ctx)
        else:
            self.fn()

    def wrap_up(self, ctx: Context) -> None:
        _wait_served(ctx, "callable")

    def close(self, ctx: Context) -> None:
        return None


class CoroutineService:
    """A coroutine (or awaitable) run as a task on the main-thread event loop."""

    def __init__(self, awaitable: Awaitable[object], name: str | None = None) -> None:
        self.awaitable = awaitable
        self.name = name or getattr(awaitable, "__qualname__", None) or type(awaitable).__name__
        self._task: Any = None

    async def serve(self, ctx: Context) -> None:
        import asyncio

        self._task = asyncio.ensure_future(self._awaitable())
        ctx.started()
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                # We were cancelled from outside, not the task by wrap-up.
                raise

    def _awaitable(self) -> Awaitable[object]:
        return self.awaitable

    async def wrap_up(self, ctx: Context) -> None:
        import asyncio

        task = self._task
        if task is None or task.done():
            return
        task.cancel("graceful: wrap-up")
        done, _ = await asyncio.wait({task}, timeout=ctx.remaining())
        if not done:
            log.error("coroutine %r did not finish within the budget after being cancelled", self.name)

    async def close(self, ctx: Context) -> None:
        return None


class CoroutineFunctionService(CoroutineService):
    """An ``async def`` with no parameters: called in ``serve()``, then run as a coroutine."""

    def __init__(self, fn: Callable[[], Awaitable[object]], name: str | None = None) -> None:
        super().__init__(None, name or default_name(fn))  # type: ignore[arg-type]
        self.fn = fn

    def _awaitable(self) -> Awaitable[object]:
        return self.fn()
