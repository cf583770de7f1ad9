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
* the arbiter's ``on_exit`` logs one summary line: how many workers stopped gracefully, had a
  failing listener, were forced by graceful's deadline, or were killed without a report.

A config file of your own: ``from graceful.gunicorn import *`` at its top. If it defines one of
the hooks below itself, call graceful's from yours (``graceful.gunicorn.worker_exit(server,
worker)``); docs/hosts/gunicorn.md shows each. Nothing here imports gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import os

import graceful
from graceful import readiness

from ._force_quit import ENV_FORCE_QUIT, budget_from_env
from ._gunicorn_worker import WorkerWatch

__all__ = [
    "child_exit",
    "on_exit",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "worker_abort",
    "worker_exit",
    "worker_int",
]

log = logging.getLogger("graceful")

OUTCOMES = ("graceful", "failed", "forced")

_watch: WorkerWatch | None = None  # this worker's, set in post_worker_init (never in the arbiter)
_records: tuple[int, int] | None = None  # arbiter -> workers pipe: one "pid outcome" line a worker
_arbiter_pid: int | None = None
_outcomes: dict[int, str] = {}  # arbiter side: pid -> outcome read from the pipe
_reaped: list[int] = []  # arbiter side: every worker pid reaped (child_exit)


def budget_for(graceful_timeout: float) -> float:
    """graceful's budget under gunicorn: ``graceful_timeout - 1``, or half of it if that is <= 2 s."""
    return graceful_timeout - 1.0 if graceful_timeout > 2.0 else graceful_timeout / 2.0


def _env_budget() -> float | None:
    """``GRACEFUL_FORCE_QUIT`` if set (checked as everywhere else), else None."""
    if not os.environ.get(ENV_FORCE_QUIT, "").strip():
        return None
    return budget_from_env(0.0)


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
    """gunicorn hook (arbiter): open the pipe workers report their outcome on."""
    global _records, _arbiter_pid
    _bridge_logging(getattr(server, "log", None))
    if _records is None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        _records, _arbiter_pid = (read, write), os.getpid()


def _drain_records() -> None:
    if _records is None or os.getpid() != _arbiter_pid:
        return
    data = b""
    while True:
        try:
            chunk = os.read(_records[0], 4096)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        data += chunk
    for line in data.decode("ascii", "replace").splitlines():
        pid, _, outcome = line.partition(" ")
        if pid.isdigit() and outcome in OUTCOMES:
            _outcomes[int(pid)] = outcome


def child_exit(server: object, worker: object) -> None:
    """gunicorn hook (arbiter, a worker was reaped): note it and read what it reported."""
    _drain_records()
    pid = getattr(worker, "pid", None)
    if isinstance(pid, int):
        _reaped.append(pid)
        if _outcomes.get(pid) == "forced":
            log.warning("graceful: worker %d was forced by graceful's deadline; its report is on stderr", pid)


def summary() -> str:
    """The arbiter's line: how its workers stopped (what ``on_exit`` logs)."""
    _drain_records()
    counts = dict.fromkeys(OUTCOMES, 0)
    unreported = 0
    for pid in _reaped:
        outcome = _outcomes.get(pid)
        if outcome is None:
            unreported += 1
        else:
            counts[outcome] += 1
    return (
        f"graceful: gunicorn arbiter exiting; {len(_reaped)} worker(s) stopped: "
        f"{counts['graceful']} gracefully, {counts['failed']} with a failed listener, "
        f"{counts['forced']} forced by graceful's deadline (report on stderr), "
        f"{unreported} without graceful's report (killed, or never booted)"
    )


def on_exit(server: object) -> None:
    """gunicorn hook (arbiter, last thing before it exits): log the summary."""
    line = summary()
    glog = getattr(server, "log", None)
    info = getattr(glog, "info", None)
    (info if callable(info) else log.info)(line)


# -- a worker ---------------------------------------------------------------------------------


def post_fork(server: object, worker: object) -> None:
    """gunicorn hook (new worker, before it loads the app): keep or replace the forked lifecycle."""
    if _records is not None:
        with contextlib.suppress(OSError):
            os.close(_records[0])  # the arbiter's end
    if graceful.state() is not graceful.State.RUNNING:
        # The arbiter started graceful itself: its threads did not survive the fork.
        env = _env_budget()
        graceful.use(graceful.Lifecycle(env if env is not None else 25.0))
        log.warning(
            "graceful: the arbiter's lifecycle was already stopping; worker %d starts a fresh one "
            "(listeners registered before the fork are not carried over)",
            os.getpid(),
        )


def post_worker_init(worker: object) -> None:
    """gunicorn hook (worker, app loaded): budget, readiness, and watch for the worker stopping."""
    global _watch
    _bridge_logging(getattr(worker, "log", None))
    lifecycle = graceful.get_lifecycle()
    cfg = getattr(worker, "cfg", None)
    graceful_timeout = float(getattr(cfg, "graceful_timeout", 30))
    env = _env_budget()
    if env is None:
        lifecycle.set_time_to_force_quit(budget_for(graceful_timeout))
    elif env >= graceful_timeout:
        log.warning(
            "graceful: %s=%g s is not below gunicorn's graceful_timeout (%g s): the arbiter's SIGKILL "
            "may come before graceful's report",
            ENV_FORCE_QUIT,
            env,
            graceful_timeout,
        )
    _watch = WorkerWatch(worker, lifecycle, on_forced=lambda: _report("forced"))
    _watch.install()
    readiness.set_ready(lifecycle)


def worker_int(worker: object) -> None:
    """gunicorn hook (worker, SIGINT/SIGQUIT: quick shutdown). Called in a signal handler: a store."""
    if _watch is not None:
        _watch.quick = "SIGINT/SIGQUIT"


def worker_abort(worker: object) -> None:
    """gunicorn hook (worker, SIGABRT: it passed ``timeout``). Called in a signal handler: a store."""
    if _watch is not None:
        _watch.quick = "SIGABRT, worker timeout"


def worker_exit(server: object, worker: object) -> None:
    """gunicorn hook (worker, its loop has ended): shutdown listeners, then report the outcome.

    gunicorn also calls it in the arbiter for a worker that vanished; there it does nothing.
    """
    watch = _watch
    if watch is None or watch.pid != os.getpid():
        return
    outcome = watch.finish()
    status = graceful.get_lifecycle().status()
    took = status.seconds_since_trigger or 0.0
    how = {"graceful": "gracefully", "failed": "with a failed listener", "forced": "forced"}[outcome]
    log.info("graceful: gunicorn worker %d stopped %s, %.3f s after its stop began", watch.pid, how, took)
    _report(outcome)


def _report(outcome: str) -> None:
    if _records is None or _watch is None:
        return
    with contextlib.suppress(OSError):  # the arbiter is gone, or the pipe is full: only the summary loses
        os.write(_records[1], f"{_watch.pid} {outcome}\n".encode("ascii"))
