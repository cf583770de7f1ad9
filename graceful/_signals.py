"""Signals: routed on the main thread, handled off it.

Why it is built this way:

* A Python-level signal handler runs in the main thread *between bytecodes*, possibly while
  that thread holds a lock: the logging lock (gunicorn #3198, #3004 deadlocked by logging in a
  handler), a database driver's, the user's. A handler that raises lands in whatever the main
  thread was doing (celery #7339 lost tasks, #10271 broke a database commit). So the handler
  here takes no lock, logs nothing, calls no listener and never raises.
* The coordinator thread does the work, and it learns of a signal from the *wakeup fd*
  (``signal.set_wakeup_fd``): the C-level handler writes the signal number there from whatever
  thread the kernel picked, at once. The Python-level handler alone would run only when the
  main thread next executes bytecode, which may be never while it is blocked in C (cotyledon
  uses a pipe for the same reason). A queue fed by the Python handler lost 14 of 60 signal
  storms in a measured reproduction; the wakeup fd lost none.
* There is one wakeup fd per process. If another library takes it over (asyncio's
  ``add_signal_handler`` does, and uvicorn's users saw SIGTERM ignored that way), the
  Python-level handler notices, gives the fd back to its new owner and forwards the signal
  number itself, so the signal is still acted on once.
* Handlers are installed only from the main thread, the previous ones are saved, replacing a
  non-default one is logged at DEBUG, and every one is restored when the block ends (trio,
  uvicorn's ``capture_signals``): nothing is overwritten silently, nothing left behind.
* The routing table is a plain method, ``Router.dispatch(signum)``: the pytest fixture calls
  it to simulate a signal without touching process-wide state.

The table (missing signals are skipped on platforms without them; SIGBREAK, on Windows, acts
like SIGTERM):

    SIGTERM, SIGINT      graceful shutdown
    SIGINT again, SIGQUIT  force quit now (report, exit 70)
    SIGTERM again        logged, ignored (orchestrators repeat it)
    SIGTSTP              wrap-up only; the process stays up; a later SIGTERM continues
    SIGUSR1              thread dump, asyncio tasks and status() to stderr; keep running
    SIGHUP               reload listeners if any, else a graceful shutdown (a closed
                         terminal must not leave an orphan serving the port)
    SIGUSR2              under run(): upgrade in place (``_upgrade``); elsewhere logged and
                         ignored, since only run() knows the servers and their sockets

The coordinator only routes. An upgrade starts its own thread (``Router.upgrade`` returns at
once: it only starts one or says why not). A reload and a SIGUSR1 dump run on a helper thread of their own
(``_Offload``: one at a time, at most one more waiting, further ones coalesced), so a reload
listener that blocks or raises, or a dump blocked on a stderr pipe nobody reads, never makes
the process deaf: SIGTERM, SIGINT and SIGQUIT are acted on at once whatever they are doing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from ._diagnostics import dump_threads, write_stderr
from ._lifecycle import Lifecycle, reload_listener_count, shutdown_requested

__all__ = ["Router", "handled_signals", "signal_handlers"]

log = logging.getLogger("graceful")

PING = 255
"""A byte no signal number uses: the systemd watchdog's "are you alive?" to the coordinator."""

_ROUTED = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGTSTP", "SIGUSR1", "SIGHUP", "SIGUSR2", "SIGBREAK")


