"""How one gunicorn worker process learns that it is stopping, and when its requests are done.

Why it works this way (read from gunicorn's and uvicorn-worker's own code):

* gunicorn has no hook on a worker's SIGTERM. Its handler only sets ``worker.alive = False``;
  the loop notices on its next turn, stops accepting, finishes the requests in flight and
  returns; only then does ``worker_exit`` run. So the moment the worker starts stopping (when
  wrap-up listeners should run and readiness turn not-ready, and when graceful's deadline must
  be armed) has to be observed, and the moment its requests are done is ``worker_exit``.
* Observing must not happen in a signal handler (gunicorn #3198: logging there deadlocked).
  ``WorkerWatch`` takes over the worker's signal wakeup fd (forwarding every byte to gunicorn's
  own pipe, so the worker loop wakes exactly as before) and wraps the Python-level SIGTERM
  handler with one ``os.write``. A watcher thread reads that pipe and starts the sequence. The
  wakeup fd is written by the C-level handler, so a TERM is seen at once even while the main
  thread is stuck in C in a request: the deadline is armed at the TERM, not when the request
  ends, and the report can be written before the arbiter's SIGKILL.
* Some stops come with no signal: ``max_requests`` and the reloader set ``alive = False``, and
  the uvicorn worker swaps in uvicorn's own SIGTERM handler (and asyncio takes the wakeup fd)
  while it serves. The watcher therefore also looks, every ``POLL`` seconds, at
  ``worker.alive`` and at the ``should_exit`` flag of a uvicorn ``Server`` whose ``handle_exit``
  is the current SIGTERM handler. Both are plain attribute reads.
* The integration owns one wrap-up listener, "gunicorn: requests in flight", released by
  ``worker_exit``: the shutdown phase (close pools, flush) starts only once every request in
  flight has finished, because the phase waits for every wrap-up listener.
* The drain delay: at the arbiter's TERM the arbiter closes *its* copies of the listening
  sockets, but every worker holds an inherited copy, so the socket keeps accepting as long as
  one worker does. A worker given a ``hold_term`` that says yes therefore does not pass the TERM
  on to gunicorn's handler (a store: ``alive = False``) at once: readiness turns 503 and the
  sequence starts at the TERM, the worker keeps accepting and serving while ``drain_wait`` runs
  on a thread of its own, and only then gets gunicorn's handler (and its loop a wakeup byte).
  SIGINT/SIGQUIT (the quick shutdown) go to gunicorn's handlers untouched: still immediate. The
  uvicorn worker swaps in uvicorn's own SIGTERM handler while it serves, and its own worker
  handler is SIG_DFL: nothing is held there (the TERM uvicorn re-raises once drained neither).
* uvicorn's server re-raises the signal it caught once it has drained. With gunicorn's SIG_DFL
  in place that kills the worker before ``worker_exit`` runs; our handler is what uvicorn
  restores, so the re-raise lands on it and the worker finishes its shutdown listeners.
* gunicorn cuts a stop short in two ways that leave graceful less time than its sequence may
  take, and its SIGKILL follows: a worker timeout (the arbiter's SIGABRT, then SIGKILL at its next
  tick: within about 1 s, sooner if another signal wakes it) and a quick shutdown after a TERM
  (SIGINT or SIGQUIT to the arbiter: SIGQUIT to the workers, SIGKILL 2 s later). gunicorn's
  handlers for both raise ``SystemExit`` in the main thread wherever it is: in a request (which
  unwinds through the app's own ``finally`` blocks, which may block), or in ``worker_exit``
  waiting for the shutdown listeners, where it left the wait and the process sat in the
  interpreter's exit, behind the sequence's thread, until the SIGKILL: no report (issue #27). So
  the watcher reads those signals' C-level wakeup bytes too (seen even while the main thread is
  stuck in C) and calls ``force_quit_now`` at once: on a timeout, and on a quick shutdown once
  the stop is under way. The report is the first thing written, the core bounds the rest. A
  quick shutdown of a worker that was serving begins the sequence and gives it ``QUICK_GRACE``
  (at most the budget; the arbiter waits ``graceful_timeout`` then), counted by the watcher,
  not by the main thread, which may be stuck unwinding the request. While ``worker_exit`` waits,
  gunicorn's handlers for those signals still run (and call ``worker_int``/``worker_abort``),
  but their ``SystemExit`` is absorbed: the loop they exist to end has ended already.
* A report section records "forced" for the arbiter as the report is made, before it is
  written: the arbiter's SIGKILL can follow the report within a second, before any force-quit
  hook would have run.
* The report shows where the main thread was when gunicorn's SIGABRT/SIGQUIT handler ran (the
  stack its ``worker_abort``/``worker_int`` hook is called from, taken there as file, line and
  function, without reading a source file): by the time the watcher writes the report, the main
  thread may have unwound the request that hung, and that request is what a timeout's report
  must show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import traceback
from collections.abc import Callable
from types import FrameType

from ._diagnostics import format_thread_stacks
from ._lifecycle import Lifecycle, State, add_report_section, budget, clock
from ._listeners import mark_own

__all__ = ["POLL", "QUICK_GRACE", "WorkerWatch"]

log = logging.getLogger("graceful")

POLL = 0.1
"""Seconds between two looks at ``worker.alive`` / uvicorn's ``should_exit`` (uvicorn's own tick)."""
QUICK_GRACE = 1.0
"""Seconds a serving worker's sequence gets on gunicorn's quick shutdown (at most the budget)."""
CUT_BACKSTOP = 5.0
"""Seconds ``worker_exit`` waits, at most, for a force quit under way to end the process."""
_TERM = bytes([signal.SIGTERM])
_QUICK = (signal.SIGQUIT, signal.SIGINT)
_CUTTERS = (signal.SIGABRT, signal.SIGQUIT, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], object] | int | None


class WorkerWatch:
    """Ties one gunicorn worker to a graceful ``Lifecycle``; made and installed in the worker."""

    def __init__(
        self,
        worker: object,
        lifecycle: Lifecycle,
        on_report: Callable[[], object],
        *,
        hold_term: Callable[[], bool] | None = None,
        drain_wait: Callable[[], object] | None = None,
        on_begin: Callable[[], object] | None = None,
    ) -> None:
        """``hold_term`` (called in the SIGTERM handler: plain reads only) says whether to keep
        accepting through ``drain_wait`` (called on a thread) before gunicorn sees the TERM;
        ``on_begin`` is called on the watcher thread when the worker's stop begins; ``on_report``
        as graceful's force-quit report is made, just before it is written (one pipe write)."""
        self.worker = worker
        self._hold_term = hold_term
        self._drain_wait = drain_wait
        self._on_begin = on_begin
        self._held = False
        """A TERM is being held back from gunicorn's handler."""
        self._unheard = False
        """A TERM came while SIGTERM's previous handler was SIG_DFL."""
        self._released = False
        self._drain_started = False
        self.lifecycle = lifecycle
        self._on_report = on_report
        self.pid = os.getpid()
        self.timeout = float(getattr(getattr(worker, "cfg", None), "timeout", 0) or 0)
        self.loop_ended = threading.Event()
        self.outcome = "graceful"
        self._cut_at: float | None = None
        """When a quick shutdown's grace ends (on the lifecycle's clock)."""
        self._cut_why = ""
        self._cutting = False
        """``force_quit_now`` was called: the report is out or on its way."""
        self._guarded: dict[int, _Handler] = {}
        """gunicorn's handlers whose SystemExit is absorbed."""
        self._caught: tuple[str, traceback.StackSummary] | None = None
        """The main thread's stack at gunicorn's SIGABRT/SIGQUIT handler: (the signal's name, the stack)."""
        # Non-inheritable: a fork+exec from the app gets neither end.
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._prev_wakeup = -1
        self._prev_term: _Handler = None
        self._stopping = False
        self._begun = False
        self._thread: threading.Thread | None = None

    # -- main thread, from post_worker_init --------------------------------------------------

    def install(self) -> None:
        """Take the wakeup fd and SIGTERM (chaining both), register the listener, start watching."""
        self._prev_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._prev_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_term)
        # As gunicorn does: a TERM must not break a request's I/O.
        signal.siginterrupt(signal.SIGTERM, False)
        self.lifecycle.add_wrap_up_listener(
            mark_own(self._requests_in_flight), name="gunicorn: requests in flight"
        )
        add_report_section(self.lifecycle, self._reporting)
        add_report_section(self.lifecycle, self._main_thread_stack)
        self._thread = threading.Thread(target=self._watch, name="graceful-gunicorn-watch", daemon=True)
        self._thread.start()

    def _requests_in_flight(self) -> None:
        """The wrap-up listener: until the worker's loop has ended (its requests answered)."""
        self.loop_ended.wait()

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: one write to a non-blocking pipe (re-entrant), then gunicorn's own
        # handler. SIG_DFL is not chained: under uvicorn that is what its re-raise would hit.
        first_hold = (
            not self._held
            # gunicorn's handler to pass it on to (uvicorn's: SIG_DFL).
            and callable(self._prev_term)
            # Not stopping already (max_requests).
            and getattr(self.worker, "alive", True) is not False
            and self._hold_term is not None
            and self._drain_wait is not None
            and self._hold_term()
        )
        if first_hold:
            # Before the write: the watcher starts the delay, then releases.
            self._held = True
        with contextlib.suppress(OSError):
            os.write(self._write, _TERM)
        if self._held and not self._released:
            # Held (a second TERM while draining too): released after the delay.
            return
        previous = self._prev_term
        if callable(previous):
            previous(sig, frame)
        else:
            # SIG_DFL: the uvicorn worker before its server serves; the watcher re-sends it.
            self._unheard = True

    def release(self) -> None:
        """Pass a held TERM on to gunicorn's handler and wake the worker loop (any thread)."""
        if not self._held or self._released:
            return
        self._released = True
        previous = self._prev_term
        if callable(previous):
            # gunicorn's: a store (and a wakeup for gthread).
            previous(signal.SIGTERM, None)
        if self._prev_wakeup >= 0:
            with contextlib.suppress(OSError):
                os.write(self._prev_wakeup, _TERM)

    def _drain_then_release(self) -> None:
        try:
            if self._drain_wait is not None:
                self._drain_wait()
        except Exception:
            # Never keep the worker accepting past a failed wait.
            log.exception("graceful: the drain delay failed; the worker stops accepting now")
        finally:
            self.release()
            _close_kept_alive(self.worker, self.pid)

    # -- the watcher thread ------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping:
            try:
                ready, _, _ = select.select([self._read], [], [], self._next_look())
            except (OSError, ValueError):
                # Closed under us at exit.
                return
            if ready:
                self._react(self._drain())
            if not self._begun:
                why = self._stopping_without_signal()
                if why is not None:
                    self._begin(why)
            if self._unheard:
                self._resend_unheard()
            cut_at = self._cut_at
            if cut_at is not None and clock(self.lifecycle).monotonic() >= cut_at:
                self._cut_now(self._cut_why)

    def _next_look(self) -> float:
        """Seconds until the watcher looks again: ``POLL``, or less when a quick grace ends first."""
        cut_at = self._cut_at
        if cut_at is None:
            return POLL
        return max(0.0, min(POLL, cut_at - clock(self.lifecycle).monotonic()))

    def _react(self, seen: set[int]) -> None:
        """Act on the signals the pipe said came (watcher thread, or ``finish`` on the main one)."""
        if signal.SIGTERM in seen:
            self._begin("SIGTERM")
            # Here, not in _begin: the C-level wakeup byte comes first.
            self._start_drain()
        if signal.SIGABRT in seen:
            self._cut_now(
                f"gunicorn worker timeout (SIGABRT): worker {self.pid} gave the arbiter no sign of "
                f"life for {self.timeout:g} s; the arbiter's SIGKILL follows within about 1 s"
            )
            return
        quick = next((sig for sig in _QUICK if sig in seen), None)
        if quick is not None:
            self._quick(signal.Signals(quick).name)

    def _quick(self, name: str) -> None:
        """gunicorn's quick shutdown: now if the stop was under way, else after a short grace."""
        if self._cut_at is not None:
            # This quick shutdown's grace runs already (a second byte).
            return
        if self.lifecycle.is_stopping():
            self._cut_now(
                f"gunicorn's quick shutdown ({name}) reached worker {self.pid} after its stop began; "
                "the arbiter's SIGKILL follows 2 s after it"
            )
            return
        grace = min(QUICK_GRACE, budget(self.lifecycle))
        self._cut_why = f"gunicorn's quick shutdown ({name}) gives worker {self.pid} {grace:g} s"
        self._cut_at = clock(self.lifecycle).monotonic() + grace
        self._begin(f"gunicorn's quick shutdown ({name})")

    def _cut_now(self, why: str) -> None:
        """The report first (the core writes it to fd 2 before anything that can block), then exit 70."""
        if self._cutting or self.lifecycle.state() is State.STOPPED:
            return
        self._cutting = True
        self.lifecycle.force_quit_now(why)

    def note_signal(self, sig: int) -> None:
        """From gunicorn's ``worker_int``/``worker_abort`` hooks (in its signal handler, on the
        main thread): keep where the main thread is for the report, and say that ``sig`` came,
        in case the wakeup fd is no longer graceful's. A store and one write."""
        # File, line and function now (no source read): once unwound, a frame shows where it ended.
        stack = traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)
        stack.reverse()
        self._caught = (signal.Signals(sig).name, stack)
        with contextlib.suppress(OSError, ValueError):
            os.write(self._write, bytes([sig]))

    def _resend_unheard(self) -> None:
        """A TERM that came before uvicorn's server took SIGTERM (uvicorn's worker resets it to
        SIG_DFL, which graceful does not chain) reached nobody who stops the loop: once uvicorn's
        handler is in place, and uvicorn is not stopping already, send the TERM again, to it."""
        handler = signal.getsignal(signal.SIGTERM)
        owner = getattr(handler, "__self__", None)
        if callable(handler) and owner is not None and owner is not self:
            self._unheard = False
            if getattr(owner, "should_exit", None) is False:
                os.kill(self.pid, signal.SIGTERM)

    def _drain(self) -> set[int]:
        """Read what the pipe holds, forward it to gunicorn's wakeup pipe; the signals that came."""
        seen: set[int] = set()
        while True:
            try:
                data = os.read(self._read, 512)
            except OSError:
                # BlockingIOError: nothing more for now; EBADF: closed at exit.
                return seen
            if not data:
                return seen
            seen.update(data)
            if self._prev_wakeup >= 0:
                # Full or closed: the loop is awake already.
                with contextlib.suppress(OSError):
                    os.write(self._prev_wakeup, data)

    def _stopping_without_signal(self) -> str | None:
        if getattr(self.worker, "alive", True) is False:
            return "the worker loop is stopping (max_requests, a reload or a signal)"
        handler = signal.getsignal(signal.SIGTERM)
        owner = getattr(handler, "__self__", None)
        if owner is not None and owner is not self and getattr(owner, "should_exit", False) is True:
            return "uvicorn is stopping"
        return None

    def _begin(self, why: str) -> None:
        if self._begun:
            # A TERM's byte and its wakeup byte may be read apart: begin once.
            return
        self._begun = True
        self.lifecycle.shutdown(f"gunicorn worker {self.pid}: {why}", wait=False)
        if self._on_begin is not None:
            try:
                self._on_begin()
            except Exception:
                log.exception("graceful: gunicorn worker %d: on_begin failed", self.pid)

    def _start_drain(self) -> None:
        """Once the TERM is held (``_on_term`` sets it before writing its byte), drain on a thread."""
        if self._held and not self._released and not self._drain_started:
            self._drain_started = True
            name = "graceful-gunicorn-drain"
            threading.Thread(target=self._drain_then_release, name=name, daemon=True).start()

    # -- main thread, from worker_exit -------------------------------------------------------

    def finish(self) -> str:
        """The loop has ended: release the wrap-up phase, run the rest, restore; the outcome."""
        self._absorb_quick_exits()
        self.loop_ended.set()
        # The loop ended anyway (a quick shutdown): nothing to hold any more.
        self.release()
        lifecycle = self.lifecycle
        # An idle worker may get here before the watcher looked.
        self._react(self._drain())
        if self._cutting:
            # The force quit owns the end: it exits the process, bounded.
            lifecycle.wait_for_shutdown(CUT_BACKSTOP)
        else:
            lifecycle.shutdown(f"gunicorn worker {self.pid}: exiting", wait=False)
            # The force-quit timer (or a quick shutdown's cut) ends the process; this is a backstop.
            remaining = lifecycle.time_remaining()
            lifecycle.wait_for_shutdown(None if remaining is None else remaining + CUT_BACKSTOP)
        self.uninstall()
        return "failed" if lifecycle.exit_code == 1 else self.outcome

    def _absorb_quick_exits(self) -> None:
        """From here on gunicorn's SIGABRT/SIGQUIT/SIGINT handlers still run, but their
        ``SystemExit`` does not leave ``worker_exit``: the watcher cuts the stop short instead."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _CUTTERS:
            previous = signal.getsignal(sig)
            if callable(previous) and previous != self._absorbing:
                self._guarded[sig] = previous
                signal.signal(sig, self._absorbing)

    def _absorbing(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: gunicorn's (a store, its worker_int/worker_abort hook, a 0.1 s sleep),
        # without the SystemExit that would abandon the shutdown listeners and the report.
        previous = self._guarded.get(sig)
        if callable(previous):
            with contextlib.suppress(SystemExit):
                previous(sig, frame)

    def uninstall(self) -> None:
        """Stop watching; put back gunicorn's wakeup fd and SIGTERM handler if still ours."""
        self._stopping = True
        if self._thread is not None:
            with contextlib.suppress(OSError):
                # Wake the watcher now rather than at its next look.
                os.write(self._write, b"\0")
            self._thread.join(1.0)
        if threading.current_thread() is threading.main_thread():
            current = signal.set_wakeup_fd(self._prev_wakeup)
            if current != self._write:
                # Someone else's (asyncio's): leave theirs in place.
                signal.set_wakeup_fd(current)
            if signal.getsignal(signal.SIGTERM) == self._on_term:
                signal.signal(signal.SIGTERM, self._prev_term)
            for sig, previous in self._guarded.items():
                if signal.getsignal(sig) == self._absorbing:
                    signal.signal(sig, previous)
        if self._thread is None or not self._thread.is_alive():
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- force quit --------------------------------------------------------------------------

    def _reporting(self) -> list[str]:
        """A report section with no line: the report is being made, so tell the arbiter now."""
        self.outcome = "forced"
        self._on_report()
        return []

    def _main_thread_stack(self) -> list[str]:
        """In graceful's report: where the worker's main thread (the worker loop) is, or was when
        gunicorn's SIGABRT/SIGQUIT handler ran (it unwinds the request right after)."""
        title = f"graceful: gunicorn worker {self.pid}: main thread (the worker loop) at force quit:"
        # Taken first: a stack caught at the handler is then the older one.
        now = format_thread_stacks([threading.main_thread()], title)
        caught = self._caught
        if caught is None:
            return now
        name, stack = caught
        lines = [f"graceful: gunicorn worker {self.pid}: main thread (the worker loop) when {name} came:"]
        for entry in stack.format():
            lines.extend("    " + line for line in entry.rstrip("\n").split("\n"))
        return lines


