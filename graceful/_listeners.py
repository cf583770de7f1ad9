"""Listeners, their waiters, and the threads that run them.

Why it is built this way (the bug reports are the reasons):

* go-zero's ``waitForCalled`` waits for a whole phase, and a listener added after its phase
  fired never runs, so its waiter blocks until the process is killed. Here a ``Waiter``
  belongs to one listener, and a listener registered late is run at once.
* Listeners of a phase run concurrently, but a thread per listener for ever would cost an OS
  thread for every idle registration (the contract: 10,000 no-op listeners finish a phase
  fast; 100 listeners that each block 1 s finish it in about 1 s). ``Pool`` reuses a couple
  of threads while listeners keep finishing, grows only when every thread is blocked and work
  is waiting, and lets idle threads exit, so a process that never shuts down keeps none.
* A listener that raises is isolated: its exception is logged with its name and kept on its
  waiter; the others still run.
* ``async def`` listeners run on the event loop that was running where they were registered
  (so they may touch that loop's objects). Registered where none was running (at module
  level, before ``run()`` started its loop), they run on the lifecycle's ``DefaultLoop``: the
  loop ``run()`` drives, while it drives one, so that a pool bound to the app's loop is closed
  on it ("attached to a different loop" otherwise); with no such loop, on a fresh loop in a
  worker thread. ``asyncio`` is imported only when such a listener actually runs.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator

from ._aio import is_awaitable, run_awaitable, running_loop, wait_async
from ._checks import TYPE_CHECKING, check_timeout

if TYPE_CHECKING:
    import asyncio
    from typing import Any


__all__ = [
    "DefaultLoop",
    "Frozen",
    "Listener",
    "ListenerState",
    "ListenerStatus",
    "Phase",
    "Pool",
    "Waiter",
    "current_listener",
    "current_server",
    "default_name",
    "mark_own",
    "refuse_in_server",
    "run_soon",
    "serving_as",
]

log = logging.getLogger("graceful")


class Phase(str, enum.Enum):
    """The phase a listener belongs to, in the order they run. A ``str`` enum:
    ``Phase.WRAP_UP == "wrap_up"``. ``FLUSH`` runs after ``SHUTDOWN``, and at a force quit."""

    WRAP_UP = "wrap_up"
    SHUTDOWN = "shutdown"
    FLUSH = "flush"

    def __str__(self) -> str:
        return self.value


class ListenerState(str, enum.Enum):
    """Where one listener is: PENDING -> RUNNING -> DONE or FAILED; or REMOVED before it ran;
    or ABANDONED past its timeout (or the wrap-up timeout): the phase no longer waits for it,
    though its thread may still be running it.

    A ``str`` enum, so ``item.state == "done"`` still reads naturally in a test.
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REMOVED = "removed"
    ABANDONED = "abandoned"

    def __str__(self) -> str:
        return self.value


class Frozen:
    """A small immutable record: equality, hash and repr from ``__slots__``.

    Hand-written instead of ``dataclasses`` because that module pulls in ``inspect`` (and
    ``ast``, ``dis``, ``tokenize``): about 8 ms on every ``import graceful``.
    """

    __slots__: tuple[str, ...] = ()
    _fields: tuple[str, ...] = ()
    """The order of the constructor's arguments."""

    def __init__(self, *values: object) -> None:
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is a snapshot: it cannot be changed")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class ListenerStatus(Frozen):
    """One listener, as ``status()`` saw it.

    ``phase`` is a ``Phase``; ``state`` a ``ListenerState`` (both ``str`` enums, equal to
    ``"wrap_up"``, ``"done"`` and so on); ``duration`` is seconds run so far (or in all, once
    finished), None if it has not started; ``timeout`` its own timeout in seconds, or None;
    ``abandoned_for`` seconds since it was abandoned, None unless it was.
    """

    __slots__ = ("abandoned_for", "duration", "name", "phase", "state", "timeout")
    _fields = ("name", "phase", "state", "duration", "timeout", "abandoned_for")
    name: str
    phase: Phase
    state: ListenerState
    duration: float | None
    timeout: float | None
    abandoned_for: float | None

    def __init__(  # noqa: PLR0917 - one positional argument per field, as a dataclass would take
        self,
        name: str,
        phase: Phase,
        state: ListenerState,
        duration: float | None,
        timeout: float | None = None,
        abandoned_for: float | None = None,
    ) -> None:
        super().__init__(name, phase, state, duration, timeout, abandoned_for)

    def describe(self) -> str:
        """One line, as the SIGUSR1 dump prints it."""
        took = "" if self.duration is None else f" ({self.duration:.3f} s)"
        bound = "" if self.timeout is None else f", timeout {self.timeout:g} s"
        left = "" if self.abandoned_for is None else f", abandoned {self.abandoned_for:.3f} s ago"
        return f"{self.phase} listener {self.name!r}: {self.state}{took}{bound}{left}"


