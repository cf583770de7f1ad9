"""arq workers: graceful's signals, listeners, deadline, report and probes inside ``arq``.

``graceful.arq.install(WorkerSettings)``, once, after the settings class (or dict) is defined,
in the module the ``arq`` command imports. arq builds its worker from the settings; graceful
wraps the settings' ``on_startup``, ``on_shutdown``, ``on_job_start`` and ``on_job_end`` (yours
still run, in the same places) and takes over the worker's signal handling at start:

* **Why**: arq's SIGTERM cancels every job in hand at once (arq #192; the jobs are retried
  later, from the start); its ``job_completion_wait`` (PR #345) waits a fixed time and then
  cancels whatever is left, and there is no report of what was cut, no wrap-up, no readiness.
* **Stop** (SIGTERM, SIGINT, or ``graceful.shutdown()``): the wrap-up listeners run;
  ``is_stopping()`` and ``wait_for_wrap_up_async()`` turn True inside the running jobs, so a long
  job can enqueue the rest of itself from its cursor (``graceful.iteration``); the worker picks
  no new job and the jobs in hand finish. Then arq's own close runs (your ``on_shutdown``), the
  shutdown listeners run, and the process exits: 0, or 1 if a listener raised. SIGTSTP is a
  pause (no new job, the process stays up); SIGUSR1 dumps every thread and asyncio task.
* **Deadline** (graceful's budget, counted from the SIGTERM): the report names each job still
  running (id, function, try, for how long, where its coroutine is), each is cancelled, and arq
  records it as "cancelled, will be run again", so the next worker runs it at once
  (at-least-once; up to the function's ``max_tries``); then exit 70. A job that blocks the event
  loop cannot be cancelled: it is named, and arq runs it again once its in-progress key expires
  (the job's timeout plus 10 s).
* **Probes** (``GRACEFUL_PROBE_PORT``): ``/readyz`` is 200 from the end of ``on_startup`` until
  the stop, ``/livez`` until the end, from memory (``arq --check`` reads a Redis key written once
  an hour by default). Under systemd, ``READY=1`` then the stop's notifications.
* **Start**: every ``GRACEFUL_*`` variable is read and the probe port bound first thing in
  ``on_startup``; a value graceful cannot use stops the worker there (exit 1, one line naming
  it), never a worker that runs without graceful.

graceful finds the worker from ``on_startup`` (arq hands its hooks only the ``ctx`` dict): the
coroutine awaiting it is the worker's ``main()``. A worker built with ``handle_signals=False``
(run inside another framework) keeps that: graceful then installs no signal handler either,
and the program calls ``graceful.shutdown()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import arq.worker

from . import readiness, systemd
from ._checks import TYPE_CHECKING
from ._current import get_lifecycle
from ._diagnostics import coroutine_lines, forget_loop, remember_loop
from ._lifecycle import (
    Event,
    Lifecycle,
    add_report_section,
    on_force_quit,
    prepare,
    set_listener_loop,
    shutdown_requested,
    subscribe,
)
from ._listeners import mark_own
from ._signals import signal_handlers

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from typing import Any

    Hook = Callable[[dict[Any, Any]], Awaitable[Any]]

__all__ = ["install"]

log = logging.getLogger("graceful")

CANCEL_GRACE = 0.4
"""Seconds the deadline waits for arq to record the jobs it cancelled: within the share of the
force quit's last second its hooks get, so that what could not be cancelled is logged too."""

_HOOKS = ("on_startup", "on_shutdown", "on_job_start", "on_job_end")
_MARK = "__graceful_arq__"


def install(settings: Any) -> None:
    """Plug graceful into the arq worker built from ``settings``; see the module docstring.

    ``settings`` is what ``arq`` is given: a ``WorkerSettings`` class or a dict of the same
    names. Its ``on_startup``, ``on_shutdown``, ``on_job_start`` and ``on_job_end`` are wrapped
    in place (yours run where they did). Idempotent. Reads no environment variable: that
    happens when the worker starts.

    Raises:
        TypeError: ``settings`` is neither a class nor a dict, or a hook in it is not callable.
    """
    space: Mapping[str, Any]
    if isinstance(settings, dict):
        space = settings
    elif isinstance(settings, type):
        # arq reads the class's own __dict__, not inherited attributes.
        space = vars(settings)
    else:
        raise TypeError(
            f"graceful.arq.install() takes arq's WorkerSettings (a class or a dict), not {type(settings).__name__}"
        )
    hooks = {name: space.get(name) for name in _HOOKS}
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise TypeError(f"graceful.arq.install(): {name} must be an async function, not {hook!r}")
    if getattr(hooks["on_startup"], _MARK, False):
        return
    host = _Host(
        handle_signals=bool(space.get("handle_signals", True)),
        **{name: hook for name, hook in hooks.items() if hook is not None},
    )
    for name in _HOOKS:
        if isinstance(settings, dict):
            settings[name] = _hook(host, name)
        else:
            setattr(settings, name, _hook(host, name))


