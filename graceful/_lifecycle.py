"""The ``Lifecycle``: one coordinated shutdown, as a small state machine that only moves forward.

RUNNING -> WRAPPING_UP -> SHUTTING_DOWN -> STOPPED. Why it is shaped like this:

* Wrap-up and shutdown are separate phases; the shutdown phase starts only when *every*
  wrap-up listener has finished (``_phases`` says why).
* Every trigger is idempotent and every caller of ``shutdown(wait=True)`` waits for the same
  single sequence. asynq #979: a second ``Shutdown()`` returned at once, ``main`` exited and
  the cleanup never ran.
* The sequence is driven by its own non-daemon thread, so the interpreter does not exit in the
  middle of it even if ``main`` returns (go-zero #1804, #1664: "call waitForCalled yourself").
* ``shutdown()`` from inside a listener, or from a running event loop, triggers but does not
  block: waiting there for the sequence that is waiting for you is a deadlock.
* A pause (``wrap_up()``, SIGTSTP) runs only the wrap-up phase and starts no deadline; a later
  ``shutdown()`` continues from there (asynq's TSTP).
* Once the deadline has passed, the force quit owns the end (``_force_quit`` says why).
* It knows nothing of signals, ``run()``, readiness or systemd: they sit above it and learn
  of its transitions through ``subscribe()`` (``Event``), never by reaching in.

Its parts, in this file because they are the lifecycle's own:

* **State and Status.** An asynq incident write-up tells of a server left half-stopped by a
  stray signal, with nothing to show it from outside. Every transition is logged, and
  ``status()`` is a plain, immutable snapshot (state, reason, time since the trigger, each
  listener's phase, state and duration) that a health endpoint, a SIGUSR1 dump or a test reads.
* **Events.** systemd wants ``STOPPING=1`` the moment a shutdown starts and ``RELOADING=1``
  around a reload; a host wants to know when the deadline starts. Integrations subscribe to
  ``Event``s (``graceful.lowlevel.subscribe``) instead of reading private fields. A subscriber
  is called in the thread that made the transition, outside the lock; one that raises is
  logged and the others are still called: an integration never breaks the sequence.
* **Phases.** Each phase keeps a count of listeners still outstanding and one condition wakes
  the sequence when it reaches zero: no fixed sleep (go-zero sleeps 1 s and hopes), one
  wake-up per phase. A listener registered after its phase began runs at once and is counted
  like the others, so nothing is dropped and no waiter blocks for ever (go-zero's late
  ``waitForCalled`` hangs until the force kill). A removed listener leaves the registry at
  once and a finished one has let go of its callable: registering and removing 100,000
  listeners leaves memory and ``status()`` as they were.
* **Reloads.** A reload is not a step towards the exit: it may happen any number of times,
  its listeners run one after another (a configuration is re-read before the pool that uses
  it is resized), and one that raises stops neither the others nor the process. With no
  reload listener, SIGHUP means "the terminal went away" and the router shuts down instead.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable

from ._aio import Moment, is_awaitable, run_awaitable, running_loop
from ._checks import TYPE_CHECKING, check_listener, check_name, check_reason, check_seconds, check_timeout
from ._deadline import (
    DEFAULT_FORCE_QUIT,
    FORCED_EXIT_CODE,
    Clock,
    ForceQuitAction,
    ForceQuitTimer,
    MonotonicClock,
    check_clock,
)
from ._diagnostics import format_report, format_sections, listener_stack, write_fd2
from ._listeners import (
    DefaultLoop,
    Frozen,
    Listener,
    ListenerState,
    ListenerStatus,
    Phase,
    Waiter,
    current_listener,
    default_name,
    refuse_in_server,
    run_soon,
)

if TYPE_CHECKING:
    import asyncio
    import socket

__all__ = [
    "Event",
    "Lifecycle",
    "Observers",
    "Phases",
    "ReloadHandle",
    "Reloads",
    "State",
    "Status",
    "add_report_section",
    "budget",
    "clock",
    "join",
    "listener_loop",
    "listening_sockets",
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

log = logging.getLogger("graceful")


# -- the state and its snapshot ------------------------------------------------------------


class State(enum.Enum):
    """Where a lifecycle is. It only ever moves forward, in this order."""

    RUNNING = "running"
    WRAPPING_UP = "wrapping_up"
    SHUTTING_DOWN = "shutting_down"
    STOPPED = "stopped"


class Status(Frozen):
    """A snapshot of a lifecycle: what ``graceful.status()`` returns.

    ``state``; ``reason`` of the latest trigger; ``seconds_since_trigger`` (None before any);
    ``force_quit``, the budget in seconds; ``listeners``, one ``ListenerStatus`` each;
    ``forced``, True once the force-quit report was written; ``wrap_up_timeout``, the longest
    the wrap-up phase may take, in seconds from the shutdown trigger.
    """

    __slots__ = (
        "force_quit",
        "forced",
        "listeners",
        "reason",
        "seconds_since_trigger",
        "state",
        "wrap_up_timeout",
    )
    _fields = (
        "state",
        "reason",
        "seconds_since_trigger",
        "force_quit",
        "listeners",
        "forced",
        "wrap_up_timeout",
    )
    state: State
    reason: str | None
    seconds_since_trigger: float | None
    force_quit: float
    listeners: tuple[ListenerStatus, ...]
    forced: bool
    wrap_up_timeout: float | None

    def __init__(  # noqa: PLR0917 - one positional argument per field, as a dataclass would take
        self,
        state: State,
        reason: str | None,
        seconds_since_trigger: float | None,
        force_quit: float,
        listeners: tuple[ListenerStatus, ...],
        forced: bool = False,
        wrap_up_timeout: float | None = None,
    ) -> None:
        super().__init__(state, reason, seconds_since_trigger, force_quit, listeners, forced, wrap_up_timeout)

    def format(self) -> str:
        """A few human-readable lines, as the SIGUSR1 dump prints them."""
        since = (
            "not triggered"
            if self.seconds_since_trigger is None
            else f"{self.seconds_since_trigger:.3f} s since {self.reason!r}"
        )
        bound = "" if self.wrap_up_timeout is None else f" (wrap-up within {self.wrap_up_timeout:g} s)"
        lines = [
            f"graceful: state {self.state.value}, {since}, force quit after {self.force_quit:g} s{bound}"
        ]
        lines.extend(f"  {item.describe()}" for item in self.listeners)
        return "\n".join(lines)


# -- events --------------------------------------------------------------------------------


class Event(str, enum.Enum):
    """A lifecycle transition, as ``Lifecycle.subscribe`` reports it with a detail string."""

    WRAPPING_UP = "wrapping_up"
    """Wrap-up began (a pause or a shutdown); detail: the reason."""
    SHUTDOWN_REQUESTED = "shutdown_requested"
    """A shutdown was asked for and the force-quit deadline started; detail: the reason."""
    SHUTTING_DOWN = "shutting_down"
    """Every wrap-up listener finished; the shutdown phase begins; detail: the reason."""
    STOPPED = "stopped"
    """The sequence is over; detail: how long it took."""
    FORCED = "forced"
    """The force quit began (the report is out; the exit follows); detail: why."""
    RELOADING = "reloading"
    """Reload listeners are about to run; detail: the reason (``"SIGHUP"``)."""
    RELOADED = "reloaded"
    """Every reload listener has run; detail: the reason."""


Subscriber = Callable[[Event, str], object]


class Observers:
    """The subscribers of one lifecycle; ``emit`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event, detail)`` at each transition; returns a function that undoes it."""
        if not callable(fn):
            raise TypeError(f"subscribe() takes a callable fn(event, detail), not {fn!r}")
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, event: Event, detail: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event, detail)
            except Exception:
                # An integration must never break the sequence.
                log.exception("graceful subscriber %r failed on %s", fn, event.value)


# -- the phases ----------------------------------------------------------------------------


class _Registry:
    __slots__ = ("listeners", "outstanding", "started")

    def __init__(self) -> None:
        self.listeners: dict[Listener, None] = {}
        """The phase's listeners in registration order: a dict, insertion-ordered, O(1) removal."""
        self.started = False
        self.outstanding = 0


class Phases:
    """The phases of one lifecycle. Every method takes the shared lock itself, unless it says so."""

    def __init__(self, changed: threading.Condition) -> None:
        self._changed = changed
        self._registries = {phase: _Registry() for phase in Phase}
        self.failures: list[str] = []
        """What failed (listeners, and servers recorded by ``run()``); written under the lock."""

    def add(self, listener: Listener) -> None:
        """Register ``listener``; if its phase began already, run it now."""
        with self._changed:
            registry = self._registries[listener.phase]
            registry.listeners[listener] = None
            late = registry.started
            if late:
                listener.scheduled = True
                registry.outstanding += 1
        if late:
            log.info(
                "%s listener %r registered after its phase began: running it now",
                listener.phase,
                listener.name,
            )
            run_soon(listener)

    def remove(self, listener: Listener) -> bool:
        """Unregister ``listener`` if it has not been scheduled; True if it was removed."""
        with self._changed:
            if not listener.remove():
                return False
            self._registries[listener.phase].listeners.pop(listener, None)
            return True

    def run(self, phase: Phase) -> tuple[int, int]:
        """Start every pending listener of ``phase`` (concurrently); returns how many, and how
        many of them are graceful's own (``run()``'s steps for its servers)."""
        with self._changed:
            registry = self._registries[phase]
            registry.started = True
            batch = [
                item
                for item in registry.listeners
                if item.state is ListenerState.PENDING and not item.scheduled
            ]
            for item in batch:
                item.scheduled = True
            registry.outstanding += len(batch)
        run_soon(*batch)
        return len(batch), sum(item.own for item in batch)

    def outstanding(self, phase: Phase) -> int:
        """Listeners of ``phase`` scheduled and not finished (the caller holds the lock)."""
        return self._registries[phase].outstanding

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until no listener of any phase is running; True if so within ``timeout``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(registry.outstanding for registry in self._registries.values()), timeout
            )

    def finished(self, listener: Listener) -> None:
        """What each listener calls as it finishes (from its pool thread), or is abandoned."""
        with self._changed:
            registry = self._registries[listener.phase]
            registry.outstanding -= 1
            if listener.error is not None:
                abandoned = " (abandoned)" if listener.state is ListenerState.ABANDONED else ""
                self.failures.append(f"{listener.phase} listener {listener.name!r}{abandoned}")
            if registry.outstanding == 0:
                # Only then can the sequence move on.
                self._changed.notify_all()

    def started(self, listener: Listener) -> None:
        """What a listener with a timeout calls as it starts: the sequence learns its expiry."""
        with self._changed:
            self._changed.notify_all()

    def unfinished(self, phases: tuple[Phase, ...]) -> list[Listener]:
        """The listeners of ``phases`` scheduled and not finished (the caller holds the lock)."""
        return [
            item
            for phase in phases
            for item in self._registries[phase].listeners
            if item.scheduled and item.state in (ListenerState.PENDING, ListenerState.RUNNING)
        ]

    def wait_real(self, phase: Phase, until: float) -> bool:
        """Block until every scheduled listener of ``phase`` has finished, or ``until`` on
        ``time.monotonic()``'s scale (the force quit's slice); True if they all did."""
        with self._changed:
            while self._registries[phase].outstanding:
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def listeners(self) -> list[Listener]:
        """Every registered listener, phase by phase, in registration order (a copy)."""
        with self._changed:
            return [item for registry in self._registries.values() for item in registry.listeners]


# -- reloads -------------------------------------------------------------------------------


class ReloadHandle:
    """What ``add_reload_listener`` returns; ``remove()`` unregisters the listener."""

    __slots__ = ("_fn", "_registry", "name")

    def __init__(self, registry: Reloads, fn: Callable[[], object], name: str) -> None:
        self._registry = registry
        self._fn = fn
        self.name = name

    def __call__(self) -> object:
        """Run the listener once (what a reload does)."""
        return self._fn()

    def remove(self) -> bool:
        """Unregister; True if it was registered."""
        return self._registry.remove(self)

    def __repr__(self) -> str:
        return f"<graceful.ReloadHandle {self.name!r}>"


class Reloads:
    """The reload listeners of one lifecycle."""

    def __init__(self, observers: Observers) -> None:
        self._observers = observers
        self._lock = threading.Lock()
        self._handles: list[ReloadHandle] = []

    def add(self, fn: Callable[[], object], name: str) -> ReloadHandle:
        handle = ReloadHandle(self, fn, name)
        with self._lock:
            self._handles.append(handle)
        return handle

    def remove(self, handle: ReloadHandle) -> bool:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)
                return True
            return False

    def count(self) -> int:
        with self._lock:
            return len(self._handles)

    def run_all(self, reason: str) -> int:
        """Run every listener, in registration order, in this thread; returns how many ran.

        Each is isolated: one that raises (even ``SystemExit`` or ``KeyboardInterrupt``) is
        logged with its name and the others still run. ``Event.RELOADING`` comes before,
        ``Event.RELOADED`` after.
        """
        with self._lock:
            handles = list(self._handles)
        log.info("reloading (%s): %d reload listener(s)", reason, len(handles))
        self._observers.emit(Event.RELOADING, reason)
        for handle in handles:
            try:
                result = handle()
                if is_awaitable(result):
                    run_awaitable(result)
            except BaseException:
                # A reload listener must never end the thread that runs it.
                log.exception("reload listener %r failed", handle.name)
        self._observers.emit(Event.RELOADED, reason)
        return len(handles)


# -- the lifecycle -------------------------------------------------------------------------


class Lifecycle:
    """One process's shutdown: listener registries, the phase sequence and the deadline.

    The module-level functions (``graceful.shutdown()`` and the rest) act on a default
    instance; tests and embedders make their own, and pass it where needed:
    ``graceful.run(server, lifecycle=lc)``, ``graceful.signal_handlers(lifecycle=lc)``.

    Args:
        force_quit: the budget in seconds, counted from the first shutdown trigger, after which
            the process reports what is still running, gives the flush listeners their last
            slice and exits with code 70. None (the default): ``GRACEFUL_FORCE_QUIT`` if it is
            set, else 25 s, read when ``run()`` or a host starts, or else when the deadline is
            armed (never at import).
        wrap_up_timeout: the longest the wrap-up phase may take, in seconds from the shutdown
            trigger; past it the wrap-up listeners still running are abandoned and the shutdown
            phase starts. None (the default): ``GRACEFUL_WRAP_UP_TIMEOUT`` if set, else the
            budget minus ``min(5 s, budget / 5)`` (20 s of 25). Must be below the budget.
        clock: where time comes from (``graceful.testing.FakeClock`` in tests).
        exit: called with 70 when the deadline passes; ``os._exit`` by default (tests record).

    Integration hooks (events, report sections, force-quit hooks, the sequence's thread) are
    not methods: they take the lifecycle as their first argument in ``graceful.lowlevel``.

    Raises:
        TypeError, ValueError: a bad argument (``force_quit`` must be a finite number > 0;
            ``wrap_up_timeout`` one below it).
    """

    def __init__(
        self,
        force_quit: float | None = None,
        *,
        wrap_up_timeout: float | None = None,
        clock: Clock | None = None,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        budget = (
            DEFAULT_FORCE_QUIT
            if force_quit is None
            else check_seconds(force_quit, "Lifecycle(force_quit=...)")
        )
        self._wrap_up_timeout = (
            None
            if wrap_up_timeout is None
            else _check_wrap_up_timeout(wrap_up_timeout, budget, "Lifecycle(wrap_up_timeout=...)")
        )
        self._budget_chosen = force_quit is not None
        """A budget was given or read; until then ``GRACEFUL_FORCE_QUIT`` may still choose it."""
        self._time: Clock = check_clock(clock) or MonotonicClock()
        self._action = ForceQuitAction(exit)
        self._daemon = False
        """The sequence's thread is a daemon (``lowlevel.set_daemon()``)."""
        self._sequence_lock = threading.Condition(threading.Lock())
        self._state = State.RUNNING
        self.stopping = False
        """True from the moment wrap-up starts. Read-only: written by the lifecycle only, under
        its lock; a plain attribute so that ``graceful.is_stopping()`` is one attribute read."""
        self._wrap_up_started = Moment()
        self._announced = threading.Event()
        """Set once "wrapping up" is logged: the sequence may log now."""
        self._reason: str | None = None
        self._triggers: list[str] = []
        """Each trigger's reason, in order, for the final log line."""
        self._triggered_at: float | None = None
        self._shutdown_requested = False
        self._phases = Phases(self._sequence_lock)
        self._observers = Observers()
        self._reload_listeners = Reloads(self._observers)
        self._stopped = Moment()
        self._forced: str | None = None
        self._report_sections: list[Callable[[], list[str]]] = []
        self._kept_armed: list[str] = []
        """What may still hold the exit (``keep_deadline_armed()``): the deadline stays armed."""
        self._progress = 0
        self._driver: threading.Thread | None = None
        self._driver_waiting = False
        """``lowlevel.prepare()`` started the sequence's thread ahead."""
        self._timer = ForceQuitTimer(self._time, budget, self._deadline_passed)
        self._listener_loops = DefaultLoop()
        self._listen_sockets: list[socket.socket] = []
        """What ``listen()`` gave: an upgrade passes them down."""

    # -- registries ---------------------------------------------------------------------------

    def add_wrap_up_listener(
        self, fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
    ) -> Waiter:
        """Run ``fn`` in the wrap-up phase ("stop taking new work, finish what is in flight").

        ``fn`` is a callable with no arguments, sync or ``async def``. It runs at most once,
        concurrently with the other wrap-up listeners. Registered after the phase began, it
        runs at once. Returns its ``Waiter``.

        ``timeout``: seconds it may run; past them (or past the wrap-up timeout, whichever
        comes first) it is *abandoned*: logged at ERROR with where it is stuck, its waiter done
        with a ``TimeoutError``, an ``async def`` one cancelled, and the sequence goes on (a
        thread cannot be killed: it runs on as a daemon). The exit code becomes 1.

        Raises:
            TypeError: ``fn`` is not callable with no arguments, is a generator function,
                ``name`` is not a str, or ``timeout`` not a number.
            ValueError: ``timeout`` is not a finite number of seconds > 0.
        """
        return self._add(Phase.WRAP_UP, fn, name, timeout, "add_wrap_up_listener")

    def add_shutdown_listener(
        self, fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
    ) -> Waiter:
        """Run ``fn`` in the shutdown phase ("release resources"), after every wrap-up listener
        has finished or was abandoned.

        Same rules as ``add_wrap_up_listener``; ``timeout`` bounds it alone.
        """
        return self._add(Phase.SHUTDOWN, fn, name, timeout, "add_shutdown_listener")

    def add_flush_listener(
        self, fn: Callable[[], object], *, name: str | None = None, timeout: float | None = None
    ) -> Waiter:
        """Run ``fn`` in the flush phase: after the shutdown phase, **and** at a force quit.

        For what must leave the process before it ends: telemetry exporters (OpenTelemetry's
        ``force_flush``), error reporters (Sentry's ``flush``), a log queue
        (``QueueListener.stop``), a metrics push. At a force quit (the deadline, a second
        SIGINT, SIGQUIT) the report is written first, then the flush listeners that have not
        run get one slice of at most 1 s together, then the exit: give them a ``timeout`` well
        under a second for that case. Same rules as ``add_wrap_up_listener`` otherwise.
        """
        return self._add(Phase.FLUSH, fn, name, timeout, "add_flush_listener")

    def _add(self, phase: Phase, fn: object, name: object, timeout: object, what: str) -> Waiter:
        checked = check_listener(fn, what)
        label = check_name(name, what) or default_name(checked)
        bound = None if timeout is None else check_seconds(timeout, f"{what}(timeout=...)", example="5")
        listener = Listener(
            checked,
            label,
            phase,
            self._time.monotonic,
            self._phases.finished,
            loops=self._listener_loops,
            timeout=bound,
            on_start=None if bound is None else self._phases.started,
        )
        self._phases.add(listener)
        return Waiter(listener, self._phases.remove)

    def add_reload_listener(self, fn: Callable[[], object], *, name: str | None = None) -> ReloadHandle:
        """Run ``fn`` on every reload (SIGHUP); returns a handle with ``remove()``.

        Raises:
            TypeError: as for ``add_wrap_up_listener``.
        """
        checked = check_listener(fn, "add_reload_listener")
        return self._reload_listeners.add(
            checked, check_name(name, "add_reload_listener") or default_name(checked)
        )

    def reload(self, reason: str = "requested") -> int:
        """Run every reload listener in turn, in this thread (one that raises is logged, the
        others still run; ``Event.RELOADING`` before, ``RELOADED`` after); returns how many."""
        return self._reload_listeners.run_all(check_reason(reason, "reload()"))

    # -- sockets ------------------------------------------------------------------------------

    def listen(self, address: object, *, backlog: int | None = None) -> socket.socket:
        """A listening socket for ``address``: the inherited one when one matches, else bound here.

        ``address`` is ``(host, port)`` for TCP (IPv4 or IPv6; ``""`` is every IPv4 interface,
        port 0 any free port) or a path for a Unix socket (``"@name"``: Linux's abstract
        namespace). Inherited means passed by systemd socket activation (``LISTEN_FDS``) or by
        the previous generation during an upgrade in place (SIGUSR2 under ``run()``): then
        nothing is bound, and no connection is refused between the two processes. The socket is
        remembered here, so that an upgrade passes it down to the next generation.

        Args:
            address: ``(host, port)`` or a Unix socket path.
            backlog: the accept queue's length; None keeps an inherited socket's and gives a
                new one ``socket.SOMAXCONN``.

        Raises:
            TypeError, ValueError: a bad address or backlog, before anything is bound.
            OSError: the address cannot be bound (in use, say); the message names it.
        """
        # Loaded on first use: ``import graceful`` stays light.
        from ._sockets import listen

        sock = listen(address, backlog=backlog)
        with self._sequence_lock:
            self._listen_sockets.append(sock)
        return sock

    # -- triggers -----------------------------------------------------------------------------

    def wrap_up(self, reason: str = "requested") -> None:
        """Run the wrap-up phase only (a pause); a later ``shutdown()`` continues from there.

        Starts no force-quit deadline. Idempotent; safe from any thread.
        """
        self._trigger(check_reason(reason, "wrap_up()"), shutdown=False)

    def shutdown(self, reason: str = "requested", *, wait: bool = True, timeout: float | None = None) -> bool:
        """Start the sequence (or join the one under way); True once the lifecycle is STOPPED.

        With ``wait`` (the default) block until STOPPED or ``timeout`` seconds. From inside a
        listener, or from a thread running an event loop, it does not block (that would
        deadlock): use ``await wait_for_shutdown_async()`` there. Idempotent; safe from any
        thread; the force-quit deadline starts at the first call.

        Raises:
            TypeError, ValueError: a bad ``reason``, ``wait`` (a bool only: ``wait="no"`` would
                be truthy and block) or ``timeout``, before anything starts.
            RuntimeError: ``wait`` from a server's thread under ``run()``: it would wait for itself.
        """
        reason = check_reason(reason, "shutdown()")
        if not isinstance(wait, bool):
            raise TypeError(f"shutdown(wait=...) takes True or False, not {wait!r}")
        limit = check_timeout(timeout, "shutdown()")
        if wait and limit != 0:
            refuse_in_server("shutdown()", "graceful.shutdown(wait=False)")
        self._trigger(reason, shutdown=True)
        if not wait or current_listener() is not None or running_loop() is not None:
            return self._stopped.is_set()
        return self._stopped.wait(limit)

    def _trigger(self, reason: str, *, shutdown: bool) -> None:
        # Act first, log after, outside the lock: the main thread may be holding the logging
        # lock while it waits for exactly the listeners this starts (gunicorn #3198).
        arm = start = False
        notes: list[str] = []
        with self._sequence_lock:
            if self._state is State.RUNNING:
                self._triggered_at = self._time.monotonic()
                self._reason = reason
                self._triggers.append(reason)
                self.stopping = True
                notes.append(self._set_state(State.WRAPPING_UP, reason))
                start = True
            if shutdown and not self._shutdown_requested:
                self._shutdown_requested = True
                arm = True
                if not start:
                    self._reason = reason
                    self._triggers.append(reason)
                    notes.append(f"shutdown requested ({reason}): continuing after the wrap-up phase")
                self._sequence_lock.notify_all()
            driver = self._driver_to_start() if start else None
        # Whatever happens here (a Ctrl-C in the main thread), the sequence is not held.
        try:
            if start:
                self._wrap_up_started.set()
            if arm:
                self._budget_from_environment()
                self._timer.arm()
            if driver is not None:
                driver.start()
            for note in notes:
                log.info("%s", note)
        finally:
            if start:
                # The sequence's own lines come after this one.
                self._announced.set()
        if start:
            self._observers.emit(Event.WRAPPING_UP, reason)
        if arm:
            self._observers.emit(Event.SHUTDOWN_REQUESTED, reason)

    def _driver_to_start(self) -> threading.Thread | None:
        """The sequence's thread, to start once out of the lock; None when ``prepare()`` started
        one ahead (woken here: the caller holds the lock)."""
        if self._driver_waiting and self._driver is not None and self._driver.is_alive():
            self._sequence_lock.notify_all()
            return None
        # Explicitly daemon or not: a thread inherits its creator's flag, and the signal
        # coordinator is a daemon; the interpreter must wait for the cleanup.
        self._driver = threading.Thread(target=self._drive, name="graceful-lifecycle", daemon=self._daemon)
        return self._driver

    def _budget_from_environment(self) -> None:
        """Nothing chose the budget (no ``run()``, no host, no call): ``GRACEFUL_FORCE_QUIT`` now.

        A bad value must not stop a shutdown that is under way: it is logged, and the default
        applies (``run()`` and the hosts refuse such a value at start, before anything runs).
        """
        if self._budget_chosen:
            return
        self._budget_chosen = True
        # Read when the deadline starts.
        from ._settings import read_budget, read_wrap_up_timeout

        try:
            seconds = read_budget()
            if seconds is not None:
                self._timer.set_budget(seconds)
            if self._wrap_up_timeout is None:
                wrap_up = read_wrap_up_timeout()
                if wrap_up is not None:
                    self._wrap_up_timeout = _check_wrap_up_timeout(
                        wrap_up, self._timer.budget, "GRACEFUL_WRAP_UP_TIMEOUT"
                    )
        except ValueError as exc:
            log.error("%s; graceful's defaults apply", exc)  # noqa: TRY400 - the message is the news, not a traceback

    def _set_state(self, state: State, why: str) -> str:
        """Move to ``state`` (the caller holds the lock); returns the line to log afterwards."""
        self._state = state
        return f"{state.value.replace('_', ' ')} ({why})"

    # -- the sequence -------------------------------------------------------------------------

    def _wait_for_trigger(self) -> None:
        """The sequence's thread, started ahead by ``lowlevel.prepare()``: wait, then drive."""
        with self._sequence_lock:
            while self._state is State.RUNNING:
                self._sequence_lock.wait()
        self._drive()

    def _drive(self) -> None:
        self._run_phase(Phase.WRAP_UP)
        # Wrap-up listeners registered late (during a pause, say) must finish first too; the
        # wrap-up timeout bounds them all once a shutdown is asked for.
        self._await(
            lambda: self._shutdown_requested and not self._phases.outstanding(Phase.WRAP_UP), (Phase.WRAP_UP,)
        )
        with self._sequence_lock:
            note = self._set_state(State.SHUTTING_DOWN, f"wrap-up done; {self._reason}")
        self._observers.emit(Event.SHUTTING_DOWN, self._reason or "")
        self._run_phase(Phase.SHUTDOWN, note)
        self._run_phase(Phase.FLUSH)
        self._await(lambda: not any(self._phases.outstanding(phase) for phase in Phase), tuple(Phase))
        left = [
            item for item in self._phases.listeners() if item.abandoned_at is not None and item.is_alive()
        ]
        with self._sequence_lock:
            # An abandoned listener still running may keep the process alive: the deadline stays
            # armed for it, and its report names it again (a thread cannot be stopped). So it
            # does for what an adapter cut at the wrap-up timeout (keep_deadline_armed()).
            kept = list(self._kept_armed)
            late = self._timer.passed() if left or kept else self._timer.disarm_unless_passed()
        if left and not late:
            remaining = self._timer.remaining() or 0.0
            log.info(
                "%d abandoned listener(s) still running (%s): the force-quit deadline stays armed, %.3f s left",
                len(left),
                ", ".join(repr(item.name) for item in left),
                remaining,
            )
        if kept and not late:
            log.info(
                "%s: the force-quit deadline stays armed, %.3f s left",
                "; ".join(kept),
                self._timer.remaining() or 0.0,
            )
        if late:
            # The deadline came first: the force quit owns the end (a no-op if it began).
            self.force_quit_now(f"the force-quit deadline of {self._timer.budget:g} s passed")
        self._finish()

    def _finish(self) -> None:
        if self._forced is not None:
            # The force quit owns the end (its hooks may still be naming what they cut): nobody
            # is told STOPPED before it is over (in tests, when the recorded exit returns).
            self._action.done.wait()
        with self._sequence_lock:
            took = self._time.monotonic() - (self._triggered_at or 0.0)
            detail = f"{took:.3f} s after {' then '.join(self._triggers)}"
            note = self._set_state(State.STOPPED, detail)
            forced = self._forced is not None
        if not forced:
            # After a force quit nothing may claim a clean stop. Logged before waking the
            # waiters, so that the log reads in order.
            log.info("%s", note)
            self._observers.emit(Event.STOPPED, detail)
        self._stopped.set()

    def _run_phase(self, phase: Phase, note: str | None = None) -> None:
        """Start the phase's listeners, log ``note``, then wait until every one has finished
        (or was abandoned)."""
        t0 = self._time.monotonic()
        count, own = self._phases.run(phase)
        if note is not None:
            log.info("%s", note)
        self._await(lambda: not self._phases.outstanding(phase), (phase,))
        # Its listeners ran first (act first); its lines follow the trigger's.
        self._announced.wait()
        if phase is Phase.FLUSH and not count:
            # Most programs have none: no line for a phase that did nothing.
            return
        # So that a reader counts theirs.
        theirs = f", {own} of them graceful's own (the servers')" if own else ""
        log.info(
            "%s phase done: %d listener(s)%s in %.3f s", phase, count, theirs, self._time.monotonic() - t0
        )

    def _await(self, done: Callable[[], bool], phases: tuple[Phase, ...]) -> None:
        """Block until ``done()``, abandoning on the way every listener of ``phases`` past its
        own timeout, and every wrap-up listener past the wrap-up timeout."""
        while True:
            with self._sequence_lock:
                if done():
                    return
                now = self._time.monotonic()
                expired, until = self._expired(phases, now)
                if not expired:
                    self._time.wait_until(self._sequence_lock, until)
                    continue
            # Outside the lock: abandoning takes it to count down.
            for listener, why in expired:
                self._abandon(listener, now, why)

    def _expired(
        self, phases: tuple[Phase, ...], now: float
    ) -> tuple[list[tuple[Listener, str]], float | None]:
        """The listeners of ``phases`` to abandon now, and when the next one would be due (the
        caller holds the lock)."""
        expired: list[tuple[Listener, str]] = []
        until: float | None = None
        wrap_up_end = self._wrap_up_end() if Phase.WRAP_UP in phases else None
        for listener in self._phases.unfinished(phases):
            due = listener.expires_at()
            why = "" if due is None else f"its timeout of {listener.timeout} s passed"
            if (
                listener.phase is Phase.WRAP_UP
                # graceful's own drains bound themselves (mark_own).
                and not listener.bounded
                and wrap_up_end is not None
                and (due is None or wrap_up_end < due)
            ):
                due, why = wrap_up_end, f"the wrap-up timeout of {self.wrap_up_timeout:g} s passed"
            if due is None:
                continue
            if now >= due:
                expired.append((listener, why))
            elif until is None or due < until:
                until = due
        return expired, until

    def _wrap_up_end(self) -> float | None:
        """When the wrap-up phase must end: the shutdown trigger plus the wrap-up timeout."""
        armed = self._timer.armed_at
        return None if armed is None else armed + self.wrap_up_timeout

    def _abandon(self, listener: Listener, now: float, why: str) -> None:
        if not listener.abandon(now, why):
            # It finished meanwhile.
            return
        took = 0.0 if listener.started is None else now - listener.started
        stack = listener_stack(listener) if listener.started is not None else ["      (it never started)"]
        log.error(
            "%s listener %r abandoned after %.3f s: %s; the sequence goes on without it. It was at:\n%s",
            listener.phase,
            listener.name,
            took,
            why,
            "\n".join(stack),
        )

    # -- the wrap-up timeout ------------------------------------------------------------------

    @property
    def wrap_up_timeout(self) -> float:
        """The longest the wrap-up phase may take, in seconds from the shutdown trigger: the one
        set, else the budget minus ``min(5 s, budget / 5)``."""
        if self._wrap_up_timeout is not None:
            return self._wrap_up_timeout
        budget = self._timer.budget
        return budget - min(5.0, budget / 5)

    def set_wrap_up_timeout(self, seconds: float) -> None:
        """Set the wrap-up timeout: seconds from the shutdown trigger, below the budget.

        A pause (``wrap_up()``, SIGTSTP) has no timeout; the count starts at the shutdown
        trigger. Past it, the wrap-up listeners still running are abandoned and the shutdown
        phase starts, so resources are released and telemetry flushed even when a drain hangs.

        Raises:
            TypeError: ``seconds`` is not a number.
            ValueError: not a finite number > 0, or not below the force-quit budget.
        """
        checked = _check_wrap_up_timeout(seconds, self._timer.budget, "set_wrap_up_timeout()")
        with self._sequence_lock:
            self._wrap_up_timeout = checked
            # The sequence looks at the new bound.
            self._sequence_lock.notify_all()

    # -- force quit ---------------------------------------------------------------------------

    def set_time_to_force_quit(self, seconds: float) -> None:
        """Set the force-quit budget; a running deadline moves, still counted from the first
        trigger. The wrap-up timeout, unless one was set, follows it.

        Raises:
            TypeError: ``seconds`` is not a number.
            ValueError: not a finite number > 0, or not above a wrap-up timeout set before.
        """
        budget = check_seconds(seconds, "set_time_to_force_quit()")
        if self._wrap_up_timeout is not None and self._wrap_up_timeout >= budget:
            raise ValueError(
                f"set_time_to_force_quit({seconds!r}) is not above the wrap-up timeout set before "
                f"({self._wrap_up_timeout:g} s): lower that first (set_wrap_up_timeout()), or choose a longer budget"
            )
        self._timer.set_budget(budget)
        self._budget_chosen = True
        with self._sequence_lock:
            # A default wrap-up timeout moved with it.
            self._sequence_lock.notify_all()

    def _deadline_passed(self) -> None:
        self.force_quit_now(f"the force-quit deadline of {self._timer.budget:g} s passed")

    def force_quit_now(self, why: str = "requested") -> None:
        """Report what is still running, then exit with code 70 now. Only the first call acts.

        What the deadline, a second SIGINT and SIGQUIT do. The report goes to stderr first,
        then to the ``graceful`` logger; then, in one slice of at most 1 s, the force-quit
        hooks and the flush listeners that have not run; then the ``logging`` handlers that can
        be flushed without waiting on a lock; then the exit.

        Raises:
            TypeError: ``why`` is not a str.
        """
        why = check_reason(why, "force_quit_now()")
        # Before the lock: this takes it itself.
        listeners = self._phases.listeners()
        with self._sequence_lock:
            if self._forced is not None:
                return
            now = self._time.monotonic()
            since = None if self._triggered_at is None else now - self._triggered_at
            report = format_report(why, since, self._triggers, FORCED_EXIT_CODE, listeners, now)
            # Claimed: only this call goes on.
            self._forced = report
        report = self._forced = "\n".join([report, *format_sections(list(self._report_sections))])
        self._action.execute(
            report, lambda: self._observers.emit(Event.FORCED, why), self._flush_at_force_quit
        )

    def _flush_at_force_quit(self, until: float) -> None:
        """The flush listeners that have not run start now; wait for all of them until ``until``
        (``time.monotonic()``'s scale: the force quit's slice is real time whatever the clock)."""
        count, _ = self._phases.run(Phase.FLUSH)
        if not self._phases.wait_real(Phase.FLUSH, until):
            still = [item.name for item in self._phases.unfinished((Phase.FLUSH,))]
            write_fd2(f"graceful: flush listener(s) still running at the end of the slice: {still}\n")
        elif count:
            write_fd2(f"graceful: {count} flush listener(s) ran before the exit\n")

    # -- observing ----------------------------------------------------------------------------

    def is_stopping(self) -> bool:
        """True from the moment wrap-up starts. An attribute read: cheap in a hot loop."""
        return self.stopping

    def state(self) -> State:
        """``State.RUNNING``, ``WRAPPING_UP``, ``SHUTTING_DOWN`` or ``STOPPED``."""
        return self._state

    def wait_for_wrap_up(self, timeout: float | None = None) -> bool:
        """Block until wrap-up begins (``is_stopping()`` turns True); True if it did in time."""
        return self._wrap_up_started.wait(check_timeout(timeout, "wait_for_wrap_up()"))

    async def wait_for_wrap_up_async(self) -> bool:
        """``await`` until wrap-up begins, without blocking the event loop."""
        return await self._wrap_up_started.wait_async()

    def wait_for_shutdown(self, timeout: float | None = None) -> bool:
        """Block until STOPPED; True if it got there within ``timeout``. ``RuntimeError`` from a
        server's thread under ``run()``, which would wait for itself: ``wait_for_wrap_up()``."""
        limit = check_timeout(timeout, "wait_for_shutdown()")
        # A timeout of 0 only looks: harmless anywhere.
        if limit != 0:
            refuse_in_server("wait_for_shutdown()")
        return self._stopped.wait(limit)

    async def wait_for_shutdown_async(self) -> bool:
        """``await`` until STOPPED, without blocking the event loop."""
        return await self._stopped.wait_async()

    @property
    def exit_code(self) -> int:
        """70 if forced, 1 if a listener or a recorded server failed, else 0."""
        if self._forced is not None:
            return FORCED_EXIT_CODE
        return 1 if self._phases.failures else 0

    @property
    def force_quit_report(self) -> str | None:
        """The force-quit report, once the lifecycle was forced; None until then."""
        return self._forced

    def wrap_up_remaining(self) -> float | None:
        """Seconds left before the wrap-up phase must end (the wrap-up timeout), or None while no
        shutdown was triggered (a pause has no timeout)."""
        end = self._wrap_up_end()
        return None if end is None else max(0.0, end - self._time.monotonic())

    def time_remaining(self) -> float | None:
        """Seconds left before force quit, or None while no shutdown was triggered."""
        return self._timer.remaining()

    def status(self) -> Status:
        """A snapshot: state, reason, time since the trigger, and every listener's progress."""
        now = self._time.monotonic()
        listeners = tuple(item.status(now) for item in self._phases.listeners())
        with self._sequence_lock:
            since = None if self._triggered_at is None else now - self._triggered_at
            return Status(
                self._state,
                self._reason,
                since,
                self._timer.budget,
                listeners,
                self._forced is not None,
                self.wrap_up_timeout,
            )

    def __repr__(self) -> str:
        return f"<graceful.Lifecycle {self._state.value} reason={self._reason!r}>"


def _check_wrap_up_timeout(seconds: object, budget: float, what: str) -> float:
    checked = check_seconds(seconds, what, example="20")
    if checked >= budget:
        raise ValueError(
            f"{what} takes a wrap-up timeout below the force-quit budget ({budget:g} s), so that "
            f"the shutdown and flush listeners still have time; not {seconds!r}"
        )
    return checked


# -- graceful.lowlevel: the integration hooks, off the public Lifecycle --------------------------


def subscribe(lifecycle: Lifecycle, fn: Callable[[Event, str], object]) -> Callable[[], None]:
    """Call ``fn(event, detail)`` at each transition of ``lifecycle`` (an ``Event``); returns the undo.

    For integrations (systemd, hosts): called in the thread that made the transition, outside
    the lifecycle's lock; it must not block. One that raises is logged.
    """
    return lifecycle._observers.subscribe(fn)


def record_failure(lifecycle: Lifecycle, what: str) -> None:
    """Note that ``what`` (a server the caller runs, say) failed: the exit code becomes 1."""
    with lifecycle._sequence_lock:
        lifecycle._phases.failures.append(what)


def keep_deadline_armed(lifecycle: Lifecycle, why: str) -> None:
    """Keep the force-quit deadline armed once the sequence is over, because of ``why``.

    For an adapter that cut requests at the wrap-up timeout: their code may go on in a thread
    that nothing can stop (a handler thread, an executor's), and a pool joins such threads at
    the exit (``asyncio.run()``, ``concurrent.futures`` at interpreter exit), so the process
    could outlive the sequence for ever. With the deadline armed, a process still alive then is
    forced (exit 70, the report), as with an abandoned listener's thread; one that exits first
    is not affected. Call it before the sequence ends (from a wrap-up step, say).
    """
    with lifecycle._sequence_lock:
        lifecycle._kept_armed.append(why)


def report_progress(lifecycle: Lifecycle) -> None:
    """Say the drain moved forward (a request answered, a job finished): ``progress()`` grows.

    Adapters call it as in-flight work ends; the systemd notifier turns progress into more time.
    """
    with lifecycle._sequence_lock:
        lifecycle._progress += 1


def progress(lifecycle: Lifecycle) -> int:
    """How many times ``report_progress()`` was called for ``lifecycle``."""
    return lifecycle._progress


def add_report_section(lifecycle: Lifecycle, fn: Callable[[], list[str]]) -> None:
    """Append ``fn()``'s lines to the force-quit report (``run()`` adds its servers' stacks)."""
    check_listener(fn, "add_report_section")
    lifecycle._report_sections.append(fn)


def on_force_quit(lifecycle: Lifecycle, fn: Callable[[], object], *, name: str | None = None) -> None:
    """Call ``fn()`` at the force quit, after the report, before the exit (cut connections, name
    dropped requests, requeue jobs); in turn, in one thread given 2 s in all, errors logged."""
    checked = check_listener(fn, "on_force_quit")
    lifecycle._action.add_hook(checked, check_name(name, "on_force_quit") or default_name(checked))


def set_listener_loop(lifecycle: Lifecycle, loop: asyncio.AbstractEventLoop | None) -> None:
    """Run ``lifecycle``'s ``async def`` listeners registered where no loop was running on
    ``loop`` (``run()`` sets the loop it drives, and None when it stops driving it)."""
    lifecycle._listener_loops.loop = loop


def listener_loop(lifecycle: Lifecycle) -> asyncio.AbstractEventLoop | None:
    """The loop set by ``set_listener_loop()``, or None."""
    return lifecycle._listener_loops.loop


def listening_sockets(lifecycle: Lifecycle) -> list[socket.socket]:
    """The sockets ``lifecycle.listen()`` returned that are still open (an upgrade passes them down)."""
    with lifecycle._sequence_lock:
        lifecycle._listen_sockets = [sock for sock in lifecycle._listen_sockets if sock.fileno() >= 0]
        return list(lifecycle._listen_sockets)


def set_daemon(lifecycle: Lifecycle, daemon: bool) -> None:
    """Run ``lifecycle``'s sequence on a daemon thread (before it starts; False by default).

    False keeps the interpreter alive until the cleanup is done; a test harness sets True so
    that a listener a test leaves stuck cannot hang the test run at exit.
    """
    if not isinstance(daemon, bool):
        raise TypeError(f"set_daemon() takes True or False, not {daemon!r}")
    lifecycle._daemon = daemon


def join(lifecycle: Lifecycle, timeout: float | None = None) -> bool:
    """Block until the sequence's thread has ended (True; also if none began): for tests."""
    limit = check_timeout(timeout, "join()")
    driver = lifecycle._driver
    if driver is None:
        return True
    driver.join(limit)
    return not driver.is_alive()


def wait_until_idle(lifecycle: Lifecycle, timeout: float | None = None) -> bool:
    """Block until no listener of ``lifecycle`` is running; True if so within ``timeout``."""
    return lifecycle._phases.wait_idle(check_timeout(timeout, "wait_until_idle()"))


def shutdown_requested(lifecycle: Lifecycle) -> bool:
    """True once a shutdown (not only a pause) was asked for: the deadline runs."""
    return lifecycle._shutdown_requested


def triggered_at(lifecycle: Lifecycle) -> float | None:
    """When wrap-up began, on ``clock(lifecycle)``'s scale; None before."""
    return lifecycle._triggered_at


def clock(lifecycle: Lifecycle) -> Clock:
    """Where ``lifecycle``'s time comes from."""
    return lifecycle._time


def budget(lifecycle: Lifecycle) -> float:
    """``lifecycle``'s force-quit budget in seconds."""
    return lifecycle._timer.budget


def set_defaults(
    lifecycle: Lifecycle,
    *,
    budget: float | None = None,
    wrap_up_timeout: float | None = None,
    source: str = "the environment",
) -> None:
    """Give ``lifecycle`` a default budget and wrap-up timeout, each unless the program chose
    one (``run()`` and the hosts: ``GRACEFUL_FORCE_QUIT`` and ``GRACEFUL_WRAP_UP_TIMEOUT`` read at
    start, or a host's own default such as gunicorn's ``graceful_timeout - 1``). Both are checked
    together before either changes; None leaves one as it is.

    Raises:
        ValueError: the wrap-up timeout would not be below the budget; the message names
            ``source``.
    """
    new_budget = lifecycle._timer.budget if lifecycle._budget_chosen or budget is None else budget
    if budget is not None:
        check_seconds(budget, f"the budget from {source}")
    keep = lifecycle._wrap_up_timeout
    if keep is not None and keep >= new_budget:
        raise ValueError(
            f"the force-quit budget from {source} ({new_budget:g} s) is not above the wrap-up timeout "
            f"set before ({keep:g} s): lower that, or choose a longer budget"
        )
    new_wrap_up = (
        keep
        if keep is not None or wrap_up_timeout is None
        else _check_wrap_up_timeout(wrap_up_timeout, new_budget, f"the wrap-up timeout from {source}")
    )
    if new_budget != lifecycle._timer.budget:
        lifecycle._timer.set_budget(new_budget)
    if budget is not None:
        lifecycle._budget_chosen = True
    lifecycle._wrap_up_timeout = new_wrap_up


def prepare(lifecycle: Lifecycle) -> None:
    """Start ahead the threads ``lifecycle``'s shutdown needs: the clock's timer thread (the
    deadline) and the sequence's own thread, waiting for the trigger. ``run()`` and the hosts
    call it at start, so that a process at its thread limit (a container's pids limit) still
    stops, reports and exits with the true code. The sequence's thread started here is a
    daemon: ``run()`` and the hosts wait for STOPPED themselves. Idempotent.

    Raises:
        RuntimeError: no thread can be started now (the process is at its thread limit).
    """
    start_timers = getattr(lifecycle._time, "prepare", None)
    if callable(start_timers):
        start_timers()
    with lifecycle._sequence_lock:
        if lifecycle.state() is not State.RUNNING or (
            lifecycle._driver is not None and lifecycle._driver.is_alive()
        ):
            return
        driver = threading.Thread(target=lifecycle._wait_for_trigger, name="graceful-lifecycle", daemon=True)
        driver.start()
        lifecycle._driver = driver
        lifecycle._driver_waiting = True


def reload_listener_count(lifecycle: Lifecycle) -> int:
    """How many reload listeners ``lifecycle`` has (with none, SIGHUP shuts down)."""
    return lifecycle._reload_listeners.count()
