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
  none): graceful's report; then every pool process writes its task's stack, says what it runs
  and what it finished, and is SIGKILLed (none outlives the worker); only then is each task
  held settled and named: finished -> acknowledged (never put back), cut or never started ->
  put back on its queue, acknowledged when it started -> lost, with its arguments, or sent
  again (``resend_early_acked``); then exit 70 (graceful/_celery_messages.py says why, from
  issue #29). Without the put-back the Redis transport keeps messages invisible for its
  ``visibility_timeout`` (an hour by default): Celery #3802 in another guise.
* **Probes** (``GRACEFUL_PROBE_PORT``, host ``GRACEFUL_PROBE_HOST``, default all interfaces):
  ``/readyz`` is 200 from Celery's ``worker_ready`` until the warm shutdown starts, ``/livez``
  until the worker's lifecycle has stopped. Both answer from the worker's memory: no broker
  round trip and no app import per probe (``celery inspect ping`` does both: Celery #4079).
* **Start**: every ``GRACEFUL_*`` variable is read and the probe port bound at Celery's
  ``worker_init``; a value graceful cannot use or a taken port stops the worker there (exit 1,
  one line naming the variable), never a worker that runs without graceful.
* Under systemd (``NOTIFY_SOCKET``): ``READY=1`` at ``worker_ready``, then what
  ``graceful.systemd.SystemdNotifier`` sends during the shutdown.

Why hand-offs: Celery calls ``worker_shutting_down`` receivers from inside its signal handler,
on the main thread, between two bytecodes of whatever it was doing. Starting graceful's
sequence takes locks and logs (gunicorn #3198, celery #7339), so the receiver only writes one
line to a pipe, and a thread of graceful's acts on it.

Celery's soft shutdown (``worker_soft_shutdown_timeout``) waits its whole timeout even when the
tasks finished sooner (Celery #9505); graceful's deadline ends the moment the last task does, so
leave the soft shutdown off.

Celery's cold shutdown (SIGQUIT, a second SIGINT) stays Celery's: graceful names the tasks it is
about to cut (with their stacks) before it cancels them, then lets Celery end the worker with its
own exit code; the rest of graceful's sequence runs once Celery's pool has stopped. It used to
wait for graceful's deadline instead and exit 70 (issue #27).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref

import celery
from celery import bootsteps, signals
from celery.worker import state as worker_state

from . import readiness, systemd
from ._celery_messages import (
    claim,
    held_requests,
    keep_received,
    restore_the_rest,
    send_again,
    settle,
    take_back_in_flight,
)
from ._celery_pool import Pipes, TaskRegistry, ignore_pipes_after_fork, stop_processes
from ._checks import TYPE_CHECKING
from ._current import get_lifecycle, use
from ._diagnostics import log_to_stderr_by_default, write_fd2
from ._lifecycle import Lifecycle, State, budget, on_force_quit, prepare
from ._listeners import mark_own

if TYPE_CHECKING:
    from typing import Any

__all__ = ["install"]

log = logging.getLogger("graceful")

STACKS_GRACE = 0.5
"""Seconds the cold report and the deadline wait for the pool processes' stacks and answers."""
KILL_GRACE = 0.5
"""Seconds the deadline waits for the SIGKILLed pool processes to be gone."""

_installed: weakref.WeakKeyDictionary[celery.Celery, bool | None] = weakref.WeakKeyDictionary()
"""Each app installed on, with its ``resend_early_acked``."""
_tasks = TaskRegistry()
"""What this process runs (task_prerun/postrun): the stacks in a report."""
_worker: _Worker | None = None
"""The worker of this process (made at worker_init; copied by forks)."""


def install(app: celery.Celery, *, resend_early_acked: bool | None = None) -> None:
    """Plug graceful into every worker of ``app``; see the module docstring. Idempotent.

    Call it where the app is made (the module ``celery -A`` imports), before the worker starts.
    Listeners registered at import time, before the pool forks, run in every process of the
    worker: the main process and each pool process.

    Args:
        resend_early_acked: at graceful's deadline, send again each task cut that was
            acknowledged when it started (not ``acks_late``): the same message, name, id and
            arguments (at-least-once for those tasks: one killed after its side effect runs
            twice). None (the default): ``GRACEFUL_CELERY_RESEND_EARLY_ACKED`` decides, off
            when unset; such tasks are then reported lost, with their arguments. A task's own
            ``graceful_resend_early_acked`` option (``@app.task(graceful_resend_early_acked=
            True)``) wins over both.

    Raises:
        TypeError: ``app`` is not a ``celery.Celery`` application, or ``resend_early_acked`` is
            not a bool or None.
    """
    if not isinstance(app, celery.Celery):
        raise TypeError(f"graceful.celery.install() takes a celery.Celery app, not {type(app).__name__}")
    if resend_early_acked is not None and not isinstance(resend_early_acked, bool):
        raise TypeError(
            f"graceful.celery.install(resend_early_acked=...) takes True, False or None, "
            f"not {resend_early_acked!r}"
        )
    known = app in _installed
    _installed[app] = resend_early_acked
    if known:
        return

    def on_worker_init(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            _start_worker(sender, _installed.get(app))

    signals.worker_init.connect(on_worker_init, weak=False)
    app.steps["consumer"].add(_AfterTheConsumer)
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


def _start_worker(controller: Any, resend_early_acked: bool | None) -> None:
    """At ``worker_init``: graceful's side of the worker, or the worker refuses to start.

    Celery calls signal receivers through a dispatcher that catches and logs what they raise,
    before the worker's logging is set up: a bad ``GRACEFUL_*`` variable or a taken probe port
    used to leave a worker that started without graceful and said nothing. A ``SystemExit`` is
    the one thing the dispatcher lets through: ``celery worker`` exits 1 at once, with the
    reason (which variable, what to set) on stderr.
    """
    global _worker
    if _worker is not None and _worker.pipes.main_pid == os.getpid():
        return
    try:
        _worker = _Worker(controller, get_lifecycle(), resend_early_acked)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"graceful: the celery worker cannot start: {exc}") from exc


class _Worker:
    """graceful's side of one Celery worker, made in its main process before the pool forks."""

    def __init__(self, controller: Any, lifecycle: Lifecycle, resend_early_acked: bool | None) -> None:
        # Celery configures logging after worker_init: this default then retires.
        log_to_stderr_by_default()
        # What can fail comes first, before anything is registered: every variable read and
        # checked (ValueError), then the probe port bound (RuntimeError).
        self.settings = readiness.configure_from_env(lifecycle)
        self.probes = readiness.serve_probes_from_env(lifecycle, self.settings)
        # Start the deadline's and the sequence's threads ahead of need.
        prepare(lifecycle)
        _check_soft_shutdown(controller, lifecycle)
        self.resend_early_acked = bool(
            self.settings.celery_resend if resend_early_acked is None else resend_early_acked
        )
        """Send early-acknowledged tasks cut at the deadline again (unless a task says otherwise)."""
        self.controller = controller
        self.lifecycle = lifecycle
        self.pipes = Pipes()
        ignore_pipes_after_fork(self.pipes)
        self.drained = threading.Event()
        """Set at worker_shutdown: the pool has no task left."""
        self._finished = False
        self.cold = False
        """Celery's cold shutdown began (SIGQUIT, a second Ctrl-C): Celery ends the worker, and
        graceful's sequence ends at its consumer's shutdown (``_AfterTheConsumer``)."""
        self._cold_reported = False
        self._report_before_celery_cancels(controller)
        lifecycle.add_wrap_up_listener(mark_own(self._stop_consuming), name="celery: tasks in flight")
        on_force_quit(lifecycle, self._at_deadline, name="celery: stop the pool, settle every task held")
        self.notifier = systemd.SystemdNotifier(lifecycle) if os.environ.get("NOTIFY_SOCKET") else None
        threading.Thread(
            target=self.pipes.read_hand_offs, args=(self._on_hand_off,), name="graceful-celery", daemon=True
        ).start()

    def is_main(self) -> bool:
        return os.getpid() == self.pipes.main_pid

    # -- the stop, in the main process -----------------------------------------------------------

    def _on_hand_off(self, note: str) -> None:
        self.lifecycle.shutdown(f"celery {note}", wait=False)

    def _stop_consuming(self) -> None:
        """Wrap-up: make sure Celery stops, tell the pool, wait until no task is left."""
        if not self.is_main():
            # A pool process's copy of the listener: its tasks are its parent's business.
            return
        if not self.cold and worker_state.should_stop is None and worker_state.should_terminate is None:
            # graceful was stopped by something other than Celery's signals: start Celery's
            # warm shutdown (its loop looks at this flag between two events).
            worker_state.should_stop = 0
        self.pipes.tell_children()
        self.drained.wait()

    def finish(self) -> None:
        """The pool has drained (``worker_shutdown``; at a cold shutdown, the consumer's
        shutdown): run the rest of the sequence, and wait for it in Celery's main thread."""
        if self._finished:
            return
        self._finished = True
        self.drained.set()
        lc = self.lifecycle
        # Joins the shutdown under way, starts one (Celery stopped by itself: a control command,
        # an error; or the hand-off thread has not run yet), or continues a pause to the end.
        lc.shutdown("celery cold shutdown" if self.cold else "celery worker stopped", wait=False)
        lc.wait_for_shutdown()
        if lc.exit_code and not getattr(self.controller, "exitcode", 0):
            # The controller's exitcode is what ``celery worker`` exits with.
            self.controller.exitcode = lc.exit_code
        if self.notifier is not None:
            self.notifier.close()
        if self.probes is not None:
            # Only now: /livez answers until the very end.
            self.probes.close()

    # -- Celery's cold shutdown, in the main process --------------------------------------------

    def _report_before_celery_cancels(self, controller: Any) -> None:
        """Have the cold report written before Celery's cold path cancels the tasks.

        Celery 5.5+ runs its cold path (``on_cold_shutdown``: soft wait, cancel every task, stop
        the pool) inside its signal handler *before* it sends ``worker_shutting_down``; by then
        the tasks are gone from its records and their processes are being killed. Its first
        step is the controller's ``wait_for_soft_shutdown()``: the report is written as that
        returns (after a soft shutdown, if one is configured), just before the cancel. Celery
        5.4 has neither: the report is written from ``worker_shutting_down``, which comes first
        there.
        """
        original = getattr(controller, "wait_for_soft_shutdown", None)
        if not callable(original):
            return

        def wait_for_soft_shutdown() -> object:
            try:
                return original()
            finally:
                self.report_cold()

        controller.wait_for_soft_shutdown = wait_for_soft_shutdown

    def report_cold(self) -> None:
        """In Celery's signal handler: name the tasks its cold shutdown is about to cut. Once.

        Only what a handler may do: copies of Celery's records, ``os.write`` to fd 2, and the
        pool processes asked for their tasks' stacks (closing a pipe, a bounded ``select``).
        Nothing when no task is held: an idle worker's cold shutdown writes no report.
        """
        self.cold = True
        if self._cold_reported:
            return
        self._cold_reported = True
        requests = held_requests()
        if not requests:
            return
        lines = [f"graceful: celery cold shutdown: {len(requests)} task(s) still running or prefetched"]
        busy = set()
        for request in requests:
            pid = request.worker_pid
            where = "not started (prefetched)" if pid is None else f"process {pid}"
            if pid is None or not request.acknowledged:
                fate = "Celery cancels it; its message goes back on its queue"
            else:
                fate = "Celery cancels it; it was acknowledged when it started: lost"
            lines.append(f"  - task {request.name} id {request.id}, {where}: {fate}")
            lines.extend(_tasks.stack(request.id, blocking=False))
            if pid is not None and pid != os.getpid():
                busy.add(pid)
        write_fd2("".join(line + "\n" for line in lines))
        if busy:
            self.pipes.ask_for_stacks(len(busy), STACKS_GRACE)

    # -- the deadline, in the main process -------------------------------------------------------

    def _at_deadline(self) -> None:
        """Stop the pool, then settle each task held: see graceful/_celery_messages.py.

        In the force-quit hooks' thread, after graceful's report, before the exit (70). Every
        request held is claimed from Celery; every pool process is asked what it runs and what
        it finished (it writes its stacks, answers, and SIGKILLs itself), then SIGKILLed and
        waited for; only then is each message acknowledged (finished), put back (killed
        mid-run, or never started), sent again or reported lost (early-acknowledged, killed).
        """
        if not self.is_main():
            return
        held = claim(held_requests())
        me = os.getpid()
        processes = (_pool_processes(self.controller) | {h.pid for h in held if h.pid is not None}) - {me}
        answers = self.pipes.collect_answers(processes, STACKS_GRACE)
        # This process's own: the threads and solo pools run tasks here.
        mine, done_here = _tasks.freeze()
        here = _tasks.dump("the main process", mine)
        if here:
            write_fd2(here)
        still = stop_processes(processes | answers.answered, KILL_GRACE)
        silent = processes - answers.answered
        lines = settle(
            held,
            running={**answers.running, **dict.fromkeys(mine, me)},
            finished=answers.finished | set(done_here),
            silent=silent,
            resend=self._resends,
            send_again=lambda messages: send_again(self.controller.app, messages),
        )
        restore_the_rest(held)
        consumer = getattr(getattr(self.controller, "consumer", None), "task_consumer", None)
        lines += take_back_in_flight(
            [getattr(consumer, "channel", None), *(h.request.message.channel for h in held)]
        )
        stopped = len(processes | answers.answered)
        head = [
            (
                f"graceful: celery at the deadline: {len(held)} task(s) held; {stopped} pool process(es) "
                f"stopped (SIGKILL) before any message was put back"
            )
        ]
        head += [f"  (process {pid} did not answer within {STACKS_GRACE:g} s)" for pid in sorted(silent)]
        head += [f"  (process {pid} was still alive {KILL_GRACE:g} s after SIGKILL)" for pid in still]
        write_fd2("".join(line + "\n" for line in head + lines))

    def _resends(self, request: Any) -> bool:
        """Send this early-acknowledged task again? Its own option first, then the worker's."""
        own = getattr(request.task, "graceful_resend_early_acked", None)
        return self.resend_early_acked if own is None else bool(own)


def _check_soft_shutdown(controller: Any, lifecycle: Lifecycle) -> None:
    """Celery's soft shutdown beside graceful's deadline: a WARNING at start, with both numbers.

    ``worker_soft_shutdown_timeout`` (Celery 5.5) waits its whole timeout even when the tasks
    finished sooner (Celery #9505), and a shorter one ends the tasks before graceful's deadline
    could name and put them back: graceful's budget bounds a warm shutdown by itself.
    """
    conf = getattr(getattr(controller, "app", None), "conf", None)
    soft = getattr(conf, "worker_soft_shutdown_timeout", 0) or 0
    if isinstance(soft, (int, float)) and soft > 0:
        log.warning(
            "graceful: Celery's worker_soft_shutdown_timeout is %g s beside graceful's force-quit budget "
            "of %g s: the soft shutdown waits its whole timeout (Celery #9505) and may end tasks before "
            "graceful names and puts them back; set worker_soft_shutdown_timeout = 0 and let the budget "
            "(GRACEFUL_FORCE_QUIT) bound the warm shutdown",
            soft,
            budget(lifecycle),
        )


def _pool_processes(controller: Any) -> set[int]:
    """The pids of the worker's pool processes, as its pool reports them (``celery inspect
    stats`` shows the same list); empty for the threads and solo pools, or if it cannot say."""
    try:
        pids = controller.pool.info.get("processes") or []
    except Exception:  # noqa: BLE001 - the pids the tasks name are stopped all the same
        return set()
    return {pid for pid in pids if isinstance(pid, int) and pid > 0}


class _AfterTheConsumer(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """A step of the worker's consumer: what Celery calls once its pool has stopped, cold or warm.

    Celery's cold shutdown (``WorkController.terminate()``) sends no ``worker_shutdown``; the
    interpreter would then exit as soon as Celery's main thread returns, whether or not
    graceful's hand-off thread has started the sequence yet, or it would wait for graceful's
    deadline and exit 70 (issue #27). The consumer's ``shutdown()`` comes in Celery's main
    thread after the worker's steps (the pool among them) have stopped, on both paths: at a
    cold shutdown it runs the rest of graceful's sequence, and Celery exits after it, with its
    own code. The warm path ends at ``worker_shutdown``, as before.
    """

    label = "graceful"

    def shutdown(self, parent: Any) -> None:
        worker = _main_worker()
        if worker is not None and worker.cold:
            worker.finish()


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
    if worker is None:
        return
    if how == "Cold" and worker.is_main():
        # For Celery 5.4; 5.5+ has written it already (see report_cold).
        worker.report_cold()
    worker.pipes.hand_off(f"{how.lower()} shutdown ({sig})".encode())


def _on_worker_shutdown(**_: object) -> None:
    worker = _main_worker()
    if worker is not None:
        worker.finish()


def _on_worker_process_init(**_: object) -> None:
    worker = _worker
    if worker is None or worker.is_main():
        # The solo pool sends worker_process_init in the main process.
        return
    # systemd listens to the main process only.
    os.environ.pop("NOTIFY_SOCKET", None)
    if worker.notifier is not None:
        # The parent's, copied by the fork: it must not speak for this one.
        worker.notifier.close()
    if get_lifecycle().state() is not State.RUNNING:
        # Forked while the parent was stopping: a fresh lifecycle (the watcher wraps it up at once).
        use(Lifecycle(get_lifecycle().status().force_quit))
    worker.pipes.watch(
        lambda: get_lifecycle().wrap_up("celery warm shutdown (told by the main process)"),
        _tasks,
        f"pool process {os.getpid()}",
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
    if request is not None and _main_worker() is not None:
        keep_received(request)
