"""The ``GRACEFUL_*`` environment: read in one place, when a service starts, never at import.

Why: a test runner, a linter or a docs build that imports ``graceful`` must never fail because
of a deployment variable (``GRACEFUL_FORCE_QUIT=abc python -c "import graceful"`` used to raise).
And a service must not start half-configured: uvicorn's ``Config`` reads its environment once,
at construction, and refuses what it cannot use. So every variable is known here, read by
``Settings.read()`` when ``run()`` or a host (gunicorn, the ASGI lifespan, Celery) starts, and
a bad value is a ``ValueError`` there that names the variable and says what to set. A program
that starts nothing of graceful's (its own main loop, a library) gets the force-quit budget
read when the deadline is armed, and the drain delay when it is first needed.

The variables:

* ``GRACEFUL_FORCE_QUIT``: the force-quit budget in seconds (default 25).
* ``GRACEFUL_WRAP_UP_TIMEOUT``: the longest the wrap-up phase may take, in seconds from the
  shutdown trigger (default: the budget minus ``min(5 s, budget / 5)``).
* ``GRACEFUL_DRAIN_DELAY``: seconds, or ``auto[:MAX]`` (docs/deploys.md).
* ``GRACEFUL_PROBE_PORT`` / ``GRACEFUL_PROBE_HOST``: where ``/readyz`` and ``/livez`` answer.
* ``GRACEFUL_TERMINATION_GRACE``: Kubernetes' ``terminationGracePeriodSeconds``, which the
  downward API does not expose, passed by hand (whole seconds; a preStop hook's time counts
  against it; 0 means no grace at all).
* ``GRACEFUL_TIMEOUT_STOP_SEC``: systemd's ``TimeoutStopSec``, which is not in a service's
  environment (graceful queries nothing: no D-Bus, no ``systemctl`` from inside a service),
  copied from the unit in seconds or systemd's time-span syntax (``90``, ``1min 30s``,
  ``infinity``); 0 and ``infinity`` mean no timeout, as in systemd.

Those two are the platform's grace before SIGKILL (SolidQueue #653: when it is shorter than the
service's own shutdown timeout, the SIGKILL comes first and nothing says what was stuck).

* ``GRACEFUL_CELERY_RESEND_EARLY_ACKED``: ``1`` (or ``true``, ``yes``, ``on``) and the Celery
  host sends again, at graceful's deadline, each task it cuts that was acknowledged when it
  started; ``0`` (``false``, ``no``, ``off``) or unset: they are reported lost
  (docs/hosts/celery.md).
* ``GRACEFUL_UPGRADE_TIMEOUT``: the longest a new generation started by SIGUSR2 may take to be
  ready before it is stopped and the old one keeps serving (default 30 s; docs/deploys.md).

Not a setting: ``GRACEFUL_UPGRADE``, which one generation sets for the next to describe the
sockets and pipes it hands down (a protocol like systemd's ``LISTEN_FDS``), is read by
``_sockets`` when the next generation starts.
"""

from __future__ import annotations

import os
import re

from ._checks import TYPE_CHECKING, check_seconds, port_number
from ._listeners import Frozen

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "AUTO_MAX",
    "ENV_CELERY_RESEND",
    "ENV_DRAIN_DELAY",
    "ENV_FORCE_QUIT",
    "ENV_PROBE_HOST",
    "ENV_PROBE_PORT",
    "ENV_TERMINATION_GRACE",
    "ENV_TIMEOUT_STOP_SEC",
    "ENV_UPGRADE_TIMEOUT",
    "ENV_WRAP_UP_TIMEOUT",
    "UPGRADE_TIMEOUT",
    "DrainDelaySetting",
    "Settings",
    "parse_drain_delay",
    "parse_timespan",
    "read_budget",
    "read_drain_delay",
    "read_wrap_up_timeout",
]

ENV_FORCE_QUIT = "GRACEFUL_FORCE_QUIT"
ENV_WRAP_UP_TIMEOUT = "GRACEFUL_WRAP_UP_TIMEOUT"
ENV_DRAIN_DELAY = "GRACEFUL_DRAIN_DELAY"
ENV_PROBE_PORT = "GRACEFUL_PROBE_PORT"
ENV_PROBE_HOST = "GRACEFUL_PROBE_HOST"
ENV_TERMINATION_GRACE = "GRACEFUL_TERMINATION_GRACE"
ENV_TIMEOUT_STOP_SEC = "GRACEFUL_TIMEOUT_STOP_SEC"
ENV_UPGRADE_TIMEOUT = "GRACEFUL_UPGRADE_TIMEOUT"

