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
  process serves probes, at least one probe answered 503; at most ``MAX`` s (default 10). A
  fixed delay must outlast the slowest balancer, so it is paid in full on every restart;
  behind a balancer that probes ``/readyz`` itself (HAProxy, nginx, an AWS target group)
  ``auto`` ends as soon as the balancer has acted on the 503.

One object per lifecycle, ``DrainDelay`` (``drain_delay_of(lifecycle)``), holds all of it, as
trio's ``CancelScope`` or httpx's ``Timeout`` hold theirs: whether the service is ready, the
setting, what ``auto`` watches (each web adapter stores each request's arrival in
:class:`Traffic`; the probe server reports each ``/readyz`` answered 503 during a wrap-up,
which wakes the waiters at once), what is left of the delay, the waits, and their lines in the
log (a silent gap of seconds after "wrapping up" reads like a hang). The lifecycle itself knows
nothing of it; ``graceful.readiness`` is its public face.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref

from ._checks import TYPE_CHECKING
from ._lifecycle import Lifecycle, triggered_at
from ._lifecycle import clock as clock_of
from ._settings import DrainDelaySetting, read_drain_delay

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["AUTO_QUIET", "DrainDelay", "Traffic", "drain_delay_of"]

log = logging.getLogger("graceful")

AUTO_QUIET = 0.05
"""Seconds without a new request after which ``auto`` takes the balancer to have stopped
sending. It only has to cover requests already on their way when the balancer acted on the
503 (well under a millisecond on loopback, a few on a LAN): the 503 answered to a probe is
what says the balancer knows, and a request that has reached an open connection is served
whatever the window. Every 50 ms of it is paid on every restart."""


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


