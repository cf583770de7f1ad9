"""asyncio from plain threads: one copy of "run this awaitable" and "wake that future".

Why: listeners, reload listeners and ``run()``'s adapter steps all had to run a coroutine
from a worker thread, each with its own edge cases (a loop that closed meanwhile, a
loop that is not running yet, being called on the loop's own thread). One function here handles
them all, so they behave alike:

* a loop that is running in *another* thread runs the awaitable there (it may touch that loop's
  objects: a pool bound to the app's loop is closed on it, not on a fresh one);
* on the loop's own thread waiting would deadlock: that is a ``RuntimeError`` that says so;
* no loop, or a closed one: a fresh loop in this thread (``asyncio.run``).

``asyncio`` is imported only when an awaitable actually runs: ``import graceful`` never pays
for it. The other way round, a ``Moment`` (wrap-up began, the lifecycle stopped) is waited
for alike by a thread (``wait``) and by a coroutine (``await wait_async()``, no thread held).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable

from ._checks import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    from typing import Any

__all__ = ["Moment", "is_awaitable", "run_awaitable", "running_loop", "set_true_soon", "wait_async"]


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, without importing asyncio if nobody did."""
    asyncio_module = sys.modules.get("asyncio")
    if asyncio_module is None:
        return None
    try:
        loop: asyncio.AbstractEventLoop = asyncio_module.get_running_loop()
    except RuntimeError:
        return None
    return loop


def is_awaitable(value: object) -> bool:
    """True for what ``await`` accepts (a coroutine, a future, anything with ``__await__``)."""
    return hasattr(value, "__await__")


def run_awaitable(
    awaitable: Any,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    on_start: Callable[[Callable[[], object]], object] | None = None,
) -> object:
    """Run ``awaitable`` to completion from a plain thread and return its result.

    On ``loop`` if it is running (in another thread), else on a fresh loop in this thread.
    ``on_start(cancel)`` is called once it runs, with a function that cancels it from any
    thread (its ``finally`` blocks run; this call then raises ``CancelledError``).

    Raises:
        RuntimeError: called on ``loop``'s own thread, where blocking would deadlock it.
        BaseException: whatever the awaitable raised.
    """
    import asyncio

    async def main() -> object:
        return await awaitable

    if loop is not None and loop.is_running() and not loop.is_closed():
        if running_loop() is loop:
            main().close()
            raise RuntimeError(
                "graceful cannot block the event loop's own thread to wait for a coroutine on it: "
                "await it instead"
            )
        future = asyncio.run_coroutine_threadsafe(main(), loop)
        if on_start is not None:
            # concurrent.futures' cancel cancels the task on its loop.
            on_start(future.cancel)
        return future.result()

    async def cancellable() -> object:
        task = asyncio.ensure_future(main())
        own = asyncio.get_running_loop()

        def cancel() -> None:
            # The loop has closed: nothing left to cancel.
            with contextlib.suppress(RuntimeError):
                own.call_soon_threadsafe(task.cancel)

        if on_start is not None:
            on_start(cancel)
        return await task

    return asyncio.run(cancellable() if on_start is not None else main())


def _set_true(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


def set_true_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool]) -> None:
    """From any thread: resolve ``future`` with True on ``loop`` (once; a closed loop is fine)."""
    # The loop closed: nobody awaits the future any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_set_true, future)


async def wait_async(
    is_set: Callable[[], bool], on_set: Callable[[Callable[[], None]], Callable[[], None]]
) -> bool:
    """``await`` until ``is_set()``, without blocking the loop: the one future wake-up.

    ``on_set(wake)`` arranges for ``wake()`` to be called (from any thread) when it happens
    and returns a function that cancels the arrangement.
    """
    import asyncio

    if is_set():
        return True
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()
    cancel = on_set(lambda: set_true_soon(loop, future))
    try:
        # Set between the caller's check and this arrangement.
        if is_set():
            return True
        return await future
    finally:
        cancel()


class Moment:
    """Something that happens once (wrap-up began, the lifecycle stopped), waited for by
    threads and by event loops alike. Set once, never cleared."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wakes: list[Callable[[], None]] | None = []
        """The wake-ups waiting for ``set()``; None once set (``set()`` has taken them)."""

    def set(self) -> None:
        with self._lock:
            wakes, self._wakes = self._wakes or [], None
        self._event.set()
        for wake in wakes:
            wake()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until set; True if it was within ``timeout`` seconds."""
        return self._event.wait(timeout)

    async def wait_async(self) -> bool:
        """``await`` until set, without blocking the loop; a cancelled wait leaves nothing behind."""
        return await wait_async(self.is_set, self._on_set)

    def _on_set(self, wake: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            wakes = self._wakes
            if wakes is not None:
                wakes.append(wake)
                return lambda: wakes.remove(wake) if wake in wakes else None
        # Already set: wake at once.
        wake()
        return lambda: None
