"""graceful under gunicorn: a gunicorn config module, ``gunicorn -c python:graceful.gunicorn app:app``.

Why a config module: gunicorn owns the process and its signals, and its only extension points
are the hooks of its config file (``post_fork``, ``post_worker_init``, ``worker_exit``, ...).
Its users have had no good place for shutdown work (gunicorn #2462, #1464; #2911: ``on_exit``
runs in the arbiter, after the socket closed, and in no worker). This module defines those
hooks, so each *worker* gets graceful's whole sequence:

* the arbiter's TERM, a ``max_requests`` recycle or a HUP reload starts the worker's sequence:
  wrap-up listeners run and readiness turns not-ready as the worker stops accepting, and the
  force-quit deadline is armed at that moment (see ``_gunicorn_worker`` for how it is seen);
* shutdown listeners run after the worker's requests in flight have finished: the integration
  holds the wrap-up phase open until ``worker_exit``, which gunicorn calls once its loop ended;
* the budget defaults to ``graceful_timeout - 1`` s (half of it when that is 2 s or less), unless
  ``GRACEFUL_FORCE_QUIT`` is set, so that graceful's report (the stuck listener and its stack,
  and the worker's main thread) is written before the arbiter's SIGKILL;
* each worker runs its own lifecycle: one forked from the arbiter keeps the listeners registered
  there (``preload_app``, or the config file itself), since the arbiter never starts graceful and
  so a fork copies a lifecycle that is RUNNING with no thread of its own; each listener runs
  once in every worker;
* probes and the drain delay (``GRACEFUL_PROBE_PORT``, ``GRACEFUL_DRAIN_DELAY``): every worker
  answers the probe port itself, bound with ``SO_REUSEPORT``, from its own lifecycle. Not one
  server in the arbiter: the arbiter would have to fork its workers with a probe thread running
  (a lock held at the fork hangs the worker), and an ``auto`` delay needs the 503 seen in the
  workers, which are the ones that keep serving. At the arbiter's TERM (``when_ready`` marks it in
  a byte of memory shared with the workers) every worker stops at once, so any worker's 503 is
  the instance's; each keeps accepting for the drain delay, then stops (``_gunicorn_worker``
  says how). An ``auto`` delay ends in every worker once one of them has seen its 503 and a quiet
  window: the balancer's checks land on one worker at a time. A worker that stops *alone*
  (``max_requests``, a HUP reload, ``TTOU``) closes its probe socket at once instead of answering
  503, since its siblings still serve, and needs no drain delay: the listening socket stays open
  in them. Requests are counted for ``auto`` in ``pre_request``;
* a worker timeout (SIGABRT) and a quick shutdown after a TERM are force quits: the report is
  written at once, before the arbiter's SIGKILL (``_gunicorn_worker`` says why and how);
* the arbiter's ``on_exit`` logs one summary line: how many workers stopped gracefully, had a
  failing listener, were forced (graceful's report on stderr), were killed without a report, or
  never booted. Every worker it reaped counts, and so do the ones it SIGKILLed at
  ``graceful_timeout``: gunicorn reaps those only with ``WNOHANG`` right after the kill, so they
  are usually still in its worker table at ``on_exit`` and never reach ``child_exit``. Each worker
  writes one line to a pipe the arbiter reads: "booted", then its outcome ("forced" as the report
  is made, before the SIGKILL that can follow it).

A config file of your own: ``from graceful.gunicorn import *`` at its top. If it defines one of
the hooks below itself, call graceful's from yours (``graceful.gunicorn.worker_exit(server,
worker)``); docs/hosts/gunicorn.md shows each. Nothing here imports gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import threading
import time
from types import FrameType

from . import readiness
from ._current import get_lifecycle, use
from ._gunicorn_worker import WorkerWatch
from ._lifecycle import Lifecycle, State, prepare
from ._settings import ENV_FORCE_QUIT

__all__ = [
    "child_exit",
    "on_exit",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "pre_request",
    "when_ready",
    "worker_abort",
    "worker_exit",
    "worker_int",
]

log = logging.getLogger("graceful")

OUTCOMES = ("graceful", "failed", "forced")
BOOTED = "booted"
"""A worker's first record: it runs graceful; without an outcome after it, it was killed."""
COUNTED = (*OUTCOMES, "killed", "never booted")

