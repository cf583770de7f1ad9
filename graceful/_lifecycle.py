"""The ``Lifecycle``: one coordinated shutdown, as a small state machine that only moves forward.

RUNNING -> WRAPPING_UP -> SHUTTING_DOWN -> STOPPED. Why it is shaped like this:

* Wrap-up ("stop taking new work, finish what is in flight") and shutdown ("release
  resources") are separate phases, and the shutdown phase starts only when *every* wrap-up
  listener has finished: no fixed one-second guess as in go-zero, and no shutdown listener
  skipped because a wrap-up listener unblocked ``main`` early (go-zero #2191).
* Every trigger is idempotent and every caller of ``shutdown(wait=True)`` waits for the same
  single sequence. asynq #979: a second ``Shutdown()`` returned at once, ``main`` exited and
  the cleanup never ran.
* The sequence is driven by its own non-daemon thread, so the interpreter does not exit in the
  middle of it even if ``main`` returns (go-zero #1804, #1664: "call waitForCalled yourself").
* ``shutdown()`` from inside a listener, or from a running event loop, triggers but does not
  block: waiting there for the sequence that is waiting for you is a deadlock.
* A pause (``wrap_up()``, SIGTSTP) runs only the wrap-up phase and starts no deadline; a later
  ``shutdown()`` continues from there (asynq's TSTP).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from ._clock import Clock, MonotonicClock
from ._diagnostics import format_unfinished
from ._force_quit import FORCED_EXIT_CODE, ForceQuitTimer, check_budget, emit_report
from ._listeners import (
    PENDING,
    Listener,
    Waiter,
    _running_loop,
    _set_true,
    check_callable,
    current_listener,
    default_name,
    run_soon,
)
from ._status import ListenerStatus, State, Status

# No ``typing`` at run time (about 4 ms of import): see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._signals import Router

__all__ = ["Lifecycle", "ReloadHandle"]

log = logging.getLogger("graceful")

FORCE_QUIT_HOOKS_GRACE = 2.0
WRAP_UP = "wrap_up"
SHUTDOWN = "shutdown"


class _Phase:
    __slots__ = ("listeners", "outstanding", "started")

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.started = False
        self.outstanding = 0


class ReloadHandle:
    """What ``add_reload_listener`` returns; ``remove()`` unregisters the listener."""

    __slots__ = ("_fn", "_lifecycle", "name")

    def __init__(self, lifecycle: Lifecycle, fn: Callable[[], object], name: str) -> None:
        self._lifecycle = lifecycle
        self._fn = fn
        self.name = name

    def remove(self) -> bool:
        """Unregister; True if it was registered."""
        return self._lifecycle._remove_reload(self)

    def __repr__(self) -> str:
        return f"<graceful.ReloadHandle {self.name!r}>"


class Lifecycle:
    """One process's shutdown: listener registries, the phase sequence and the deadline.

    The module-level functions (``graceful.shutdown()`` and the rest) act on a default
    instance; tests and embedders make their own.

    Args:
        force_quit: the budget in seconds, counted from the first shutdown trigger, after which
            the process reports what is still running and exits with code 70.
        clock: where time comes from (``graceful.testing.FakeClock`` in tests).
        exit: called with 70 when the deadline passes; ``os._exit`` by default. A test passes
            something that records the code instead.

    Raises:
        ValueError: ``force_quit`` is <= 0, NaN or infinite.
    """

    def __init__(
        self,
        force_quit: float = 25.0,
        *,
        clock: Clock | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        budget = check_budget(force_quit, "Lifecycle(force_quit=...)")
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._exit = exit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = State.RUNNING
        self._stopping = False  # read without the lock by is_stopping(): a plain attribute
        self._reason: str | None = None
        self._triggered_at: float | None = None
        self._shutdown_requested = False
        self._phases = {WRAP_UP: _Phase(), SHUTDOWN: _Phase()}
        self._reloads: list[ReloadHandle] = []
        self._stopped = threading.Event()
        self._on_stopped: list[Callable[[], None]] = []
        self._failures: list[str] = []
        self._forced: str | None = None
        self._observers: list[Callable[[str, str], object]] = []  # graceful.systemd, for one
        self._ready = False  # graceful.readiness: set by run() once every server is up
        self._drain_delay: float | None = None  # graceful.readiness: None until first read
        self._driver: threading.Thread | None = None
        self._force_quit_hooks: list[tuple[str, Callable[[], object]]] = []
        self._daemon_driver = False  # graceful.testing sets True: a stuck test must not hang pytest
        self._timer = ForceQuitTimer(self._clock, budget, self._deadline_passed)

    # -- registries ---------------------------------------------------------------------------

    def add_wrap_up_listener(self, fn: Callable[[], object], *, name: str | None = None) -> Waiter:
        """Run ``fn`` in the wrap-up phase ("stop taking new work, finish what is in flight").

        ``fn`` is a callable with no arguments, sync or ``async def``. It runs at most once,
        concurrently with the other wrap-up listeners. Registered after the phase began, it
        runs at once. Returns its ``Waiter``.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        return self._add(WRAP_UP, check_callable(fn, "add_wrap_up_listener"), name)

    def add_shutdown_listener(self, fn: Callable[[], object], *, name: str | None = None) -> Waiter:
        """Run ``fn`` in the shutdown phase ("release resources"), after every wrap-up listener.

        Same rules as ``add_wrap_up_listener``.
        """
        return self._add(SHUTDOWN, check_callable(fn, "add_shutdown_listener"), name)

    def _add(self, phase: str, fn: Callable[[], object], name: str | None) -> Waiter:
        listener = Listener(fn, name or default_name(fn), phase, self._clock, self._finished)
        with self._lock:
            registry = self._phases[phase]
            registry.listeners.append(listener)
            late = registry.started
            if late:
                listener.scheduled = True
                registry.outstanding += 1
        if late:
            log.info("%s listener %r registered after its phase began: running it now", phase, listener.name)
            run_soon(listener)
        return Waiter(listener, self._remove)

    def _remove(self, listener: Listener) -> bool:
        with self._lock:
            return listener.remove()

    def add_reload_listener(self, fn: Callable[[], object], *, name: str | None = None) -> ReloadHandle:
        """Run ``fn`` on every reload (SIGHUP); returns a handle with ``remove()``."""
        check_callable(fn, "add_reload_listener")
        handle = ReloadHandle(self, fn, name or default_name(fn))
        with self._lock:
            self._reloads.append(handle)
        return handle

    def _remove_reload(self, handle: ReloadHandle) -> bool:
        with self._lock:
            if handle in self._reloads:
                self._reloads.remove(handle)
                return True
            return False

    def reload_listener_count(self) -> int:
        """How many reload listeners are registered."""
        return len(self._reloads)

    def reload(self, reason: str = "requested") -> int:
        """Run every reload listener, one after another, in this thread; returns how many ran.

        A listener that raises is logged with its name and the others still run.
        """
        with self._lock:
            handles = list(self._reloads)
        log.info("reloading (%s): %d reload listener(s)", reason, len(handles))
        self._emit("reloading", reason)
        for handle in handles:
            try:
                result = handle._fn()
                if hasattr(result, "__await__"):
                    import asyncio

                    async def main(aw: object = result) -> object:
                        return await aw  # type: ignore[misc]

                    asyncio.run(main())
            except Exception:  # one bad reload listener must not stop the others
                log.exception("reload listener %r failed", handle.name)
        self._emit("reloaded", reason)
        return len(handles)

    # -- triggers -----------------------------------------------------------------------------

    def wrap_up(self, reason: str = "requested") -> None:
        """Run the wrap-up phase only (a pause); a later ``shutdown()`` continues from there.

        Starts no force-quit deadline. Idempotent; safe from any thread.
        """
        self._trigger(reason, shutdown=False)

    def shutdown(self, reason: str = "requested", *, wait: bool = True, timeout: float | None = None) -> bool:
        """Start the sequence (or join the one under way); True once the lifecycle is STOPPED.

        With ``wait`` (the default) block until STOPPED or ``timeout`` seconds. From inside a
        listener, or from a thread running an event loop, it does not block (that would
        deadlock): use ``await wait_for_shutdown_async()`` there. Idempotent; safe from any
        thread; the force-quit deadline starts at the first call.
        """
        self._trigger(reason, shutdown=True)
        if not wait or current_listener() is not None or _running_loop() is not None:
            return self._stopped.is_set()
        return self._stopped.wait(timeout)

    def _trigger(self, reason: str, *, shutdown: bool) -> None:
        # Act first, log after, outside the lock: the main thread may be holding the logging
        # lock while it waits for exactly the listeners this starts (gunicorn #3198).
        arm = start = False
        notes: list[str] = []
        with self._lock:
            if self._state is State.RUNNING:
                self._triggered_at = self._clock.monotonic()
                self._reason = reason
                self._stopping = True
                notes.append(self._set_state(State.WRAPPING_UP, reason))
                start = True
            if shutdown and not self._shutdown_requested:
                self._shutdown_requested = True
                arm = True
                if not start:
                    self._reason = reason
                    notes.append(f"shutdown requested ({reason}): continuing after the wrap-up phase")
                self._changed.notify_all()
            # Explicitly non-daemon: a thread inherits its creator's flag, and the signal
            # coordinator is a daemon; the interpreter must wait for the cleanup.
            driver = (
                threading.Thread(target=self._drive, name="graceful-lifecycle", daemon=self._daemon_driver)
                if start
                else None
            )
            self._driver = driver or self._driver
        if arm:
            self._timer.arm()
        if driver is not None:
            driver.start()
        for note in notes:
            log.info("%s", note)
        if start:
            self._emit("wrapping_up", reason)
        if arm:
            self._emit("shutdown", reason)

    def _set_state(self, state: State, why: str) -> str:
        """Move to ``state`` (the caller holds the lock); returns the line to log afterwards."""
        self._state = state
        return f"{state.value.replace('_', ' ')} ({why})"

    # -- the sequence -------------------------------------------------------------------------

    def _drive(self) -> None:
        self._run_phase(WRAP_UP)
        with self._lock:
            # Wrap-up listeners registered late (during a pause, say) must finish first too.
            while not self._shutdown_requested or self._phases[WRAP_UP].outstanding:
                self._changed.wait()
            note = self._set_state(State.SHUTTING_DOWN, f"wrap-up done; {self._reason}")
        self._emit("shutting_down", self._reason or "")
        self._run_phase(SHUTDOWN, note)
        with self._lock:
            while any(phase.outstanding for phase in self._phases.values()):
                self._changed.wait()
            took = self._clock.monotonic() - (self._triggered_at or 0.0)
            note = self._set_state(State.STOPPED, f"{took:.3f} s after {self._reason}")
            callbacks, self._on_stopped = self._on_stopped, []
        self._timer.disarm()
        log.info("%s", note)  # before waking the waiters, so the log reads in order
        self._emit("stopped", note)
        self._stopped.set()
        for callback in callbacks:
            callback()

    def _run_phase(self, name: str, note: str | None = None) -> None:
        """Start the phase's listeners, log ``note``, then wait until every one has finished."""
        started = self._clock.monotonic()
        with self._lock:
            phase = self._phases[name]
            phase.started = True
            batch = [item for item in phase.listeners if item.state == PENDING and not item.scheduled]
            for item in batch:
                item.scheduled = True
            phase.outstanding += len(batch)
        run_soon(*batch)
        if note is not None:
            log.info("%s", note)
        with self._lock:
            while phase.outstanding:
                self._changed.wait()
        log.info(
            "%s phase done: %d listener(s) in %.3f s", name, len(batch), self._clock.monotonic() - started
        )

    def _finished(self, listener: Listener) -> None:
        with self._lock:
            phase = self._phases[listener.phase]
            phase.outstanding -= 1
            if listener.error is not None:
                self._failures.append(f"{listener.phase} listener {listener.name!r}")
            if phase.outstanding == 0:  # only then can the driver move on: one wake-up a phase
                self._changed.notify_all()

    def _observe(self, fn: Callable[[str, str], object]) -> Callable[[], None]:
        """Call ``fn(event, detail)`` at each transition; returns a function that stops it.

        Events: ``wrapping_up``, ``shutdown`` (the deadline starts), ``shutting_down``,
        ``stopped``, ``forced``, ``reloading``, ``reloaded``. For integrations (``graceful.systemd``).
        """
        self._observers.append(fn)
        return lambda: self._observers.remove(fn) if fn in self._observers else None

    def _emit(self, event: str, detail: str) -> None:
        for fn in list(self._observers):
            try:
                fn(event, detail)
            except Exception:  # an integration must never break the sequence
                log.exception("graceful observer %r failed on %s", fn, event)

    def record_failure(self, what: str) -> None:
        """Note that a server (or anything else the caller runs) failed: the exit code becomes 1."""
        with self._lock:
            self._failures.append(what)

    # -- force quit ---------------------------------------------------------------------------

    def set_time_to_force_quit(self, seconds: float) -> None:
        """Set the force-quit budget; if the deadline is running it moves (still counted from
        the first shutdown trigger, so a budget already used up fires at once).

        Raises:
            ValueError: ``seconds`` is <= 0, NaN or infinite.
        """
        self._timer.set_budget(check_budget(seconds))

    def _deadline_passed(self) -> None:
        self.force_quit(f"the force-quit deadline of {self._timer.budget:g} s passed")

    def force_quit(self, why: str = "requested") -> None:
        """Report what is still running, then exit with code 70 now. Only the first call acts."""
        with self._lock:
            if self._forced is not None:
                return
            listeners = [item for phase in self._phases.values() for item in phase.listeners]
            since = (
                ""
                if self._triggered_at is None
                else (
                    f"; shutdown began {self._clock.monotonic() - self._triggered_at:.3f} s ago ({self._reason})"
                )
            )
            header = f"graceful: force quit: {why}{since}. Exiting with code {FORCED_EXIT_CODE}."
            report = "\n".join([header, *format_unfinished(listeners, self._clock.monotonic())])
            self._forced = report
        emit_report(report)
        self._emit("forced", why)
        self._run_force_quit_hooks()
        self._exit(FORCED_EXIT_CODE)

    def on_force_quit(self, fn: Callable[[], object], *, name: str | None = None) -> None:
        """Call ``fn()`` when the process is forced, after the report and before the exit.

        For adapters that must act at the deadline: close the connections still open and log
        each dropped request, push running jobs back on their queue, SIGKILL child processes.
        Hooks run one after another, in registration order, in a helper thread that is given
        ``FORCE_QUIT_HOOKS_GRACE`` seconds in all; a hook that raises is logged and skipped.
        """
        check_callable(fn, "on_force_quit")
        with self._lock:
            self._force_quit_hooks.append((name or default_name(fn), fn))

    def _run_force_quit_hooks(self) -> None:
        with self._lock:
            hooks = list(self._force_quit_hooks)
        if not hooks:
            return

        def run_hooks() -> None:
            for name, fn in hooks:
                try:
                    fn()
                except Exception:
                    log.exception("force-quit hook %r failed", name)

        thread = threading.Thread(target=run_hooks, name="graceful-force-quit-hooks", daemon=True)
        thread.start()
        thread.join(FORCE_QUIT_HOOKS_GRACE)

    @property
    def forced(self) -> str | None:
        """The force-quit report, if the lifecycle was forced (None otherwise)."""
        return self._forced

    # -- running servers ----------------------------------------------------------------------

    def run(self, server: object, *, force_quit: float | None = None, handle_signals: bool = True) -> int:
        """``graceful.run()`` on this lifecycle; see there."""
        from ._run import run_with

        return run_with(self, server, force_quit=force_quit, handle_signals=handle_signals)

    def signal_handlers(self) -> AbstractContextManager[Router]:
        """``graceful.signal_handlers()`` routing to this lifecycle; see there."""
        from ._signals import signal_handlers

        return signal_handlers(self)

    # -- observing ----------------------------------------------------------------------------

    def is_stopping(self) -> bool:
        """True from the moment wrap-up starts. An attribute read: cheap in a hot loop."""
        return self._stopping

    def state(self) -> State:
        """``State.RUNNING``, ``WRAPPING_UP``, ``SHUTTING_DOWN`` or ``STOPPED``."""
        return self._state

    def wait_for_shutdown(self, timeout: float | None = None) -> bool:
        """Block until STOPPED; True if it got there within ``timeout``."""
        return self._stopped.wait(timeout)

    async def wait_for_shutdown_async(self) -> bool:
        """``await`` until STOPPED, without blocking the event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            if self._stopped.is_set():
                return True

            def wake() -> None:
                loop.call_soon_threadsafe(_set_true, future)

            self._on_stopped.append(wake)
        return await future

    @property
    def exit_code(self) -> int:
        """70 if forced, 1 if a listener or a recorded server failed, else 0."""
        if self._forced is not None:
            return FORCED_EXIT_CODE
        return 1 if self._failures else 0

    def time_remaining(self) -> float | None:
        """Seconds left before force quit, or None while no shutdown was triggered."""
        return self._timer.remaining()

    def status(self) -> Status:
        """A snapshot: state, reason, time since the trigger, and every listener's progress."""
        now = self._clock.monotonic()
        with self._lock:
            listeners = tuple(
                ListenerStatus(item.name, item.phase, item.state, item.duration(now))
                for phase in self._phases.values()
                for item in phase.listeners
            )
            since = None if self._triggered_at is None else now - self._triggered_at
            return Status(
                self._state, self._reason, since, self._timer.budget, listeners, self._forced is not None
            )

    def __repr__(self) -> str:
        return f"<graceful.Lifecycle {self._state.value} reason={self._reason!r}>"
