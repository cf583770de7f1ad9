"""systemd's notify protocol (``sd_notify``) and watchdog, with no dependency.

Why here: our users deploy under systemd (``Type=notify``, ``Type=notify-reload``,
``WatchdogSec=``). A service that says ``READY=1`` only once it accepts work, ``STOPPING=1`` as
soon as it stops, asks for more time only while its drain is making progress, and stops
feeding the watchdog when its signal coordinator hangs, lets systemd order restarts correctly
and kill only what is really stuck. The pytest fixture ``graceful_process`` listens on the same
protocol to know when a child is ready.

``NOTIFY_SOCKET`` may be a filesystem path or an abstract socket (``@name``). When it is unset,
``notify()`` is a no-op that returns False, and ``run()`` starts no notifier.

What ``run()`` sends (``READY=1`` itself, the rest through ``SystemdNotifier``):

* ``READY=1`` and ``STATUS=serving (N server(s))`` once every server has started;
* ``STOPPING=1`` and ``STATUS=wrapping up (reason)`` when a shutdown starts. A *pause*
  (SIGTSTP, ``wrap_up()``) sends only ``STATUS=paused (reason) ...``: to systemd, ``STOPPING=1``
  from a running service means "as if SIGTERMed", and it would SIGKILL the paused process once
  ``TimeoutStopSec`` passed, while a pause may last as long as the operator wants.
  ``STOPPING=1`` follows when the shutdown does;
* ``EXTEND_TIMEOUT_USEC=`` while the drain makes progress (see ``EXTEND_EVERY``): systemd lets
  a draining service run past ``TimeoutStopSec`` as long as it keeps asking, and kills one
  that stopped asking (a stuck drain) when ``TimeoutStopSec`` is over;
* ``STATUS=shutting down``, ``STATUS=stopped (...)``, ``STATUS=forced: ...`` at those moments;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` before the reload listeners run (SIGHUP), and
  ``READY=1`` after them (``Type=notify-reload``). With no reload listener registered, SIGHUP
  shuts the service down gracefully (``STOPPING=1``): a unit that reloads must register one;
* ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` while healthy: each ping first asks graceful's
  signal coordinator thread to answer, and no ``WATCHDOG=1`` is sent until it has answered the
  previous ask, so a stuck coordinator stops the pings and systemd's watchdog acts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from ._checks import TYPE_CHECKING
from ._current import or_default
from ._lifecycle import Event, Lifecycle, progress, shutdown_requested, subscribe
from ._lifecycle import report_progress as lowlevel_report_progress
from ._listeners import ListenerState

if TYPE_CHECKING:
    from ._signals import Router

_FINISHED = (ListenerState.DONE, ListenerState.FAILED)

__all__ = ["SystemdNotifier", "notify", "report_progress", "watchdog_interval"]

log = logging.getLogger("graceful")

EXTEND_EVERY = 5.0
"""Seconds between two progress checks of a running shutdown.

*Progress* means that since the previous check at least one wrap-up or shutdown listener
finished (returned or raised), or something called ``report_progress()`` (a request answered,
a job done). Each check that sees progress sends ``EXTEND_TIMEOUT_USEC=`` for twice this
interval, so one quiet check is forgiven and two in a row are not. The very start of the
shutdown counts as progress.
"""
EXTEND_MARGIN = 5.0
"""Seconds asked for beyond graceful's own force-quit deadline, for its report and the exit: no
extension reaches further than that."""


def _address(raw: str) -> str:
    return "\0" + raw[1:] if raw.startswith("@") else raw


def notify(*messages: str) -> bool:
    """Send ``messages`` (e.g. ``"READY=1"``, ``"STATUS=draining"``) in one datagram.

    Returns True if sent; False if ``NOTIFY_SOCKET`` is unset or the send failed (logged at
    DEBUG: a supervisor that went away must not break the service).
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw or not messages:
        return False
    payload = "\n".join(messages).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(_address(raw))
            sock.sendall(payload)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", raw, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``WATCHDOG_USEC``), or None when systemd
    asks for none, or asks another process (``WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "").strip()
    pid = os.environ.get("WATCHDOG_PID", "").strip()
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