def _hook(host: _Host, name: str) -> Hook:
    """A plain ``async def`` for the settings (arq calls what it finds there with ``ctx``)."""
    method = getattr(host, name)

    async def hook(ctx: dict[Any, Any]) -> None:
        await method(ctx)

    hook.__qualname__ = hook.__name__ = f"graceful_{name}"
    setattr(hook, _MARK, True)
    return hook


class _Host:
    """graceful's side of one arq worker; its four methods are the settings' hooks."""

    def __init__(
        self,
        *,
        handle_signals: bool,
        on_startup: Hook | None = None,
        on_shutdown: Hook | None = None,
        on_job_start: Hook | None = None,
        on_job_end: Hook | None = None,
    ) -> None:
        self.handle_signals = handle_signals
        self._theirs = {
            "on_startup": on_startup,
            "on_shutdown": on_shutdown,
            "on_job_start": on_job_start,
            "on_job_end": on_job_end,
        }
        self.run: _Run | None = None

    # arq calls these four (they must be plain ``async def`` functions: arq reads them from the
    # settings' __dict__ and calls them with ``ctx`` alone).

    async def on_startup(self, ctx: dict[Any, Any]) -> None:
        worker = _the_worker()
        try:
            run = _Run(worker, get_lifecycle())
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"graceful: the arq worker cannot start: {exc}") from exc
        self.run = run
        if self.handle_signals:
            run.route_signals()
        theirs = self._theirs["on_startup"]
        if theirs is not None:
            await theirs(ctx)
        run.user_started = True
        run.ready()

    async def on_shutdown(self, ctx: dict[Any, Any]) -> None:
        run = self.run
        theirs = self._theirs["on_shutdown"]
        if run is None:
            return
        if theirs is not None and run.user_started:
            await theirs(ctx)
        code = await run.finish()
        if code:
            # The ``arq`` command exits 0 once the worker has closed: raise the true code from
            # the last step of its close, after the connection pool is closed.
            with contextlib.suppress(Exception):
                await ctx["redis"].close(close_connection_pool=True)
            raise SystemExit(code)

    async def on_job_start(self, ctx: dict[Any, Any]) -> None:
        if self.run is not None:
            self.run.started[str(ctx.get("job_id"))] = (time.monotonic(), int(ctx.get("job_try") or 1))
        theirs = self._theirs["on_job_start"]
        if theirs is not None:
            await theirs(ctx)

    async def on_job_end(self, ctx: dict[Any, Any]) -> None:
        try:
            theirs = self._theirs["on_job_end"]
            if theirs is not None:
                await theirs(ctx)
        finally:
            if self.run is not None:
                self.run.started.pop(str(ctx.get("job_id")), None)


def _the_worker() -> arq.worker.Worker:
    """The arq ``Worker`` whose ``main()`` is awaiting ``on_startup`` right now."""
    task = asyncio.current_task()
    frame = getattr(task.get_coro() if task is not None else None, "cr_frame", None)
    worker = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(worker, arq.worker.Worker):
        raise RuntimeError(  # noqa: TRY004 - not a bad argument: arq's worker is not the caller
            "graceful.arq: on_startup was not called by an arq Worker's main(); run the worker "
            "with the arq command (arq module.WorkerSettings) or arq.worker.run_worker(WorkerSettings)"
        )
    return worker


