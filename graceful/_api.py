"""The module-level functions: ``graceful.shutdown()`` and the rest, on the default lifecycle.

Why functions and not only methods: most code wants *the process's* shutdown, registered from
wherever the resource lives (go-zero's ``proc.AddShutdownListener``). Each function looks the
default up at call time (``_current``), so ``graceful.use()`` in a test takes effect everywhere.
``run()`` and ``signal_handlers()`` take ``lifecycle=`` for any other lifecycle: they live here,
above the core, so the ``Lifecycle`` never imports its own entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from . import _current
from ._checks import TYPE_CHECKING
from ._lifecycle import Lifecycle, ReloadHandle, State, Status
from ._listeners import Waiter

if TYPE_CHECKING:
    import socket

    from ._signals import Router

__all__ = [
    "add_flush_listener",
    "add_reload_listener",
    "add_shutdown_listener",
    "add_wrap_up_listener",
    "listen",
    "run",
    "set_time_to_force_quit",
    "set_wrap_up_timeout",
    "shutdown",
    "signal_handlers",
    "state",
    "status",
    "wait_for_shutdown",
    "wait_for_shutdown_async",
    "wait_for_wrap_up",
    "wait_for_wrap_up_async",
    "wrap_up",
]


def add_wrap_up_listener(
    fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
) -> Waiter:
    """Run ``fn`` in the wrap-up phase of the default lifecycle; see ``Lifecycle``."""
    return _current.get_lifecycle().add_wrap_up_listener(fn, name=name, timeout=timeout)


def add_shutdown_listener(
    fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
) -> Waiter:
    """Run ``fn`` in the shutdown phase of the default lifecycle; see ``Lifecycle``."""
    return _current.get_lifecycle().add_shutdown_listener(fn, name=name, timeout=timeout)


def add_flush_listener(
    fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
) -> Waiter:
    """Run ``fn`` in the flush phase of the default lifecycle (after the shutdown phase, and at
    a force quit before the exit); see ``Lifecycle.add_flush_listener``."""
    return _current.get_lifecycle().add_flush_listener(fn, name=name, timeout=timeout)


def add_reload_listener(fn: Callable[[], object], *, name: str | None = None) -> ReloadHandle:
    """Run ``fn`` on every SIGHUP; see ``Lifecycle.add_reload_listener``."""
    return _current.get_lifecycle().add_reload_listener(fn, name=name)


def set_time_to_force_quit(seconds: float) -> None:
    """Set the force-quit budget of the default lifecycle; ``ValueError`` for <= 0, NaN, inf."""
    _current.get_lifecycle().set_time_to_force_quit(seconds)


def listen(address: object, *, backlog: int | None = None) -> socket.socket:
    """A listening socket for ``address``: inherited when one matches, else bound here.

    The inherited one is systemd's (socket activation: ``LISTEN_FDS``) or, during an upgrade in
    place (SIGUSR2 under ``run()``), the previous generation's: nothing is bound then, and no
    connection is refused between the two processes. Give the socket to the server instead of
    its address (``server.serve(sockets=[sock])``, ``web.SockSite``); the adapters of
    ``run()`` do it themselves. See ``Lifecycle.listen`` (this is the default lifecycle's).

    Args:
        address: ``(host, port)`` for TCP (IPv4 or IPv6; port 0: any free one, kept across
            upgrades), or a Unix socket path (``"@name"``: Linux's abstract namespace).
        backlog: the accept queue's length; None keeps an inherited socket's and gives a new
            one ``socket.SOMAXCONN``.

    Raises:
        TypeError, ValueError: a bad address or backlog, before anything is bound.
        OSError: the address cannot be bound (in use, say); the message names it.

    Example, a server that binds itself (``run()``'s adapters need no change; a stdlib server
    is built with ``bind_and_activate=False`` and ``run()`` binds it)::

        sock = graceful.listen(("0.0.0.0", 8000))
        server = await loop.create_server(Protocol, sock=sock)
    """
    return _current.get_lifecycle().listen(address, backlog=backlog)


def set_wrap_up_timeout(seconds: float) -> None:
    """Set the wrap-up timeout of the default lifecycle; see ``Lifecycle.set_wrap_up_timeout``."""
    _current.get_lifecycle().set_wrap_up_timeout(seconds)


def shutdown(reason: str = "requested", *, wait: bool = True, timeout: float | None = None) -> bool:
    """Start (or join) the shutdown sequence; see ``Lifecycle.shutdown``."""
    return _current.get_lifecycle().shutdown(reason, wait=wait, timeout=timeout)


def wrap_up(reason: str = "requested") -> None:
    """Run the wrap-up phase only (a pause); see ``Lifecycle.wrap_up``."""
    _current.get_lifecycle().wrap_up(reason)


def wait_for_wrap_up(timeout: float | None = None) -> bool:
    """Block until wrap-up begins (``is_stopping()`` turns True); True if it did in time.

    What a worker loop waits on instead of polling ``is_stopping()`` with a sleep (go-zero's
    ``proc.Done()``).
    """
    return _current.get_lifecycle().wait_for_wrap_up(timeout)


async def wait_for_wrap_up_async() -> bool:
    """``await`` until wrap-up begins on the default lifecycle."""
    return await _current.get_lifecycle().wait_for_wrap_up_async()


def wait_for_shutdown(timeout: float | None = None) -> bool:
    """Block until the default lifecycle is STOPPED; True if it got there in time."""
    return _current.get_lifecycle().wait_for_shutdown(timeout)


async def wait_for_shutdown_async() -> bool:
    """``await`` until the default lifecycle is STOPPED."""
    return await _current.get_lifecycle().wait_for_shutdown_async()


def state() -> State:
    """The default lifecycle's ``State``."""
    return _current.get_lifecycle().state()


def status() -> Status:
    """A snapshot of the default lifecycle; see ``Status``."""
    return _current.get_lifecycle().status()


def run(
    server: object,
    *,
    force_quit: float | None = None,
    handle_signals: bool = True,
    lifecycle: Lifecycle | None = None,
) -> int:
    """Run ``server`` (or a list of servers) until shutdown; returns the exit code.

    Installs the signal router (``handle_signals``), starts every server, sends ``READY=1``
    when all are up, blocks, runs the whole sequence however the process ends, restores the
    signal handlers and returns the exit code.

    Args:
        server: anything ``graceful.adapters.adapt()`` accepts, or a list of such. A blocking
            callable runs in a thread of its own and should return once
            ``wait_for_wrap_up()`` does; an ``async def`` may be given uncalled.
        force_quit: the force-quit budget in seconds for this run (default: the lifecycle's,
            25 s or ``GRACEFUL_FORCE_QUIT``).
        handle_signals: install the signal router (main thread only). Pass False to route
            signals yourself, e.g. when ``run()`` is not called from the main thread.
        lifecycle: the lifecycle to run on; the default one if None.

    Returns:
        0 if everything stopped gracefully, 1 if a server or a listener raised, 70 if forced.

    Raises:
        TypeError: a server graceful does not know how to run (a generator function, a
            callable that needs arguments), or a bad argument.
        ValueError: an empty list, or a bad ``force_quit``.
        RuntimeError: ``handle_signals`` is True and this is not the main thread; or the
            lifecycle has stopped already. Raised before anything changes.
    """
    # Loaded on first use: about 1 ms that a library never pays.
    from ._run import run_with

    lc = _current.or_default(lifecycle, "run()")
    return run_with(lc, server, force_quit=force_quit, handle_signals=handle_signals)


def signal_handlers(lifecycle: Lifecycle | None = None) -> AbstractContextManager[Router]:
    """Route SIGTERM, SIGINT, SIGQUIT, SIGTSTP, SIGUSR1, SIGHUP and SIGUSR2 to ``lifecycle`` in a block.

    For programs that keep their own main loop (``run()`` uses it too). The previous handlers
    and wakeup fd are restored when the block ends.

    Args:
        lifecycle: the lifecycle the signals act on; the default one if None.

    Raises:
        TypeError: ``lifecycle`` is not a ``graceful.Lifecycle`` (or None).
        RuntimeError: not called from the main thread (only it can install signal handlers).

    Example::

        with graceful.signal_handlers():
            while not graceful.is_stopping():
                do_some_work()
        graceful.wait_for_shutdown()
    """
    from ._signals import signal_handlers as install

    return install(_current.or_default(lifecycle, "signal_handlers()"))
