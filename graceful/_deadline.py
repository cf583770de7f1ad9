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
  (``_diagnostics.emit_report``). Then one slice of at most a second for the hooks and the
  flush listeners (``ForceQuitAction`` says why), the logging handlers flushed, and the process
  exits with code 70 whatever is still running.
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

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable

from ._checks import TYPE_CHECKING
from ._diagnostics import emit_report, flush_logging, write_fd2

if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

__all__ = [
    "DEFAULT_FORCE_QUIT",
    "FLUSH_SLICE",
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
FLUSH_SLICE = 1.0
"""Seconds between the force-quit report and the exit: for the hooks, the flush listeners that
have not run, and the logging handlers (contract section 10: at most 1 s)."""
HOOKS_SHARE = 0.5
"""Of the slice, what the hooks get before the flush listeners start whatever they do."""
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

    def wait_until(self, cond: threading.Condition, until: float | None) -> None:
        """With ``cond`` held, wait until it is notified or ``monotonic()`` reaches ``until``
        (None: no time limit). It may return early: the caller looks again, in a loop."""


class _Timer:
    __slots__ = ("cancelled", "fn", "name", "seq", "when")

    def __init__(self, when: float, seq: int, fn: Callable[[], None], name: str) -> None:
        self.when = when
        self.seq = seq
        self.fn = fn
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: _Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class _Timers:
    """The real clock's timers: one daemon thread for the whole process, not one per timer.

    Why one thread: a process at its thread limit (a container's pids limit) must still reach
    its deadline, report and exit; ``prepare()`` (``run()`` and the hosts call it at start)
    starts the thread ahead, so nothing on the way out needs a new one. Callbacks run on it,
    one at a time: they must be short (the force quit, the last one, ends the process).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[_Timer] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def prepare(self) -> None:
        """Start the thread now if it is not running.

        Raises:
            RuntimeError: no thread can be started (the process is at its thread limit).
        """
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            thread = threading.Thread(target=self._run, name="graceful-timers", daemon=True)
            thread.start()
            self._thread = thread

    def call_at(self, when: float, fn: Callable[[], None], name: str) -> _Timer:
        self.prepare()
        with self._cond:
            self._seq += 1
            timer = _Timer(when, self._seq, fn, name)
            heapq.heappush(self._heap, timer)
            self._cond.notify()
        return timer

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0].cancelled or self._heap[0].when > time.monotonic():
                    if self._heap and self._heap[0].cancelled:
                        heapq.heappop(self._heap)
                        continue
                    self._cond.wait(
                        None if not self._heap else max(0.0, self._heap[0].when - time.monotonic())
                    )
                timer = heapq.heappop(self._heap)
            try:
                timer.fn()
            except Exception:
                # One timer's failure must not stop the others.
                log.exception("graceful: timer %r failed", timer.name)

    def _after_fork(self) -> None:
        # Threads do not survive a fork: the child starts its own when it needs one.
        self._cond = threading.Condition(threading.Lock())
        self._heap = []
        self._thread = None


_timers = _Timers()


class MonotonicClock:
    """The real clock: ``time.monotonic()``, and timers on one shared thread (``prepare()``
    starts it ahead of need)."""

    monotonic = staticmethod(time.monotonic)
    """``time.monotonic`` itself, the C function: hot paths call it as is."""

    @staticmethod
    def call_at(when: float, fn: Callable[[], None], *, name: str) -> TimerHandle:
        return _timers.call_at(when, fn, name)

    @staticmethod
    def wait_until(cond: threading.Condition, until: float | None) -> None:
        cond.wait(None if until is None else max(0.0, until - time.monotonic()))

    @staticmethod
    def prepare() -> None:
        """Start the timers' thread now, so that no deadline needs a new thread later."""
        _timers.prepare()


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

    def wait_until(self, cond: threading.Condition, until: float | None) -> None:
        """With ``cond`` held, wait until notified, or until ``advance()`` reaches ``until``."""
        if until is None:
            cond.wait()
            return

        def wake() -> None:
            with cond:
                cond.notify_all()

        timer = self.call_at(until, wake)
        try:
            cond.wait()
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
        self._generation = 0
        """Which schedule is the current one: a cancelled one must not fire."""

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

    def passed(self) -> bool:
        """True once the deadline has come (it is armed, and its time is reached)."""
        deadline = self.deadline
        return deadline is not None and self._clock.monotonic() >= deadline

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
    """What happens when the process is forced: report, hooks, flush, exit. Acts once.

    The order (contract section 10): the report goes out first (``emit_report``: fd 2 before
    anything that takes a lock: it must never be lost); then one slice of at most
    ``FLUSH_SLICE`` seconds, shared by the hooks adapters registered (close connections and name
    each dropped request, push jobs back on their queue, SIGKILL children: ``HOOKS_SHARE`` of
    the slice before the flush starts whatever they are doing) and the flush listeners that
    have not run (``flush(until)``: OpenTelemetry's ``force_flush``, Sentry's ``flush``, a log
    queue); then the ``logging`` handlers and stdio that can be flushed without waiting on a
    lock a stuck thread holds; then ``exit(70)`` whatever is still running. ``os._exit`` skips
    ``atexit`` and every buffer (dd-trace-py #16412, opentelemetry-python #2284): this slice is
    their one chance. The exit comes at most ``FLUSH_SLICE`` seconds (plus a few milliseconds)
    after the force quit began. Each helper thread is optional: a process at its thread limit
    still reports and exits.
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

    def execute(
        self,
        report: str,
        announce: Callable[[], object],
        flush: Callable[[float], object] = lambda until: None,
    ) -> None:
        """Write ``report``, call ``announce()``, then hooks and ``flush(until)`` within one slice,
        flush logging, exit with 70. ``until`` is on ``time.monotonic()``'s scale."""
        until = time.monotonic() + FLUSH_SLICE
        try:
            logged = emit_report(report, timeout=0)
            announce()
            self._run_hooks(min(until, time.monotonic() + FLUSH_SLICE * HOOKS_SHARE))
            flush(until)
            _bounded(flush_logging, until, "graceful-force-quit-flush")
            logged.wait(max(0.0, until - time.monotonic()))
            self._exit(FORCED_EXIT_CODE)
        finally:
            self.done.set()

    def _run_hooks(self, until: float) -> None:
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

        _bounded(run_hooks, until, "graceful-force-quit-hooks")


def _bounded(fn: Callable[[], object], until: float, name: str) -> None:
    """Run ``fn`` on a daemon thread and wait for it until ``until`` (at least a few ms)."""
    thread = threading.Thread(target=fn, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # At the thread limit: skip it, the exit must still come.
        write_fd2(f"graceful: no thread for {name} (thread limit): skipped\n")
        return
    thread.join(max(0.005, until - time.monotonic()))
