"""The drain delay: how long the servers keep serving after readiness turned 503.

Why: a balancer keeps sending for a while after a process starts to stop (the "endpoint
race"); a server that closes its listening socket at once refuses those requests. So every web
adapter turns not-ready first, keeps serving for the drain delay, and only then stops
accepting. One delay, counted from the first wrap-up trigger and bounded by the force-quit
budget left, covers every server in the process. It is said two ways:

* **fixed** (``GRACEFUL_DRAIN_DELAY=5``): right when the balancer learns of the 503 through a
  control plane whose lag the process cannot see (a Kubernetes Service: the endpoint list is
  propagated to kube-proxy and the ingress seconds later), or when its probe period is long.
* **auto** (``GRACEFUL_DRAIN_DELAY=auto``, ``auto:MAX``): keep serving only until the balancer
  has *visibly* stopped: no new request for :data:`AUTO_QUIET` s, counted from the latest of
  the last request, the wrap-up trigger and the first probe answered 503, and, when this
  process serves probes, at least one probe answered 503; at most ``MAX`` s (default
  :data:`AUTO_MAX`). A fixed delay must outlast the slowest balancer, so it is paid in full on
  every restart; behind a balancer that probes ``/readyz`` itself (HAProxy, nginx, an AWS
  target group) ``auto`` ends as soon as the balancer has acted on the 503.

What it watches: each web adapter calls :meth:`Traffic.arrived` once per request (one float
stored); the probe server calls :func:`probe_refused` when it answers ``/readyz`` with 503
during a wrap-up, which wakes the waiters at once. The state lives here, per lifecycle, in a
``WeakKeyDictionary``: the lifecycle itself knows nothing of it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

from ._checks import TYPE_CHECKING, check_seconds
from ._lifecycle import Lifecycle

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "AUTO_MAX",
    "AUTO_QUIET",
    "ENV_DRAIN_DELAY",
    "DrainDelay",
    "Traffic",
    "drain_delay_ended_why",
    "drain_delay_left",
    "drain_delay_setting",
    "parse_drain_delay",
    "probe_refused",
    "probes_served",
    "set_drain_delay_setting",
    "traffic",
    "wait_drain_delay",
    "wait_drain_delay_async",
]

ENV_DRAIN_DELAY = "GRACEFUL_DRAIN_DELAY"

AUTO_QUIET = 0.05
"""Seconds without a new request after which ``auto`` takes the balancer to have stopped
sending. It only has to cover requests already on their way when the balancer acted on the
503 (well under a millisecond on loopback, a few on a LAN): the 503 answered to a probe is
what says the balancer knows, and a request that has reached an open connection is served
whatever the window. Every 50 ms of it is paid on every restart."""

AUTO_MAX = 10.0
"""The bound of a plain ``auto``: HAProxy's default check (``inter 2s fall 3``) takes 6 s to
mark a server down."""

_HOW = "a number of seconds such as 5, or auto (auto:MAX to bound it, such as auto:10)"


class DrainDelay:
    """A drain delay setting: ``seconds`` (fixed), or ``auto`` with ``seconds`` as its bound."""

    __slots__ = ("auto", "seconds")

    def __init__(self, seconds: float, *, auto: bool = False) -> None:
        self.seconds = seconds
        self.auto = auto

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DrainDelay):
            return NotImplemented
        return (self.seconds, self.auto) == (other.seconds, other.auto)

    def __hash__(self) -> int:
        return hash((self.seconds, self.auto))

    def __repr__(self) -> str:
        return f"DrainDelay({self.seconds:g}, auto={self.auto})"

    def __str__(self) -> str:
        return f"auto:{self.seconds:g}" if self.auto else f"{self.seconds:g} s"


def parse_drain_delay(value: object, where: str, *, from_text: bool = False) -> DrainDelay:
    """A number of seconds >= 0, ``"auto"`` or ``"auto:MAX"`` (MAX > 0) as a :class:`DrainDelay`.

    ``from_text`` (an environment variable): a number written as text is taken too; from
    Python, ``"5"`` is a ``TypeError`` like every other number of seconds given as a string.

    Raises:
        TypeError, ValueError: anything else; the message names ``where`` and says what to set.
    """
    if not isinstance(value, str):
        return DrainDelay(check_seconds(value, where, zero=True, example="5"))
    text = value.strip().lower()
    if text == "auto":
        return DrainDelay(AUTO_MAX, auto=True)
    if not text.startswith("auto:") and not from_text:
        raise TypeError(f"{where} takes {_HOW}, not {value!r}")
    bound = text[5:] if text.startswith("auto:") else None
    try:
        number = float(text if bound is None else bound)
    except ValueError:
        raise ValueError(f"{where} takes {_HOW}, not {value!r}") from None
    if bound is None:
        return DrainDelay(check_seconds(number, where, zero=True, example="5"))
    return DrainDelay(check_seconds(number, f"{where} (the MAX of auto:MAX)", example="10"), auto=True)


class Traffic:
    """The requests a lifecycle's servers receive, as an ``auto`` drain delay watches them.

    A server that graceful's adapters do not run calls ``traffic(lifecycle).arrived()`` once
    per request, so that ``auto`` sees its requests too. Every request pays it, so it is an
    attribute store and no lock: of two arrivals at the same moment on two threads either may be
    the one kept, microseconds apart, which is nothing to a quiet window of :data:`AUTO_QUIET`.
    The adapters write ``last = now()`` inline, without the method call.
    """

    __slots__ = ("last", "now")

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        """The lifecycle's clock (``time.monotonic`` itself for the real one: a C call)."""
        self.last: float | None = None
        """When the latest request arrived (on the lifecycle's clock), None before the first."""

    def arrived(self) -> None:
        """A request arrived (call it once per request, from any thread)."""
        self.last = self.now()


