"""The ``Lifecycle``: one coordinated shutdown, as a small state machine that only moves forward.

RUNNING -> WRAPPING_UP -> SHUTTING_DOWN -> STOPPED. Why it is shaped like this:

* Wrap-up and shutdown are separate phases; the shutdown phase starts only when *every*
  wrap-up listener has finished (``_phases`` says why).
* Every trigger is idempotent and every caller of ``shutdown(wait=True)`` waits for the same
  single sequence. asynq #979: a second ``Shutdown()`` returned at once, ``main`` exited and
  the cleanup never ran.
* The sequence is driven by its own non-daemon thread, so the interpreter does not exit in the
  middle of it even if ``main`` returns (go-zero #1804, #1664: "call waitForCalled yourself").
* ``shutdown()`` from inside a listener, or from a running event loop, triggers but does not
  block: waiting there for the sequence that is waiting for you is a deadlock.
* A pause (``wrap_up()``, SIGTSTP) runs only the wrap-up phase and starts no deadline; a later
  ``shutdown()`` continues from there (asynq's TSTP).
* Once the deadline has passed, the force quit owns the end (``_force_quit`` says why).
* It knows nothing of signals, ``run()``, readiness or systemd: they sit above it and learn
  of its transitions through ``subscribe()`` (``Event``), never by reaching in.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ._aio import Moment, running_loop
from ._checks import check_clock, check_listener, check_name, check_reason, check_timeout
from ._clock import Clock, MonotonicClock
from ._diagnostics import format_report, format_sections
from ._events import Event, Observers
from ._force_quit import FORCED_EXIT_CODE, ForceQuitAction, ForceQuitTimer, check_budget
from ._listeners import DefaultLoop, Listener, Waiter, current_listener, default_name, refuse_in_server
from ._phases import Phases
from ._reload import ReloadHandle, Reloads
from ._status import ListenerStatus, Phase, State, Status

__all__ = ["Lifecycle"]

log = logging.getLogger("graceful")


class Lifecycle:
    """One process's shutdown: listener registries, the phase sequence and the deadline.

    The module-level functions (``graceful.shutdown()`` and the rest) act on a default
    instance; tests and embedders make their own, and pass it where needed:
    ``graceful.run(server, lifecycle=lc)``, ``graceful.signal_handlers(lifecycle=lc)``.

    Args:
        force_quit: the budget in seconds, counted from the first shutdown trigger, after which
            the process reports what is still running and exits with code 70.
        clock: where time comes from (``graceful.testing.FakeClock`` in tests).
        exit: called with 70 when the deadline passes; ``os._exit`` by default (tests record).
        daemon: run the sequence on a daemon thread. False (the default) keeps the interpreter
            alive until the cleanup is done; the test harness passes True so that a listener a
            test leaves stuck cannot hang the test run at exit.

    Raises:
        TypeError, ValueError: a bad argument (``force_quit`` must be a finite number > 0).
    """

    def __init__(
        self,
        force_quit: float = 25.0,
        *,
        clock: Clock | None = None,
        exit: Callable[[int], object] = os._exit,
        daemon: bool = False,
    ) -> None:
        budget = check_budget(force_quit, "Lifecycle(force_quit=...)")
        self._clock: Clock = check_clock(clock) or MonotonicClock()
        self._action = ForceQuitAction(exit)
        self._daemon = bool(daemon)
        self._lock = threading.Condition(threading.Lock())
        self._state = State.RUNNING
        self.stopping = False
        """True from the moment wrap-up starts. Read-only: written by the lifecycle only, under
        its lock; a plain attribute so that ``graceful.is_stopping()`` is one attribute read."""
        self._wrap_up_started = Moment()
        self._announced = threading.Event()  # "wrapping up" is logged: the sequence may log now
        self._reason: str | None = None
        self._triggers: list[str] = []  # each trigger's reason, in order, for the final log line
        self._triggered_at: float | None = None
        self._shutdown_requested = False
        self._phases = Phases(self._lock)
        self._observers = Observers()
        self._reloads = Reloads(self._observers)
        self._stopped = Moment()
        self._forced: str | None = None
        self._report_sections: list[Callable[[], list[str]]] = []
        self._progress = 0
        self._driver: threading.Thread | None = None
        self._timer = ForceQuitTimer(self._clock, budget, self._deadline_passed)
        self._loops = DefaultLoop()

    # -- registries ---------------------------------------------------------------------------

    def add_wrap_up_listener(self, fn: Callable[[], object], *, name: str | None = None) -> Waiter:
        """Run ``fn`` in the wrap-up phase ("stop taking new work, finish what is in flight").

        ``fn`` is a callable with no arguments, sync or ``async def``. It runs at most once,
        concurrently with the other wrap-up listeners. Registered after the phase began, it
        runs at once. Returns its ``Waiter``.

        Raises:
            TypeError: ``fn`` is not callable with no arguments, is a generator function, or
                ``name`` is not a str.
        """
        return self._add(Phase.WRAP_UP, fn, name, "add_wrap_up_listener")

    def add_shutdown_listener(self, fn: Callable[[], object], *, name: str | None = None) -> Waiter:
        """Run ``fn`` in the shutdown phase ("release resources"), after every wrap-up listener.

        Same rules as ``add_wrap_up_listener``.
        """
        return self._add(Phase.SHUTDOWN, fn, name, "add_shutdown_listener")

    def _add(self, phase: Phase, fn: object, name: object, what: str) -> Waiter:
        checked = check_listener(fn, what)
        label = check_name(name, what) or default_name(checked)
        listener = Listener(checked, label, phase, self._clock, self._phases.finished, loops=self._loops)
        self._phases.add(listener)
        return Waiter(listener, self._phases.remove)

    def add_reload_listener(self, fn: Callable[[], object], *, name: str | None = None) -> ReloadHandle:
        """Run ``fn`` on every reload (SIGHUP); returns a handle with ``remove()``.

        Raises:
            TypeError: as for ``add_wrap_up_listener``.
        """
        checked = check_listener(fn, "add_reload_listener")
        return self._reloads.add(checked, check_name(name, "add_reload_listener") or default_name(checked))

    def reload_listener_count(self) -> int:  # how many are registered
        return self._reloads.count()

    def reload(self, reason: str = "requested") -> int:
        """Run every reload listener in turn, in this thread (one that raises is logged, the
        others still run; ``Event.RELOADING`` before, ``RELOADED`` after); returns how many."""
        return self._reloads.run_all(check_reason(reason, "reload()"))

    # -- triggers -----------------------------------------------------------------------------

    def wrap_up(self, reason: str = "requested") -> None:
        """Run the wrap-up phase only (a pause); a later ``shutdown()`` continues from there.

        Starts no force-quit deadline. Idempotent; safe from any thread.
        """
        self._trigger(check_reason(reason, "wrap_up()"), shutdown=False)

    def shutdown(self, reason: str = "requested", *, wait: bool = True, timeout: float | None = None) -> bool:
        """Start the sequence (or join the one under way); True once the lifecycle is STOPPED.

        With ``wait`` (the default) block until STOPPED or ``timeout`` seconds. From inside a
        listener, or from a thread running an event loop, it does not block (that would
        deadlock): use ``await wait_for_shutdown_async()`` there. Idempotent; safe from any
        thread; the force-quit deadline starts at the first call.

        Raises:
            TypeError, ValueError: a bad ``reason`` or ``timeout``, before anything starts.
            RuntimeError: ``wait`` from a server's thread under ``run()``: it would wait for itself.
        """
        reason = check_reason(reason, "shutdown()")
        limit = check_timeout(timeout, "shutdown()")
        if wait and limit != 0:
            refuse_in_server("shutdown()", "graceful.shutdown(wait=False)")
        self._trigger(reason, shutdown=True)
        if not wait or current_listener() is not None or running_loop() is not None:
            return self._stopped.is_set()
        return self._stopped.wait(limit)

    def _trigger(self, reason: str, *, shutdown: bool) -> None:
        # Act first, log after, outside the lock: the main thread may be holding the logging
        # lock while it waits for exactly the listeners this starts (gunicorn #3198).
        arm = start = False
        notes: list[str] = []
        with self._lock:
            if self._state is State.RUNNING:
                self._triggered_at = self._clock.monotonic()
                self._reason = reason
                self._triggers.append(reason)
                self.stopping = True
                notes.append(self._set_state(State.WRAPPING_UP, reason))
                start = True
            if shutdown and not self._shutdown_requested:
                self._shutdown_requested = True
                arm = True
                if not start:
                    self._reason = reason
                    self._triggers.append(reason)
                    notes.append(f"shutdown requested ({reason}): continuing after the wrap-up phase")
                self._lock.notify_all()
            # Explicitly daemon or not: a thread inherits its creator's flag, and the signal
            # coordinator is a daemon; the interpreter must wait for the cleanup.
            driver = (
                threading.Thread(target=self._drive, name="graceful-lifecycle", daemon=self._daemon)
                if start
                else None
            )
            self._driver = driver or self._driver
        try:  # whatever happens here (a Ctrl-C in the main thread), the sequence is not held
            if start:
                self._wrap_up_started.set()
            if arm:
                self._timer.arm()
            if driver is not None:
                driver.start()
            for note in notes:
                log.info("%s", note)
        finally:
            if start:
                self._announced.set()  # the sequence's own lines come after this one
        if start:
            self._observers.emit(Event.WRAPPING_UP, reason)
        if arm:
            self._observers.emit(Event.SHUTDOWN_REQUESTED, reason)

    def _set_state(self, state: State, why: str) -> str:
        """Move to ``state`` (the caller holds the lock); returns the line to log afterwards."""
        self._state = state
        return f"{state.value.replace('_', ' ')} ({why})"

    # -- the sequence -------------------------------------------------------------------------

    def _drive(self) -> None:
        self._run_phase(Phase.WRAP_UP)
        with self._lock:
            # Wrap-up listeners registered late (during a pause, say) must finish first too.
            while not self._shutdown_requested or self._phases.outstanding(Phase.WRAP_UP):
                self._lock.wait()
            note = self._set_state(State.SHUTTING_DOWN, f"wrap-up done; {self._reason}")
        self._observers.emit(Event.SHUTTING_DOWN, self._reason or "")
        self._run_phase(Phase.SHUTDOWN, note)
        with self._lock:
            while self._phases.outstanding(Phase.WRAP_UP) or self._phases.outstanding(Phase.SHUTDOWN):
                self._lock.wait()
            late = self._timer.disarm_unless_passed()
        if late:  # the deadline came first: the force quit owns the end (a no-op if it began)
            self.force_quit(f"the force-quit deadline of {self._timer.budget:g} s passed")
        self._finish()

    def _finish(self) -> None:
        if self._forced is not None:
            # The force quit owns the end (its hooks may still be naming what they cut): nobody
            # is told STOPPED before it is over (in tests, when the recorded exit returns).
            self._action.done.wait()
        with self._lock:
            took = self._clock.monotonic() - (self._triggered_at or 0.0)
            detail = f"{took:.3f} s after {' then '.join(self._triggers)}"
            note = self._set_state(State.STOPPED, detail)
            forced = self._forced is not None
        if not forced:  # after a force quit nothing may claim a clean stop
            log.info("%s", note)  # before waking the waiters, so the log reads in order
            self._observers.emit(Event.STOPPED, detail)
        self._stopped.set()

    def _run_phase(self, phase: Phase, note: str | None = None) -> None:
        """Start the phase's listeners, log ``note``, then wait until every one has finished."""
        t0 = self._clock.monotonic()
        count, own = self._phases.run(phase)
        if note is not None:
            log.info("%s", note)
        with self._lock:
            self._phases.wait(phase)
        self._announced.wait()  # its listeners ran first (act first); its lines follow the trigger's
        theirs = f", {own} of them graceful's own (the servers')" if own else ""  # a reader counts theirs
        log.info(
            "%s phase done: %d listener(s)%s in %.3f s", phase, count, theirs, self._clock.monotonic() - t0
        )

    # -- seams for integrations ---------------------------------------------------------------

    def subscribe(self, fn: Callable[[Event, str], object]) -> Callable[[], None]:
        """Call ``fn(event, detail)`` at each transition (an ``Event``); returns the undo.

        For integrations (systemd, hosts): called in the thread that made the transition,
        outside the lifecycle's lock; it must not block. One that raises is logged.
        """
        return self._observers.subscribe(fn)

    def record_failure(self, what: str) -> None:
        """Note that a server (or anything else the caller runs) failed: the exit code becomes 1."""
        with self._lock:
            self._phases.failures.append(what)

    def report_progress(self) -> None:
        """Say the drain moved forward (a request answered, a job finished): ``progress`` grows.

        Adapters call it as in-flight work ends; systemd turns progress into more time.
        """
        with self._lock:
            self._progress += 1

    # Read-only views for integrations.
    @property
    def progress(self) -> int:  # how many report_progress() calls
        return self._progress

    @property
    def shutdown_requested(self) -> bool:  # a shutdown, not only a pause: the deadline runs
        return self._shutdown_requested

    @property
    def clock(self) -> Clock:  # where this lifecycle's time comes from
        return self._clock

    @property
    def triggered_at(self) -> float | None:  # when wrap-up began, on clock's scale
        return self._triggered_at

    @property
    def listener_loop(self) -> DefaultLoop:  # async listeners registered with no loop run on its .loop
        return self._loops  # run() sets .loop to the loop it drives, for as long as it does

    @property
    def force_quit_budget(self) -> float:  # seconds
        return self._timer.budget

    def join(self, timeout: float | None = None) -> bool:
        """Block until the sequence's thread has ended (True; also if none began): for tests."""
        limit = check_timeout(timeout, "join()")
        driver = self._driver
        if driver is None:
            return True
        driver.join(limit)
        return not driver.is_alive()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until no listener of this lifecycle is running; True if so within ``timeout``."""
        return self._phases.wait_idle(check_timeout(timeout, "wait_until_idle()"))

    # -- force quit ---------------------------------------------------------------------------

    def set_time_to_force_quit(self, seconds: float) -> None:
        """Set the force-quit budget (a finite number of seconds > 0, else ``TypeError`` or
        ``ValueError``); a running deadline moves, still counted from the first trigger."""
        self._timer.set_budget(check_budget(seconds))

    def _deadline_passed(self) -> None:
        self.force_quit(f"the force-quit deadline of {self._timer.budget:g} s passed")

    def force_quit(self, why: str = "requested") -> None:
        """Report what is still running, then exit with code 70 now. Only the first call acts."""
        listeners = self._phases.listeners()  # takes the lock itself
        with self._lock:
            if self._forced is not None:
                return
            now = self._clock.monotonic()
            since = None if self._triggered_at is None else now - self._triggered_at
            report = format_report(why, since, self._triggers, FORCED_EXIT_CODE, listeners, now)
            self._forced = report  # claimed: only this call goes on
        report = self._forced = "\n".join([report, *format_sections(list(self._report_sections))])
        self._action.execute(report, lambda: self._observers.emit(Event.FORCED, why))

    def on_force_quit(self, fn: Callable[[], object], *, name: str | None = None) -> None:
        """Call ``fn()`` at the force quit, after the report, before the exit (cut connections,
        name dropped requests, requeue jobs); in turn, in one thread given 2 s, errors logged."""
        checked = check_listener(fn, "on_force_quit")
        self._action.add_hook(checked, check_name(name, "on_force_quit") or default_name(checked))

    def add_report_section(self, fn: Callable[[], list[str]]) -> None:
        """Append ``fn()``'s lines to the force-quit report (``run()`` adds its servers' stacks)."""
        check_listener(fn, "add_report_section")
        self._report_sections.append(fn)

    @property
    def forced(self) -> str | None:
        """The force-quit report, if the lifecycle was forced (None otherwise)."""
        return self._forced

    # -- observing ----------------------------------------------------------------------------

    def is_stopping(self) -> bool:
        """True from the moment wrap-up starts. An attribute read: cheap in a hot loop."""
        return self.stopping

    def state(self) -> State:
        """``State.RUNNING``, ``WRAPPING_UP``, ``SHUTTING_DOWN`` or ``STOPPED``."""
        return self._state

    def wait_for_wrap_up(self, timeout: float | None = None) -> bool:
        """Block until wrap-up begins (``is_stopping()`` turns True); True if it did in time."""
        return self._wrap_up_started.wait(check_timeout(timeout, "wait_for_wrap_up()"))

    async def wait_for_wrap_up_async(self) -> bool:
        """``await`` until wrap-up begins, without blocking the event loop."""
        return await self._wrap_up_started.wait_async()

    def wait_for_shutdown(self, timeout: float | None = None) -> bool:
        """Block until STOPPED; True if it got there within ``timeout``. ``RuntimeError`` from a
        server's thread under ``run()``, which would wait for itself: ``wait_for_wrap_up()``."""
        limit = check_timeout(timeout, "wait_for_shutdown()")
        if limit != 0:  # 0 only looks: harmless anywhere
            refuse_in_server("wait_for_shutdown()")
        return self._stopped.wait(limit)

    async def wait_for_shutdown_async(self) -> bool:
        """``await`` until STOPPED, without blocking the event loop."""
        return await self._stopped.wait_async()

    @property
    def exit_code(self) -> int:
        """70 if forced, 1 if a listener or a recorded server failed, else 0."""
        if self._forced is not None:
            return FORCED_EXIT_CODE
        return 1 if self._phases.failures else 0

    def time_remaining(self) -> float | None:
        """Seconds left before force quit, or None while no shutdown was triggered."""
        return self._timer.remaining()

    def status(self) -> Status:
        """A snapshot: state, reason, time since the trigger, and every listener's progress."""
        now = self._clock.monotonic()
        listeners = tuple(
            ListenerStatus(item.name, item.phase, item.state, item.duration(now))
            for item in self._phases.listeners()
        )
        with self._lock:
            since = None if self._triggered_at is None else now - self._triggered_at
            return Status(
                self._state, self._reason, since, self._timer.budget, listeners, self._forced is not None
            )

    def __repr__(self) -> str:
        return f"<graceful.Lifecycle {self._state.value} reason={self._reason!r}>"
