"""The process's default ``Lifecycle`` and the module-level functions bound to it.

Why: go-zero's ``proc`` is a process-wide registry, and that is what makes it easy to use from
anywhere in an application (``graceful.add_shutdown_listener(pool.close)`` in the module that
owns the pool). Tests need the opposite, a fresh lifecycle per test: ``use()`` swaps the
default and hands back the previous one, which is what the pytest fixture does. Each
function looks the default up at call time, so a swap takes effect everywhere at once.

The default's force-quit budget comes from ``GRACEFUL_FORCE_QUIT`` when it is set (a bad value
is a ``ValueError`` on import, naming the variable), else 25 s.
"""

from __future__ import annotations

from collections.abc import Callable

from ._force_quit import budget_from_env
from ._lifecycle import Lifecycle, ReloadHandle
from ._listeners import Waiter
from ._status import State, Status

__all__ = [
    "add_reload_listener",
    "add_shutdown_listener",
    "add_wrap_up_listener",
    "get_lifecycle",
    "is_stopping",
    "set_time_to_force_quit",
    "shutdown",
    "state",
    "status",
    "use",
    "wait_for_shutdown",
    "wait_for_shutdown_async",
    "wrap_up",
]


_current = Lifecycle(budget_from_env(25.0))  # rebound by use(); read at each call


def get_lifecycle() -> Lifecycle:
    """The lifecycle the module-level functions act on."""
    return _current


def use(lifecycle: Lifecycle) -> Lifecycle:
    """Make ``lifecycle`` the default; returns the previous default so it can be put back."""
    global _current
    if not isinstance(lifecycle, Lifecycle):
        raise TypeError(f"use() takes a graceful.Lifecycle, not {type(lifecycle).__name__}")
    previous, _current = _current, lifecycle
    return previous


def add_wrap_up_listener(fn: Callable[[], object], *, name: str | None = None) -> Waiter:
    """Run ``fn`` in the wrap-up phase of the default lifecycle; see ``Lifecycle``."""
    return _current.add_wrap_up_listener(fn, name=name)


def add_shutdown_listener(fn: Callable[[], object], *, name: str | None = None) -> Waiter:
    """Run ``fn`` in the shutdown phase of the default lifecycle; see ``Lifecycle``."""
    return _current.add_shutdown_listener(fn, name=name)


def add_reload_listener(fn: Callable[[], object], *, name: str | None = None) -> ReloadHandle:
    """Run ``fn`` on every SIGHUP; see ``Lifecycle.add_reload_listener``."""
    return _current.add_reload_listener(fn, name=name)


def set_time_to_force_quit(seconds: float) -> None:
    """Set the force-quit budget of the default lifecycle; ``ValueError`` for <= 0, NaN, inf."""
    _current.set_time_to_force_quit(seconds)


def shutdown(reason: str = "requested", *, wait: bool = True, timeout: float | None = None) -> bool:
    """Start (or join) the shutdown sequence; see ``Lifecycle.shutdown``."""
    return _current.shutdown(reason, wait=wait, timeout=timeout)


def wrap_up(reason: str = "requested") -> None:
    """Run the wrap-up phase only (a pause); see ``Lifecycle.wrap_up``."""
    _current.wrap_up(reason)


def is_stopping() -> bool:
    """True from the moment wrap-up starts; one global and one attribute read, for hot loops."""
    return _current._stopping


def wait_for_shutdown(timeout: float | None = None) -> bool:
    """Block until the default lifecycle is STOPPED; True if it got there in time."""
    return _current.wait_for_shutdown(timeout)


async def wait_for_shutdown_async() -> bool:
    """``await`` until the default lifecycle is STOPPED."""
    return await _current.wait_for_shutdown_async()


def state() -> State:
    """The default lifecycle's ``State``."""
    return _current._state


def status() -> Status:
    """A snapshot of the default lifecycle; see ``Status``."""
    return _current.status()