_watch: WorkerWatch | None = None
"""This worker's, set in ``post_worker_init`` (never in the arbiter)."""
_records: tuple[int, int] | None = None
"""The workers -> arbiter pipe: "pid booted", then "pid outcome"."""
_arbiter_pid: int | None = None
_last_record: dict[int, str] = {}
"""Arbiter side: a live worker's pid -> its last record."""
_counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
"""Arbiter side: the workers stopped, by outcome."""
_STOPPING, _TOLD, _WATCHED = 0, 1, 2
_shared: mmap.mmap | None = None
"""Shared by the arbiter and its workers (anonymous, MAP_SHARED: survives the fork), one byte each:
``_STOPPING`` the arbiter got TERM; ``_TOLD`` a worker's drain ended; ``_WATCHED`` when_ready ran."""
_probes: readiness.ProbeServer | None = None
"""This worker's probe server."""
_traffic: readiness.Traffic | None = None
"""This worker's, for ``pre_request``."""
DRAIN_POLL = 0.02
"""Seconds between two looks, while draining, at whether a sibling's delay ended."""


def budget_for(graceful_timeout: float) -> float:
    """graceful's budget under gunicorn: ``graceful_timeout - 1``, or half of it if that is <= 2 s."""
    return graceful_timeout - 1.0 if graceful_timeout > 2.0 else graceful_timeout / 2.0


def _bridge_logging(glog: object) -> None:
    """Send graceful's log lines to gunicorn's error log, unless logging is configured already."""
    logger = logging.getLogger("graceful")
    error_log = getattr(glog, "error_log", None)
    if logger.handlers or logging.getLogger().handlers or not isinstance(error_log, logging.Logger):
        return
    logger.handlers = list(error_log.handlers)
    logger.setLevel(error_log.level)
    logger.propagate = False


# -- the arbiter ------------------------------------------------------------------------------


def on_starting(server: object) -> None:
    """gunicorn hook (arbiter): the pipe workers report their outcome on, the bytes shared with them."""
    global _records, _arbiter_pid, _shared
    _bridge_logging(getattr(server, "log", None))
    if _shared is None:
        _shared = mmap.mmap(-1, 3)
    if _records is None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        _records, _arbiter_pid = (read, write), os.getpid()


def when_ready(server: object) -> None:
    """gunicorn hook (arbiter, signals installed): note the arbiter's TERM for the workers.

    Wraps the arbiter's SIGTERM handler with one store into memory shared with the workers, so a
    worker's TERM is known to be the whole instance's stop (not a reload's or a TTOU's).
    """
    shared = _shared
    if shared is None or os.getpid() != _arbiter_pid:
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "__graceful__", False):
        return

    def on_term(sig: int, frame: FrameType | None) -> None:
        shared[_STOPPING] = 1
        if callable(previous):
            previous(sig, frame)

    on_term.__graceful__ = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_term)
    shared[_WATCHED] = 1


def _drain_records() -> None:
    if _records is None or os.getpid() != _arbiter_pid:
        return
    data = b""
    while True:
        try:
            chunk = os.read(_records[0], 4096)
        except OSError:
            # BlockingIOError: nothing more for now.
            break
        if not chunk:
            break
        data += chunk
    for line in data.decode("ascii", "replace").splitlines():
        pid, _, record = line.partition(" ")
        if pid.isdigit() and (record in OUTCOMES or record == BOOTED):
            _last_record[int(pid)] = record


def _count(pid: int) -> str:
    """Count the worker ``pid``, which has ended, by its last record; the outcome counted."""
    record = _last_record.pop(pid, None)
    outcome = record if record in OUTCOMES else "killed" if record == BOOTED else "never booted"
    _counts[outcome] += 1
    return outcome