class _State:
    """What this module keeps for one lifecycle."""

    __slots__ = ("ended_why", "lock", "probes", "refused_at", "setting", "traffic", "wakers")

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lock = threading.Lock()
        self.setting: DrainDelay | None = None  # None until first read: the environment is read then
        self.traffic = Traffic(lifecycle.clock.monotonic)
        self.probes = 0  # probe servers answering for this lifecycle
        self.refused_at: float | None = None  # the first /readyz answered 503 in a wrap-up
        self.wakers: set[Callable[[], None]] = set()
        self.ended_why: str | None = None


_states: weakref.WeakKeyDictionary[Lifecycle, _State] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _of(lifecycle: Lifecycle) -> _State:
    found = _states.get(lifecycle)
    if found is None:
        with _states_lock:
            found = _states.setdefault(lifecycle, _State(lifecycle))
    return found


def set_drain_delay_setting(lifecycle: Lifecycle, setting: DrainDelay) -> None:
    """Set the lifecycle's drain delay (``readiness.set_drain_delay`` checks the input first)."""
    _of(lifecycle).setting = setting


def drain_delay_setting(lifecycle: Lifecycle) -> DrainDelay:
    """The setting: the one set, else ``GRACEFUL_DRAIN_DELAY``, else 0 s.

    Raises:
        ValueError: ``GRACEFUL_DRAIN_DELAY`` is neither seconds nor ``auto[:MAX]``.
    """
    state = _of(lifecycle)
    if state.setting is None:
        raw = os.environ.get(ENV_DRAIN_DELAY, "").strip()
        if not raw:
            state.setting = DrainDelay(0.0)
        else:
            try:
                state.setting = parse_drain_delay(raw, ENV_DRAIN_DELAY, from_text=True)
            except (TypeError, ValueError):
                raise ValueError(f"{ENV_DRAIN_DELAY}={raw!r}: set it to {_HOW}, or unset it") from None
    return state.setting


def traffic(lifecycle: Lifecycle) -> Traffic:
    """The lifecycle's :class:`Traffic`: servers report each request's arrival to it."""
    return _of(lifecycle).traffic


