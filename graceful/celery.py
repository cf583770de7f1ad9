"""Celery workers: graceful's listeners, deadline, report and probes inside ``celery worker``.

``graceful.celery.install(app)``, once, where the Celery app is made. Celery owns the worker
process and its signals; graceful plugs into Celery's own lifecycle (its signals) instead:

* **Warm shutdown** (SIGTERM, or anything that calls ``graceful.shutdown()`` in the worker):
  the wrap-up listeners run as the consumer stops; ``is_stopping()`` turns True in the main
  process *and inside running tasks* in every pool, prefork children included (they are told
  through a pipe: see graceful/_celery_pool.py), so a long task can save where it got to and
  re-enqueue the rest (the job-iteration pattern, examples/celery_worker.py). Each pool process
  runs its own wrap-up listeners then, and its shutdown listeners as it exits, after its task.
* The main process's **shutdown listeners** run after the tasks in flight have finished (after
  Celery's ``worker_shutdown``, which comes once the pool has drained), and the process exits
  only once they are done: 0, or 1 if a listener raised.
* **Deadline** (graceful's force-quit budget, counted from SIGTERM; Celery's warm shutdown has
  none): graceful's report, then each task still running named (name, id, process) with its
  stack (from the pool process itself for prefork), every message not yet acknowledged
  (``acks_late`` tasks, and tasks prefetched but not started) put back on its queue and logged
  one by one, then exit 70. Without this the Redis transport keeps them invisible for its
  ``visibility_timeout`` (an hour by default): Celery #3802 in another guise.
* **Probes** (``GRACEFUL_PROBE_PORT``, host ``GRACEFUL_PROBE_HOST``, default all interfaces):
  ``/readyz`` is 200 from Celery's ``worker_ready`` until the warm shutdown starts, ``/livez``
  until the worker's lifecycle has stopped. Both answer from the worker's memory: no broker
  round trip and no app import per probe (``celery inspect ping`` does both: Celery #4079).
* Under systemd (``NOTIFY_SOCKET``): ``READY=1`` at ``worker_ready``, then what
  ``graceful.systemd.SystemdNotifier`` sends during the shutdown.

Why hand-offs: Celery calls ``worker_shutting_down`` receivers from inside its signal handler,
on the main thread, between two bytecodes of whatever it was doing. Starting graceful's
sequence takes locks and logs (gunicorn #3198, celery #7339), so the receiver only writes one
line to a pipe, and a thread of graceful's acts on it.

Celery's soft shutdown (``worker_soft_shutdown_timeout``) waits its whole timeout even when the
tasks finished sooner (Celery #9505); graceful's deadline ends the moment the last task does, so
leave the soft shutdown off. Celery's cold shutdown (SIGQUIT, a second SIGINT) stays Celery's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref

import celery
from celery import signals
from celery.worker import state as worker_state

from . import Lifecycle, State, get_lifecycle, readiness, systemd, use
from ._celery_pool import Pipes, TaskRegistry, ignore_pipes_after_fork
from ._checks import TYPE_CHECKING
from ._diagnostics import log_to_stderr_by_default, write_fd2
from ._lifecycle import on_force_quit

if TYPE_CHECKING:
    from typing import Any

__all__ = ["install"]

log = logging.getLogger("graceful")

STACKS_GRACE = 0.5
"""Seconds the deadline hook waits for the pool processes to print their tasks' stacks."""

_installed: weakref.WeakSet[celery.Celery] = weakref.WeakSet()
_tasks = TaskRegistry()  # what this process runs (task_prerun/postrun): the stacks in a report
_worker: _Worker | None = None  # the worker of this process (made at worker_init; copied by forks)


