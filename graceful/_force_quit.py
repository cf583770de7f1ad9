"""The force-quit deadline: one budget, counted from the first shutdown trigger.

Why it works this way:

* One deadline for the whole sequence, counted from the *first* shutdown trigger, so a
  repeated SIGTERM (orchestrators repeat it) never extends it. A pause (``wrap_up()`` or
  SIGTSTP) starts no deadline: it may last as long as the operator wants.
* The default, 25 s, sits below Kubernetes' 30 s grace period so that graceful, not the
  kubelet's SIGKILL, has the last word and leaves a report behind.
* When it fires, the report goes out *before* anything that could block. The stuck thread may
  hold the logging lock (gunicorn #3198, celery #7339 are about exactly that lock), so the
  report is first written straight to stderr when logging would not put it there, then logged
  at CRITICAL from a helper thread that is given at most ``LOG_GRACE`` seconds, then the
  process exits with code 70 whatever is still running.
* The clock and the exit action are injected: tests advance a fake clock and record the code.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

from ._clock import Clock, TimerHandle

__all__ = ["FORCED_EXIT_CODE", "ForceQuitTimer", "check_budget", "emit_report"]

log = logging.getLogger("graceful")

FORCED_EXIT_CODE = 70
_INFINITY = float("inf")
LOG_GRACE = 1.0


def check_budget(seconds: object, what: str = "set_time_to_force_quit()") -> float:
    """The budget as a float; ``ValueError``/``TypeError`` with a sentence otherwise."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{what} takes a number of seconds, such as 25, not {seconds!r}")
    value = float(seconds)
    if not 0 < value < _INFINITY:  # also False for NaN
        raise ValueError(
            f"{what} takes a finite number of seconds greater than 0, such as 25, not {seconds!r}"
        )
    return value


def budget_from_env(default: float) -> float:
    """``GRACEFUL_FORCE_QUIT`` if set, else ``default``; a bad value is a clear error."""
    raw = os.environ.get("GRACEFUL_FORCE_QUIT")
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"GRACEFUL_FORCE_QUIT={raw!r} is not a number: set it to the force-quit budget in "
            "seconds, a finite number greater than 0 such as 25, or unset it"
        ) from None
    return check_budget(value, "GRACEFUL_FORCE_QUIT")


class ForceQuitTimer:
    """Arms once, may be re-budgeted while armed, fires at most once."""

    def __init__(self, clock: Clock, budget: float, fire: Callable[[], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._lock = threading.Lock()
        self.budget = budget
        self.armed_at: float | None = None
        self._handle: TimerHandle | None = None

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

    def remaining(self) -> float | None:
        deadline = self.deadline
        return None if deadline is None else max(0.0, deadline - self._clock.monotonic())

    def disarm(self) -> None:
        with self._lock:
            self._cancel()

    def _schedule(self) -> None:
        assert self.armed_at is not None
        self._handle = self._clock.call_at(
            self.armed_at + self.budget, self._fire, name="graceful-force-quit"
        )

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _logging_reaches_stderr(logger: logging.Logger) -> bool:
    """True if a record logged on ``logger`` would be printed on stderr by a handler."""
    current: logging.Logger | None = logger
    found_any = False
    while current is not None:
        for handler in current.handlers:
            found_any = True
            stream = getattr(handler, "stream", None)
            if stream is not None and stream in (sys.stderr, sys.__stderr__):
                return True
        if not current.propagate:
            break
        current = current.parent
    # With no handler at all, logging's last-resort handler prints WARNING+ to stderr.
    return not found_any and logging.lastResort is not None


def emit_report(report: str) -> None:
    """Put the report on stderr exactly once and on the ``graceful`` logger, without blocking."""
    if not _logging_reaches_stderr(log):
        _write_stderr(report + "\n")
    done = threading.Event()

    def log_it() -> None:
        log.critical("%s", report)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        _flush_stdio()
        done.set()

    # Bounded: a stuck thread may hold the logging lock or a stream's lock.
    threading.Thread(target=log_it, name="graceful-force-quit-log", daemon=True).start()
    done.wait(LOG_GRACE)


def _write_stderr(text: str) -> None:
    stream = sys.stderr
    if stream is None:  # pragma: no cover - pythonw without a console
        return
    if stream is sys.__stderr__ and stream is not None:
        # Straight to the fd: the stream's lock may be held by the thread that is stuck.
        try:
            os.write(stream.fileno(), text.encode("utf-8", "replace"))
            return
        except (OSError, ValueError):  # pragma: no cover - no usable fd; fall back to the stream
            pass
    stream.write(text)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # pragma: no cover - closed or broken stream at exit
            pass
