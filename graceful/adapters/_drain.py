"""The drain delay, said aloud in the log, for every adapter alike.

Why: the delay keeps a server answering for seconds after readiness turned 503 (the
Kubernetes endpoint race), and a log with a silent gap of seconds after "wrapping up" reads
like a hang. Each web adapter waits it out where it belongs in its own wrap-up (after what must
happen first, such as gRPC's health turning NOT_SERVING), through these functions, which log
its start and its end. The wrap-up steps of ``run()`` run one after another and the delay is
counted from the first trigger, so only the first adapter waits and speaks; the others find it
over and say nothing, as they do when the delay is 0.
"""

from __future__ import annotations

import logging

from .._checks import TYPE_CHECKING
from .._drain_delay import drain_delay_ended_why
from ..readiness import (
    drain_delay,
    drain_delay_is_auto,
    drain_delay_left,
    wait_drain_delay,
    wait_drain_delay_async,
)

if TYPE_CHECKING:
    from .._lifecycle import Lifecycle

log = logging.getLogger("graceful")

__all__ = ["sleep_drain_delay_said", "wait_drain_delay_said"]


def _left_said(lifecycle: Lifecycle) -> float:
    """Seconds before the drain delay can be over; when some are, log that the servers keep serving."""
    left = drain_delay_left(lifecycle)
    if left > 0:
        if drain_delay_is_auto(lifecycle):
            log.info(
                "drain delay (auto): serving until the balancer stops sending, at most %.1f s (not ready)",
                drain_delay(lifecycle),
            )
        else:
            log.info("drain delay: serving %.1f s more while the balancer stops sending (not ready)", left)
    return left


def _said_over(lifecycle: Lifecycle, waited: float) -> None:
    why = drain_delay_ended_why(lifecycle) if drain_delay_is_auto(lifecycle) else None
    if why:
        log.info("drain delay over after %.2f s (%s): the servers stop accepting", waited, why)
    else:
        log.info("drain delay over: the servers stop accepting")


def wait_drain_delay_said(lifecycle: Lifecycle) -> None:
    """``readiness.wait_drain_delay``, with its start and end in the log (nothing if none left)."""
    if _left_said(lifecycle) > 0:
        _said_over(lifecycle, wait_drain_delay(lifecycle))


async def sleep_drain_delay_said(lifecycle: Lifecycle) -> None:
    """The same on an event loop: it waits on the loop, not ``wait_drain_delay()`` in the
    default executor, whose threads the app's own ``run_in_executor()`` calls may all hold."""
    if _left_said(lifecycle) > 0:
        _said_over(lifecycle, await wait_drain_delay_async(lifecycle))
