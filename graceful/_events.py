"""Lifecycle events: what integrations listen to instead of reaching into the ``Lifecycle``.

Why: systemd wants ``STOPPING=1`` the moment a shutdown starts and ``RELOADING=1`` around a
reload; a host (gunicorn, Celery) wants to know when the deadline starts. Each of those used to
read the lifecycle's private fields. Now the lifecycle announces each transition as an
``Event`` (an enum: a typo is a type error, not a silent miss) to every subscriber, and an
integration keeps whatever state it needs itself.

A subscriber is called in the thread that made the transition, after the transition and outside
the lifecycle's lock; it must be quick and must not block. One that raises is logged and the
others are still called: an integration never breaks the sequence.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

__all__ = ["Event", "Observers"]

log = logging.getLogger("graceful")


class Event(str, enum.Enum):
    """A lifecycle transition, as ``Lifecycle.subscribe`` reports it with a detail string."""

    WRAPPING_UP = "wrapping_up"
    """Wrap-up began (a pause or a shutdown); detail: the reason."""
    SHUTDOWN_REQUESTED = "shutdown_requested"
    """A shutdown was asked for and the force-quit deadline started; detail: the reason."""
    SHUTTING_DOWN = "shutting_down"
    """Every wrap-up listener finished; the shutdown phase begins; detail: the reason."""
    STOPPED = "stopped"
    """The sequence is over; detail: how long it took."""
    FORCED = "forced"
    """The force quit began (the report is out; the exit follows); detail: why."""
    RELOADING = "reloading"
    """Reload listeners are about to run; detail: the reason (``"SIGHUP"``)."""
    RELOADED = "reloaded"
    """Every reload listener has run; detail: the reason."""


Subscriber = Callable[[Event, str], object]


class Observers:
    """The subscribers of one lifecycle; ``emit`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event, detail)`` at each transition; returns a function that undoes it."""
        if not callable(fn):
            raise TypeError(f"subscribe() takes a callable fn(event, detail), not {fn!r}")
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, event: Event, detail: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event, detail)
            except Exception:  # an integration must never break the sequence
                log.exception("graceful subscriber %r failed on %s", fn, event.value)