def handled_signals(module: object = signal) -> list[int]:
    """The signals graceful routes on this platform (the names the ``signal`` module has)."""
    return [int(getattr(module, name)) for name in _ROUTED if hasattr(module, name)]


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Offload:
    """Runs one kind of job on a daemon thread: one at a time, at most one more waiting.

    A job asked for while one runs is remembered once (a SIGHUP storm is one more reload, not a
    thousand); the coordinator never waits for it.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._running = False
        self._pending: Callable[[], object] | None = None

    def submit(self, job: Callable[[], object]) -> None:
        with self._lock:
            if self._running:
                self._pending = job
                return
            self._running = True
        threading.Thread(target=self._work, args=(job,), name=self._name, daemon=True).start()

    def _work(self, job: Callable[[], object]) -> None:
        current: Callable[[], object] | None = job
        while current is not None:
            try:
                current()
            except BaseException:
                # A job must never end the helper silently.
                log.exception("graceful: %s failed", self._name)
            with self._lock:
                current, self._pending = self._pending, None
                if current is None:
                    self._running = False


class Router:
    """The signal table of one lifecycle: what each signal does. Thread-safe; never raises.

    Args:
        lifecycle: where the signals go.
        stderr: where the SIGUSR1 dump is written (stderr, without a lock, by default).
        offload: run reloads and dumps on a helper thread (the coordinator must stay free);
            the test harness passes False so that ``send_signal()`` returns once they ran.
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        *,
        stderr: Callable[[str], object] | None = None,
        offload: bool = True,
    ) -> None:
        if not isinstance(lifecycle, Lifecycle):
            raise TypeError(f"Router() takes a graceful.Lifecycle, not {lifecycle!r}")
        self.lifecycle = lifecycle
        self._write = stderr or write_stderr
        self._interrupts = 0
        self._lock = threading.Lock()
        self._reloads = _Offload("graceful-reload") if offload else None
        self._dumps = _Offload("graceful-dump") if offload else None
        self.answered = 0.0
        """When the coordinator last answered a ``ping()`` (monotonic); the systemd watchdog
        pings only while it answers."""
        self._ping: Callable[[], object] = self.answer
        """What ``ping()`` calls (see ``route_pings_to``); without a coordinator, ``answer`` at once."""
        self.upgrade: Callable[[], object] | None = None
        """What SIGUSR2 calls: ``run()`` sets its upgrade in place (it must return at once);
        None elsewhere, where SIGUSR2 is logged and ignored."""

    def ping(self) -> None:
        """Ask the coordinator thread to show it is alive (it sets ``answered``)."""
        self._ping()

    def answer(self) -> None:
        """What the coordinator does when a ping reaches it (public for the installation)."""
        self.answered = time.monotonic()

    def route_pings_to(self, send: Callable[[], object]) -> None:
        """Make ``ping()`` call ``send`` (the installation writes a byte to its pipe)."""
        self._ping = send

    def dispatch(self, signum: int) -> None:
        """Act on one signal, as the coordinator thread does for a real one."""
        name = _name(signum)
        try:
            self._route(signum, name)
        except BaseException:
            # The coordinator must survive anything a listener does.
            log.exception("graceful: handling %s failed", name)

    def _route(self, signum: int, name: str) -> None:  # noqa: PLR0911, PLR0912 - one branch per table row
        # Each row acts first and logs after: the main thread may hold the logging lock.
        lc = self.lifecycle
        if name == "SIGINT":
            with self._lock:
                self._interrupts += 1
                again = self._interrupts > 1 or shutdown_requested(lc)
            if again:
                lc.force_quit_now(f"{name} again while shutting down")
                return
            lc.shutdown(name, wait=False)
            log.info("received %s: shutting down gracefully (press Ctrl-C again to force)", name)
            return
        if name in ("SIGTERM", "SIGBREAK"):
            if shutdown_requested(lc):
                log.info("received %s again: already shutting down, ignored", name)
                return
            lc.shutdown(name, wait=False)
            log.info("received %s: shutting down gracefully", name)
            return
        if name == "SIGQUIT":
            lc.force_quit_now(f"{name} received")
            return
        if name == "SIGTSTP":
            if lc.is_stopping():
                log.info("received %s: already stopping, ignored", name)
                return
            lc.wrap_up(name)
            log.info("received %s: wrapping up; the process stays up until SIGTERM", name)
            return
        if name == "SIGUSR1":
            self._offload(self._dumps, self._dump)
            return
        if name == "SIGHUP":
            if reload_listener_count(lc) == 0:
                if shutdown_requested(lc):
                    log.info("received %s again: already shutting down, ignored", name)
                    return
                lc.shutdown(name, wait=False)
                log.info(
                    "received %s with no reload listener (the terminal went away?): shutting down gracefully",
                    name,
                )
                return
            self._offload(self._reloads, lambda: lc.reload(name))
            return
        if name == "SIGUSR2":
            upgrade = self.upgrade
            if upgrade is None:
                log.warning(
                    "received %s: an upgrade in place needs graceful.run(), which knows the servers "
                    "and their sockets; ignored",
                    name,
                )
                return
            upgrade()
            return
        log.info("received %s: not routed, ignored", name)

    def _dump(self) -> None:
        self._write(dump_threads(self.lifecycle.status().format()))

    @staticmethod
    def _offload(helper: _Offload | None, job: Callable[[], object]) -> None:
        if helper is None:
            job()
        else:
            helper.submit(job)


_active: list[_Installation] = []
"""The open ``signal_handlers()`` blocks, innermost last (main thread only)."""


