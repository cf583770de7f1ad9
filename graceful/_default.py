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
from contextlib import AbstractContextManager

from ._force_quit import budget_from_env
from ._lifecycle import Lifecycle, ReloadHandle
from ._listeners import Waiter
from ._status import State, Status

# No ``typing`` at run time (about 4 ms of import): see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._signals import Router

__all__ = [
    "add_reload_listener",
    "add_shutdown_listener",
    "add_wrap_up_listener",
    "get_lifecycle",
    "is_stopping",
    "run",
    "set_time_to_force_quit",
    "shutdown",
    "signal_handlers",
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


def run(server: object, *, force_quit: float | None = None, handle_signals: bool = True) -> int:
    """Run ``server`` (or a list of servers) on the default lifecycle until shutdown.

    Installs the signal router (``handle_signals``), starts every server, sends ``READY=1``
    when all are up, blocks, runs the whole sequence however the process ends, restores the
    signal handlers and returns the exit code.

    Args:
        server: anything ``graceful.adapters.adapt()`` accepts, or a list of such.
        force_quit: the force-quit budget in seconds for this run (default: the lifecycle's,
            25 s or ``GRACEFUL_FORCE_QUIT``).
        handle_signals: install the signal router (main thread only). Pass False to route
            signals yourself, e.g. when ``run()`` is not called from the main thread.

    Returns:
        0 if everything stopped gracefully, 1 if a server or a listener raised, 70 if forced.

    Raises:
        TypeError: a server graceful does not know how to run.
        ValueError: an empty list, or a bad ``force_quit``.
        RuntimeError: ``handle_signals`` is True and this is not the main thread.
    """
    from ._run import run_with  # loaded on first use: about 1 ms that a library never pays

    return run_with(_current, server, force_quit=force_quit, handle_signals=handle_signals)


def signal_handlers(lifecycle: Lifecycle | None = None) -> AbstractContextManager[Router]:
    """Route SIGTERM, SIGINT, SIGQUIT, SIGTSTP, SIGUSR1 and SIGHUP to ``lifecycle`` in a block.

    For programs that keep their own main loop (``run()`` uses it too). Defaults to the default
    lifecycle. The previous handlers and wakeup fd are restored when the block ends.

    Raises:
        RuntimeError: not called from the main thread (only it can install signal handlers).

    Example::

        with graceful.signal_handlers():
            while not graceful.is_stopping():
                do_some_work()
        graceful.wait_for_shutdown()
    """
    from ._signals import signal_handlers as install

    return install(lifecycle if lifecycle is not None else _current)