class Pool:
    """Worker threads for listeners: reused while work flows, grown when all are blocked.

    ``submit`` queues a job and makes sure a worker exists. A watcher runs while jobs are
    queued: if no job has finished for ``STALL`` seconds, every worker is blocked, so it adds
    one worker per waiting job (up to ``GROW``). A worker with nothing to do for ``IDLE``
    seconds exits.
    """

    STALL = 0.004
    GROW = 128
    IDLE = 2.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: deque[Callable[[], None]] = deque()
        self._ready = threading.Condition(self._lock)
        self._left = threading.Condition(self._lock)
        self._workers = 0
        self._idle = 0
        self._finished = 0
        self._watching = False
        self._names = 0

    def submit(self, *jobs: Callable[[], None]) -> None:
        """Queue ``jobs`` (a whole phase at once: one lock round-trip, not one per listener).

        If no thread can be started at all (a process at its thread limit: a container's pids
        limit, ``RLIMIT_NPROC``), the jobs run here, one after another: slower, never lost.
        """
        with self._lock:
            self._jobs.extend(jobs)
            if self._idle > 0:
                self._ready.notify(len(jobs))
            elif self._workers == 0:
                self._spawn(1)
            stranded = self._workers == 0
            if not self._watching and not stranded:
                self._watching = _start_daemon(self._watch, "graceful-pool-watch")
        if stranded:
            self._run_here()

    def _run_here(self) -> None:
        log.warning("graceful: no thread could be started for the listeners: running them one by one")
        while True:
            with self._lock:
                if not self._jobs or self._workers:
                    return
                job = self._jobs.popleft()
            job()

    def _spawn(self, count: int) -> None:
        for _ in range(count):
            self._names += 1
            if not _start_daemon(self._work, f"graceful-listener-{self._names}"):
                # At the thread limit: the workers already there take the jobs in turn.
                return
            self._workers += 1

    def _work(self) -> None:
        ran = 0
        while True:
            with self._lock:
                # Under the lock: several workers write it.
                self._finished += ran
                ran = 1
                while not self._jobs:
                    self._idle += 1
                    woke = self._ready.wait(self.IDLE)
                    self._idle -= 1
                    if not woke and not self._jobs:
                        self._workers -= 1
                        self._left.notify_all()
                        return
                job = self._jobs.popleft()
            job()

    def wait_idle(self, timeout: float) -> bool:
        """Block until every worker has exited (idle workers leave after ``IDLE`` s)."""
        with self._lock:
            return self._left.wait_for(lambda: self._workers == 0, timeout)

    def _watch(self) -> None:
        seen = -1
        while True:
            with self._lock:
                if not self._jobs:
                    self._watching = False
                    return
                if self._finished == seen and self._idle == 0:
                    self._spawn(min(len(self._jobs), self.GROW))
                seen = self._finished
            time.sleep(self.STALL)


def _start_daemon(target: Callable[[], None], name: str) -> bool:
    """Start a daemon thread; False (not an exception) when the process cannot have one more."""
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    except RuntimeError:
        # "can't start new thread": at the process's thread limit.
        return False
    return True


pool = Pool()
"""The one pool of the process: every lifecycle's listeners share it."""

