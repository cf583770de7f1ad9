"""rq workers (``rq.SimpleWorker``) coordinated by graceful.

Why: ``Worker.work()`` installs its own SIGINT/SIGTERM handlers, which raise inside whatever the
main thread is doing (celery #7339's failure mode) and only work in the main thread; an idle
worker blocked in its dequeue loop does not look at a stop request until a job arrives; and
rq's cold shutdown kills the job in hand and leaves it to be marked failed, not put back
(celery #3802's lost ``acks_late`` tasks, in another library). Here the worker runs in a thread
with its own signal handling off, and graceful drives it:

* serve: ``work()``; "started" once rq's bootstrap is over: the worker is registered in Redis,
  subscribed to its command channel (``rq shutdown``, ``send_stop_job_command``) and about to
  take jobs. Not earlier: READY sent from ``register_birth`` let a SIGTERM land while rq was
  still subscribing. An idle worker looks for a stop every second (its dequeue is cut into 1 s
  waits; ``worker_ttl`` and the ``max_idle_time`` you pass keep their meaning). Jobs are timed
  out with rq's ``TimerDeathPenalty``: SIGALRM, rq's default, only reaches the main thread.
* rq's teardown unsubscribes from that channel with a wait that has no bound under redis-py 8:
  rq 3.0 sends UNSUBSCRIBE, then calls ``PubSubWorkerThread.stop()``, which in redis-py 8 joins
  the pub/sub thread without a timeout (7.x only cleared its running flag). If that thread
  handles the UNSUBSCRIBE reply before ``stop()`` clears the flag (a busy machine: 4 to 7 runs
  in 30 with three busy loops beside it), it is no longer subscribed and waits up to rq's
  ``sleep_time`` of 60 s for a subscription; the join waits with it, past graceful's deadline,
  and an idle worker's SIGTERM ended in exit 70 ("job None still running"). Here the flag is
  cleared *first*, then UNSUBSCRIBE is sent (its reply ends the thread's loop), and the join is
  bounded (``PUBSUB_GRACE``); a thread still running after it is a daemon and closes its own
  connection when its wait ends.
* wrap-up (SIGTSTP or SIGTERM; also ``rq shutdown``, which sends this process SIGINT): rq's warm
  shutdown: no new job is taken, the job in hand finishes, rq deregisters the worker.
* deadline: the job still running is taken out of rq's started-job registry (so that rq's
  cleanup cannot later mark it failed) and put back at the *front* of its queue, logged by
  id, and the worker is deregistered.

Only ``rq.SimpleWorker`` (and its subclasses) is run: it performs each job in its own thread,
which graceful can wait for and requeue. ``rq.Worker`` forks a "horse" per job and watches it
with SIGALRM, which does not work from a thread, and a fork of a threaded process may inherit
held locks; run it as a child process instead (``graceful.run(subprocess.Popen(["rq",
"worker"]))``: rq's own warm shutdown answers the SIGTERM graceful sends it).
"""

from __future__ import annotations

import logging
import math
import threading
import time

import rq
from rq.exceptions import StopRequested
from rq.timeouts import TimerDeathPenalty, UnixSignalDeathPenalty

from .._checks import TYPE_CHECKING
from .._lifecycle import on_force_quit
from .._service import Context

if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("graceful")

__all__ = ["RqService", "adapt"]

IDLE_POLL = 1
"""Seconds an idle worker waits for a job before it looks for a stop (rq takes whole seconds)."""
PUBSUB_GRACE = 1.0
"""Seconds rq's teardown waits for its pub/sub thread to end (rq's own join bound)."""

WORK_OPTIONS = (
    "burst",
    "logging_level",
    "date_format",
    "log_format",
    "max_jobs",
    "max_idle_time",
    "dequeue_strategy",
)
"""What ``RqService`` passes on to ``work()``; ``with_scheduler`` forks from a thread (refused)."""


