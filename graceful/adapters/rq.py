"""rq workers (``rq.SimpleWorker``, ``rq.Worker``) coordinated by graceful.

Why: ``Worker.work()`` installs its own SIGINT/SIGTERM handlers (they raise inside whatever the
main thread is doing, celery #7339's failure mode) and can only run in the main thread; its
cold shutdown kills the job in hand and leaves it to be marked failed, not put back. Here the
worker runs in a thread with its signal handling off, and graceful drives it:

* serve: ``work()``; "started" once the worker has registered itself in Redis. An idle worker
  checks for a stop every second (rq blocks in BLPOP for ``worker_ttl - 15`` s, so
  ``worker_ttl`` becomes 16 s); a ``SimpleWorker`` times its jobs out with rq's
  ``TimerDeathPenalty``, since SIGALRM only reaches the main thread.
* wrap-up (SIGTSTP or SIGTERM): rq's warm shutdown: no new job is taken, the job in hand
  finishes (in the horse, for ``rq.Worker``), and rq deregisters the worker.
* deadline: the job still running is put back at the *front* of its queue (removed from the
  started-job registry first, so rq's cleanup cannot later mark it failed) and logged by id,
  the horse of an ``rq.Worker`` is killed, and the worker is deregistered.
"""

from __future__ import annotations

import logging
import threading

import rq
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty, UnixSignalDeathPenalty

from .._service import Context

log = logging.getLogger("graceful")

__all__ = ["RqService", "adapt"]

IDLE_POLL = 1
"""Seconds an idle worker waits for a job before it checks for a stop (rq's BLPOP timeout)."""


def _coordinate(worker: rq.worker.BaseWorker) -> None:
    """Turn rq's own signal handling off, on this worker only (its class is pickled for horses)."""
    worker._install_signal_handlers = lambda: None  # type: ignore[method-assign] # graceful routes them
    worker.worker_ttl = min(worker.worker_ttl, IDLE_POLL + 15)  # rq's dequeue timeout: worker_ttl - 15
    if isinstance(worker, rq.SimpleWorker) and worker.death_penalty_class is UnixSignalDeathPenalty:
        # The job runs in the worker's thread, not the main thread: SIGALRM cannot time it out.
        worker.death_penalty_class = TimerDeathPenalty


class RqService:
    """An ``rq`` worker; see the module docstring."""

    def __init__(
        self, worker: rq.worker.BaseWorker, *, name: str | None = None, **work_options: object
    ) -> None:
        if not isinstance(worker, rq.worker.BaseWorker):
            raise TypeError(
                f"RqService takes an rq worker (rq.SimpleWorker, rq.Worker), not {type(worker).__name__}"
            )
        _coordinate(worker)
        self.worker = worker
        self.name = name or f"rq {worker.name}"
        self.work_options = work_options
        self._registered = threading.Event()

    def serve(self, ctx: Context) -> None:
        ctx.lifecycle.on_force_quit(self._put_back, name=f"requeue the job of {self.name}")
        register_birth = self.worker.register_birth

        def register_then_say_started() -> None:
            register_birth()  # type: ignore[no-untyped-call]
            ctx.started()

        self.worker.register_birth = register_then_say_started  # type: ignore[method-assign]
        self.worker.work(**self.work_options)  # type: ignore[arg-type]

    def wrap_up(self, ctx: Context) -> None:
        from rq.utils import now

        self.worker._shutdown_requested_date = now()
        self.worker._stop_requested = True
        job = self.worker.get_current_job_id()
        log.info("%s: warm shutdown: no new job; %s", self.name, f"job {job} in hand" if job else "idle")
        if not ctx.wait_served(ctx.remaining()):
            log.warning("%s: job still running when the budget ran out", self.name)

    def close(self, ctx: Context) -> None:
        return None

    def _put_back(self) -> None:
        worker = self.worker
        job = worker.get_current_job()
        if job is not None:
            StartedJobRegistry(job.origin, connection=worker.connection).remove_executions(job)
            queue = rq.Queue(job.origin, connection=worker.connection, serializer=worker.serializer)
            queue.enqueue_job(job, at_front=True)
            log.error(
                "%s: job %s (%s) still running at the force-quit deadline: put back at the front of %r",
                self.name,
                job.id,
                job.func_name,
                job.origin,
            )
        if getattr(worker, "horse_pid", 0):
            worker.kill_horse()
            worker.wait_for_horse()
        worker.register_death()  # type: ignore[no-untyped-call]


def adapt(obj: object) -> RqService | None:
    """The service for an rq worker; None for anything else."""
    if isinstance(obj, rq.worker.BaseWorker):
        return RqService(obj)
    return None