_local = threading.local()
_event_lock = threading.Lock()
"""Guards the lazy creation of each listener's Event."""


def current_listener() -> Listener | None:
    """The listener this thread is running right now, if any."""
    return getattr(_local, "listener", None)


def current_server() -> str | None:
    """The name of the server whose blocking ``serve()`` this thread runs for ``run()``, if any.

    ``run()`` waits for that ``serve()`` to return before it can stop: such a thread that
    blocks until STOPPED would wait for itself until the force quit.
    """
    return getattr(_local, "server", None)


def serving_as(name: str | None) -> None:
    """Mark (or, with None, unmark) this thread as the one running server ``name``."""
    _local.server = name


def refuse_in_server(what: str, instead: str = "") -> None:
    """A ``RuntimeError`` if this thread runs a server for ``run()``: blocking here until
    STOPPED would deadlock it until the force quit (STOPPED waits for the server to return)."""
    server = current_server()
    if server is None:
        return
    also = f" (to ask for the stop from here, call {instead})" if instead else ""
    raise RuntimeError(
        f"{what} was called from server {server!r}, which graceful.run() runs: it would wait for "
        "itself, since run() stops only after the server has returned. Instead, use "
        "graceful.wait_for_wrap_up() to wait for the stop, then return from the server"
        f"{also}; run() finishes the shutdown."
    )


class DefaultLoop:
    """Where a lifecycle's ``async def`` listeners run when none was running at registration.

    One per lifecycle, shared by its listeners; ``loop`` is None (a fresh loop for each) unless
    ``run()`` has put the loop it drives here (``lowlevel.set_listener_loop()``).
    """

    __slots__ = ("loop",)

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None


