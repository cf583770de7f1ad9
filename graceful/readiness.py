"""Readiness for Kubernetes probes and load balancers, and the drain delay: the public face.

Why: when a pod is deleted, Kubernetes sends SIGTERM and removes the pod from its Service's
endpoints *at the same time*; proxies keep sending new connections for a few seconds more.
A server that closes its listening socket at once refuses them (the "endpoint race"). The
cure is to turn not-ready first, keep serving for a *drain delay*, and only then stop
accepting. Every web adapter waits the delay out at the start of its wrap-up, so one delay,
counted from the first wrap-up trigger, covers every server in the process.

* ready: ``run()`` marks the lifecycle ready once every server has started; it turns not-ready
  the moment wrap-up starts (a pause or a shutdown) and never back. A program that does not
  use ``run()`` calls :func:`set_ready` itself.
* live: True until the lifecycle has STOPPED (a liveness probe must not restart a pod that is
  draining).
* drain delay: ``set_drain_delay(seconds)`` or ``GRACEFUL_DRAIN_DELAY`` (seconds, default 0;
  or ``auto[:MAX]``: until the balancer has visibly stopped sending), bounded by what is left
  of the force-quit budget. The functions here are the public face of one object per
  lifecycle (graceful/_drain_delay.py says how it works).
* probes: ``serve_probes(port)`` (or ``GRACEFUL_PROBE_PORT`` under ``run()`` and the hosts)
  answers ``/readyz`` and ``/livez`` on one thread whatever its clients do (idle connections
  time out, the oldest is closed at a cap): graceful/_probe_server.py says how. Its port is
  opened with ``Lifecycle.listen()`` (unless ``reuse_port``): an upgrade in place passes it to
  the next generation, which answers the probes once it is ready.
* platform grace: ``check_platform_grace()`` warns at start when the drain delay plus the
  force-quit budget would outlast the grace Kubernetes or systemd give before SIGKILL.
"""

from __future__ import annotations

import logging

from ._current import or_default
from ._deadline import FLUSH_SLICE
from ._drain_delay import Traffic, drain_delay_of
from ._lifecycle import Lifecycle, State, budget, set_defaults
from ._probe_server import ProbeServer
from ._settings import (
    ENV_DRAIN_DELAY,
    ENV_FORCE_QUIT,
    ENV_WRAP_UP_TIMEOUT,
    DrainDelaySetting,
    Settings,
    parse_drain_delay,
)

__all__ = [
    "DrainDelaySetting",
    "ProbeServer",
    "Traffic",
    "check_platform_grace",
    "configure_from_env",
    "drain_delay",
    "drain_delay_is_auto",
    "drain_delay_left",
    "fit_drain_delay",
    "is_live",
    "is_ready",
    "serve_probes",
    "serve_probes_from_env",
    "set_drain_delay",
    "set_ready",
    "traffic",
    "wait_drain_delay",
    "wait_drain_delay_async",
]

log = logging.getLogger("graceful")

# Its public home: help() and the API reference say so.
ProbeServer.__module__ = __name__


def _lc(lifecycle: Lifecycle | None) -> Lifecycle:
    return or_default(lifecycle, "graceful.readiness")


def set_ready(lifecycle: Lifecycle | None = None) -> None:
    """Say the service accepts work (``run()`` does this once every server has started)."""
    drain_delay_of(_lc(lifecycle)).ready = True


def is_ready(lifecycle: Lifecycle | None = None) -> bool:
    """True while the service takes new work: marked ready and not wrapping up or stopping."""
    lc = _lc(lifecycle)
    return drain_delay_of(lc).ready and not lc.is_stopping()


def is_live(lifecycle: Lifecycle | None = None) -> bool:
    """True until the lifecycle has stopped: draining is alive, not dead."""
    return _lc(lifecycle).state() is not State.STOPPED


# -- the drain delay --------------------------------------------------------------------------------


def set_drain_delay(seconds: float | str, lifecycle: Lifecycle | None = None) -> None:
    """Keep serving after turning not-ready, before any server stops accepting.

    ``seconds``: a number (a fixed delay), ``"auto"`` or ``"auto:MAX"`` (serve until the
    balancer has visibly stopped sending, at most MAX s: see docs/deploys.md).

    Raises:
        TypeError, ValueError: anything else (a negative number, NaN, ``"auto:0"``, ...).
    """
    setting = parse_drain_delay(seconds, "set_drain_delay()")
    drain_delay_of(_lc(lifecycle)).set(setting)


def drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """The drain delay in seconds (for ``auto``, its bound): the one set, else
    ``GRACEFUL_DRAIN_DELAY``, else 0.

    Raises:
        ValueError: ``GRACEFUL_DRAIN_DELAY`` is neither seconds nor ``auto[:MAX]``.
    """
    return drain_delay_of(_lc(lifecycle)).setting.seconds


def drain_delay_is_auto(lifecycle: Lifecycle | None = None) -> bool:
    """True when the drain delay is ``auto``: it ends once the balancer has stopped sending."""
    return drain_delay_of(_lc(lifecycle)).setting.auto


