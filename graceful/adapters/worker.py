"""A queue worker that never loses a job at shutdown: asynq's and SolidQueue's rules, in Python.

Why: celery's warm shutdown did not ack ``acks_late`` tasks (#3802) and jobs vanished; asynq
stops fetching at SIGTSTP and pushes the tasks still running at its timeout back to the head
of the queue; SolidQueue's ``stopping?`` flag lets a long job checkpoint and re-enqueue
itself. ``Worker`` does all three for any queue, given three functions of yours:

* ``fetch(timeout) -> job | None``: take one job, waiting at most ``timeout`` seconds;
* ``handle(job)``: do it (raise ``Requeue`` to have it put back, e.g. after a checkpoint);
* ``requeue(job)``: put it back, at the head of the queue if the queue has one.

``concurrency`` consumer threads fetch and handle. Wrap-up (SIGTSTP or SIGTERM) stops every
consumer from fetching within ``poll`` seconds; the jobs in hand finish. A job fetched at the
very moment wrap-up began never starts: it is put back at once. At the force-quit deadline each
job still running is requeued and logged with its age; it will run again (at-least-once).

Failures, decided here because a queue's own policy should decide retries, not the worker:

* a job that raises is logged with its traceback and counted (``failed``), and *not* requeued;
* a job whose ``requeue`` raises is logged at ERROR, named, and counted as failed;
* a ``fetch`` that raises means the queue is gone: the worker stops fetching, lets the jobs in
  hand finish, and crashes (exit code 1), so that the orchestrator restarts it. A ``fetch`` that
  wants to ride out a blip catches the error itself and returns None.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from .._checks import TYPE_CHECKING
from .._lifecycle import on_force_quit, report_progress
from .._service import Context

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["Requeue", "Worker"]

_SAME = object()


class Requeue(Exception):  # noqa: N818 - it is an instruction, not an error
    """Raise from ``handle(job)`` to have the job put back on the queue (job iteration).

    A long job polls ``graceful.is_stopping()`` between steps; once it is True, the job saves
    its progress and raises ``Requeue(job_with_checkpoint)`` (or plain ``Requeue()`` to put the
    same job back): the next worker resumes from the checkpoint.
    """

    def __init__(self, job: object = _SAME) -> None:
        super().__init__()
        self.job = job


class Worker:
    """``concurrency`` consumers of ``fetch``/``handle``/``requeue``: a ``graceful.Service``.

    Args:
        fetch: ``fetch(timeout)`` returns one job, or None if none came within ``timeout`` s.
        handle: ``handle(job)`` does the job; its return value is ignored.
        requeue: ``requeue(job)`` puts a job back (asked by ``Requeue``, or at the deadline).
        concurrency: how many consumer threads fetch and handle (>= 1).
        describe: how a job is named in the log (default ``repr``).
        name: the service's name in the log and in ``graceful.status()``.
        poll: the ``timeout`` given to ``fetch``: how soon a stop is noticed by an idle consumer.

    Counters ``done``, ``failed`` and ``requeued`` are kept for logs and tests.
    """

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

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
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll < math.inf:
            raise ValueError(f"Worker(poll=...) must be a finite number of seconds > 0; got {poll!r}")
        self.fetch, self.handle, self.requeue, self._describe = fetch, handle, requeue, describe
        self.concurrency, self.name, self.poll = concurrency, name, float(poll)
        self.done = self.failed = self.requeued = 0
        self._lock = threading.Lock()
        self._running: dict[int, tuple[Any, float]] = {}
        """Per consumer: the job in hand, and since when."""
        self._stop = threading.Event()
        self._error: BaseException | None = None

    # -- the service ---------------------------------------------------------------------------

    def serve(self, ctx: Context) -> None:
        on_force_quit(ctx.lifecycle, self._requeue_running, name=f"requeue the jobs of {self.name}")
        # A stop that came while we were starting is not lost.
        if ctx.lifecycle.is_stopping():
            self._stop.set()
        consumers = [
            threading.Thread(target=self._consume, args=(i, ctx), name=f"{self.name}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for consumer in consumers:
            consumer.start()
        ctx.started()
        for consumer in consumers:
            consumer.join()
        log.info(
            "%s: stopped (%d done, %d failed, %d requeued)", self.name, self.done, self.failed, self.requeued
        )
        if self._error is not None:
            raise RuntimeError(f"{self.name}: fetch() failed: {self._error!r}") from self._error

    def wrap_up(self, ctx: Context) -> None:
        with self._lock:
            self._stop.set()
            in_hand = [self.describe(job) for job, _ in self._running.values()]
        what = "shutting down" if ctx.shutting_down() else "paused"
        log.info(
            "%s: %s: fetching stopped; %d job(s) in hand%s",
            self.name,
            what,
            len(in_hand),
            f": {', '.join(in_hand)}" if in_hand else "",
        )
        if not ctx.wait_served(ctx.remaining()):
            log.warning("%s: jobs still running when the budget ran out", self.name)

    def close(self, ctx: Context) -> None:
        return None

    # -- the consumers -------------------------------------------------------------------------

    def _consume(self, index: int, ctx: Context) -> None:
        while not self._stop.is_set():
            try:
                job = self.fetch(self.poll)
            except Exception as exc:  # noqa: BLE001 - the queue is gone: stop, drain, crash (docstring)
                self._fetch_failed(exc, ctx)
                return
            if job is None:
                continue
            with self._lock:
                started = not self._stop.is_set()
                if started:
                    self._running[index] = (job, time.monotonic())
            if not started:
                # Fetched as wrap-up began: it never started, put it back.
                self._put_back(job, job, "fetched as the worker was stopping")
                return
            try:
                self._handle(job)
            finally:
                with self._lock:
                    self._running.pop(index, None)
                if self._stop.is_set():
                    # The drain moves: systemd gives more time.
                    report_progress(ctx.lifecycle)

    def _handle(self, job: Any) -> None:
        try:
            self.handle(job)
        except Requeue as asked:
            self._put_back(job, job if asked.job is _SAME else asked.job, "asked to be requeued")
        except Exception:
            # One failing job must not stop the consumer.
            log.exception("%s: job %s failed", self.name, self.describe(job))
            self._count("failed")
        else:
            self._count("done")

    def _fetch_failed(self, exc: Exception, ctx: Context) -> None:
        with self._lock:
            first = self._error is None
            if first:
                self._error = exc
            self._stop.set()
        if first:
            log.error("%s: fetch() failed: no new job; the jobs in hand finish", self.name, exc_info=exc)
            ctx.lifecycle.shutdown(f"{self.name}: fetch() failed", wait=False)

    def _put_back(self, job: Any, new: Any, why: str) -> None:
        try:
            self.requeue(new)
        except Exception:
            log.exception("%s: job %s %s, but requeue() failed", self.name, self.describe(job), why)
            self._count("failed")
        else:
            self._count("requeued")
            log.info("%s: job %s %s: requeued", self.name, self.describe(new), why)

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def describe(self, job: Any) -> str:
        """The job's name in the log; ``repr`` if the given ``describe`` raises."""
        try:
            return str(self._describe(job))
        except Exception:  # noqa: BLE001 - a broken describe must not hide which job it was
            return repr(job)

    # -- the deadline --------------------------------------------------------------------------

    def _requeue_running(self) -> None:
        """Force-quit hook: every job still in hand goes back on its queue, each one logged."""
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        now = time.monotonic()
        for job, since in running:
            age = now - since
            try:
                self.requeue(job)
            except Exception:
                # The next one must still be tried.
                log.exception(
                    "%s: job %s still running at the force-quit deadline (for %.1f s) and requeue() "
                    "failed: it is lost unless the queue redelivers it",
                    self.name,
                    self.describe(job),
                    age,
                )
            else:
                self._count("requeued")
                log.error(
                    "%s: job %s still running at the force-quit deadline (for %.1f s): requeued",
                    self.name,
                    self.describe(job),
                    age,
                )
