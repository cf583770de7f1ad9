"""The grace a platform gives a stopping process before SIGKILL, as far as the process can know it.

Why: SolidQueue #653. When the platform's grace is shorter than the service's own shutdown
timeout, the platform's SIGKILL comes first and the service never says what it was still doing.
graceful can warn at start, but neither platform tells the process its grace:

* Kubernetes: ``terminationGracePeriodSeconds`` is not among the fields the downward API
  exposes, so it is passed by hand as ``GRACEFUL_TERMINATION_GRACE`` (whole seconds; a preStop
  hook's time counts against it). 0 means "no grace at all".
* systemd: ``TimeoutStopSec`` is not in the service's environment and graceful queries nothing
  (no D-Bus, no ``systemctl`` from inside a service), so it is passed by hand as
  ``GRACEFUL_TIMEOUT_STOP_SEC``, in seconds or in systemd's own time-span syntax, copied
  from the unit (``90``, ``90s``, ``1min 30s``, ``infinity``); 0 and ``infinity`` mean "no
  timeout", as in systemd.
"""

from __future__ import annotations

import math
import os
import re

__all__ = ["ENV_TERMINATION_GRACE", "ENV_TIMEOUT_STOP_SEC", "parse_timespan", "platform_grace"]

ENV_TERMINATION_GRACE = "GRACEFUL_TERMINATION_GRACE"
ENV_TIMEOUT_STOP_SEC = "GRACEFUL_TIMEOUT_STOP_SEC"

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
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)")


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
    return total if total > 0 else None  # TimeoutStopSec=0 turns the timeout off


def _kubernetes_grace() -> float | None:
    raw = os.environ.get(ENV_TERMINATION_GRACE, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(
            f"{ENV_TERMINATION_GRACE}={raw!r} is not a number of seconds: set it to the pod's "
            f"terminationGracePeriodSeconds, e.g. 30"
        )
    return value


def _systemd_grace() -> float | None:
    raw = os.environ.get(ENV_TIMEOUT_STOP_SEC, "").strip()
    return parse_timespan(raw, ENV_TIMEOUT_STOP_SEC) if raw else None


def platform_grace() -> tuple[float, str] | None:
    """The shortest grace the environment declares, with a phrase naming where it comes from.

    None when neither ``GRACEFUL_TERMINATION_GRACE`` nor a finite ``GRACEFUL_TIMEOUT_STOP_SEC``
    is set.

    Raises:
        ValueError: one of them is set to something that is not a duration.
    """
    found = []
    kubernetes = _kubernetes_grace()
    if kubernetes is not None:
        found.append((kubernetes, f"Kubernetes' terminationGracePeriodSeconds ({ENV_TERMINATION_GRACE})"))
    systemd = _systemd_grace()
    if systemd is not None:
        found.append((systemd, f"systemd's TimeoutStopSec ({ENV_TIMEOUT_STOP_SEC})"))
    return min(found) if found else None
