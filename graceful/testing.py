"""Helpers to test code that shuts down with graceful: what the pytest fixtures hand a test.

Why: the shutdown path is the code that runs least and breaks most quietly. go-zero's users
found out in production that a wrap-up listener unblocked ``main`` and the shutdown listeners
never ran (#2191); asynq's that a second ``Shutdown()`` skipped cleanup (#979); uber-go/fx
ships ``fxtest`` because stop hooks need tests too. So graceful ships the tests' side:

* ``LifecycleHarness``, in-process: a fresh ``Lifecycle`` made the default for one test, with
  a ``FakeClock`` (the force-quit deadline fires when the test says so, never after 25 real
  seconds) and an exit action that records the code instead of ending the test run. A signal
  is simulated by calling the very routing table the coordinator thread calls for a real one
  (``Router.dispatch``), so nothing process-wide (handlers, the wakeup fd) is touched.
* ``ProcessFactory`` / ``GracefulProcess``, out of process: the real program, real signals, and
  readiness learnt over ``NOTIFY_SOCKET`` (the systemd protocol ``graceful.run()`` speaks), so a
  test sends SIGTERM only once the servers accept work, without sleeping.

Nothing here imports pytest: ``unittest`` users call ``install()``/``close()`` themselves (or
use the harness as a context manager). The subprocess helpers are POSIX only (they need an
``AF_UNIX`` datagram socket).
"""

from __future__ import annotations

import signal
import threading
import time
from types import TracebackType

from ._checks import check_seconds
from ._current import use
from ._deadline import FakeClock
from ._lifecycle import Lifecycle, State, join, set_daemon, wait_until_idle
from ._listeners import ListenerState
from ._signals import Router, handled_signals
from ._testing_process import (
    BOUND,
    GracefulProcess,
    NotReadyError,
    ProcessFactory,
    ProcessResult,
)

__all__ = [
    "FakeClock",
    "GracefulProcess",
    "LifecycleHarness",
    "NotReadyError",
    "ProcessFactory",
    "ProcessResult",
]

_HOW_TO_RELEASE = (
    "Nothing can stop a Python thread: it keeps running, and if the test started the sequence "
    "with graceful.shutdown() the interpreter waits for it at exit. Release what it waits on "
    "before the test ends (set the event, put the sentinel on the queue) or give its wait a "
    "timeout; raise teardown_timeout if it only needs longer."
)