class Listener:
    """One registered callable and everything known about its single run."""

    __slots__ = (
        "_awaiting",
        "_callbacks",
        "_cancel",
        "_claimed",
        "_default_loop",
        "_done",
        "_event",
        "_now",
        "abandoned_at",
        "bounded",
        "error",
        "finished",
        "fn",
        "loop",
        "name",
        "on_finish",
        "on_start",
        "own",
        "phase",
        "scheduled",
        "started",
        "state",
        "thread_id",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[[], object],
        name: str,
        phase: Phase,
        now: Callable[[], float],
        on_finish: Callable[[Listener], None],
        *,
        loops: DefaultLoop | None = None,
        timeout: float | None = None,
        on_start: Callable[[Listener], None] | None = None,
    ) -> None:
        self.fn: Callable[[], object] | None = fn
        self.name = name
        self.phase = phase
        self.own = getattr(fn, OWN, False) is True
        """One of graceful's own (``run()``'s steps)."""
        self.bounded = getattr(fn, BOUNDED, False) is True
        """It bounds its own wait (``mark_own``): the wrap-up timeout does not abandon it."""
        self.state = ListenerState.PENDING
        self.scheduled = False
        self.started: float | None = None
        self.finished: float | None = None
        self.thread_id: int | None = None
        self.error: BaseException | None = None
        self.timeout = timeout
        """Seconds it may run before it is abandoned; None: as long as its phase allows."""
        self.abandoned_at: float | None = None
        self.loop = running_loop()
        self._default_loop = loops
        self.on_finish = on_finish
        self.on_start = on_start
        self._now = now
        """The lifecycle clock's ``monotonic()``."""
        self._done = False
        self._event: threading.Event | None = None
        """Made on first wait, so that 10,000 listeners register fast."""
        self._callbacks: list[Callable[[], None]] = []
        self._awaiting: object = None
        self._cancel: Callable[[], object] | None = None
        self._claimed = False
        """Its end was claimed: by its own return, or by abandonment."""

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run the listener once, in the calling thread; never raises.

        One abandoned before a thread took it up (the wrap-up timeout passed while it waited
        for one) does not run at all.
        """
        # A finished listener keeps no reference to its callable.
        fn, self.fn = self.fn, None
        with _event_lock:
            if self._claimed:
                return
            self.thread_id = threading.get_ident()
            self.started = self._now()
            self.state = ListenerState.RUNNING
        if self.on_start is not None:
            # Its timeout counts from now: the sequence learns when it ends.
            self.on_start(self)
        _local.listener = self
        error: BaseException | None = None
        try:
            assert fn is not None, "a listener runs once"
            result = fn()
            if is_awaitable(result):
                self._awaiting = result
                run_awaitable(result, self._loop(), on_start=self._set_cancel)
        except BaseException as exc:
            # Isolate the listener (even SystemExit), keep its error.
            error = exc
            if self.abandoned_at is None:
                log.exception("%s listener %r failed", self.phase, self.name)
        finally:
            _local.listener = None
            self._awaiting = None
            self._cancel = None
            self._ended(error)

    def _ended(self, error: BaseException | None) -> None:
        finished = self._now()
        took = finished - (self.started or finished)
        if not self._claim():
            log.warning(
                "%s listener %r, abandoned %.3f s ago, has finished after all (%.3f s in all)",
                self.phase,
                self.name,
                finished - (self.abandoned_at or finished),
                took,
            )
            return
        self.finished = finished
        self.error = error
        log.debug("%s listener %r finished in %.3f s", self.phase, self.name, took)
        self._finish(ListenerState.FAILED if error is not None else ListenerState.DONE)
        self.on_finish(self)

    def _claim(self) -> bool:
        """True for the one caller that ends this listener: its return, or its abandonment."""
        with _event_lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def _set_cancel(self, cancel: Callable[[], object]) -> None:
        self._cancel = cancel

    def abandon(self, now: float, why: str) -> bool:
        """Stop waiting for this listener (past its timeout, or the wrap-up timeout's): its
        waiter is done with a ``TimeoutError``, an ``async def`` one is cancelled (its
        ``finally`` blocks run), and a thread runs on as the daemon it is. The caller logs it.
        Returns False if it had finished (or was abandoned) already.
        """
        if self.state not in (ListenerState.RUNNING, ListenerState.PENDING) or not self._claim():
            return False
        self.abandoned_at = now
        took = 0.0 if self.started is None else now - self.started
        self.error = TimeoutError(f"{self.phase} listener {self.name!r} abandoned after {took:.3f} s: {why}")
        cancel = self._cancel
        if cancel is not None:
            cancel()
        self._finish(ListenerState.ABANDONED)
        self.on_finish(self)
        return True

    def is_alive(self) -> bool:
        """True while a thread still runs its code (an abandoned one included)."""
        return self.state is ListenerState.RUNNING or (
            self.state is ListenerState.ABANDONED and self.started is not None and self.finished is None
        )

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop of registration, else the lifecycle's default (``run()``'s), else None."""
        if self.loop is not None or self._default_loop is None:
            return self.loop
        return self._default_loop.loop

    def awaiting(self) -> object:
        """The coroutine this listener is awaiting, if it is an async listener."""
        return self._awaiting

    def _finish(self, state: ListenerState) -> None:
        self.state = state
        with _event_lock:
            self._done = True
            event = self._event
        if event is not None:
            event.set()
        for callback in self._callbacks:
            callback()

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or removed); True if it is, False on timeout (checked)."""
        if self._done:
            return True
        with _event_lock:
            if self._event is None:
                self._event = threading.Event()
                if self.done():
                    # Finished between the check above and the lock.
                    self._event.set()
            event = self._event
        return event.wait(timeout)

    def remove(self) -> bool:
        """Mark as removed if it is not scheduled to run; the caller holds the registry lock."""
        if self.state is not ListenerState.PENDING or self.scheduled:
            return False
        self.fn = None
        self._finish(ListenerState.REMOVED)
        return True

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from any thread) once the listener has finished or was removed.

        Racing with the finish, the callback may be called twice: callbacks must be idempotent
        (the only one, ``Waiter``'s async wake-up, is).
        """
        self._callbacks.append(callback)
        if self._done and callback in self._callbacks:
            self._callbacks.remove(callback)
            callback()

    def duration(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished if self.finished is not None else now) - self.started

    def expires_at(self) -> float | None:
        """When its own timeout runs out (on the lifecycle's clock), if it has one and runs."""
        if self.timeout is None or self.started is None or self.state is not ListenerState.RUNNING:
            return None
        return self.started + self.timeout

    def status(self, now: float) -> ListenerStatus:
        abandoned = None if self.abandoned_at is None else now - self.abandoned_at
        return ListenerStatus(self.name, self.phase, self.state, self.duration(now), self.timeout, abandoned)