def drain_delay_left(lifecycle: Lifecycle | None = None) -> float:
    """Seconds to wait before the drain delay can be over (0 once over, when it is 0, or
    before wrap-up); counted from the first wrap-up trigger, bounded by the budget left.

    A fixed delay: what is left of it. ``auto``: the earliest moment it could end; wait that
    long and ask again until 0 (or call :func:`wait_drain_delay` /
    :func:`wait_drain_delay_async`, which also wake when a probe is answered 503).
    """
    return drain_delay_of(_lc(lifecycle)).left()


def wait_drain_delay(lifecycle: Lifecycle | None = None) -> float:
    """Block until the drain delay, counted from the first wrap-up trigger, is over.

    Bounded by the force-quit budget left. Returns the seconds waited (0 when the delay was
    over already, was 0, or no wrap-up has started).
    """
    return drain_delay_of(_lc(lifecycle)).wait()


async def wait_drain_delay_async(lifecycle: Lifecycle | None = None) -> float:
    """:func:`wait_drain_delay` for a server on an event loop: it waits on the loop."""
    return await drain_delay_of(_lc(lifecycle)).wait_async()


def traffic(lifecycle: Lifecycle | None = None) -> Traffic:
    """Where a server reports each request's arrival (``.arrived()``), so that an ``auto``
    drain delay sees it. graceful's adapters do it themselves."""
    return drain_delay_of(_lc(lifecycle)).traffic


# -- the probe endpoint ----------------------------------------------------------------------------


