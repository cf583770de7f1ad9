"""The process's default ``Lifecycle``: the one the module-level functions act on.

Why a holder of its own: go-zero's ``proc`` is a process-wide registry, and that is what makes
it easy to use from anywhere in an application (``graceful.add_shutdown_listener(pool.close)``
in the module that owns the pool). Tests need the opposite, a fresh lifecycle per test:
``use()`` swaps the default and hands back the previous one, which is what the pytest fixture
does. Everything that defaults to "the process's lifecycle" (the public functions, readiness,
systemd, ``signal_handlers()``) looks it up here at call time, so a swap takes effect
everywhere at once. The core itself never looks here: a ``Lifecycle`` does not know whether it
is the default.

Making the default reads no environment: its budget is ``GRACEFUL_FORCE_QUIT`` or 25 s, read
when ``run()`` or a host starts (or when its deadline is armed), never at ``import graceful``.
"""

from __future__ import annotations

from ._lifecycle import Lifecycle

__all__ = ["get_lifecycle", "is_stopping", "or_default", "use"]

_current = Lifecycle()
"""The default lifecycle: rebound by ``use()``, read at each call."""


def is_stopping() -> bool:
    """True from the moment wrap-up starts; cheap enough for a hot loop (one global lookup
    and one attribute read, as cheap as ``threading.Event.is_set()``)."""
    return _current.stopping


def get_lifecycle() -> Lifecycle:
    """The lifecycle the module-level functions act on."""
    return _current


def or_default(lifecycle: object, what: str) -> Lifecycle:
    """``lifecycle`` if it is one, the default if None; a ``TypeError`` that says so otherwise."""
    if lifecycle is None:
        return _current
    if isinstance(lifecycle, Lifecycle):
        return lifecycle
    raise TypeError(
        f"{what} takes lifecycle=None (the default lifecycle) or a graceful.Lifecycle, not {lifecycle!r}"
    )


def use(lifecycle: Lifecycle) -> Lifecycle:
    """Make ``lifecycle`` the default; returns the previous default so it can be put back.

    Raises:
        TypeError: ``lifecycle`` is not a ``graceful.Lifecycle``.
    """
    global _current
    if not isinstance(lifecycle, Lifecycle):
        raise TypeError(f"use() takes a graceful.Lifecycle, not {type(lifecycle).__name__}")
    previous, _current = _current, lifecycle
    return previous