def _close_kept_alive(worker: object, pid: int) -> None:
    """gthread: close the idle kept-alive connections now, on the worker's own loop.

    At its stop gthread keeps them open up to ``STOP_KEEPALIVE_LINGER`` (2 s) so that a request
    arriving on one is still answered. After the drain delay the balancer has stopped sending,
    so that linger is all the worker would wait for: behind HAProxy, which keeps its server
    connections, every stop took 2 s more than the drain. The close runs through gthread's own
    ``method_queue`` (its loop's thread) with its public ``murder_keepalived(force=True)``;
    a worker without them (sync, another version) is left as it is.
    """
    defer = getattr(getattr(worker, "method_queue", None), "defer", None)
    murder = getattr(worker, "murder_keepalived", None)
    kept = getattr(worker, "keepalived_conns", None)
    if not callable(defer) or not callable(murder) or kept is None:
        return
    if "force" not in getattr(getattr(murder, "__code__", None), "co_varnames", ()):
        return

    def close() -> None:
        """Runs on the worker's loop."""
        count = len(kept)
        murder(force=True)
        if count:
            log.info("graceful: gunicorn worker %d closed %d idle keep-alive connection(s)", pid, count)

    # The loop has closed its queue: nothing left.
    with contextlib.suppress(OSError, ValueError):
        defer(close)
