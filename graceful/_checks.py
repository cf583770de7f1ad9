"""Argument checks: one copy of each, so every public call rejects bad input the same way.

Why a module of its own: the contract says bad input gets a clear error *at the call*, before
any state changes, and that the message says what is accepted and what to do. A number of
seconds alone is taken by the budget, the timeouts, the drain delay, the harness and two
environment variables; when each had its own check, each had its own gaps (``bool`` taken as
a number, ``inf`` passed to ``threading`` and an ``OverflowError`` at shutdown, NaN silently
False). Every check here runs before the caller touches its state.

Nothing here imports ``inspect`` at module level (about 8 ms): the listener check reads the
code object of a plain function and falls back to ``inspect.signature`` only for the rare
callable that has none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

TYPE_CHECKING = False
"""``typing.TYPE_CHECKING`` without importing ``typing`` (about 4 ms on ``import graceful``).

Every module of the package imports this one: mypy treats any name ``TYPE_CHECKING`` as True,
and at run time the imports under it are skipped and the protocols are plain classes."""

__all__ = [
    "check_listener",
    "check_name",
    "check_reason",
    "check_seconds",
    "check_timeout",
    "is_coroutine_function",
    "is_generator_function",
    "port_from_env",
    "port_number",
]

MAX_SECONDS = float(threading.TIMEOUT_MAX)
"""The longest wait ``threading`` accepts (about 292 years on Linux): a budget above it would
kill the thread that waits for the deadline."""

CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ASYNC_GENERATOR = 0x200


def _code(fn: object) -> object:
    return getattr(getattr(fn, "__func__", fn), "__code__", None)


def is_coroutine_function(fn: object) -> bool:
    """True for an ``async def`` (or a method of one), read off its code object: no ``inspect``."""
    return bool(getattr(_code(fn), "co_flags", 0) & CO_COROUTINE)


def is_generator_function(fn: object) -> bool:
    """True for a generator or async-generator function: calling it would run none of its body."""
    return bool(getattr(_code(fn), "co_flags", 0) & (CO_GENERATOR | CO_ASYNC_GENERATOR))


def check_seconds(value: object, what: str, *, zero: bool = False, example: str = "25") -> float:
    """``value`` as a float: a finite number of seconds > 0 (>= 0 with ``zero``), at most
    ``threading.TIMEOUT_MAX``. ``TypeError`` for a non-number (``bool`` and strings included),
    ``ValueError`` for NaN, infinity, a negative number, 0 without ``zero``, or too large."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} takes a number of seconds, such as {example}, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        # An int too large for a float.
        seconds = float("inf")
    low = "0 or more" if zero else "greater than 0"
    # NaN fails both comparisons.
    if not (seconds >= 0 if zero else seconds > 0) or not seconds <= MAX_SECONDS:
        raise ValueError(
            f"{what} takes a finite number of seconds {low} and at most {MAX_SECONDS:.0f}, "
            f"such as {example}, not {value!r}"
        )
    return seconds


def check_timeout(value: object, what: str) -> float | None:
    """A ``timeout=`` argument: None (wait as long as it takes) or seconds >= 0 (0 checks
    without waiting, as ``threading.Event.wait(0)`` does)."""
    if value is None:
        return None
    return check_seconds(value, f"{what} (timeout=None waits as long as it takes)", zero=True, example="5")


def port_number(text: str) -> int | None:
    """``text`` as a port number 0-65535, or None. ASCII digits only: ``int()`` would also take
    ``"١٢٣٤"`` (Arabic-Indic digits) as 1234 and ``"1_0"`` as 10, which no operator meant."""
    text = text.strip()
    if not text or len(text) > 5 or not all("0" <= char <= "9" for char in text):
        return None
    port = int(text)
    return port if port <= 65535 else None


def port_from_env(name: str, default: int | None, *, zero: bool = False) -> int | None:
    """The environment variable ``name`` as a TCP port (1-65535; 0 too with ``zero``), else
    ``default``; anything else is a ``ValueError`` naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    port = port_number(raw)
    if port is None or (port == 0 and not zero):
        low = 0 if zero else 1
        raise ValueError(f"{name}={raw!r} is not a port number ({low}-65535): set it to e.g. 8080")
    return port


def check_name(name: object, what: str) -> str | None:
    """A listener's ``name=``: a ``str`` or None."""
    if name is None or isinstance(name, str):
        return name
    raise TypeError(f"{what}(name=...) takes a str (or None for the callable's own name), not {name!r}")


def check_reason(reason: object, what: str) -> str:
    """A trigger's ``reason``: a ``str`` that the log and ``status()`` show."""
    if isinstance(reason, str):
        return reason
    raise TypeError(f'{what} takes a reason as a str, such as "deploy", not {reason!r}')


def check_listener(fn: object, what: str) -> Callable[[], object]:
    """``fn`` if it can be a listener: callable with no arguments, not a generator function.

    A generator or async-generator function would be called, hand back a generator, and its
    body would never run; ``lambda x: x`` would fail only at shutdown. Both are a ``TypeError``
    here, at registration.
    """
    if not callable(fn):
        raise TypeError(
            f"{what}() takes a callable with no arguments (a function, a bound method or an "
            f"async def), not {type(fn).__name__} {fn!r}"
        )
    if is_generator_function(fn):
        raise TypeError(
            f"{what}() was given the generator function {fn!r}: calling it would only make a "
            "generator and its body would never run. Pass a plain function or an async def."
        )
    if _required_arguments(fn, _code(fn)) > 0:
        raise TypeError(
            f"{what}() takes a callable with no arguments, and {fn!r} needs some: wrap it, "
            "e.g. functools.partial(fn, arg) or lambda: fn(arg)"
        )
    return fn


def _required_arguments(fn: object, code: object) -> int:
    """How many arguments ``fn()`` is missing (0 when it can be called as it is)."""
    if code is not None and type(fn).__name__ in ("function", "method"):
        func = getattr(fn, "__func__", fn)
        positional: int = code.co_argcount  # type: ignore[attr-defined]
        defaults = len(getattr(func, "__defaults__", None) or ())
        bound = 1 if func is not fn else 0
        kw_only: int = code.co_kwonlyargcount  # type: ignore[attr-defined]
        kw_defaults = len(getattr(func, "__kwdefaults__", None) or {})
        return max(0, positional - defaults - bound) + (kw_only - kw_defaults)
    try:
        # Rare: a class, a partial, a callable object, a builtin.
        import inspect

        inspect.signature(fn).bind()  # type: ignore[arg-type]
    except TypeError:
        return 1
    except ValueError:
        # No signature to read (some builtins): give it the benefit of the doubt.
        return 0
    return 0
