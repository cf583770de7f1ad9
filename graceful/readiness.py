"""Readiness for Kubernetes probes and load balancers, and the drain delay.

Why: when a pod is deleted, Kubernetes sends SIGTERM and removes the pod from its Service's
endpoints *at the same time*; proxies keep sending new connections for a few seconds more.
A server that closes its listening socket at once refuses them (the "endpoint race"). The
cure is to turn not-ready first, keep serving for a *drain delay*, and only then stop
accepting. Every web adapter calls :func:`wait_drain_delay` at the start of its wrap-up, so
one delay, counted from the first wrap-up trigger, covers every server in the process.

* ready: ``run()`` marks the lifecycle ready once every server has started; it turns not-ready
  the moment wrap-up starts (a pause or a shutdown) and never back. A program that does not
  use ``run()`` calls :func:`set_ready` itself.
* live: True until the lifecycle has STOPPED (a liveness probe must not restart a pod that is
  draining).
* drain delay: ``set_drain_delay(seconds)`` or ``GRACEFUL_DRAIN_DELAY`` (seconds, default 0),
  bounded by what is left of the force-quit budget.
"""

from __future__ import annotations

import math
import os
import threading

from ._default import get_lifecycle
from ._status import State

# No ``typing`` at run time: see graceful/_clock.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = [
    "drain_delay",
    "drain_delay_left",
    "is_live",
    "is_ready",
    "set_drain_delay",
    "set_ready",
    "wait_drain_delay",
]

ENV_DRAIN_DELAY = "GRACEFUL_DRAIN_DELAY"


def _check_delay(seconds: object, where: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{where} takes a number of seconds (0 or more), not {type(seconds).__name__}")
    value = float(seconds)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{where} must be a finite number of seconds, 0 or more; got {seconds!r}")
    return value


def _delay_from_env() -> float:
    raw = os.environ.get(ENV_DRAIN_DELAY, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_DRAIN_DELAY}={raw!r} is not a number: set it to seconds, e.g. 5") from None
    return _check_delay(value, ENV_DRAIN_DELAY)


def _lc(lifecycle: Lifecycle | None) -> Lifecycle:
    return lifecycle if lifecycle is not None else get_lifecycle()


def set_ready(lifecycle: Lifecycle | None = None) -> None:
    """Say the service accepts work (``run()`` does this once every server has started)."""
    _lc(lifecycle)._ready = True


def is_ready(lifecycle: Lifecycle | None = None) -> bool:
    """True while the service takes new work: marked ready and not wrapping up or stopping."""
    lc = _lc(lifecycle)
    return lc._ready and not lc._stopping


def is_live(lifecycle: Lifecycle | None = None) -> bool:
    """True until the lifecycle has stopped: draining is alive, not dead."""
    return _lc(lifecycle).state() is not State.STOPPED


def set_drain_delay(seconds: float, lifecycle: Lifecycle | None = None) -> None:
    """Keep serving ``seconds`` after turning not-ready, before any server stops accepting.

    Raises:
        TypeError, ValueError: ``seconds`` is not a finite number >= 0.
    """
    _lc(lifecycle)._drain_delay = _check_delay(seconds, "set_drain_delay()")


def drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """The drain delay in seconds: the one set, else ``GRACEFUL_DRAIN_DELAY``, else 0."""
    lc = _lc(lifecycle)
    if lc._drain_delay is None:
        lc._drain_delay = _delay_from_env()
    return lc._drain_delay


def drain_delay_left(lifecycle: Lifecycle | None = None) -> float:
    """Seconds of the drain delay still to wait (0 once over, when it is 0, or before wrap-up).

    Counted from the first wrap-up trigger and bounded by the force-quit budget left; for
    asyncio servers, ``await asyncio.sleep(drain_delay_left())`` is the drain delay.
    """
    lc = _lc(lifecycle)
    delay = drain_delay(lc)
    started = lc._triggered_at
    if delay <= 0 or started is None:
        return 0.0
    left = started + delay - lc._clock.monotonic()
    remaining = lc.time_remaining()
    if remaining is not None:
        left = min(left, remaining)
    return max(left, 0.0)


def wait_drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """Block until the drain delay, counted from the first wrap-up trigger, has passed.

    Bounded by the force-quit budget left. Returns the seconds waited (0 when the delay was
    over already, was 0, or no wrap-up has started).
    """
    lc = _lc(lifecycle)
    left = drain_delay_left(lc)
    if left <= 0:
        return 0.0
    passed = threading.Event()
    now = lc._clock.monotonic()
    handle = lc._clock.call_at(now + left, passed.set, name="graceful-drain-delay")
    try:
        passed.wait()
    finally:
        handle.cancel()
    return lc._clock.monotonic() - now