UPGRADE_TIMEOUT = 30.0
"""Seconds a new generation may take to be ready (``GRACEFUL_UPGRADE_TIMEOUT``): an import and a
lifespan startup, with room; systemd's own ``TimeoutStartSec`` defaults to 90 s."""
ENV_CELERY_RESEND = "GRACEFUL_CELERY_RESEND_EARLY_ACKED"

AUTO_MAX = 10.0
"""The bound of a plain ``auto`` drain delay: HAProxy's default check (``inter 2s fall 3``)
takes 6 s to mark a server down."""

_HOW_DRAIN = "a number of seconds such as 5, or auto (auto:MAX to bound it, such as auto:10)"


def _raw(name: str, environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(name, "").strip()


def _seconds(name: str, environ: Mapping[str, str] | None, *, zero: bool = False) -> float | None:
    raw = _raw(name, environ)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not a number: set it to a number of seconds such as 5, or unset it"
        ) from None
    return check_seconds(value, name, zero=zero)


def read_budget(environ: Mapping[str, str] | None = None) -> float | None:
    """``GRACEFUL_FORCE_QUIT`` in seconds, None when unset.

    Raises:
        ValueError: set to something that is not a number of seconds > 0; the message names it.
    """
    return _seconds(ENV_FORCE_QUIT, environ)


def read_wrap_up_timeout(environ: Mapping[str, str] | None = None) -> float | None:
    """``GRACEFUL_WRAP_UP_TIMEOUT`` in seconds, None when unset.

    Raises:
        ValueError: set to something that is not a number of seconds > 0; the message names it.
    """
    return _seconds(ENV_WRAP_UP_TIMEOUT, environ)


# -- the drain delay ----------------------------------------------------------------------------


class DrainDelaySetting(Frozen):
    """A drain delay setting: ``seconds`` (fixed), or ``auto`` with ``seconds`` as its bound."""

    __slots__ = ("auto", "seconds")
    _fields = ("seconds", "auto")
    seconds: float
    auto: bool

    def __init__(self, seconds: float, auto: bool = False) -> None:
        super().__init__(seconds, auto)

    def __str__(self) -> str:
        return f"auto:{self.seconds:g}" if self.auto else f"{self.seconds:g} s"


def parse_drain_delay(value: object, where: str, *, from_text: bool = False) -> DrainDelaySetting:
    """A number of seconds >= 0, ``"auto"`` or ``"auto:MAX"`` (MAX > 0) as a setting.

    ``from_text`` (an environment variable): a number written as text is taken too; from
    Python, ``"5"`` is a ``TypeError`` like every other number of seconds given as a string.

    Raises:
        TypeError, ValueError: anything else; the message names ``where`` and says what to set.
    """
    if not isinstance(value, str):
        return DrainDelaySetting(check_seconds(value, where, zero=True, example="5"))
    text = value.strip().lower()
    if text == "auto":
        return DrainDelaySetting(AUTO_MAX, auto=True)
    if not text.startswith("auto:") and not from_text:
        raise TypeError(f"{where} takes {_HOW_DRAIN}, not {value!r}")
    bound = text[5:] if text.startswith("auto:") else None
    try:
        number = float(text if bound is None else bound)
    except ValueError:
        raise ValueError(f"{where} takes {_HOW_DRAIN}, not {value!r}") from None
    if bound is None:
        return DrainDelaySetting(check_seconds(number, where, zero=True, example="5"))
    return DrainDelaySetting(check_seconds(number, f"{where} (the MAX of auto:MAX)", example="10"), auto=True)


def read_drain_delay(environ: Mapping[str, str] | None = None) -> DrainDelaySetting | None:
    """``GRACEFUL_DRAIN_DELAY`` as a setting, None when unset.

    Raises:
        ValueError: neither seconds nor ``auto[:MAX]``; the message names the variable.
    """
    raw = _raw(ENV_DRAIN_DELAY, environ)
    if not raw:
        return None
    try:
        return parse_drain_delay(raw, ENV_DRAIN_DELAY, from_text=True)
    except (TypeError, ValueError):
        raise ValueError(f"{ENV_DRAIN_DELAY}={raw!r}: set it to {_HOW_DRAIN}, or unset it") from None


# -- the platform's grace -----------------------------------------------------------------------

_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)")


