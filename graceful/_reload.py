"""Reload listeners: what SIGHUP runs when a program asked for it.

Why a registry apart from the phases: a reload is not a step towards the exit. It may happen
any number of times, its listeners run one after another (a configuration is re-read before
the pool that uses it is resized), and one that raises must neither stop the others nor end
the process. With no reload listener registered, SIGHUP means "the terminal went away" and the
signal router shuts down instead (a closed terminal must not leave an orphan on the port).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ._aio import is_awaitable, run_awaitable
from ._events import Event, Observers

__all__ = ["ReloadHandle", "Reloads"]

log = logging.getLogger("graceful")


class ReloadHandle:
    """What ``add_reload_listener`` returns; ``remove()`` unregisters the listener."""

    __slots__ = ("_fn", "_registry", "name")

    def __init__(self, registry: Reloads, fn: Callable[[], object], name: str) -> None:
        self._registry = registry
        self._fn = fn
        self.name = name

    def __call__(self) -> object:
        """Run the listener once (what a reload does)."""
        return self._fn()

    def remove(self) -> bool:
        """Unregister; True if it was registered."""
        return self._registry.remove(self)

    def __repr__(self) -> str:
        return f"<graceful.ReloadHandle {self.name!r}>"


class Reloads:
    """The reload listeners of one lifecycle."""

    def __init__(self, observers: Observers) -> None:
        self._observers = observers
        self._lock = threading.Lock()
        self._handles: list[ReloadHandle] = []

    def add(self, fn: Callable[[], object], name: str) -> ReloadHandle:
        handle = ReloadHandle(self, fn, name)
        with self._lock:
            self._handles.append(handle)
        return handle

    def remove(self, handle: ReloadHandle) -> bool:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)
                return True
            return False

    def count(self) -> int:
        with self._lock:
            return len(self._handles)

    def run_all(self, reason: str) -> int:
        """Run every listener, in registration order, in this thread; returns how many ran.

        Each is isolated: one that raises (even ``SystemExit`` or ``KeyboardInterrupt``) is
        logged with its name and the others still run. ``Event.RELOADING`` comes before,
        ``Event.RELOADED`` after.
        """
        with self._lock:
            handles = list(self._handles)
        log.info("reloading (%s): %d reload listener(s)", reason, len(handles))
        self._observers.emit(Event.RELOADING, reason)
        for handle in handles:
            try:
                result = handle()
                if is_awaitable(result):
                    run_awaitable(result)
            except BaseException:  # a reload listener must never end the thread that runs it
                log.exception("reload listener %r failed", handle.name)
        self._observers.emit(Event.RELOADED, reason)
        return len(handles)
