"""A queue worker that never loses a job at shutdown: asynq's and SolidQueue's rules, in Python.

Why: celery's warm shutdown did not ack ``acks_late`` tasks (#3802) and jobs vanished; asynq
stops fetching at SIGTSTP and pushes the tasks still running at its timeout back to the head
of the queue; SolidQueue's ``stopping?`` flag lets a long job checkpoint and re-enqueue
itself. ``Worker`` does all three for any queue, given three functions of yours:

* ``fetch(timeout) -> job | None``: take one job, waiting at most ``timeout`` seconds;
* ``handle(job)``: do it (raise ``Requeue`` to have it put back, e.g. after a checkpoint);
* ``requeue(job)``: put it back, at the head of the queue if the queue has one.

``concurrency`` consumer threads fetch and handle. Wrap-up (SIGTSTP or SIGTERM) stops every
consumer from fetching; the jobs in hand finish. A job fetched at the very moment wrap-up
began is put back at once. At the force-quit deadline each job still running is requeued and
logged by name; it will run again (at-least-once). A job that raises is logged with its
traceback and counted, and not retried: retrying is the queue's policy, not the worker's.
"""

from __future__ import annotations

import logging
import threading

from .._service import Context

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["Requeue", "Worker"]


class Requeue(Exception):  # noqa: N818 - it is an instruction, not an error
    """Raise from ``handle(job)`` to have the job put back on the queue (job iteration).

    A long job polls ``graceful.is_stopping()``, saves its progress in the job, and raises
    ``Requeue``: the next worker resumes from the checkpoint.
    """


class Worker:
    """``concurrency`` consumers of ``fetch``/``handle``/``requeue``; see the module docstring."""

    def __init__(
        self,
        fetch: Callable[[float], Any],
        handle: Callable[[Any], object],
        requeue: Callable[[Any], object],
        *,
        concurrency: int = 1,
        describe: Callable[[Any], str] = repr,
        name: str = "worker",
        poll: float = 0.5,
    ) -> None:
        for what, fn in (("fetch", fetch), ("handle", handle), ("requeue", requeue), ("describe", describe)):
            if not callable(fn):
                raise TypeError(f"Worker({what}=...) must be callable, not {type(fn).__name__}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"Worker(concurrency=...) must be an int >= 1; got {concurrency!r}")
        if not poll > 0:
            raise ValueError(f"Worker(poll=...) must be a number of seconds > 0; got {poll!r}")
        self.fetch, self.handle, self.requeue, self.describe = fetch, handle, requeue, describe
        self.concurrency, self.name, self.poll = concurrency, name, poll
        self.done = self.failed = self.requeued = 0
        self._lock = threading.Lock()
        self._running: dict[int, Any] = {}  # consumer index -> the job in its hands
        self._stop = threading.Event()
        self._consumers: list[threading.Thread] = []

    def serve(self, ctx: Context) -> None:
        ctx.lifecycle.on_force_quit(self._requeue_running, name=f"requeue the jobs of {self.name}")
        self._consumers = [
            threading.Thread(target=self._consume, args=(i,), name=f"{self.name}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for consumer in self._consumers:
            consumer.start()
        ctx.started()
        for consumer in self._consumers:
            consumer.join()
        log.info(
            "%s: stopped (%d done, %d failed, %d requeued)", self.name, self.done, self.failed, self.requeued
        )

    def _consume(self, index: int) -> None:
        while not self._stop.is_set():
            job = self.fetch(self.poll)
            if job is None:
                continue
            if self._stop.is_set():  # fetched as wrap-up began: it never started, put it back
                self._put_back(job, "fetched as the worker was stopping")
                return
            with self._lock:
                self._running[index] = job
            try:
                self.handle(job)
            except Requeue:
                self._put_back(job, "asked to be requeued")
            except Exception:  # one failing job must not stop the consumer
                log.exception("%s: job %s failed", self.name, self.describe(job))
                with self._lock:
                    self.failed += 1
            else:
                with self._lock:
                    self.done += 1
            finally:
                with self._lock:
                    self._running.pop(index, None)

    def _put_back(self, job: Any, why: str) -> None:
        self.requeue(job)
        with self._lock:
            self.requeued += 1
        log.info("%s: job %s %s: requeued", self.name, self.describe(job), why)

    def wrap_up(self, ctx: Context) -> None:
        self._stop.set()
        with self._lock:
            running = len(self._running)
        log.info("%s: fetching stopped; %d job(s) in hand", self.name, running)
        if not ctx.wait_served(ctx.remaining()):
            log.warning("%s: jobs still running when the budget ran out", self.name)

    def close(self, ctx: Context) -> None:
        return None

    def _requeue_running(self) -> None:
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for job in running:
            try:
                self.requeue(job)
            except Exception:  # the next one must still be tried
                log.exception(
                    "%s: job %s could not be requeued at the deadline", self.name, self.describe(job)
                )
            else:
                log.error(
                    "%s: job %s still running at the force-quit deadline: requeued",
                    self.name,
                    self.describe(job),
                )
