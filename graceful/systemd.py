"""systemd's notify protocol (``sd_notify``) and watchdog, with no dependency.

Why here: our users deploy under systemd (``Type=notify``, ``Type=notify-reload``,
``WatchdogSec=``). A service that says ``READY=1`` only once it accepts work, ``STOPPING=1`` as
soon as it stops accepting, and asks for more time only while its drain is making progress,
lets systemd order restarts correctly and kill only what is really stuck. The pytest fixture
``graceful_process`` listens on the same protocol to know when a child is ready.

``NOTIFY_SOCKET`` may be a filesystem path or an abstract socket (``@name``). When it is unset,
``notify()`` is a no-op that returns False, and ``run()`` starts no notifier.

What ``run()`` sends, through ``SystemdNotifier``:

* ``READY=1`` and ``STATUS=serving ...`` once every server has started;
* ``STOPPING=1`` and ``STATUS=wrapping up (reason)`` when wrap-up starts (a pause included);
* ``EXTEND_TIMEOUT_USEC=`` (the budget left plus ``EXTEND_MARGIN``) when a shutdown starts,
  so systemd waits for graceful's own deadline and its report rather than SIGKILLing first,
  and again every ``EXTEND_EVERY`` seconds while listeners keep finishing (progress); a drain
  that makes no progress is not extended;
* ``STATUS=shutting down`` and ``STATUS=stopped`` at those transitions;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` before the reload listeners run (SIGHUP), and
  ``READY=1`` after them (``Type=notify-reload``);
* ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` while healthy: each ping first asks graceful's
  signal coordinator thread to answer, and no ``WATCHDOG=1`` is sent until it has answered the
  previous one, so a stuck coordinator stops the pings and systemd's watchdog acts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from ._signals import Router

__all__ = ["SystemdNotifier", "notify", "watchdog_interval"]

log = logging.getLogger("graceful")

EXTEND_EVERY = 5.0
"""Seconds between two progress checks of a running sequence (``EXTEND_TIMEOUT_USEC``)."""
EXTEND_MARGIN = 5.0
"""Seconds asked for beyond graceful's own deadline, for its report and the exit."""


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


def _usec(seconds: float) -> int:
    return int(seconds * 1_000_000)


class SystemdNotifier:
    """Tells systemd about one lifecycle; ``run()`` starts one when ``NOTIFY_SOCKET`` is set."""

    def __init__(self, lifecycle: Lifecycle, router: Router | None = None) -> None:
        self.lifecycle = lifecycle
        self.router = router
        self._stop = threading.Event()
        self._sequence = threading.Event()  # set while a shutdown runs: progress checks
        self._finished_at_last_check = 0
        self._unobserve = lifecycle._observe(self._on_event)
        self._thread = threading.Thread(target=self._tick, name="graceful-systemd", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop observing and pinging (``run()`` does it before returning)."""
        self._unobserve()
        self._stop.set()
        self._thread.join(5)

    def _on_event(self, event: str, detail: str) -> None:
        if event == "wrapping_up":
            notify("STOPPING=1", f"STATUS=wrapping up ({detail})")
        elif event == "shutdown":
            self._extend()
            self._finished_at_last_check = self._finished()
            self._sequence.set()
        elif event == "shutting_down":
            notify("STATUS=shutting down")
        elif event == "stopped":
            notify(f"STATUS=stopped ({detail})")
            self._stop.set()
        elif event == "reloading":
            notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        elif event == "reloaded":
            notify("READY=1", "STATUS=serving (reloaded)")

    def _extend(self) -> None:
        remaining = self.lifecycle.time_remaining()
        if remaining is not None:
            notify(f"EXTEND_TIMEOUT_USEC={_usec(remaining + EXTEND_MARGIN)}")

    def _finished(self) -> int:
        return sum(1 for item in self.lifecycle.status().listeners if item.state in ("done", "failed"))

    def _tick(self) -> None:
        """Watchdog pings, and progress checks while a shutdown runs, on one thread."""
        interval = watchdog_interval()
        step = min(interval or EXTEND_EVERY, EXTEND_EVERY)
        sent_ping = next_extend = 0.0
        while not self._stop.wait(step):
            now = time.monotonic()
            if interval is not None:
                if self.router is None or self.router.answered >= sent_ping:
                    notify("WATCHDOG=1")
                else:
                    log.warning(
                        "the signal coordinator has not answered for %.1f s: no WATCHDOG=1", now - sent_ping
                    )
                sent_ping = time.monotonic()
                if self.router is not None:
                    self.router.ping()
            if self._sequence.is_set() and now >= next_extend:
                next_extend = now + EXTEND_EVERY
                done = self._finished()
                if done > self._finished_at_last_check:  # progress since the last check
                    self._extend()
                self._finished_at_last_check = done