def install(app: celery.Celery) -> None:
    """Plug graceful into every worker of ``app``; see the module docstring. Idempotent.

    Call it where the app is made (the module ``celery -A`` imports), before the worker starts.
    Listeners registered at import time, before the pool forks, run in every process of the
    worker: the main process and each pool process.

    Raises:
        TypeError: ``app`` is not a ``celery.Celery`` application.
    """
    if not isinstance(app, celery.Celery):
        raise TypeError(f"graceful.celery.install() takes a celery.Celery app, not {type(app).__name__}")
    if app in _installed:
        return
    _installed.add(app)

    def on_worker_init(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            _start_worker(sender)

    signals.worker_init.connect(on_worker_init, weak=False)
    _connect_once()


_connected = False


def _connect_once() -> None:
    """The receivers that do not depend on the app: they act on this process's ``_Worker``."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_process_init.connect(_on_worker_process_init, weak=False)
    signals.worker_process_shutdown.connect(_on_worker_process_shutdown, weak=False)
    signals.task_received.connect(_on_task_received, weak=False)
    signals.task_prerun.connect(_on_task_prerun, weak=False)
    signals.task_postrun.connect(_on_task_postrun, weak=False)


def _start_worker(controller: Any) -> None:
    global _worker
    if _worker is None or _worker.pipes.main_pid != os.getpid():
        _worker = _Worker(controller, get_lifecycle())


class _Worker:
    """graceful's side of one Celery worker, made in its main process before the pool forks."""

    def __init__(self, controller: Any, lifecycle: Lifecycle) -> None:
        log_to_stderr_by_default()  # Celery configures logging after worker_init: it then retires
        self.controller = controller
        self.lifecycle = lifecycle
        self.pipes = Pipes()
        ignore_pipes_after_fork(self.pipes)
        self.drained = threading.Event()  # set at worker_shutdown: the pool has no task left
        self._finished = False
        lifecycle.add_wrap_up_listener(self._stop_consuming, name="celery: tasks in flight")
        on_force_quit(lifecycle, self._at_deadline, name="celery: requeue unacknowledged tasks")
        self.settings = readiness.configure_from_env(lifecycle)
        self.probes = self._serve_probes()
        self.notifier = systemd.SystemdNotifier(lifecycle) if os.environ.get("NOTIFY_SOCKET") else None
        threading.Thread(
            target=self.pipes.read_hand_offs, args=(self._on_hand_off,), name="graceful-celery", daemon=True
        ).start()

    def _serve_probes(self) -> readiness.ProbeServer | None:
        return readiness.serve_probes_from_env(self.lifecycle, self.settings)

    def is_main(self) -> bool:
        return os.getpid() == self.pipes.main_pid

    # -- the stop, in the main process -----------------------------------------------------------

    def _on_hand_off(self, note: str) -> None:
        self.lifecycle.shutdown(f"celery {note}", wait=False)

    def _stop_consuming(self) -> None:
        """Wrap-up: make sure Celery stops, tell the pool, wait until no task is left."""
        if not self.is_main():
            return  # a pool process's copy of the listener: its tasks are its parent's business
        if worker_state.should_stop is None and worker_state.should_terminate is None:
            # graceful was stopped by something other than Celery's signals: start Celery's
            # warm shutdown (its loop looks at this flag between two events).
            worker_state.should_stop = 0
        self.pipes.tell_children()
        self.drained.wait()

    def finish(self) -> None:
        """At ``worker_shutdown``: the pool has drained; run the rest of the sequence, wait for it."""
        if self._finished:
            return
        self._finished = True
        self.drained.set()
        lc = self.lifecycle
        # Joins the shutdown under way, starts one (Celery stopped by itself: a control command,
        # an error), or continues a pause (wrap_up()) to the end.
        lc.shutdown("celery worker stopped", wait=False)
        lc.wait_for_shutdown()
        if lc.exit_code and not getattr(self.controller, "exitcode", 0):
            self.controller.exitcode = lc.exit_code  # what ``celery worker`` exits with
        if self.notifier is not None:
            self.notifier.close()
        if self.probes is not None:
            self.probes.close()  # only now: /livez answers until the very end

    # -- the deadline, in the main process -------------------------------------------------------

    def _at_deadline(self) -> None:
        """Name each task still held, put back every unacknowledged message, then the stacks."""
        if not self.is_main():
            return
        requests = _requests()
        lines = [f"graceful: celery tasks still running or prefetched at the deadline: {len(requests)}"]
        busy = set()
        for request in requests:
            pid = request.worker_pid
            where = "not started (prefetched)" if pid is None else f"process {pid}"
            fate = (
                "acknowledged when it started (not acks_late): NOT put back"
                if request.acknowledged
                else "put back on its queue"
            )
            lines.append(f"  - task {request.name} id {request.id}, {where}: {fate}")
            lines.extend(_tasks.stack(request.id))
            if pid is not None and pid != os.getpid():
                busy.add(pid)
        write_fd2("".join(line + "\n" for line in lines))
        channel = None
        for request in requests:
            channel = _requeue(request) or channel
        _restore_the_rest(channel)
        if busy:
            self.pipes.ask_for_stacks(len(busy), STACKS_GRACE)


_received: dict[str, Any] = {}  # task id -> Request, from task_received until acknowledged and done


def _requests() -> list[Any]:
    """Every request this worker holds (running or prefetched), each once, in a stable order.

    Celery forgets the prefetched ones when its consumer closes (their messages stay
    unacknowledged on the channel), so those received are kept here too.
    """
    for _ in range(10):  # the main thread may change the sets while we copy them
        try:
            held = [*worker_state.active_requests, *worker_state.reserved_requests, *list(_received.values())]
            break
        except RuntimeError:
            continue
    else:
        held = []
    found = {id(r): r for r in held if not (r.acknowledged and r not in worker_state.active_requests)}
    return sorted(found.values(), key=lambda r: (r.worker_pid is None, str(r.id)))


def _requeue(request: Any) -> Any:
    """Put the request's message back on its queue now; its channel (None if it was acked)."""
    if request.acknowledged:
        log.warning(
            "celery task %s[%s] was acknowledged when it started: it is lost", request.name, request.id
        )
        return None
    message = request.message
    try:
        # Straight to the channel: Celery's own ``request.reject()`` queues the call on its event
        # loop, and the main thread is not running it now (it waits for the pool).
        message.reject(requeue=True)
        request.acknowledged = True  # Celery must not ack or reject it again in the last instant
    except Exception:  # the others must still be put back
        log.exception("celery task %s[%s] could not be put back on its queue", request.name, request.id)
        return None
    log.warning("celery task %s[%s] put back on its queue at the deadline", request.name, request.id)
    return message.channel


def _restore_the_rest(channel: Any) -> None:
    """Put back what else the channel holds unacknowledged (kombu's virtual transports: Redis,
    SQS...). AMQP brokers redeliver by themselves once the connection drops with the process."""
    restore = getattr(getattr(channel, "qos", None), "restore_unacked", None)
    if callable(restore):
        try:
            restore()
        except Exception:
            log.exception("graceful: could not put back the other unacknowledged celery messages")


# -- Celery's signals ------------------------------------------------------------------------------


def _main_worker() -> _Worker | None:
    worker = _worker
    return worker if worker is not None and worker.is_main() else None


def _on_worker_ready(**_: object) -> None:
    worker = _main_worker()
    if worker is not None:
        readiness.set_ready(worker.lifecycle)
        systemd.notify("READY=1", "STATUS=celery worker ready")


def _on_worker_shutting_down(sig: str = "?", how: str = "?", **_: object) -> None:
    # Inside Celery's signal handler: a hand-off only (see the module docstring).
    worker = _worker
    if worker is not None:
        worker.pipes.hand_off(f"{how.lower()} shutdown ({sig})".encode())


def _on_worker_shutdown(**_: object) -> None:
    worker = _main_worker()
    if worker is not None:
        worker.finish()


def _on_worker_process_init(**_: object) -> None:
    worker = _worker
    if worker is None or worker.is_main():
        return  # the solo pool sends it in the main process
    os.environ.pop("NOTIFY_SOCKET", None)  # systemd listens to the main process only
    if worker.notifier is not None:
        worker.notifier.close()  # the parent's, copied by the fork: it must not speak for this one
    if get_lifecycle().state() is not State.RUNNING:
        # Forked while the parent was stopping: a fresh lifecycle (the watcher wraps it up at once).
        use(Lifecycle(get_lifecycle().status().force_quit))
    pid = os.getpid()
    worker.pipes.watch(
        lambda: get_lifecycle().wrap_up("celery warm shutdown (told by the main process)"),
        lambda: _tasks.dump(f"pool process {pid}"),
    )


def _on_worker_process_shutdown(**_: object) -> None:
    # In a pool process, as it exits: after its last task. Its own budget bounds the listeners.
    worker = _worker
    if worker is not None and not worker.is_main():
        with contextlib.suppress(Exception):
            get_lifecycle().shutdown("celery pool process exits")


def _on_task_prerun(task_id: str = "", task: Any = None, **_: object) -> None:
    _tasks.started(task_id, getattr(task, "name", "?"))


def _on_task_postrun(task_id: str = "", **_: object) -> None:
    _tasks.finished(task_id)


def _on_task_received(request: Any = None, **_: object) -> None:
    # In the main process, on Celery's event loop: keep it until it is done with (bounded by
    # the prefetch: the finished ones are dropped here, at the next one received).
    if request is None or _main_worker() is None:
        return
    channel = request.message.channel
    for task_id, held in list(_received.items()):
        done = held.acknowledged and held not in worker_state.active_requests
        if done or held.message.channel is not channel:  # another channel: a reconnect redelivers it
            del _received[task_id]
    _received[str(request.id)] = request
