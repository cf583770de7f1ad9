"""Threads, executors and asyncio tasks, stopped within the budget.

Why: the contract lists ``threading.Thread`` and ``concurrent.futures`` executors among the
things ``graceful.run()`` accepts, and both are easy to lose work in. A Python thread cannot be
interrupted from outside, so a thread service is cooperative: the thread polls
``graceful.is_stopping()`` and returns, and wrap-up waits for it within the budget, naming it in
the log if it does not return. An executor stops taking work at wrap-up (``submit`` then raises,
as ``shutdown()`` makes it), lets what is running finish within the budget, and at shutdown
cancels what never started, with a log line that counts them (celery #3802 is about work that
vanished silently at a warm shutdown).

An asyncio task that is not a server (a background refresher, a consumer spawned by one) is
handed to ``cancel_at_shutdown(task)``: at shutdown it is cancelled with a reason that says
why, and awaited within the budget; one that swallows the cancellation is named in the log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Executor
from queue import Empty

from .._checks import TYPE_CHECKING
from .._current import or_default
from .._service import Context

if TYPE_CHECKING:
    import asyncio
    from typing import Any

    from .._lifecycle import Lifecycle
    from .._listeners import Waiter

log = logging.getLogger("graceful")

__all__ = ["ExecutorService", "ThreadService", "adapt", "cancel_at_shutdown"]


class ThreadService:
    """A ``threading.Thread`` that returns once ``graceful.is_stopping()`` turns True.

    ``serve`` starts it if it has not been started, then joins it. Wrap-up waits for it within
    the remaining budget (for ever during a pause) and logs an error naming it if it is still
    running; the force-quit report then shows where it is stuck.
    """

    def __init__(self, thread: threading.Thread, name: str | None = None) -> None:
        self.thread = thread
        self.name = name or thread.name

    def serve(self, ctx: Context) -> None:
        if self.thread.ident is None:
            self.thread.start()
        ctx.started()
        self.thread.join()

    def wrap_up(self, ctx: Context) -> None:
        self.thread.join(ctx.remaining())
        if self.thread.is_alive():
            log.error(
                "thread %r did not return within the budget: it must poll graceful.is_stopping()", self.name
            )

    def close(self, ctx: Context) -> None:
        return None


class ExecutorService:
    """A ``concurrent.futures`` executor: no new work at wrap-up, pending work cancelled at shutdown.

    Wrap-up calls ``shutdown(wait=False)``, so ``submit`` raises from then on while queued and
    running work carries on. Close cancels the work that never started (``cancel_futures``),
    logging how many items that was, and waits for the running ones within the budget.
    """

    def __init__(self, executor: Executor, name: str | None = None) -> None:
        self.executor = executor
        self.name = name or type(executor).__name__
        self._stopped = threading.Event()

    def serve(self, ctx: Context) -> None:
        ctx.started()
        self._stopped.wait()

    def wrap_up(self, ctx: Context) -> None:
        self.executor.shutdown(wait=False)
        self._stopped.set()

    def close(self, ctx: Context) -> None:
        cancelled = self._cancel_queued()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if cancelled:
            log.warning("%s: cancelled %d queued work item(s) that never started", self.name, cancelled)
        workers = list(getattr(self.executor, "_threads", ())) or list(
            (getattr(self.executor, "_processes", None) or {}).values()
        )
        remaining = ctx.remaining()
        for worker in workers:
            worker.join(remaining)
            if worker.is_alive():
                log.error("%s: a worker was still running at the deadline", self.name)
                return

    def _cancel_queued(self) -> int:
        """Cancel and count ThreadPoolExecutor's queued items (``cancel_futures`` counts none)."""
        queue = getattr(self.executor, "_work_queue", None)
        if queue is None:
            return 0
        cancelled = 0
        with contextlib.suppress(Empty):
            while True:
                item = queue.get_nowait()
                if item is not None and item.future.cancel():
                    cancelled += 1
        # Put back the wake-up that shutdown() had queued for the workers.
        queue.put(None)
        return cancelled


def adapt(obj: object) -> ThreadService | ExecutorService | None:
    """The service for a ``Thread`` or an ``Executor``; None for anything else."""
    if isinstance(obj, threading.Thread):
        return ThreadService(obj)
    if isinstance(obj, Executor):
        return ExecutorService(obj)
    return None


def cancel_at_shutdown(task: asyncio.Task[Any], *, lifecycle: Lifecycle | None = None) -> Waiter:
    """Cancel ``task`` in the shutdown phase and await it within the budget; returns the waiter.

    Call it from the task's event loop (the shutdown listener runs there). The cancellation
    carries the message ``"graceful: shutdown"``; the task may catch ``CancelledError`` to
    finish what it is doing.

    Raises:
        TypeError: ``task`` is not an ``asyncio.Task``.
    """
    import asyncio

    if not isinstance(task, asyncio.Task):
        raise TypeError(
            f"cancel_at_shutdown() takes an asyncio.Task (asyncio.create_task(...)), not {type(task).__name__}"
        )
    lc = or_default(lifecycle, "cancel_at_shutdown()")
    name = task.get_name()

    async def cancel() -> None:
        if task.done():
            return
        task.cancel("graceful: shutdown")
        done, _ = await asyncio.wait({task}, timeout=lc.time_remaining())
        if not done:
            log.error("asyncio task %r did not finish within the budget after being cancelled", name)

    return lc.add_shutdown_listener(cancel, name=f"cancel task {name}")