class RqService:
    """An ``rq.SimpleWorker`` run by graceful; see the module docstring.

    Args:
        worker: the ``rq.SimpleWorker``; its signal handling, dequeue wait and (default) death
            penalty are replaced on this instance only.
        name: the service's name in the log (default ``"rq <worker name>"``).
        **work_options: passed to ``worker.work()``: ``burst``, ``max_jobs``,
            ``max_idle_time``, ``dequeue_strategy``, ``logging_level``, ``date_format``,
            ``log_format``.
    """

    bounds_its_drain = True
    """Its ``wrap_up`` bounds itself and names what it cuts: ``run()`` does not abandon it at the
    wrap-up timeout (graceful/_service.py)."""

    def __init__(self, worker: rq.SimpleWorker, *, name: str | None = None, **work_options: Any) -> None:
        _check(worker)
        unknown = sorted(set(work_options) - set(WORK_OPTIONS))
        if "with_scheduler" in unknown:
            raise ValueError(
                "RqService does not start rq's scheduler (it forks from a thread): run it as its own "
                "process, e.g. graceful.run(subprocess.Popen(['rq', 'worker', '--with-scheduler', ...]))"
            )
        if unknown:
            raise TypeError(f"RqService got unknown work() options {unknown}; it takes {list(WORK_OPTIONS)}")
        self.worker = worker
        self.name = name or f"rq {worker.name}"
        self.work_options = work_options
        self._asked = threading.Event()
        """Wrap-up asked rq to stop (else ``work()`` returning is a crash)."""
        _coordinate(worker, self._asked)

    def serve(self, ctx: Context) -> None:
        on_force_quit(ctx.lifecycle, self._put_back, name=f"requeue the job of {self.name}")
        worker = self.worker
        bootstrap = worker.bootstrap

        def bootstrap_then_say_started(*args: Any, **kwargs: Any) -> None:
            # It registers, subscribes and logs "*** Listening on ...".
            bootstrap(*args, **kwargs)
            ctx.started()

        worker.bootstrap = bootstrap_then_say_started  # type: ignore[method-assign]
        # A stop that came while we were starting is not lost.
        if ctx.lifecycle.is_stopping():
            self._asked.set()
            worker._stop_requested = True
        worker.work(**self.work_options)
        finite = any(self.work_options.get(k) for k in ("burst", "max_jobs", "max_idle_time"))
        if not self._asked.is_set() and not finite:
            raise RuntimeError(f"{self.name}: rq's work() returned on its own (see rq's log above)")

    def wrap_up(self, ctx: Context) -> None:
        from rq.utils import now

        worker = self.worker
        self._asked.set()
        worker._shutdown_requested_date = now()
        worker._stop_requested = True
        if not ctx.served.is_set():
            worker.handle_warm_shutdown_request()  # type: ignore[no-untyped-call] # rq's hook (its log line)
        job = worker.get_current_job_id()
        log.info("%s: warm shutdown: no new job; %s", self.name, f"job {job} in hand" if job else "idle")
        if not ctx.wait_served(ctx.remaining()):
            log.warning("%s: job %s still running when the budget ran out", self.name, job)

    def close(self, ctx: Context) -> None:
        return None

    def _put_back(self) -> None:
        """Force-quit hook: the job in hand goes back to the front of its queue, by id."""
        worker = self.worker
        execution = worker.execution
        job = worker.get_current_job()
        if job is not None:
            with worker.connection.pipeline() as pipeline:
                # Out of StartedJobRegistry: rq will not fail it later.
                if execution is not None:
                    worker.cleanup_execution(job, pipeline, execution)
                pipeline.execute()
            queue = worker.queue_class(
                job.origin,
                connection=worker.connection,
                job_class=worker.job_class,
                serializer=worker.serializer,
            )
            queue.enqueue_job(job, at_front=True)
            log.error(
                "%s: job %s (%s) still running at the force-quit deadline: put back at the front of %r",
                self.name,
                job.id,
                job.func_name,
                job.origin,
            )
        worker.register_death()  # type: ignore[no-untyped-call]