class DrainDelay:
    """One lifecycle's readiness and drain delay; ``drain_delay_of(lifecycle)`` finds it."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._clock = clock_of(lifecycle)
        self._lock = threading.Lock()
        self._setting: DrainDelaySetting | None = None
        """The setting; None until first read (from the environment, then)."""
        self.ready = False
        """Marked by ``run()`` (or a host) once every server accepts work; readiness itself is
        ``ready and not lifecycle.is_stopping()``."""
        self.traffic = Traffic(self._clock.monotonic)
        self._probes = 0
        """Probe servers answering for this lifecycle."""
        self._refused_at: float | None = None
        """When a /readyz was first answered 503 in a wrap-up."""
        self._wakers: set[Callable[[], None]] = set()
        self.ended_why: str | None = None
        """Why an ``auto`` delay ended (for the log), None until it has."""

    # -- the setting ------------------------------------------------------------------------------

    @property
    def setting(self) -> DrainDelaySetting:
        """The one set, else ``GRACEFUL_DRAIN_DELAY`` (read now, once), else 0 s.

        Raises:
            ValueError: ``GRACEFUL_DRAIN_DELAY`` is neither seconds nor ``auto[:MAX]``.
        """
        setting = self._setting
        if setting is None:
            setting = self._setting = read_drain_delay() or DrainDelaySetting(0.0)
        return setting

    def set(self, setting: DrainDelaySetting) -> None:
        """Use ``setting`` (checked by the caller)."""
        self._setting = setting

    def default(self, setting: DrainDelaySetting | None) -> None:
        """Use ``setting`` (the environment's, read at start) unless one was set already."""
        if self._setting is None:
            self._setting = setting or DrainDelaySetting(0.0)

    # -- what auto watches --------------------------------------------------------------------

    def probes_served(self, change: int) -> None:
        """A probe server for this lifecycle started (+1) or closed (-1)."""
        with self._lock:
            self._probes += change

    def probe_refused(self) -> None:
        """A probe was answered 503 (not ready): once in a wrap-up, the balancer has been told."""
        started = triggered_at(self._lifecycle)
        if started is None:
            # Not ready yet at start-up, not a wrap-up.
            return
        with self._lock:
            if self._refused_at is None:
                self._refused_at = max(self._clock.monotonic(), started)
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # -- what is left, and the waits ----------------------------------------------------------

    def left(self) -> float:
        """Seconds to wait before the delay can be over; 0 once it is (or before a wrap-up).

        Fixed: what is left of it. ``auto``: the earliest moment it could end, so wait that long
        and ask again until 0 (a probe answered 503 can end it sooner: ``wait()`` wakes for it).
        Bounded by the force-quit budget left.
        """
        setting = self.setting
        started = triggered_at(self._lifecycle)
        if setting.seconds <= 0 or started is None:
            return 0.0
        now = self._clock.monotonic()
        end = started + setting.seconds
        remaining = self._lifecycle.time_remaining()
        if remaining is not None:
            end = min(end, now + remaining)
        if now >= end:
            if setting.auto and self.ended_why is None:
                budget_first = end < started + setting.seconds
                self.ended_why = (
                    "the force-quit budget ran out" if budget_first else f"at its maximum of {setting}"
                )
            return 0.0
        if not setting.auto:
            return end - now
        with self._lock:
            probes, refused_at = self._probes, self._refused_at
        last = self.traffic.last
        if probes and refused_at is None:
            # No balancer has been told yet: a probe answered 503 wakes the waiter.
            return end - now
        quiet_from = max(t for t in (started, refused_at, last) if t is not None)
        due = quiet_from + AUTO_QUIET
        if now >= due:
            if self.ended_why is None:
                told = ", a probe answered 503" if probes else " (no probes served)"
                self.ended_why = f"no new request for {AUTO_QUIET:g} s{told}"
            return 0.0
        return min(due, end) - now

    def wait(self) -> float:
        """Block until the delay is over; the seconds waited (0 if it was over already)."""
        changed = threading.Condition(threading.Lock())
        # A wake between a look at left() and the wait is not lost.
        woken = [False]

        def wake() -> None:
            with changed:
                woken[0] = True
                changed.notify_all()

        begun = self._clock.monotonic()
        with self._lock:
            self._wakers.add(wake)
        try:
            while True:
                with changed:
                    woken[0] = False
                left = self.left()
                if left <= 0:
                    return self._clock.monotonic() - begun
                with changed:
                    if not woken[0]:
                        self._clock.wait_until(changed, self._clock.monotonic() + left)
        finally:
            with self._lock:
                self._wakers.discard(wake)

    async def wait_async(self) -> float:
        """``wait()`` on an event loop: it sleeps on the loop, no thread held."""
        # Imported here: only servers that already run a loop call this.
        import asyncio

        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            # The loop has closed: nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(woken.set)

        begun = self._clock.monotonic()
        with self._lock:
            self._wakers.add(wake)
        try:
            while True:
                woken.clear()
                left = self.left()
                if left <= 0:
                    return self._clock.monotonic() - begun
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), left)
        finally:
            with self._lock:
                self._wakers.discard(wake)

    # -- the same, said in the log (what every adapter calls) -----------------------------------
    #
    # Each web adapter waits where it belongs in its own wrap-up (after what must happen first,
    # such as gRPC's health turning NOT_SERVING). ``run()``'s wrap-up steps run one after another
    # and the delay is counted from the first trigger, so only the first adapter waits and
    # speaks; the others find it over and say nothing, as they do when the delay is 0.

    def wait_said(self) -> None:
        """``wait()``, with its start and end in the log (nothing if none is left)."""
        if self._left_said() > 0:
            self._said_over(self.wait())

    async def wait_said_async(self) -> None:
        """``wait_said()`` on an event loop: it waits on the loop, not ``wait()`` in the default
        executor, whose threads the app's own ``run_in_executor()`` calls may all hold."""
        if self._left_said() > 0:
            self._said_over(await self.wait_async())

    def _left_said(self) -> float:
        left = self.left()
        if left > 0:
            if self.setting.auto:
                log.info(
                    "drain delay (auto): serving until the balancer stops sending, at most %.1f s (not ready)",
                    self.setting.seconds,
                )
            else:
                log.info(
                    "drain delay: serving %.1f s more while the balancer stops sending (not ready)", left
                )
        return left

    def _said_over(self, waited: float) -> None:
        why = self.ended_why if self.setting.auto else None
        if why:
            log.info("drain delay over after %.2f s (%s): the servers stop accepting", waited, why)
        else:
            log.info("drain delay over: the servers stop accepting")


_of: weakref.WeakKeyDictionary[Lifecycle, DrainDelay] = weakref.WeakKeyDictionary()
_of_lock = threading.Lock()


def drain_delay_of(lifecycle: Lifecycle) -> DrainDelay:
    """``lifecycle``'s ``DrainDelay`` (made on first use; it goes with the lifecycle)."""
    found = _of.get(lifecycle)
    if found is None:
        with _of_lock:
            found = _of.setdefault(lifecycle, DrainDelay(lifecycle))
    return found