def serve_probes(
    port: int = 0, host: str = "127.0.0.1", lifecycle: Lifecycle | None = None, *, reuse_port: bool = False
) -> ProbeServer:
    """Answer Kubernetes probes on ``host:port`` (``port=0``: any free port, see ``.port``).

    ``reuse_port=True`` binds with ``SO_REUSEPORT`` (Linux, BSD): several processes each answer
    on the same port, each connection going to one of them (graceful.gunicorn's workers).

    ``run()`` starts one by itself when ``GRACEFUL_PROBE_PORT`` is set (on every interface,
    ``GRACEFUL_PROBE_HOST`` to change it, since the kubelet probes the pod's IP). Close it after
    ``run()`` returns, not in a shutdown listener: ``/livez`` must answer until the end.

    Raises:
        ValueError: ``port`` is not a port number.
        RuntimeError: the port cannot be bound (in use, say); the message says what to do.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"serve_probes(port=...) must be a port number 0-65535; got {port!r}")
    return ProbeServer(_lc(lifecycle), host, port, reuse_port=reuse_port)


def serve_probes_from_env(
    lifecycle: Lifecycle, settings: Settings | None = None, *, reuse_port: bool = False
) -> ProbeServer | None:
    """The probes ``run()`` and the hosts serve: on ``GRACEFUL_PROBE_PORT`` (None and nothing
    served when it is unset), on ``GRACEFUL_PROBE_HOST`` or every interface (the kubelet probes
    the pod's IP), as ``settings`` read them (read now if None). Logs the port.
    ``reuse_port``: as for :func:`serve_probes`.

    Raises:
        ValueError: a ``GRACEFUL_*`` variable is not usable (``settings`` None).
        RuntimeError: the port cannot be bound.
    """
    settings = Settings.read() if settings is None else settings
    if settings.probe_port is None:
        return None
    probes = serve_probes(settings.probe_port, settings.probe_host, lifecycle, reuse_port=reuse_port)
    log.info("answering probes on port %d (/readyz, /livez)", probes.port)
    return probes


def configure_from_env(
    lifecycle: Lifecycle, settings: Settings | None = None, *, budget: float | None = None
) -> Settings:
    """What ``run()`` and every host do first, before anything runs; returns the settings.

    Reads every ``GRACEFUL_*`` variable at once unless ``settings`` were read already (a bad
    one is a ``ValueError`` that names it, before anything changes); then gives ``lifecycle``
    the environment's force-quit budget (or ``budget``, a host's own default, when
    ``GRACEFUL_FORCE_QUIT`` is unset) unless the program chose one, and the environment's drain
    delay unless one was set; then fits the drain delay to the budget
    (:func:`fit_drain_delay`) and warns if the platform's grace is too short
    (:func:`check_platform_grace`).
    """
    settings = Settings.read() if settings is None else settings
    set_defaults(
        lifecycle,
        budget=settings.force_quit if settings.force_quit is not None else budget,
        wrap_up_timeout=settings.wrap_up_timeout,
        source="GRACEFUL_FORCE_QUIT / GRACEFUL_WRAP_UP_TIMEOUT"
        if settings.force_quit is not None or settings.wrap_up_timeout is not None
        else "the host",
    )
    drain_delay_of(lifecycle).default(settings.drain_delay)
    fit_drain_delay(lifecycle)
    check_platform_grace(lifecycle, settings)
    return settings


# -- the drain delay within the budget --------------------------------------------------------------

DRAIN_ROOM = 1.0
"""Seconds a drain delay must end before the wrap-up timeout, so that the requests in flight can
finish within the wrap-up phase (the rest of the budget is the shutdown listeners'); half the
wrap-up timeout when that is 2 s or less, the rule gunicorn's host uses within ``graceful_timeout``."""


def _room_for_the_drain(seconds: float) -> float:
    """What a wrap-up timeout of ``seconds`` keeps for the drain after the delay:
    :data:`DRAIN_ROOM`, or half of it when it is 2 s or less."""
    return DRAIN_ROOM if seconds > 2 * DRAIN_ROOM else seconds / 2


def fit_drain_delay(lifecycle: Lifecycle | None = None) -> str | None:
    """Fit the drain delay to the force-quit budget, at start; returns what was logged, or None.

    The delay counts from the first wrap-up trigger and the deadline from the shutdown (one
    moment, at SIGTERM), so a delay that reaches the budget ends every stop in the forced exit,
    on an idle server too; one that reaches the wrap-up timeout (what a drain may take, the rest
    of the budget being the shutdown listeners') leaves the drain no time. So the delay must end
    :data:`DRAIN_ROOM` s before the wrap-up timeout. ``auto`` is cut to that (an INFO line says
    so): it ends sooner than its maximum only when the balancer is seen to stop. A fixed delay
    is the operator's number, so it is kept and said at WARNING, with the numbers and what to
    change: a warning and not an error because the service works (it serves, drains, and the
    deadline's report says what was cut), and the contract says so (docs/kubernetes.md).
    ``run()`` and the hosts call it once, from :func:`configure_from_env`.
    """
    lc = _lc(lifecycle)
    delay = drain_delay_of(lc)
    setting, seconds, wrap_up = delay.setting, budget(lc), lc.wrap_up_timeout
    room = _room_for_the_drain(wrap_up)
    most = wrap_up - room
    if setting.seconds <= most:
        return None
    if setting.auto:
        delay.set(DrainDelaySetting(most, auto=True))
        line = (
            f"drain delay {setting}: at most {most:g} s, to end {room:g} s before the wrap-up timeout "
            f"({wrap_up:g} s of the {seconds:g} s force-quit budget) so that the requests in flight can "
            f"finish; a longer budget ({ENV_FORCE_QUIT}; under gunicorn, --graceful-timeout) or wrap-up "
            f"timeout ({ENV_WRAP_UP_TIMEOUT}) lets it run longer"
        )
        log.info("%s", line)
        return line
    if setting.seconds + _room_for_the_drain(seconds) > seconds:
        then = "every stop would end in graceful's forced exit (70) once the delay is over"
    else:
        then = (
            f"the requests in flight and the shutdown listeners would share the "
            f"{seconds - setting.seconds:g} s left of the budget"
        )
    line = (
        f"the drain delay ({setting.seconds:g} s) leaves the drain no room in the force-quit budget "
        f"({seconds:g} s, wrap-up timeout {wrap_up:g} s): {then}. Set {ENV_DRAIN_DELAY} to at most "
        f"{most:g} s, or give the drain more time ({ENV_FORCE_QUIT}, {ENV_WRAP_UP_TIMEOUT}; under "
        f"gunicorn, --graceful-timeout)"
    )
    log.warning("%s", line)
    return line


# -- the platform's grace --------------------------------------------------------------------------


def check_platform_grace(lifecycle: Lifecycle | None = None, settings: Settings | None = None) -> str | None:
    """Warn when graceful's latest exit would come after the platform's SIGKILL.

    The grace comes from ``GRACEFUL_TERMINATION_GRACE`` (Kubernetes'
    ``terminationGracePeriodSeconds``) or ``GRACEFUL_TIMEOUT_STOP_SEC`` (systemd's
    ``TimeoutStopSec``: seconds or a systemd time span such as ``1min 30s``; 0 or
    ``infinity`` is no limit), the shorter if both are set; neither platform tells the process
    (see docs/kubernetes.md and docs/systemd.md). Past it the platform sends SIGKILL and
    graceful never writes its report of what was stuck (SolidQueue #653). The latest exit is the
    force-quit budget plus the flush slice after the report (at most 1 s); the drain delay is
    spent inside the budget, so it does not add to it. ``run()`` and the
    hosts call this once at start, with the ``settings`` they read (read now if None). Returns
    the warning (also logged at WARNING on ``graceful``), or None.

    Raises:
        ValueError: one of the variables is not a duration.
    """
    lc = _lc(lifecycle)
    found = (Settings.read() if settings is None else settings).platform_grace
    if found is None:
        return None
    grace, where = found
    seconds = budget(lc)
    needed = seconds + FLUSH_SLICE
    if needed < grace:
        return None
    warning = (
        f"the force-quit budget ({seconds:g} s) and the last flush slice ({FLUSH_SLICE:g} s) end "
        f"{needed:g} s after SIGTERM, not before the platform's grace of {grace:g} s ({where}): the "
        f"process could be SIGKILLed before graceful reports what is stuck. Lower GRACEFUL_FORCE_QUIT, "
        f"or give the process more time"
    )
    log.warning("%s", warning)
    return warning
