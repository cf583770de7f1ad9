"""``graceful.run(server)``: the entrypoint wrapper.

Why: uvicorn users who run two servers in one process see it hang on shutdown (uvicorn #1773),
asynq's ``Run()`` grabs SIGTERM from the rest of the program (#318), and most hand-written
entrypoints forget one of the ways a process ends. ``run()`` does the whole job once: it adapts
each server to a ``Service``, installs the signal router, starts every server, says READY=1 when
all are up, blocks, and runs the full sequence however the process ends (a signal,
``shutdown()`` from anywhere, a server returning, a server raising, ``KeyboardInterrupt``), then
restores the signal handlers and returns the exit code (0, 1 or 70).

Several servers are brought down together: when one stops or crashes, all stop. Within each
phase they are stopped one after another in *reverse* list order (go-zero's ServiceGroup): with
``[worker, api]`` the API stops accepting and drains before the worker it feeds is told to stop.
"Told" is the service's own context: ``ctx.wrapping_up()`` turns True when its wrap-up step
begins, whereas ``graceful.is_stopping()`` is True for every service at once (a worker that
polls it stops fetching while the API still accepts jobs).

When any server is asynchronous (a coroutine, uvicorn, aiohttp, grpc.aio), ``run()`` drives one
asyncio loop in the main thread; signals still reach graceful through its own wakeup fd, and the
loop is never given a second signal owner. While it runs, ``async def`` listeners registered
where no loop was running run on it (``Lifecycle.listener_loop``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence

from . import _sockets, _upgrade, readiness, systemd
from ._aio import is_awaitable, run_awaitable
from ._checks import TYPE_CHECKING, check_seconds, is_coroutine_function
from ._diagnostics import forget_loop, format_thread_stacks, log_to_stderr_by_default, remember_loop
from ._lifecycle import (
    Lifecycle,
    State,
    add_report_section,
    listener_loop,
    prepare,
    record_failure,
    set_listener_loop,
    shutdown_requested,
)
from ._lifecycle import (
    budget as budget_of,
)
from ._listeners import Waiter, current_listener, mark_own, serving_as
from ._service import Context, Service
from ._settings import Settings
from ._signals import signal_handlers
from .adapters import adapt

BLOCK_SLICE = 0.5
"""Seconds the main thread waits in one piece in ``run()``; see ``_Runner._block``."""

if TYPE_CHECKING:
    import asyncio
    from typing import Any

__all__ = ["run_with"]

log = logging.getLogger("graceful")


def run_with(
    lifecycle: Lifecycle, server: Any, *, force_quit: float | None = None, handle_signals: bool = True
) -> int:
    """``run()`` on a given lifecycle (what ``graceful.run`` calls).

    Every argument is checked before anything changes: a ``run()`` that raises leaves the
    budget, the signal handlers and the lifecycle as they were.
    """
    listener = current_listener()
    # Called from a listener, run() would block the sequence that is running it.
    if listener is not None:
        raise RuntimeError(
            f"graceful.run() was called from inside the listener {listener.name!r}: a listener "
            "runs during the shutdown sequence and must return, and run() would block until "
            "that sequence is over; start servers before the shutdown, from the main code"
        )
    budget = None if force_quit is None else check_seconds(force_quit, "graceful.run(force_quit=...)")
    if not isinstance(handle_signals, bool):
        raise TypeError(f"graceful.run(handle_signals=...) takes True or False, not {handle_signals!r}")
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "graceful.run() must be called from the main thread to handle signals (Python installs "
            "signal handlers only there); pass handle_signals=False to run it from another thread "
            "and route signals yourself"
        )
    if lifecycle.state() is State.STOPPED:
        raise RuntimeError(
            "graceful.run() was given a lifecycle that has already stopped; start the servers "
            "on a new one (graceful.use(graceful.Lifecycle()), or graceful.run(..., lifecycle=graceful.Lifecycle()))"
        )
    items = list(server) if isinstance(server, (list, tuple)) else [server]
    if not items:
        raise ValueError("graceful.run() needs at least one server; it got an empty list")
    services = [adapt(item) for item in items]
    # Every GRACEFUL_* variable; a bad one raises here, naming it.
    settings = Settings.read()
    log_to_stderr_by_default()
    # All checked: from here on, state may change.
    if budget is not None:
        lifecycle.set_time_to_force_quit(budget)
    readiness.configure_from_env(lifecycle, settings)
    # Start the deadline's and the sequence's threads ahead of need (a thread limit).
    prepare(lifecycle)
    # Take systemd's or the previous generation's sockets out of the environment now.
    _sockets.inherited()
    # Where an upgrade starts the next generation.
    cwd = os.getcwd()
    runner = _Runner(lifecycle, services)
    guard = signal_handlers(lifecycle) if handle_signals else contextlib.nullcontext()
    with guard as router:
        notifier: systemd.SystemdNotifier | None = None
        probes: readiness.ProbeServer | None = None

        def before_handover() -> None:
            """The next generation is ready: it speaks to systemd and answers probes from now on."""
            if notifier is not None:
                notifier.close()
            if probes is not None:
                probes.close()

        if router is not None:
            runner.upgrader = _upgrade.Upgrader(
                lifecycle, timeout=settings.upgrade_timeout, cwd=cwd, before_handover=before_handover
            )
            router.upgrade = runner.upgrader.request
        if os.environ.get("NOTIFY_SOCKET"):
            # Under systemd (or graceful_process).
            notifier = systemd.SystemdNotifier(lifecycle, router)
        try:
            probes = readiness.serve_probes_from_env(lifecycle, settings)
            runner.run()
        finally:
            if router is not None:
                router.upgrade = None
            if probes is not None:
                probes.close()
            if notifier is not None:
                notifier.close()
    return lifecycle.exit_code


def _address_in_use(exc: OSError) -> str:
    """The one line for an address already in use: the error's own text names the address when
    the server put it there (asyncio's and so aiohttp's do; a bare ``socket.bind`` does not)."""
    text = str(exc).replace(f"[Errno {exc.errno}] ", "")
    return f"address already in use ({text})" if "already in use" not in text.lower() else text


class _Runner:
    def __init__(self, lifecycle: Lifecycle, services: Sequence[Service]) -> None:
        self.lifecycle = lifecycle
        self.services = list(services)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.contexts: list[Context] = []
        self.threads: list[threading.Thread] = []
        self._ready_lock = threading.Lock()
        self._ready = 0
        self._error: BaseException | None = None
        self._waiters: list[Waiter] = []
        self._halves: dict[Context, int] = {}
        """Per server, how many of the two halves of "stopped" happened (see ``_stopped_half``)."""
        self.upgrader: _upgrade.Upgrader | None = None
        """The upgrade in place (SIGUSR2), when ``run()`` routes the signals."""
        # Held while a server is marked as entered and while a wrap-up step reads that mark:
        # a server that enters after its wrap-up step has looked would never be stopped.
        self._entering = threading.Lock()

    # -- the steps, top-down ------------------------------------------------------------------

    def run(self) -> None:
        # A server that never returns: the report shows where the user's code is stuck, not
        # only graceful's listener waiting for it to return.
        add_report_section(self.lifecycle, self._server_stacks)
        if any(is_coroutine_function(service.serve) for service in self.services):
            self._run_async()
        else:
            self._run_sync()
        self._report_leftovers()

    def _run_sync(self) -> None:
        with self._whatever_happens():
            self._register()
            for service, ctx in zip(self.services, self.contexts, strict=True):
                if self._too_late(service):
                    break
                self._start_thread(service, ctx)
        self._block()
        # Registered after STOPPED (a race with shutdown()): run at once.
        for waiter in self._waiters:
            waiter.wait(budget_of(self.lifecycle))
        self._reraise()

    def _run_async(self) -> None:
        import asyncio

        asyncio.run(self._main_async())

    async def _main_async(self) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        remember_loop(self.loop)
        # An ``async def`` listener registered before this loop ran (at module level, for a
        # pool bound to this loop) runs on it, not on a fresh loop that the pool refuses.
        set_listener_loop(self.lifecycle, self.loop)
        tasks = []
        try:
            with self._whatever_happens():
                self._register()
                for service, ctx in zip(self.services, self.contexts, strict=True):
                    if self._too_late(service):
                        break
                    if is_coroutine_function(service.serve):
                        tasks.append(asyncio.ensure_future(self._serve_async(service, ctx)))
                    else:
                        self._start_thread(service, ctx)
            await self._block_async()
            # As in _run_sync.
            await asyncio.wait(
                [asyncio.ensure_future(w) for w in self._waiters], timeout=budget_of(self.lifecycle)
            )
            if tasks:
                await asyncio.wait(tasks, timeout=self.lifecycle.time_remaining())
            self._reraise()
        finally:
            if listener_loop(self.lifecycle) is self.loop:
                set_listener_loop(self.lifecycle, None)
            forget_loop(self.loop)

    # -- pieces -------------------------------------------------------------------------------

    def _register(self) -> None:
        """One wrap-up and one shutdown listener per service, chained in reverse list order."""
        self.contexts = [Context(self.lifecycle, s.name, self._started) for s in self.services]
        pairs = list(zip(self.services, self.contexts, strict=True))[::-1]
        previous: Waiter | None = None
        for service, ctx in pairs:
            previous = self.lifecycle.add_wrap_up_listener(
                self._step(service, ctx, previous, wrap_up=True), name=f"wrap up {service.name}"
            )
        if previous is not None:
            self._waiters.append(previous)
        previous = None
        for service, ctx in pairs:
            previous = self.lifecycle.add_shutdown_listener(
                self._step(service, ctx, previous, wrap_up=False), name=f"close {service.name}"
            )
        if previous is not None:
            # The last of each chain finishes after all the others.
            self._waiters.append(previous)

    def _step(self, service: Service, ctx: Context, after: Waiter | None, *, wrap_up: bool) -> Any:
        method = service.wrap_up if wrap_up else service.close

        def step() -> None:
            if after is not None:
                after.wait()
            with self._entering:
                entered = ctx.entered
            if wrap_up:
                # This service's turn: ctx.wrapping_up() turns True.
                ctx.wrap_up_began()
            if wrap_up and not entered:
                # Startup was interrupted before serve() ran.
                log.info("server %r never started serving: nothing to wrap up", ctx.name)
                return
            result = method(ctx)
            if is_awaitable(result):
                self._await_on_loop(result)
            if wrap_up:
                # Drained: "stopped" once serve() has returned too.
                self._stopped_half(ctx)

        # A wrap-up step waits on the service's drain: one of graceful's adapters bounds it and
        # names what it cuts (bounds_its_drain); a user's own Service or callable is abandoned at
        # the wrap-up timeout like any listener, so a drain that hangs holds nothing hostage.
        return mark_own(step, bounded=not wrap_up or getattr(service, "bounds_its_drain", False) is True)

    def _stopped_half(self, ctx: Context) -> None:
        """Called when serve() returned during the stop, and when the wrap-up step finished:
        the second call logs "server X stopped", so the line never comes before the drain."""
        with self._ready_lock:
            self._halves[ctx] = halves = self._halves.get(ctx, 0) + 1
        if halves == 2:
            log.info("server %r stopped", ctx.name)

    def _await_on_loop(self, awaitable: Any) -> None:
        run_awaitable(awaitable, None if self.loop is None or self.loop.is_closed() else self.loop)

    def _started(self, ctx: Context) -> None:
        with self._ready_lock:
            self._ready += 1
            all_up = self._ready == len(self.services)
        log.info("server %r started", ctx.name)
        if all_up:
            # Ready first, then say so: a probe sent on reading the line finds it ready.
            readiness.set_ready(self.lifecycle)
            _sockets.report_unclaimed()
            if self.upgrader is not None:
                # Before READY=1: a SIGUSR2 sent on reading it is taken.
                self.upgrader.serving = True
            ready = ["READY=1", f"STATUS=serving ({len(self.services)} server(s))"]
            # A new generation also says MAINPID=.
            if not _upgrade.successor_ready(ready):
                systemd.notify(*ready)
            log.info("all %d server(s) started: ready", len(self.services))

    def _start_thread(self, service: Service, ctx: Context) -> None:
        thread = threading.Thread(
            target=self._serve_sync, args=(service, ctx), name=f"graceful-serve-{service.name}", daemon=True
        )
        self.threads.append(thread)
        thread.start()

    def _too_late(self, service: Service) -> bool:
        """The sequence has begun: start no more servers (each one started must be stopped)."""
        if not self.lifecycle.is_stopping():
            return False
        log.info("shutting down while starting: server %r and those after it not started", service.name)
        return True

    def _enter(self, ctx: Context) -> bool:
        with self._entering:
            if not self.lifecycle.is_stopping():
                ctx.entered = True
        if not ctx.entered:
            ctx.served.set()
        return ctx.entered

    def _serve_sync(self, service: Service, ctx: Context) -> None:
        if not self._enter(ctx):
            return
        # Waiting for STOPPED in here would deadlock: _lifecycle refuses it.
        serving_as(service.name)
        try:
            service.serve(ctx)
        except BaseException as exc:  # noqa: BLE001 - a crashed server must stop the others, not vanish
            self._ended(service, ctx, exc)
        else:
            self._ended(service, ctx, None)
        finally:
            ctx.served.set()

    async def _serve_async(self, service: Service, ctx: Context) -> None:
        import asyncio

        if not self._enter(ctx):
            return
        try:
            await service.serve(ctx)  # type: ignore[misc]
        except asyncio.CancelledError:
            self._ended(service, ctx, None)
        except BaseException as exc:  # noqa: BLE001 - as in _serve_sync
            self._ended(service, ctx, exc)
        else:
            self._ended(service, ctx, None)
        finally:
            ctx.served.set()

    def _ended(self, service: Service, ctx: Context, exc: BaseException | None) -> None:
        if isinstance(exc, KeyboardInterrupt):
            log.info("server %r was interrupted: shutting down", service.name)
            self.lifecycle.shutdown("KeyboardInterrupt", wait=False)
        elif isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            # A known cause: one line.
            log.error(
                "server %r could not start: %s: stopping everything", service.name, _address_in_use(exc)
            )
            record_failure(self.lifecycle, f"server {service.name!r}")
            self.lifecycle.shutdown(f"server {service.name!r} could not start", wait=False)
        elif exc is not None:
            log.error("server %r crashed: stopping everything", service.name, exc_info=exc)
            record_failure(self.lifecycle, f"server {service.name!r}")
            self.lifecycle.shutdown(f"server {service.name!r} crashed", wait=False)
        elif self.lifecycle.force_quit_report is not None:
            # The force quit owns the end: claim nothing.
            log.info("server %r ended at the force quit", service.name)
        elif self.lifecycle.is_stopping():
            self._stopped_half(ctx)
        else:
            log.info("server %r returned on its own: stopping everything", service.name)
            self.lifecycle.shutdown(f"server {service.name!r} exited", wait=False)

    def _block(self) -> None:
        while True:
            try:
                # In slices, not one endless wait: CPython runs a Python signal handler only
                # between bytecodes, and a SIGINT that lands after the last such check but before
                # the lock wait blocks stays pending until the lock is acquired, here never: a
                # Ctrl-C under handle_signals=False (Python's KeyboardInterrupt) was lost. A
                # slice's end runs it at most BLOCK_SLICE later. (Our own handlers hand signals
                # to the wakeup fd instead: this race is not theirs.)
                if self.lifecycle.wait_for_shutdown(BLOCK_SLICE):
                    return
            except KeyboardInterrupt:
                # Only without our SIGINT handler (handle_signals=False).
                try:
                    if self._interrupted():
                        return
                except KeyboardInterrupt:
                    # The next Ctrl-C came while handling this one.
                    self.lifecycle.force_quit_now("KeyboardInterrupt again while shutting down")
                    return

    async def _block_async(self) -> None:
        import asyncio

        while True:
            try:
                await self.lifecycle.wait_for_shutdown_async()
                return
            except asyncio.CancelledError:
                # asyncio.run's own Ctrl-C handling (handle_signals=False).
                if self._interrupted():
                    return

    def _interrupted(self) -> bool:
        """Ctrl-C as the signal table has it: the first shuts down, any later one forces."""
        if shutdown_requested(self.lifecycle):
            self.lifecycle.force_quit_now("KeyboardInterrupt again while shutting down")
            return True
        self.lifecycle.shutdown("KeyboardInterrupt", wait=False)
        return False

    @contextlib.contextmanager
    def _whatever_happens(self) -> Iterator[None]:
        """If starting raises, trigger the sequence; ``_reraise()`` raises it once it has run."""
        try:
            yield
        except KeyboardInterrupt:
            # Ctrl-C while starting, without our SIGINT handler.
            try:
                self.lifecycle.shutdown("KeyboardInterrupt", wait=False)
                log.info("interrupted while starting: shutting down")
            except KeyboardInterrupt:
                # The next Ctrl-C came while handling this one.
                self.lifecycle.force_quit_now("KeyboardInterrupt again while starting")
        except BaseException as exc:
            # Kept, and raised again after the sequence.
            log.exception("graceful.run() failed: running the shutdown sequence anyway")
            record_failure(self.lifecycle, "graceful.run()")
            self.lifecycle.shutdown("graceful.run() failed", wait=False)
            self._error = exc

    def _reraise(self) -> None:
        """Raise what startup raised, now that the sequence has run."""
        if self._error is not None:
            raise self._error

    def _server_stacks(self) -> list[str]:
        return format_thread_stacks(self.threads, "Server threads still running:")

    def _report_leftovers(self) -> None:
        # One second for all of them, not one each.
        deadline = time.monotonic() + 1.0
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("server thread %r still running after shutdown", thread.name)
