"""Low-level hooks for integrations: what hosts, adapters and test harnesses use.

Why a namespace of its own (trio's ``trio.lowlevel``): a ``Lifecycle``'s public face is what an
application calls (register listeners, trigger, wait, look). Hosts such as gunicorn or Celery,
adapters and test harnesses need more: to hear every transition, to mark a server failed, to
add a section to the force-quit report, to run code at the force quit, to say the drain moved,
to learn when the sequence began or which clock it runs on. Those used to be methods beside the
user API, so ``help(graceful.Lifecycle)`` mixed the two. Here each is a function that takes the
lifecycle first. They are stable API, but for the people who integrate graceful with a host.

``import graceful`` does not load this module; ``import graceful.lowlevel`` does.
"""

from __future__ import annotations

from ._lifecycle import (
    Event,
    add_report_section,
    budget,
    clock,
    join,
    keep_deadline_armed,
    listener_loop,
    listening_sockets,
    on_force_quit,
    prepare,
    progress,
    record_failure,
    reload_listener_count,
    report_progress,
    set_daemon,
    set_defaults,
    set_listener_loop,
    shutdown_requested,
    subscribe,
    triggered_at,
    wait_until_idle,
)
from ._listeners import mark_own

__all__ = [
    "Event",
    "add_report_section",
    "budget",
    "clock",
    "join",
    "keep_deadline_armed",
    "listener_loop",
    "listening_sockets",
    "mark_own",
    "on_force_quit",
    "prepare",
    "progress",
    "record_failure",
    "reload_listener_count",
    "report_progress",
    "set_daemon",
    "set_defaults",
    "set_listener_loop",
    "shutdown_requested",
    "subscribe",
    "triggered_at",
    "wait_until_idle",
]

Event.__module__ = "graceful.lowlevel"