def child_exit(server: object, worker: object) -> None:
    """gunicorn hook (arbiter, a worker was reaped): count it by what it reported."""
    _drain_records()
    pid = getattr(worker, "pid", None)
    if not isinstance(pid, int):
        return
    outcome = _count(pid)
    if outcome == "forced":
        log.warning("graceful: worker %d was forced; graceful's report is on stderr", pid)
    elif outcome == "killed":
        log.warning("graceful: worker %d ended without graceful's report (killed, or it crashed)", pid)


def _count_the_killed(server: object) -> None:
    """The workers still in the arbiter's table at ``on_exit``: it SIGKILLed them at
    ``graceful_timeout`` and has not reaped them. Count each, and say so for those without a report."""
    workers = getattr(server, "WORKERS", None)
    if not isinstance(workers, dict):
        return
    graceful_timeout = getattr(getattr(server, "cfg", None), "graceful_timeout", None)
    for pid in [pid for pid in workers if isinstance(pid, int)]:
        if _count(pid) == "killed":
            log.warning(
                "graceful: worker %d ended without graceful's report: the arbiter SIGKILLed it at "
                "graceful_timeout (%s s); raise graceful_timeout, or lower %s",
                pid,
                graceful_timeout,
                ENV_FORCE_QUIT,
            )


def summary() -> str:
    """The arbiter's line: how its workers stopped (what ``on_exit`` logs)."""
    _drain_records()
    counts = _counts
    return (
        f"graceful: gunicorn arbiter exiting; {sum(counts.values())} worker(s) stopped: "
        f"{counts['graceful']} gracefully, {counts['failed']} with a failed listener, "
        f"{counts['forced']} forced (graceful's report on stderr), "
        f"{counts['killed']} killed without graceful's report, {counts['never booted']} never booted"
    )


def on_exit(server: object) -> None:
    """gunicorn hook (arbiter, last thing before it exits): log the summary."""
    _drain_records()
    _count_the_killed(server)
    line = summary()
    glog = getattr(server, "log", None)
    info = getattr(glog, "info", None)
    (info if callable(info) else log.info)(line)


# -- a worker ---------------------------------------------------------------------------------


def post_fork(server: object, worker: object) -> None:
    """gunicorn hook (new worker, before it loads the app): keep or replace the forked lifecycle."""
    if _records is not None:
        with contextlib.suppress(OSError):
            # Close the arbiter's end.
            os.close(_records[0])
    if get_lifecycle().state() is not State.RUNNING:
        # The arbiter started graceful itself: its threads did not survive the fork.
        # Its budget: set in post_worker_init, as for any worker.
        use(Lifecycle())
        log.warning(
            "graceful: the arbiter's lifecycle was already stopping; worker %d starts a fresh one "
            "(listeners registered before the fork are not carried over)",
            os.getpid(),
        )


def post_worker_init(worker: object) -> None:
    """gunicorn hook (worker, app loaded): budget, readiness, and watch for the worker stopping."""
    global _watch
    _bridge_logging(getattr(worker, "log", None))
    lifecycle = get_lifecycle()
    cfg = getattr(worker, "cfg", None)
    graceful_timeout = float(getattr(cfg, "graceful_timeout", 30))
    # Every GRACEFUL_* variable, checked before anything starts: a bad one is a ValueError, no boot.
    settings = readiness.configure_from_env(lifecycle, budget=budget_for(graceful_timeout))
    env = settings.force_quit
    if env is not None and env >= graceful_timeout:
        log.warning(
            "graceful: %s=%g s is not below gunicorn's graceful_timeout (%g s): the arbiter's SIGKILL "
            "may come before graceful's report",
            ENV_FORCE_QUIT,
            env,
            graceful_timeout,
        )
    # Start the deadline's and the sequence's threads ahead of need.
    prepare(lifecycle)
    drain = readiness.drain_delay(lifecycle) > 0
    _watch = WorkerWatch(
        worker,
        lifecycle,
        on_report=lambda: _report("forced"),
        hold_term=_instance_stopping if drain else None,
        drain_wait=_drain_wait,
        on_begin=_on_begin,
    )
    _watch.install()
    _report(BOOTED)
    readiness.set_ready(lifecycle)
    global _probes, _traffic
    _traffic = readiness.traffic(lifecycle)
    _probes = readiness.serve_probes_from_env(lifecycle, settings, reuse_port=True)