class _Run:
    """One run of one arq worker under graceful, from ``on_startup`` to ``on_shutdown``."""

    def __init__(self, worker: arq.worker.Worker, lifecycle: Lifecycle) -> None:
        # What can fail comes first, before anything is registered: every variable read and
        # checked (ValueError), the sequence's threads started ahead of need, then the probe
        # port bound (RuntimeError).
        self.settings = readiness.configure_from_env(lifecycle)
        prepare(lifecycle)
        self.probes = readiness.serve_probes_from_env(lifecycle, self.settings)
        self.worker = worker
        self.loop = worker.loop
        self.lifecycle = lifecycle
        self.started: dict[str, tuple[float, int]] = {}
        """Job id -> (when it started, its try), from ``on_job_start`` to ``on_job_end``."""
        self.user_started = False
        self._lock = threading.Lock()
        self._drained = False
        self._ended = False
        self._signals: contextlib.ExitStack | None = None
        set_listener_loop(lifecycle, self.loop)
        remember_loop(self.loop)
        lifecycle.add_wrap_up_listener(mark_own(self._jobs_in_flight), name="arq: jobs in flight")
        add_report_section(lifecycle, self._report_section)
        on_force_quit(lifecycle, self._at_deadline, name="arq: cancel the jobs in hand (arq retries them)")
        subscribe(lifecycle, self._on_event)
        self.notifier = systemd.SystemdNotifier(lifecycle) if os.environ.get("NOTIFY_SOCKET") else None

    def route_signals(self) -> None:
        """Take SIGTERM and SIGINT from arq (its handlers cancel every job at once) and route
        every signal graceful handles to the lifecycle, until ``finish()``."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.remove_signal_handler(signum)
        stack = contextlib.ExitStack()
        stack.enter_context(signal_handlers(self.lifecycle))
        self._signals = stack

    def ready(self) -> None:
        readiness.set_ready(self.lifecycle)
        systemd.notify("READY=1", "STATUS=arq worker ready")

    # -- the stop --------------------------------------------------------------------------------

    def _jobs_in_flight(self) -> None:
        """The wrap-up listener: no new job; wait (on the worker's loop) for the jobs in hand."""
        asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result()
        with self._lock:
            self._drained = True
        self._end_if_asked()

    async def _drain(self) -> None:
        worker = self.worker
        worker.allow_pick_jobs = False
        count = sum(not task.done() for task in worker.tasks.values())
        log.info("arq: no new job; %d job(s) in hand", count)
        while running := [task for task in worker.tasks.values() if not task.done()]:
            await asyncio.wait(running)

    def _on_event(self, event: Event, detail: str) -> None:
        if event is Event.SHUTDOWN_REQUESTED:
            self._end_if_asked()

    def _end_if_asked(self) -> None:
        """Once drained and a shutdown is asked (not a pause): end the worker's main loop, as
        arq's own handler does; its close runs then (``on_shutdown``)."""
        with self._lock:
            if not self._drained or self._ended or not shutdown_requested(self.lifecycle):
                return
            self._ended = True
        main = self.worker.main_task
        if main is not None:
            # The loop has closed: main() ended already.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(main.cancel)

    async def finish(self) -> int:
        """In arq's close, on the worker's loop: run the rest of the sequence, wait for it;
        the exit code."""
        lc = self.lifecycle
        lc.shutdown("arq worker stopped", wait=False)
        await asyncio.to_thread(lc.wait_for_shutdown)
        if self._signals is not None:
            self._signals.close()
        set_listener_loop(lc, None)
        forget_loop(self.loop)
        if self.notifier is not None:
            self.notifier.close()
        if self.probes is not None:
            # Only now: /livez answers until the very end.
            self.probes.close()
        return lc.exit_code

    # -- the deadline ----------------------------------------------------------------------------

    def _running(self) -> list[tuple[str, asyncio.Task[Any]]]:
        # The loop's thread may change the dict while we copy it.
        for _ in range(10):
            try:
                return sorted(
                    ((job_id, task) for job_id, task in self.worker.job_tasks.items() if not task.done()),
                    key=lambda pair: self.started.get(pair[0], (0.0, 0))[0],
                )
            except RuntimeError:
                continue
        return []

    def _describe(self, job_id: str, task: asyncio.Task[Any], now: float) -> str:
        since, job_try = self.started.get(job_id, (now, 1))
        function = getattr(task.get_coro(), "__qualname__", "?")
        return f"arq job {job_id} ({function}), try {job_try}, running for {now - since:.1f} s"

    def _report_section(self) -> list[str]:
        running = self._running()
        now = time.monotonic()
        lines = [f"graceful: arq jobs still running at the deadline: {len(running)} (each is cancelled now)"]
        for job_id, task in running:
            lines.append(f"  - {self._describe(job_id, task, now)}, at:")
            lines.extend(coroutine_lines(task.get_coro(), "      "))
        return lines

    def _at_deadline(self) -> None:
        """Cancel every job in hand and wait (a little) for arq to record each as to be run again."""
        running = self._running()
        if not running:
            return
        now = time.monotonic()
        names = {job_id: self._describe(job_id, task, now) for job_id, task in running}
        tasks = [task for _, task in running]

        async def cancel_and_wait() -> set[str]:
            for task in tasks:
                task.cancel()
            records = [self.worker.tasks[job_id] for job_id in names if job_id in self.worker.tasks]
            if records:
                await asyncio.wait(records, timeout=CANCEL_GRACE)
            return {
                job_id
                for job_id in names
                if job_id not in self.worker.tasks or self.worker.tasks[job_id].done()
            }

        try:
            recorded = asyncio.run_coroutine_threadsafe(cancel_and_wait(), self.loop).result(
                CANCEL_GRACE + 0.1
            )
        except (FutureTimeout, RuntimeError):
            recorded = set()
        timeout = self.worker.in_progress_timeout_s
        for job_id, name in names.items():
            if job_id in recorded:
                log.warning("%s: cancelled at the force-quit deadline; arq runs it again", name)
            else:
                log.error(
                    "%s: could not be cancelled in time (its event loop is busy); arq runs it again once "
                    "its in-progress key expires (within %.0f s)",
                    name,
                    timeout,
                )
