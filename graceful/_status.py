"""The observable state of a lifecycle: the ``State`` enum and the ``status()`` snapshot.

Why: an asynq incident write-up tells of a server left half-stopped by a stray signal, with
nothing to show it from outside. Every transition here is logged, and ``status()`` gives a
plain, immutable snapshot (state, reason, time since the trigger, each listener's phase,
progress and duration) that a health endpoint, a SIGUSR1 dump or a test can read safely.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ListenerStatus", "State", "Status"]


class State(enum.Enum):
    """Where a lifecycle is. It only ever moves forward, in this order."""

    RUNNING = "running"
    WRAPPING_UP = "wrapping_up"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ListenerStatus:
    """One listener, as ``status()`` saw it.

    ``phase`` is ``"wrap_up"`` or ``"shutdown"``; ``state`` one of ``"pending"``,
    ``"running"``, ``"done"``, ``"failed"``, ``"removed"``; ``duration`` is seconds run so far
    (or in all, once finished), None if it has not started.
    """

    name: str
    phase: str
    state: str
    duration: float | None


@dataclass(frozen=True)
class Status:
    """A snapshot of a lifecycle: what ``graceful.status()`` returns."""

    state: State
    reason: str | None
    seconds_since_trigger: float | None
    force_quit: float
    listeners: tuple[ListenerStatus, ...]
    forced: bool = False

    def format(self) -> str:
        """A few human-readable lines, as the SIGUSR1 dump prints them."""
        since = (
            "not triggered"
            if self.seconds_since_trigger is None
            else f"{self.seconds_since_trigger:.3f} s since {self.reason!r}"
        )
        lines = [f"graceful: state {self.state.value}, {since}, force quit after {self.force_quit:g} s"]
        for item in self.listeners:
            took = "" if item.duration is None else f" ({item.duration:.3f} s)"
            lines.append(f"  {item.phase} listener {item.name!r}: {item.state}{took}")
        return "\n".join(lines)