def probes_served(lifecycle: Lifecycle, change: int) -> None:
    """A probe server for ``lifecycle`` started (+1) or closed (-1)."""
    state = _of(lifecycle)
    with state.lock:
        state.probes += change


def probe_refused(lifecycle: Lifecycle) -> None:
    """A probe was answered 503 (not ready): once in a wrap-up, the balancer has been told."""
    started = lifecycle.triggered_at
    if started is None:
        return  # not ready yet at start-up, not a wrap-up
    state = _of(lifecycle)
    with state.lock:
        if state.refused_at is None:
            state.refused_at = max(lifecycle.clock.monotonic(), started)
        wakers = list(state.wakers)
    for wake in wakers:
        wake()


def drain_delay_ended_why(lifecycle: Lifecycle) -> str | None:
    """Why the lifecycle's ``auto`` drain delay ended (for the log), None until it has."""
    return _of(lifecycle).ended_why


def drain_delay_left(lifecycle: Lifecycle) -> float:
    """Seconds to wait before the drain delay can be over; 0 once it is (or before a wrap-up).

    Fixed: what is left of it. ``auto``: the earliest moment it could end, so wait that long
    and ask again until 0 (a probe answered 503 can end it sooner: :func:`wait_drain_delay`
    wakes for it). Bounded by the force-quit budget left.
    """
    setting = drain_delay_setting(lifecycle)
    started = lifecycle.triggered_at
    if setting.seconds <= 0 or started is None:
        return 0.0
    now = lifecycle.clock.monotonic()
    end = started + setting.seconds
    remaining = lifecycle.time_remaining()
    if remaining is not None:
        end = min(end, now + remaining)
    if now >= end:
        if setting.auto:
            budget_first = end < started + setting.seconds
            _ended(
                lifecycle, "the force-quit budget ran out" if budget_first else f"at its maximum of {setting}"
            )
        return 0.0
    if not setting.auto:
        return end - now
    state = _of(lifecycle)
    with state.lock:
        probes, refused_at = state.probes, state.refused_at
    last = state.traffic.last
    if probes and refused_at is None:
        return end - now  # no balancer has been told yet: a probe answered 503 wakes the waiter
    quiet_from = max(t for t in (started, refused_at, last) if t is not None)
    due = quiet_from + AUTO_QUIET
    if now >= due:
        told = ", a probe answered 503" if probes else " (no probes served)"
        _ended(lifecycle, f"no new request for {AUTO_QUIET:g} s{told}")
        return 0.0
    return min(due, end) - now


def _ended(lifecycle: Lifecycle, why: str) -> None:
    state = _of(lifecycle)
    if state.ended_why is None:
        state.ended_why = why


def wait_drain_delay(lifecycle: Lifecycle) -> float:
    """Block until the drain delay is over; the seconds waited (0 if it was over already)."""
    clock = lifecycle.clock
    state = _of(lifecycle)
    woken = threading.Event()
    begun = clock.monotonic()
    with state.lock:
        state.wakers.add(woken.set)
    try:
        while True:
            woken.clear()
            left = drain_delay_left(lifecycle)
            if left <= 0:
                return clock.monotonic() - begun
            handle = clock.call_at(clock.monotonic() + left, woken.set, name="graceful-drain-delay")
            try:
                woken.wait()
            finally:
                handle.cancel()
    finally:
        with state.lock:
            state.wakers.discard(woken.set)


async def wait_drain_delay_async(lifecycle: Lifecycle) -> float:
    """:func:`wait_drain_delay` on an event loop: sleeps on the loop, no thread held."""
    import asyncio  # only servers that already run a loop call this

    loop = asyncio.get_running_loop()
    clock = lifecycle.clock
    state = _of(lifecycle)
    woken = asyncio.Event()

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(woken.set)

    begun = clock.monotonic()
    with state.lock:
        state.wakers.add(wake)
    try:
        while True:
            woken.clear()
            left = drain_delay_left(lifecycle)
            if left <= 0:
                return clock.monotonic() - begun
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(woken.wait(), left)
    finally:
        with state.lock:
            state.wakers.discard(wake)
