"""The observable state of a lifecycle: the ``State`` enum and the ``status()`` snapshot.

Why: an asynq incident write-up tells of a server left half-stopped by a stray signal, with
nothing to show it from outside. Every transition here is logged, and ``status()`` gives a
plain, immutable snapshot (state, reason, time since the trigger, each listener's phase,
progress and duration) that a health endpoint, a SIGUSR1 dump or a test can read safely.
"""

from __future__ import annotations

import enum

__all__ = ["ListenerState", "ListenerStatus", "Phase", "State", "Status"]


class State(enum.Enum):
    """Where a lifecycle is. It only ever moves forward, in this order."""

    RUNNING = "running"
    WRAPPING_UP = "wrapping_up"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


class Phase(str, enum.Enum):
    """The phase a listener belongs to. A ``str`` enum: ``Phase.WRAP_UP == "wrap_up"``."""

    WRAP_UP = "wrap_up"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


class ListenerState(str, enum.Enum):
    """Where one listener is: PENDING -> RUNNING -> DONE or FAILED; or REMOVED before it ran.

    A ``str`` enum, so ``item.state == "done"`` still reads naturally in a test.
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REMOVED = "removed"

    def __str__(self) -> str:
        return self.value


class _Frozen:
    """A small immutable record: equality, hash and repr from ``__slots__``.

    Hand-written instead of ``dataclasses`` because that module pulls in ``inspect`` (and
    ``ast``, ``dis``, ``tokenize``): about 8 ms on every ``import graceful``.
    """

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()  # the order of the constructor's arguments

    def __init__(self, *values: object) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is a snapshot: it cannot be changed")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class ListenerStatus(_Frozen):
    """One listener, as ``status()`` saw it.

    ``phase`` is a ``Phase`` (``Phase.WRAP_UP`` or ``Phase.SHUTDOWN``); ``state`` a
    ``ListenerState`` (both ``str`` enums, equal to ``"wrap_up"``, ``"done"`` and so on);
    ``duration`` is seconds run so far (or in all, once finished), None if it has not started.
    """

    __slots__ = ("duration", "name", "phase", "state")
    _fields = ("name", "phase", "state", "duration")
    name: str
    phase: Phase
    state: ListenerState
    duration: float | None

    def __init__(self, name: str, phase: Phase, state: ListenerState, duration: float | None) -> None:
        super().__init__(name, phase, state, duration)


class Status(_Frozen):
    """A snapshot of a lifecycle: what ``graceful.status()`` returns.

    ``state``; ``reason`` of the latest trigger; ``seconds_since_trigger`` (None before any);
    ``force_quit``, the budget in seconds; ``listeners``, one ``ListenerStatus`` each;
    ``forced``, True once the force-quit report was written.
    """

    __slots__ = ("force_quit", "forced", "listeners", "reason", "seconds_since_trigger", "state")
    _fields = ("state", "reason", "seconds_since_trigger", "force_quit", "listeners", "forced")
    state: State
    reason: str | None
    seconds_since_trigger: float | None
    force_quit: float
    listeners: tuple[ListenerStatus, ...]
    forced: bool

    def __init__(  # noqa: PLR0917 - one positional argument per field, as a dataclass would take
        self,
        state: State,
        reason: str | None,
        seconds_since_trigger: float | None,
        force_quit: float,
        listeners: tuple[ListenerStatus, ...],
        forced: bool = False,
    ) -> None:
        super().__init__(state, reason, seconds_since_trigger, force_quit, listeners, forced)

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