def report_progress(lifecycle: Lifecycle | None = None) -> None:
    """Say the drain moved forward (a request answered, a job finished): worth more time.

    Cheap and thread-safe (``graceful.lowlevel.report_progress()``); a ``SystemdNotifier`` watching the
    lifecycle turns it into more time, and nothing else reads it. Adapters and long wrap-up listeners call it as their in-flight work ends,
    so one server draining many requests counts as progress before its listener returns.
    """
    lowlevel_report_progress(or_default(lifecycle, "report_progress()"))


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Tells systemd about one lifecycle; ``run()`` starts one when ``NOTIFY_SOCKET`` is set.

    It observes the lifecycle's transitions (see the module docstring for what it sends) and
    runs one daemon thread for the watchdog pings and the progress checks. A program that
    keeps its own main loop uses it as a context manager, inside ``signal_handlers()``::

        with graceful.signal_handlers() as router, SystemdNotifier(graceful.get_lifecycle(), router):
            graceful.systemd.notify("READY=1")
            ...

    Without a ``router`` (signals not routed by graceful) the watchdog pings while the process
    is alive at all: there is no coordinator to ask.
    """

    def __init__(self, lifecycle: Lifecycle, router: Router | None = None) -> None:
        self.lifecycle = lifecycle
        self.router = router
        self.watchdog = watchdog_interval()
        """Seconds between two ``WATCHDOG=1``, or None (no watchdog asked for)."""
        self._lock = threading.Lock()
        """One transition's messages at a time, in order."""
        self._stopping_sent = False
        self._stop = threading.Event()
        self._draining = threading.Event()
        """Set once a shutdown runs: the watchdog then checks progress."""
        self._seen = (0, 0)
        """(listeners finished, reports) at the last progress check."""
        self._stuck = False
        """The coordinator has not answered the watchdog's last ask."""
        self._unobserve = subscribe(lifecycle, self._on_event)
        self._thread = threading.Thread(target=self._tick, name="graceful-systemd", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop observing and pinging (``run()`` does it before returning). Idempotent."""
        self._unobserve()
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transitions --------------------------------------------------------------------------

    def _on_event(self, event: Event, detail: str) -> None:
        with self._lock:
            if event is Event.WRAPPING_UP:
                if shutdown_requested(self.lifecycle):
                    self._begin_shutdown(detail)
                elif not self._stopping_sent:
                    notify(f"STATUS=paused ({detail}): not taking new work; SIGTERM stops the service")
            elif event is Event.SHUTDOWN_REQUESTED:
                self._begin_shutdown(detail)
            elif event is Event.SHUTTING_DOWN:
                # After a pause the driver may get here before the trigger's "shutdown" event.
                self._begin_shutdown(detail)
                notify("STATUS=shutting down")
            elif event is Event.STOPPED:
                notify(f"STATUS=stopped ({detail})")
                self._stop.set()
            elif event is Event.FORCED:
                notify(f"STATUS=forced: {detail}")
            elif event is Event.RELOADING and not self._stopping_sent:
                notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}", f"STATUS=reloading ({detail})")
            elif event is Event.RELOADED and not self._stopping_sent:
                state = "paused" if self.lifecycle.is_stopping() else "serving"
                notify("READY=1", f"STATUS={state} (reloaded)")

    def _begin_shutdown(self, reason: str) -> None:
        """``STOPPING=1``, the first extension, the progress checks: once (the caller holds the lock)."""
        if self._stopping_sent:
            return
        self._stopping_sent = True
        notify("STOPPING=1", f"STATUS=wrapping up ({reason})")
        self._seen = (self._finished(), progress(self.lifecycle))
        # The start of the shutdown counts as progress.
        self._extend()
        self._draining.set()

    # -- the thread: watchdog pings and progress checks ---------------------------------------

    def _tick(self) -> None:
        interval = self.watchdog
        step = min(interval or EXTEND_EVERY, EXTEND_EVERY)
        asked = next_check = 0.0
        while not self._stop.wait(step):
            if interval is not None:
                asked = self._watchdog(asked)
            now = time.monotonic()
            if self._draining.is_set() and now >= next_check:
                next_check = now + EXTEND_EVERY
                self._check_progress()

    def _watchdog(self, asked: float) -> float:
        """One watchdog tick: if the coordinator answered the last ask, ping and ask again.

        Returns when the pending ask was made (monotonic). While the coordinator does not
        answer, no ping is sent and no new ask is queued behind the old one."""
        router = self.router
        if router is not None and router.answered < asked:
            if not self._stuck:
                self._stuck = True
                log.warning(
                    "the signal coordinator has not answered for %.3f s: no WATCHDOG=1 until it does "
                    "(systemd's watchdog acts if it never does)",
                    time.monotonic() - asked,
                )
            return asked
        if self._stuck:
            self._stuck = False
            log.warning("the signal coordinator answers again: WATCHDOG=1 resumes")
        notify("WATCHDOG=1")
        asked = time.monotonic()
        if router is not None:
            router.ping()
        return asked

    def _finished(self) -> int:
        return sum(1 for item in self.lifecycle.status().listeners if item.state in _FINISHED)

    def _check_progress(self) -> None:
        status = self.lifecycle.status()
        finished = sum(1 for item in status.listeners if item.state in _FINISHED)
        seen = (finished, progress(self.lifecycle))
        if seen[0] > self._seen[0] or seen[1] > self._seen[1]:
            with self._lock:
                if not self._stop.is_set():
                    phase = status.state.value.replace("_", " ")
                    self._extend(f"STATUS={phase}: {finished} of {len(status.listeners)} listener(s) done")
        self._seen = seen

    def _extend(self, *more: str) -> None:
        window = 2 * EXTEND_EVERY
        remaining = self.lifecycle.time_remaining()
        if remaining is not None:
            window = min(window, remaining + EXTEND_MARGIN)
        notify(f"EXTEND_TIMEOUT_USEC={_usec(window)}", *more)