def parse_timespan(raw: str, name: str) -> float | None:
    """Seconds in a systemd time span (``"90"``, ``"1min 30s"``, ``"500ms"``); None for no limit.

    Raises:
        ValueError: not a time span; the message names ``name`` and shows the expected form.
    """
    text = raw.strip().lower()
    if text == "infinity":
        return None
    total, pos = 0.0, 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(
                f"{name}={raw!r} is not a time span: set it to seconds (e.g. 90) or to the unit's "
                f"TimeoutStopSec value (e.g. 1min 30s, infinity)"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if pos == 0:
        raise ValueError(f"{name}={raw!r} is empty: unset it, or set it to seconds (e.g. 90)")
    # TimeoutStopSec=0 turns the timeout off.
    return total if total > 0 else None


def _kubernetes_grace(environ: Mapping[str, str] | None) -> float | None:
    raw = _raw(ENV_TERMINATION_GRACE, environ)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    # NaN fails it too.
    if not 0 <= value < float("inf"):
        raise ValueError(
            f"{ENV_TERMINATION_GRACE}={raw!r} is not a number of seconds: set it to the pod's "
            f"terminationGracePeriodSeconds, e.g. 30"
        )
    return value


def _platform_grace(environ: Mapping[str, str] | None) -> tuple[float, str] | None:
    found = []
    kubernetes = _kubernetes_grace(environ)
    if kubernetes is not None:
        found.append((kubernetes, f"Kubernetes' terminationGracePeriodSeconds ({ENV_TERMINATION_GRACE})"))
    raw = _raw(ENV_TIMEOUT_STOP_SEC, environ)
    systemd = parse_timespan(raw, ENV_TIMEOUT_STOP_SEC) if raw else None
    if systemd is not None:
        found.append((systemd, f"systemd's TimeoutStopSec ({ENV_TIMEOUT_STOP_SEC})"))
    return min(found) if found else None


_SWITCH = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _switch(name: str, environ: Mapping[str, str] | None) -> bool | None:
    raw = _raw(name, environ)
    if not raw:
        return None
    value = _SWITCH.get(raw.lower())
    if value is None:
        raise ValueError(f"{name}={raw!r}: set it to 1 (on) or 0 (off), or unset it")
    return value


# -- all of them ---------------------------------------------------------------------------------


class Settings(Frozen):
    """Every ``GRACEFUL_*`` variable, read and checked at once (``Settings.read()``).

    ``force_quit``: seconds or None (unset); ``wrap_up_timeout``: seconds or None; ``drain_delay``: a ``DrainDelaySetting`` or None;
    ``probe_port``: a port or None; ``probe_host``: the interface the probes bind (default all,
    ``0.0.0.0``: the kubelet probes the pod's IP); ``platform_grace``: the shortest grace the
    environment declares, with a phrase naming where it comes from, or None;
    ``upgrade_timeout``: seconds a new generation may take to be ready (SIGUSR2);
    ``celery_resend``: ``GRACEFUL_CELERY_RESEND_EARLY_ACKED`` as a bool, None when unset.
    """

    __slots__ = (
        "celery_resend",
        "drain_delay",
        "force_quit",
        "platform_grace",
        "probe_host",
        "probe_port",
        "upgrade_timeout",
        "wrap_up_timeout",
    )
    _fields = (
        "force_quit",
        "drain_delay",
        "probe_port",
        "probe_host",
        "platform_grace",
        "wrap_up_timeout",
        "upgrade_timeout",
        "celery_resend",
    )
    force_quit: float | None
    wrap_up_timeout: float | None
    drain_delay: DrainDelaySetting | None
    probe_port: int | None
    probe_host: str
    platform_grace: tuple[float, str] | None
    upgrade_timeout: float
    celery_resend: bool | None

    def __init__(  # noqa: PLR0917 - one positional argument per field, as a dataclass would take
        self,
        force_quit: float | None = None,
        drain_delay: DrainDelaySetting | None = None,
        probe_port: int | None = None,
        probe_host: str = "0.0.0.0",
        platform_grace: tuple[float, str] | None = None,
        wrap_up_timeout: float | None = None,
        upgrade_timeout: float = UPGRADE_TIMEOUT,
        celery_resend: bool | None = None,
    ) -> None:
        super().__init__(
            force_quit,
            drain_delay,
            probe_port,
            probe_host,
            platform_grace,
            wrap_up_timeout,
            upgrade_timeout,
            celery_resend,
        )

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable from ``environ`` (``os.environ`` by default).

        Raises:
            ValueError: one is set to a value graceful cannot use; the message names it and
                says what to set. Nothing is half-read: call it before changing any state.
        """
        raw_port = _raw(ENV_PROBE_PORT, environ)
        port = None
        if raw_port:
            port = port_number(raw_port)
            if port is None or port == 0:
                raise ValueError(
                    f"{ENV_PROBE_PORT}={raw_port!r} is not a port number (1-65535): set it to e.g. 8081"
                )
        return cls(
            read_budget(environ),
            read_drain_delay(environ),
            port,
            _raw(ENV_PROBE_HOST, environ) or "0.0.0.0",
            _platform_grace(environ),
            read_wrap_up_timeout(environ),
            _seconds(ENV_UPGRADE_TIMEOUT, environ) or UPGRADE_TIMEOUT,
            _switch(ENV_CELERY_RESEND, environ),
        )