class _Installation:
    """One active ``signal_handlers()`` block: the pipe, the coordinator, the saved state."""

    def __init__(self, router: Router, signals: list[int]) -> None:
        self.router = router
        self.signals = signals
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.saved: dict[int, object] = {}
        self.previous_wakeup = -1
        self.coordinator = threading.Thread(target=self._coordinate, name="graceful-signals", daemon=True)
        router.route_pings_to(self._send_ping)

    def _send_ping(self) -> None:
        # A full or closed pipe: no answer, as for a stuck coordinator.
        with contextlib.suppress(OSError):
            os.write(self.write_fd, bytes([PING]))

    def handler(self, signum: int, frame: FrameType | None) -> None:
        # Re-entrant hand-off only: the C-level handler already wrote ``signum`` to the
        # wakeup fd. If someone else owns the wakeup fd now, give it back to them and forward
        # the number ourselves. No locks, no logging, never raises.
        try:
            current = signal.set_wakeup_fd(self.write_fd)
            if current != self.write_fd:
                signal.set_wakeup_fd(current)
                os.write(self.write_fd, bytes([signum]))
        except Exception:  # noqa: BLE001 - a handler must never raise into the main thread
            pass

    def _coordinate(self) -> None:
        while True:
            try:
                data = os.read(self.read_fd, 512)
            except OSError:  # pragma: no cover - the pipe was closed under us
                return
            for signum in data:
                if signum == 0:
                    # Our own stop byte.
                    return
                if signum == PING:
                    self.router.answer()
                    continue
                # Others' handlers write here too: theirs to handle. dispatch() never raises.
                if signum in self.signals:
                    self.router.dispatch(signum)

    def install(self) -> None:
        _active.append(self)
        self.previous_wakeup = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.coordinator.start()
        for signum in self.signals:
            previous = signal.signal(signum, self.handler)
            self.saved[signum] = previous
            if previous not in (signal.SIG_DFL, signal.default_int_handler, None):
                log.debug(
                    "graceful replaced the %s handler %r (restored when the block ends)",
                    _name(signum),
                    previous,
                )

    def uninstall(self) -> None:
        if self in _active and _active[-1] is not self:
            self._hand_over(_active[_active.index(self) + 1])
        else:
            self._restore()
        if self in _active:
            _active.remove(self)
        # A full pipe: the coordinator is far behind anyway.
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")
        if self.coordinator.ident is not None:
            self.coordinator.join(timeout=5)
        os.close(self.read_fd)
        os.close(self.write_fd)

    def _hand_over(self, inner: _Installation) -> None:
        """Left before a block nested in it: the inner block stays in charge, and will restore
        what this one saved (not this one's handler and wakeup fd, which are about to go)."""
        log.debug("signal_handlers() blocks left out of order: the inner one restores the outer's state")
        for signum, previous in self.saved.items():
            if inner.saved.get(signum) == self.handler:
                inner.saved[signum] = previous
        if inner.previous_wakeup == self.write_fd:
            inner.previous_wakeup = self.previous_wakeup

    def _restore(self) -> None:
        for signum, previous in self.saved.items():
            try:
                current = signal.signal(signum, previous)  # type: ignore[arg-type]
            except (TypeError, ValueError, OSError):  # pragma: no cover - a handler not from Python
                current = None
            if current != self.handler:
                log.debug("the %s handler was changed by someone else inside the block", _name(signum))
        mine = signal.set_wakeup_fd(self.previous_wakeup)
        if mine != self.write_fd:
            log.debug("the signal wakeup fd was taken over inside the block; restored the one from before")


@contextmanager
def signal_handlers(lifecycle: Lifecycle) -> Iterator[Router]:
    """Route SIGTERM, SIGINT, SIGQUIT, SIGTSTP, SIGUSR1, SIGHUP and SIGUSR2 to ``lifecycle`` in this block.

    For programs that keep their own main loop; ``graceful.run()`` uses it. The previous
    handlers and wakeup fd are restored when the block ends.

    ``graceful.signal_handlers()`` is the public face (its docstring has an example).

    Raises:
        RuntimeError: not called from the main thread (only it can install signal handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "graceful.signal_handlers() must be called from the main thread: Python installs "
            "signal handlers only there. Call it (or graceful.run()) from the main thread, or pass "
            "handle_signals=False to graceful.run() and route signals yourself."
        )
    installation = _Installation(Router(lifecycle), handled_signals())
    try:
        installation.install()
        yield installation.router
    finally:
        installation.uninstall()
