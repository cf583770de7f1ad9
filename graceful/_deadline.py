"""The force-quit deadline: one budget, counted from the first shutdown trigger, on a clock.

Why it works this way:

* One deadline for the whole sequence, counted from the *first* shutdown trigger, so a
  repeated SIGTERM (orchestrators repeat it) never extends it. A pause (``wrap_up()`` or
  SIGTSTP) starts no deadline: it may last as long as the operator wants.
* The default, 25 s, sits below Kubernetes' 30 s grace period so that graceful, not the
  kubelet's SIGKILL, has the last word and leaves a report behind.
* When it fires, the report goes out *before* anything that could block. The stuck thread may
  hold the logging lock or a handler's lock (gunicorn #3198, celery #7339 are about exactly
  those locks), so the report is first written straight to fd 2, taking no lock, then given to
  the logging handlers that do not print to stderr from a bounded helper thread
  (``_diagnostics.emit_report``), then the hooks run (bounded), then the process exits with
  code 70 whatever is still running.
* Once the deadline has passed, the force quit owns the end: the lifecycle checks the deadline
  before it claims STOPPED, so an adapter whose own budget wait ends at the same instant can
  never beat it to a clean-looking exit.
* The clock is injected: the deadline is the one part of a shutdown that is about time, and a
  test must never sit for 25 real seconds to see it fire. Every part of graceful that reads the
  time or schedules a deadline asks a ``Clock``: ``MonotonicClock`` in production
  (``time.monotonic`` and a ``threading.Timer`` per scheduled call), ``FakeClock`` in tests,
  whose ``advance(seconds)`` runs every callback that has come due, at once, in the caller's
  thread, so a deadline fires deterministically. The exit action is injected too: tests
  record the code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ._checks import TYPE_CHECKING
from ._diagnostics import emit_report

if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

__all__ = [
    "DEFAULT_FORCE_QUIT",
    "FORCED_EXIT_CODE",
    "Clock",
    "FakeClock",
    "ForceQuitAction",
    "ForceQuitTimer",
    "MonotonicClock",
    "TimerHandle",
    "check_clock",
]

log = logging.getLogger("graceful")

FORCED_EXIT_CODE = 70
HOOKS_GRACE = 2.0
"""Seconds the force-quit hooks get, in all, between the report and the exit."""
DEFAULT_FORCE_QUIT = 25.0
"""The budget when nothing chose one: below Kubernetes' 30 s grace period."""


# -- the clock -------------------------------------------------------------------------------


class TimerHandle(Protocol):
    """What ``Clock.call_at`` returns: something that can be cancelled."""

    def cancel(self) -> None:
        """Stop the callback from running if it has not run yet; harmless afterwards."""


class Clock(Protocol):
    """The time source of a ``Lifecycle``."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def call_at(self, when: float, fn: Callable[[], None], *, name: str) -> TimerHandle:
        """Run ``fn()`` once, when ``monotonic()`` reaches ``when``, unless cancelled first."""

    def wait_until(self, when: float, event: threading.Event) -> None:
        """Block until ``event`` is set or ``monotonic()`` reaches ``when``, whichever is first."""


class MonotonicClock:
    """The real clock: ``time.monotonic()`` and a ``threading.Timer`` (a daemon) per scheduled call."""

    monotonic = staticmethod(time.monotonic)  # the C function itself: hot paths call it as is

    def call_at(self, when: float, fn: Callable[[], None], *, name: str) -> TimerHandle:
        timer = threading.Timer(max(0.0, when - time.monotonic()), fn)
        timer.name = name
        timer.daemon = True
        timer.start()
        return timer

    @staticmethod
    def wait_until(when: float, event: threading.Event) -> None:
        event.wait(max(0.0, when - time.monotonic()))  # no thread: the wait's own timeout


class _FakeTimer:
    def __init__(self, when: float, seq: int, fn: Callable[[], None]) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that only moves when told to.

    ``advance(seconds)`` moves time forward and runs, in the calling thread and in deadline
    order, every scheduled callback that has come due (including ones scheduled by those
    callbacks, if they are due too).

    Example::

        clock = FakeClock()
        lifecycle = Lifecycle(force_quit=5, clock=clock, exit=codes.append)
        lifecycle.shutdown(wait=False)
        clock.advance(5)          # the force-quit report is written, codes == [70]
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._timers: list[_FakeTimer] = []
        self._seq = 0

    def monotonic(self) -> float:
        return self._now

    def call_at(self, when: float, fn: Callable[[], None], *, name: str = "") -> TimerHandle:
        with self._lock:
            self._seq += 1
            timer = _FakeTimer(when, self._seq, fn)
            self._timers.append(timer)
        return timer

    def wait_until(self, when: float, event: threading.Event) -> None:
        """Block until ``event`` is set, which ``advance()`` does once the clock reaches ``when``."""
        timer = self.call_at(when, event.set)
        try:
            event.wait()
        finally:
            timer.cancel()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward and run what came due. ``ValueError`` if < 0."""
        if not seconds >= 0:
            raise ValueError(f"FakeClock.advance() takes a number of seconds >= 0, not {seconds!r}")
        with self._lock:
            target = self._now + seconds
        while True:
            with self._lock:
                due = [t for t in self._timers if not t.cancelled and t.when <= target]
                if not due:
                    self._now = target
                    self._timers = [t for t in self._timers if not t.cancelled]
                    return
                timer = min(due, key=lambda t: (t.when, t.seq))
                self._timers.remove(timer)
                self._now = max(self._now, timer.when)
            timer.fn()


