"""The phase runner: each phase's listeners, started together and waited for together.

Why it is shaped like this:

* The shutdown phase starts only when *every* wrap-up listener has finished, so each phase
  keeps a count of listeners still outstanding and one condition wakes the sequence when it
  reaches zero: no fixed sleep (go-zero sleeps 1 s and hopes), one wake-up per phase.
* A listener registered after its phase began runs at once and is counted like the others,
  so nothing is dropped and no waiter blocks for ever (go-zero's late ``waitForCalled``
  hangs until the force kill).
* A removed listener is gone from the registry at once, and a finished one has already let go
  of its callable: registering and removing 100,000 listeners leaves memory and ``status()``
  as they were.

The runner shares the ``Lifecycle``'s lock (a ``threading.Condition``), so a transition and the
counts it depends on are read together.
"""

from __future__ import annotations

import logging
import threading

from ._listeners import Listener, run_soon
from ._status import ListenerState, Phase

__all__ = ["Phases"]

log = logging.getLogger("graceful")


class _Registry:
    __slots__ = ("listeners", "outstanding", "started")

    def __init__(self) -> None:
        self.listeners: dict[Listener, None] = {}  # insertion-ordered; O(1) removal
        self.started = False
        self.outstanding = 0


class Phases:
    """Both phases of one lifecycle. Every method takes the shared lock itself."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._registries = {phase: _Registry() for phase in Phase}
        self.failures: list[str] = []
        """What failed (listeners, and servers recorded by ``run()``); written under the lock."""

    def add(self, listener: Listener) -> None:
        """Register ``listener``; if its phase began already, run it now."""
        with self._changed:
            registry = self._registries[listener.phase]
            registry.listeners[listener] = None
            late = registry.started
            if late:
                listener.scheduled = True
                registry.outstanding += 1
        if late:
            log.info(
                "%s listener %r registered after its phase began: running it now",
                listener.phase,
                listener.name,
            )
            run_soon(listener)

    def remove(self, listener: Listener) -> bool:
        """Unregister ``listener`` if it has not been scheduled; True if it was removed."""
        with self._changed:
            if not listener.remove():
                return False
            self._registries[listener.phase].listeners.pop(listener, None)
            return True

    def run(self, phase: Phase) -> tuple[int, int]:
        """Start every pending listener of ``phase`` (concurrently); returns how many, and how
        many of them are graceful's own (``run()``'s steps for its servers)."""
        with self._changed:
            registry = self._registries[phase]
            registry.started = True
            batch = [
                item
                for item in registry.listeners
                if item.state is ListenerState.PENDING and not item.scheduled
            ]
            for item in batch:
                item.scheduled = True
            registry.outstanding += len(batch)
        run_soon(*batch)
        return len(batch), sum(item.own for item in batch)

    def outstanding(self, phase: Phase) -> int:
        """Listeners of ``phase`` scheduled and not finished (the caller holds the lock)."""
        return self._registries[phase].outstanding

    def wait(self, phase: Phase) -> None:
        """Block until every scheduled listener of ``phase`` has finished (the caller holds the lock)."""
        while self._registries[phase].outstanding:
            self._changed.wait()

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no listener of either phase is running; True if so within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(registry.outstanding for registry in self._registries.values()), timeout
            )

    def finished(self, listener: Listener) -> None:
        """What each listener calls as it finishes (from its pool thread)."""
        with self._changed:
            registry = self._registries[listener.phase]
            registry.outstanding -= 1
            if listener.error is not None:
                self.failures.append(f"{listener.phase} listener {listener.name!r}")
            if registry.outstanding == 0:  # only then can the sequence move on
                self._changed.notify_all()

    def listeners(self) -> list[Listener]:
        """Every registered listener, wrap-up first, in registration order (a copy)."""
        with self._changed:
            return [item for registry in self._registries.values() for item in registry.listeners]
