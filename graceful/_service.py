"""The ``Service`` protocol: what an adapter must know about a server to stop it well.

Why a protocol of three steps: every server family stops the same way once you look past its
API. *Serve* until told otherwise; *wrap up* (stop accepting, let in-flight work finish, within
the remaining budget); *close* (release what is left). ``graceful.run()`` maps wrap-up and close
onto the two phases of the lifecycle, so a server stopped this way is stopped in step with
every other listener of the process, and a stuck one is named by the force-quit report.

Each method may be a plain function or an ``async def``; async ones run on the event loop that
``run()`` drives in the main thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ._checks import TYPE_CHECKING
from ._lifecycle import shutdown_requested

if TYPE_CHECKING:
    from typing import Protocol

    from ._lifecycle import Lifecycle
else:
    Protocol = object

__all__ = ["Context", "Service"]


class Context:
    """What ``run()`` hands each service: its lifecycle, its budget, and a way to say "started"."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        name: str,
        on_started: Callable[[Context], None] = lambda ctx: None,
    ) -> None:
        self.lifecycle = lifecycle
        self.name = name
        self._on_started = on_started
        self._started = threading.Event()
        self.entered = False
        """True once ``run()`` has called ``serve()``."""
        self.served = threading.Event()
        """Set once ``serve()`` has returned or raised."""
        self._turn = threading.Event()

    def started(self) -> None:
        """Say that the service now accepts work (idempotent). READY=1 waits for every service."""
        if not self._started.is_set():
            self._started.set()
            self._on_started(self)

    def remaining(self) -> float | None:
        """Seconds left before force quit; None while no shutdown was triggered (a pause)."""
        return self.lifecycle.time_remaining()

    def wrap_up_remaining(self) -> float | None:
        """Seconds left before the wrap-up phase must end (the wrap-up timeout); None while no
        shutdown was triggered. ``run()`` does not abandon a service's wrap-up step at the
        wrap-up timeout: the step bounds itself, by this or by ``remaining()``."""
        return self.lifecycle.wrap_up_remaining()

    def shutting_down(self) -> bool:
        """True once a shutdown (not only a pause) was asked for."""
        return shutdown_requested(self.lifecycle)

    def wrapping_up(self) -> bool:
        """True once ``run()`` has called *this* service's wrap-up step.

        ``graceful.is_stopping()`` turns True for every service at once; this turns True in
        list order reversed: with ``run([worker, api])`` the worker's turn comes only after the
        API has stopped accepting and drained, so a worker that polls this takes every job the
        API accepted. An attribute read, cheap in a hot loop.
        """
        return self._turn.is_set()

    def wait_for_wrap_up(self, timeout: float | None = None) -> bool:
        """Block until this service's wrap-up turn has come; True if it came within ``timeout``."""
        return self._turn.wait(timeout)

    def wrap_up_began(self) -> None:
        """What ``run()`` calls as it starts this service's wrap-up step (idempotent)."""
        self._turn.set()

    def wait_served(self, timeout: float | None = None) -> bool:
        """Block until ``serve()`` has returned; True if it did within ``timeout``."""
        return self.served.wait(timeout)


class Service(Protocol):
    """An adapter: how to serve a server, wrap it up and close it.

    * ``serve(ctx)`` runs the server until it stops; calls ``ctx.started()`` once it accepts
      work. ``run()`` calls it in its own thread (or as a task, if ``async def``).
    * ``wrap_up(ctx)`` stops taking new work and waits for in-flight work, within
      ``ctx.remaining()`` seconds; returns when drained. Afterwards ``serve()`` returns.
    * ``close(ctx)`` releases what is left (pools, sockets, registrations).

    ``run()`` abandons a service's ``wrap_up`` still running at the wrap-up timeout, as it does
    any wrap-up listener (contract section 10), unless the service sets ``bounds_its_drain =
    True``: then it bounds its own wait (``ctx.wrap_up_remaining()`` or ``ctx.remaining()``) and
    names what it cuts, as graceful's own adapters do.
    """

    name: str

    def serve(self, ctx: Context) -> object:
        """Run until stopped."""

    def wrap_up(self, ctx: Context) -> object:
        """Stop taking new work and drain."""

    def close(self, ctx: Context) -> object:
        """Release resources."""


def is_service(obj: object) -> bool:
    """True if ``obj`` has what a ``Service`` has (a structural check, like a runtime protocol)."""
    return isinstance(getattr(obj, "name", None), str) and all(
        callable(getattr(obj, method, None)) for method in ("serve", "wrap_up", "close")
    )