def check_clock(clock: object) -> Clock | None:
    """``Lifecycle(clock=...)``: None (the real clock) or an object with ``monotonic()``,
    ``call_at()`` and ``wait_until()``."""
    if clock is None or all(
        callable(getattr(clock, method, None)) for method in ("monotonic", "call_at", "wait_until")
    ):
        return clock  # type: ignore[return-value]
    raise TypeError(
        "Lifecycle(clock=...) takes a clock with monotonic(), call_at() and wait_until() "
        f"(graceful.testing.FakeClock in tests), or None for the real one; not {clock!r}"
    )


# -- the deadline ---------------------------------------------------------------------------


class ForceQuitTimer:
    """Arms once, may be re-budgeted while armed, fires at most once."""

    def __init__(self, clock: Clock, budget: float, fire: Callable[[], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._lock = threading.Lock()
        self.budget = budget
        self.armed_at: float | None = None
        self._handle: TimerHandle | None = None
        self._generation = 0  # which schedule is the current one: a cancelled one must not fire

    @property
    def deadline(self) -> float | None:
        return None if self.armed_at is None else self.armed_at + self.budget

    def arm(self) -> None:
        """Start counting now; a second call changes nothing (one deadline, first trigger)."""
        with self._lock:
            if self.armed_at is not None:
                return
            self.armed_at = self._clock.monotonic()
            self._schedule()

    def set_budget(self, budget: float) -> None:
        """Change the budget; if armed, the deadline moves, still counted from the trigger."""
        with self._lock:
            self.budget = budget
            if self.armed_at is not None:
                self._cancel()
                self._schedule()

    def disarm_unless_passed(self) -> bool:
        """Disarm, unless the deadline has come: then True (the force quit owns the end).

        One step under the timer's lock, so it and a timer firing at the deadline agree: the
        timer fires only if this has not disarmed it, and this disarms only before the deadline.
        """
        with self._lock:
            deadline = self.deadline
            if deadline is not None and self._clock.monotonic() >= deadline:
                return True
            self._cancel()
            return False

    def remaining(self) -> float | None:
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - self._clock.monotonic())

    def _schedule(self) -> None:
        assert self.armed_at is not None
        self._generation += 1
        generation = self._generation
        self._handle = self._clock.call_at(
            self.armed_at + self.budget, lambda: self._due(generation), name="graceful-force-quit"
        )

    def _due(self, generation: int) -> None:
        # A timer thread checks "cancelled?" and then calls this: a disarm (or a new budget) in
        # between must still win, or a sequence that ended in time is forced after all.
        with self._lock:
            if self._handle is None or generation != self._generation:
                return
        self._fire()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class ForceQuitAction:
    """What happens when the process is forced: report, hooks, exit. Acts once.

    The report goes out first (``emit_report``: fd 2 before anything that takes a lock), then
    the hooks adapters registered (close connections and name each dropped request, push jobs
    back on their queue, SIGKILL children), in one helper thread given ``HOOKS_GRACE`` seconds
    in all, then ``exit(70)`` whatever is still running.
    """

    def __init__(self, exit: Callable[[int], object]) -> None:
        if not callable(exit):
            raise TypeError(
                f"Lifecycle(exit=...) takes a callable that ends the process with a code, such as "
                f"os._exit (the default), not {exit!r}"
            )
        self._exit = exit
        self._lock = threading.Lock()
        self._hooks: list[tuple[str, Callable[[], object]]] = []
        self.done = threading.Event()
        """Set once ``exit`` has returned (it does only in tests: ``os._exit`` never returns)."""

    def add_hook(self, fn: Callable[[], object], name: str) -> None:
        with self._lock:
            self._hooks.append((name, fn))

    def execute(self, report: str, announce: Callable[[], object]) -> None:
        """Write ``report``, call ``announce()``, run the hooks (bounded), exit with 70."""
        try:
            emit_report(report)
            announce()
            self._run_hooks()
            self._exit(FORCED_EXIT_CODE)
        finally:
            self.done.set()

    def _run_hooks(self) -> None:
        with self._lock:
            hooks = list(self._hooks)
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
        thread.join(HOOKS_GRACE)