def _check(worker: object) -> None:
    if not isinstance(worker, rq.SimpleWorker):
        if isinstance(worker, rq.worker.BaseWorker):
            raise TypeError(
                f"graceful runs rq.SimpleWorker, not {type(worker).__qualname__}: forking a horse per "
                "job from a thread is unsafe and rq watches it with SIGALRM, which only the main thread "
                "gets. Use rq.SimpleWorker(queues, connection=...), or run `rq worker` as a child "
                "process: graceful.run(subprocess.Popen(['rq', 'worker', ...]))"
            )
        raise TypeError(f"RqService takes an rq.SimpleWorker, not {type(worker).__name__}")


def _coordinate(worker: rq.SimpleWorker, asked: threading.Event) -> None:
    """Hand rq's stop to graceful, on this worker instance only."""
    worker._install_signal_handlers = lambda: None  # type: ignore[method-assign] # graceful routes them
    if worker.death_penalty_class is UnixSignalDeathPenalty:
        # The job runs in the worker's thread, not the main thread: SIGALRM cannot time it out.
        worker.death_penalty_class = TimerDeathPenalty
    dequeue = worker.dequeue_job_and_maintain_ttl

    def dequeue_until_stopped(timeout: int | None, max_idle_time: int | None = None) -> Any:
        """rq's dequeue, cut into ``IDLE_POLL`` waits so that an idle worker sees a stop."""
        # Burst mode: rq does not block.
        if timeout is None:
            return dequeue(timeout, max_idle_time)
        idle_since = time.monotonic()
        while not asked.is_set():
            wait = IDLE_POLL
            if max_idle_time is not None:
                left = max_idle_time - (time.monotonic() - idle_since)
                if left <= 0:
                    # work() logs "idle for N seconds, quitting".
                    return None
                wait = max(1, min(wait, math.ceil(left)))
            # rq returns None after ``wait`` idle seconds.
            result = dequeue(min(timeout, wait), wait)
            if result is not None:
                return result
        # work() ends its loop, deregisters the worker, returns.
        raise StopRequested

    worker.dequeue_job_and_maintain_ttl = dequeue_until_stopped  # type: ignore[method-assign]
    worker.unsubscribe = lambda: _unsubscribe(worker)  # type: ignore[method-assign]


def _unsubscribe(worker: rq.SimpleWorker) -> None:
    """rq's ``unsubscribe()``, every wait bounded: stop the pub/sub thread's loop, then UNSUBSCRIBE."""
    # Any: rq types it as None, but it is set in subscribe().
    thread: Any = worker.pubsub_thread
    pubsub: Any = worker.pubsub
    if thread is None or pubsub is None:
        return
    worker.log.info("Worker %s: unsubscribing from channel %s", worker.name, worker.pubsub_channel_name)
    try:
        # redis-py >= 8: clear the running flag; a join of 0 s.
        thread.stop(timeout=0)
    except TypeError:
        # redis-py < 8: stop() only clears the flag.
        thread.stop()
    # Its reply wakes the thread, which now leaves its loop.
    pubsub.unsubscribe()
    thread.join(PUBSUB_GRACE)
    if thread.is_alive():
        # A daemon: it closes its own connection when its wait ends.
        log.warning(
            "rq worker %s: its pub/sub thread did not stop within %g s; left to end on its own",
            worker.name,
            PUBSUB_GRACE,
        )
        return
    pubsub.close()


def adapt(obj: object) -> RqService | None:
    """The service for an ``rq.SimpleWorker``; TypeError for other rq workers; else None."""
    if isinstance(obj, rq.worker.BaseWorker):
        return RqService(obj)  # type: ignore[arg-type] # _check raises the clear TypeError
    return None