class Waiter:
    """The handle that ``add_wrap_up_listener`` and ``add_shutdown_listener`` return.

    One waiter belongs to one listener. ``wait()`` returns True once *that* listener has
    finished (returned or raised), so ``main`` can wait for exactly the cleanup it cares
    about. A listener registered after its phase began runs at once, so its waiter never
    blocks for ever. After ``remove()`` the waiter counts as done (there is nothing left to
    wait for) and ``exception()`` is None.

    Example::

        flushed = graceful.add_shutdown_listener(metrics.flush)
        ...
        flushed.wait(timeout=5)   # or flushed(), or await flushed
    """

    __slots__ = ("_listener", "_remove")

    def __init__(self, listener: Listener, remove: Callable[[Listener], bool]) -> None:
        self._listener = listener
        self._remove = remove

    @property
    def name(self) -> str:
        """The listener's name, as it appears in logs, ``status()`` and the force-quit report."""
        return self._listener.name

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the listener has finished; True if it has, False on timeout.

        Raises:
            TypeError, ValueError: ``timeout`` is not None or a finite number of seconds > 0.
        """
        return self._listener.wait(check_timeout(timeout, "Waiter.wait()"))

    def __call__(self, timeout: float | None = None) -> bool:
        """Same as ``wait()``, for go-zero's ``waitForCalled()`` habit."""
        return self.wait(timeout)

    def __await__(self) -> Generator[Any, None, bool]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> bool:
        def on_done(wake: Callable[[], None]) -> Callable[[], None]:
            self._listener.add_done_callback(wake)
            # The wake-up is harmless once the future is gone.
            return lambda: None

        return await wait_async(self._listener.done, on_done)

    def done(self) -> bool:
        """True once the listener has finished (or was removed)."""
        return self._listener.done()

    def exception(self) -> BaseException | None:
        """What the listener raised, or None (also while it has not finished)."""
        return self._listener.error

    def remove(self) -> bool:
        """Unregister the listener if it has not started; True if it was removed."""
        return self._remove(self._listener)

    def __repr__(self) -> str:
        return f"<graceful.Waiter {self._listener.name!r} {self._listener.state}>"


OWN = "graceful_own"
BOUNDED = "graceful_bounded"


def mark_own(fn: Callable[[], object], *, bounded: bool = True) -> Callable[[], object]:
    """Mark ``fn`` as one of graceful's own listeners (returns it, or for a bound method a
    function that calls it); ``bounded=False`` for one that waits on the user's code:
    ``run()``'s steps for its servers, a host's wait for the requests, tasks or jobs in flight.
    with ``bounded`` (the default), the wrap-up timeout does not abandon it (it bounds its own
    wait: what is in flight is finished, put back or cut and named by its adapter, up to the
    deadline); either way "phase done: N listener(s)" counts it apart from the ones the user
    registered."""
    try:
        setattr(fn, OWN, True)
        setattr(fn, BOUNDED, bounded)
    except AttributeError:
        # A bound method takes no attribute: mark a function that calls it.
        method = fn

        def own() -> object:
            return method()

        own.__qualname__ = getattr(method, "__qualname__", own.__qualname__)
        setattr(own, OWN, True)
        setattr(own, BOUNDED, bounded)
        return own
    return fn


def run_soon(*listeners: Listener) -> None:
    """Run the listeners on the pool's threads."""
    pool.submit(*(listener.run for listener in listeners))


def default_name(fn: Callable[..., object]) -> str:
    """A readable name for a callable: ``module.qualname`` when it has them."""
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname is None:
        return repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module and module != "__main__" else str(qualname)
