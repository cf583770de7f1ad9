"""Where graceful gets the time from, and how it waits for a deadline.

Why a module for this: the force-quit deadline is the one part of a shutdown that is about
time, and a test must never sit for 25 real seconds to see it fire. Every part of graceful that
reads the time or schedules a deadline asks a ``Clock``. Production uses ``MonotonicClock``
(``time.monotonic`` plus one short-lived timer thread per deadline); tests use ``FakeClock``,
whose ``advance(seconds)`` runs every callback that has come due, at once, in the caller's
thread, so a deadline fires deterministically.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# ``typing`` costs ~4 ms to import and the core needs it only for type checkers: mypy treats
# any ``TYPE_CHECKING`` name as True, and at run time the protocols below are plain classes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

__all__ = ["Clock", "FakeClock", "MonotonicClock", "TimerHandle"]


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


class _ThreadTimer:
    """A daemon thread that sleeps until a deadline; cancel() wakes it for good."""

    def __init__(self, when: float, fn: Callable[[], None], name: str) -> None:
        self._when = when
        self._fn = fn
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Event.wait measures its timeout on the monotonic clock; loop in case it wakes early.
        while not self._cancelled.is_set():
            remaining = self._when - time.monotonic()
            if remaining <= 0:
                self._fn()
                return
            self._cancelled.wait(remaining)

    def cancel(self) -> None:
        self._cancelled.set()


class MonotonicClock:
    """The real clock: ``time.monotonic()`` and a timer thread per scheduled call."""

    monotonic = staticmethod(time.monotonic)  # the C function itself: hot paths call it as is

    def call_at(self, when: float, fn: Callable[[], None], *, name: str) -> TimerHandle:
        return _ThreadTimer(when, fn, name)


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