class LifecycleHarness:
    """A fresh ``Lifecycle`` for one test; what the ``graceful_lifecycle`` fixture returns.

    Attributes:
        lifecycle: a ``graceful.Lifecycle`` (force-quit budget ``force_quit``, 25 s by
            default, ``GRACEFUL_FORCE_QUIT`` is not read). While installed it is the default,
            so module-level calls in the code under test (``graceful.add_shutdown_listener``,
            ``graceful.is_stopping()``, ``graceful.set_time_to_force_quit``) land on it.
        clock: its ``FakeClock``; ``clock.advance(25)`` after a shutdown trigger fires the
            force quit in the calling thread: the report is written and ``exit_codes`` gets 70.
        exit_codes: what the exit action was called with (``[70]`` once forced); nothing exits.
        teardown_timeout: how long ``close()`` waits for the sequence to finish (5 s).

    Edge cases: a test that never triggers a shutdown leaves no thread, and its listeners are
    not run at teardown. A test that paused (SIGTSTP, ``wrap_up()``) gets the shutdown phase
    run at teardown, as a later SIGTERM would, so the sequence's thread ends; list
    ``graceful_lifecycle`` last among a test's fixtures so the resources those listeners
    close are still there. Listeners still running after ``teardown_timeout`` are named by
    ``close()``; nothing can stop a Python thread, so they keep running.
    """

    def __init__(self, force_quit: float = 25.0, *, teardown_timeout: float = 5.0) -> None:
        self.clock = FakeClock()
        self.exit_codes: list[int] = []
        # daemon: a listener a test leaves stuck must not keep pytest alive at exit.
        self.lifecycle = Lifecycle(force_quit, clock=self.clock, exit=self.exit_codes.append)
        set_daemon(self.lifecycle, True)
        self.teardown_timeout = check_seconds(
            teardown_timeout, "LifecycleHarness(teardown_timeout=...)", zero=True, example="10"
        )
        self._router = Router(self.lifecycle, offload=False)
        self._previous: Lifecycle | None = None
        self._phase = "created"

    # -- install / close ----------------------------------------------------------------------

    def install(self) -> LifecycleHarness:
        """Make ``lifecycle`` the default (``graceful.use``); ``close()`` puts the old one back.

        Raises:
            RuntimeError: installed already, or closed (a harness serves one test).
        """
        if self._phase != "created":
            raise RuntimeError(f"this LifecycleHarness is {self._phase}: make a new one for each test")
        self._previous = use(self.lifecycle)
        self._phase = "installed"
        return self

    def close(self) -> str | None:
        """Finish the sequence, restore the previous default; a report of leftovers, or None.

        Idempotent. Returns a message naming every listener still running (or never started
        because one before it is stuck) after ``teardown_timeout`` seconds.
        """
        if self._phase == "closed":
            return None
        try:
            leftovers = self._finish()
        finally:
            if self._previous is not None:
                use(self._previous)
                self._previous = None
            self._phase = "closed"
        if not leftovers:
            return None
        return (
            f"graceful_lifecycle: the test left {len(leftovers)} listener(s) unfinished "
            f"{self.teardown_timeout:g} s into teardown:\n" + "\n".join(leftovers) + "\n" + _HOW_TO_RELEASE
        )

    def __enter__(self) -> LifecycleHarness:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        problem = self.close()
        if problem is not None and exc is None:
            raise AssertionError(problem)

    def _finish(self) -> list[str]:
        lc = self.lifecycle
        deadline = time.monotonic() + self.teardown_timeout
        if lc.state() is State.RUNNING:
            # Never triggered: no thread was started, nothing to finish.
            return []
        lc.shutdown("graceful_lifecycle teardown", wait=False)
        stopped = lc.wait_for_shutdown(self.teardown_timeout)
        # A listener added after STOPPED runs on its own: wait for it too, within the bound.
        wait_until_idle(lc, max(0.0, deadline - time.monotonic()))
        if stopped:
            join(lc, max(0.0, deadline - time.monotonic()))
        listeners = lc.status().listeners
        lines = [
            f"  - {item.phase} listener {item.name!r} is still running"
            for item in listeners
            if item.state is ListenerState.RUNNING
        ]
        if not stopped:
            lines += [
                f"  - {item.phase} listener {item.name!r} never started: it waits for the ones above"
                for item in listeners
                if item.state is ListenerState.PENDING
            ]
        return lines

    # -- driving ------------------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Act on ``sig`` as graceful's coordinator thread does for a real one.

        The same table (``SIGTERM``/``SIGINT`` shut down, a second ``SIGINT`` or ``SIGQUIT``
        forces, ``SIGTSTP`` pauses, ``SIGUSR1`` writes a thread dump to ``sys.stderr``,
        ``SIGHUP`` runs reload listeners), from a thread of its own as for a real signal.
        Returns once the signal was acted on; shutdown listeners run in the background, so
        wait with ``wait_for_shutdown()``. No process-wide signal handler or wakeup fd is
        touched.

        Raises:
            TypeError: ``sig`` is not a signal number (``signal.SIGTERM``).
            ValueError: a signal graceful does not route (SIGKILL, say): test those with the
                ``graceful_process`` fixture and a real process.
        """
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise TypeError(f"send_signal() takes a signal number such as signal.SIGTERM, not {sig!r}")
        routed = handled_signals()
        if sig not in routed:
            names = ", ".join(signal.Signals(s).name for s in routed)
            raise ValueError(
                f"graceful does not route signal {sig}: send_signal() simulates only {names}; "
                "send any other signal to a real process (the graceful_process fixture)"
            )
        # From a short-lived daemon thread, as the coordinator (a daemon thread) does it for a
        # real signal: the sequence's thread inherits that, so a listener the test leaves
        # stuck is reported at teardown but cannot keep the test run from exiting; and an
        # async reload listener gets a thread without a running event loop.
        helper = threading.Thread(
            target=self._router.dispatch, args=(sig,), name="graceful-signals", daemon=True
        )
        helper.start()
        helper.join()

    def wait_for_shutdown(self, timeout: float = BOUND) -> bool:
        """Block until the lifecycle is STOPPED; True if it got there within ``timeout``."""
        return self.lifecycle.wait_for_shutdown(
            check_seconds(timeout, "wait_for_shutdown()", zero=True, example="10")
        )

    @property
    def force_quit_report(self) -> str | None:
        """The force-quit report (it names each unfinished listener), or None if not forced."""
        return self.lifecycle.force_quit_report

    def __repr__(self) -> str:
        return f"<graceful.testing.LifecycleHarness {self._phase} {self.lifecycle!r}>"