def _instance_stopping() -> bool:
    """The whole instance is stopping: the arbiter got TERM (or, without ``when_ready``, assume so).

    Called in the worker's SIGTERM handler: plain reads of shared memory, nothing else.
    """
    shared = _shared
    return shared is None or shared[_WATCHED] == 0 or shared[_STOPPING] == 1


def _on_begin() -> None:
    """The worker's stop began (watcher thread): alone, leave the probe port to the siblings."""
    global _probes
    if _probes is not None and not _instance_stopping():
        probes, _probes = _probes, None
        probes.close()


def _drain_wait() -> None:
    """Keep accepting for the drain delay; for ``auto``, until this worker's or a sibling's ended."""
    lifecycle = get_lifecycle()
    shared = _shared
    begun = time.monotonic()
    why = "its drain delay is over"
    if not readiness.drain_delay_is_auto(lifecycle) or shared is None or not shared[_WATCHED]:
        # Without when_ready a reload's TERM is held too: a flag it left must not end a later delay.
        readiness.wait_drain_delay(lifecycle)
    else:
        # Never set: a bounded wait between two looks.
        pause = threading.Event()
        while (left := readiness.drain_delay_left(lifecycle)) > 0:
            if shared[_TOLD]:
                why = "a sibling worker's auto drain delay ended"
                break
            pause.wait(min(DRAIN_POLL, left))
        else:
            shared[_TOLD] = 1
    log.info(
        "graceful: gunicorn worker %d stops accepting after %.3f s of drain delay: %s",
        os.getpid(),
        time.monotonic() - begun,
        why,
    )


def pre_request(worker: object, req: object) -> None:
    """gunicorn hook (worker, a request arrived): count it for an ``auto`` drain delay."""
    if _traffic is not None:
        _traffic.arrived()


def worker_int(worker: object) -> None:
    """gunicorn hook (worker, SIGINT/SIGQUIT: quick shutdown). Called in a signal handler: a
    store (the main thread's frame, for the report) and one pipe write. The watcher has usually
    seen the signal already (its wakeup byte); the write is for when the wakeup fd is no longer
    graceful's."""
    if _watch is not None:
        _watch.note_signal(signal.SIGQUIT)


def worker_abort(worker: object) -> None:
    """gunicorn hook (worker, SIGABRT: it passed ``timeout``). Called in a signal handler: a
    store (the frame: where the request hung, for the report) and one pipe write."""
    if _watch is not None:
        _watch.note_signal(signal.SIGABRT)


def worker_exit(server: object, worker: object) -> None:
    """gunicorn hook (worker, its loop has ended): shutdown listeners, then report the outcome.

    gunicorn also calls it in the arbiter for a worker that vanished; there it does nothing.
    """
    watch = _watch
    if watch is None or watch.pid != os.getpid():
        return
    outcome = watch.finish()
    _report(outcome)
    global _probes
    # Closed only now: /livez answered until the very end.
    if _probes is not None:
        probes, _probes = _probes, None
        probes.close()
    status = get_lifecycle().status()
    took = status.seconds_since_trigger or 0.0
    how = {"graceful": "gracefully", "failed": "with a failed listener", "forced": "forced"}[outcome]
    log.info("graceful: gunicorn worker %d stopped %s, %.3f s after its stop began", watch.pid, how, took)


def _report(outcome: str) -> None:
    if _records is None or _watch is None:
        return
    # The arbiter is gone, or the pipe is full: only the summary loses.
    with contextlib.suppress(OSError):
        os.write(_records[1], f"{_watch.pid} {outcome}\n".encode("ascii"))
