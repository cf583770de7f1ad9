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
* uvicorn's server re-raises the signal it caught once it has drained. With gunicorn's SIG_DFL
  in place that kills the worker before ``worker_exit`` runs; our handler is what uvicorn
  restores, so the re-raise lands on it and the worker finishes its shutdown listeners.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType

from . import Lifecycle
from ._diagnostics import format_thread_stacks

__all__ = ["POLL", "QUICK_GRACE", "WorkerWatch"]

log = logging.getLogger("graceful")

POLL = 0.1  # seconds between two looks at worker.alive / uvicorn's should_exit (uvicorn's own tick)
QUICK_GRACE = 1.0  # seconds the listeners get on gunicorn's quick shutdown (the arbiter allows 2)
_TERM = bytes([signal.SIGTERM])

_Handler = Callable[[int, FrameType | None], object] | int | None


class WorkerWatch:
    """Ties one gunicorn worker to a graceful ``Lifecycle``; made and installed in the worker."""

    def __init__(self, worker: object, lifecycle: Lifecycle, on_forced: Callable[[], object]) -> None:
        self.worker = worker
        self.lifecycle = lifecycle
        self._on_forced = on_forced
        self.pid = os.getpid()
        self.loop_ended = threading.Event()
        self.quick: str | None = None  # set from gunicorn's handlers: a plain store, nothing else
        self.outcome = "graceful"
        self._read, self._write = os.pipe()  # non-inheritable: a fork+exec from the app gets neither
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
        signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn: a TERM must not break a request's I/O
        self.lifecycle.add_wrap_up_listener(self.loop_ended.wait, name="gunicorn: requests in flight")
        self.lifecycle.add_report_section(self._main_thread_stack)
        self.lifecycle.on_force_quit(self._forced, name="gunicorn: forced outcome")
        self._thread = threading.Thread(target=self._watch, name="graceful-gunicorn-watch", daemon=True)
        self._thread.start()

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: one write to a non-blocking pipe (re-entrant), then gunicorn's own
        # handler. SIG_DFL is not chained: under uvicorn that is what its re-raise would hit.
        with contextlib.suppress(OSError):
            os.write(self._write, _TERM)
        previous = self._prev_term
        if callable(previous):
            previous(sig, frame)

    # -- the watcher thread ------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping:
            try:
                ready, _, _ = select.select([self._read], [], [], POLL)
            except (OSError, ValueError):  # closed under us at exit
                return
            if ready and self._drain():
                self._begin("SIGTERM")
            if not self._begun:
                why = self._stopping_without_signal()
                if why is not None:
                    self._begin(why)

    def _drain(self) -> bool:
        """Read what the pipe holds, forward it to gunicorn's wakeup pipe; True if a TERM came."""
        term = False
        while True:
            try:
                data = os.read(self._read, 512)
            except (BlockingIOError, InterruptedError):
                return term
            except OSError:
                return term
            if not data:
                return term
            term = term or _TERM in data
            if self._prev_wakeup >= 0:
                with contextlib.suppress(OSError):  # full or closed: the loop is awake already
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
        self._begun = True
        self.lifecycle.shutdown(f"gunicorn worker {self.pid}: {why}", wait=False)

    # -- main thread, from worker_exit -------------------------------------------------------

    def finish(self) -> str:
        """The loop has ended: release the wrap-up phase, run the rest, restore; the outcome."""
        self.loop_ended.set()
        lifecycle = self.lifecycle
        if not self._begun and self._drain():  # an idle worker may get here before the watcher looked
            self._begin("SIGTERM")
        lifecycle.shutdown(f"gunicorn worker {self.pid}: exiting", wait=False)
        if self.quick is not None:
            if not lifecycle.wait_for_shutdown(QUICK_GRACE):
                lifecycle.force_quit(f"gunicorn's quick shutdown ({self.quick}) allows {QUICK_GRACE:g} s")
        else:
            # The force-quit timer ends the process at the deadline; the bound is a backstop.
            remaining = lifecycle.time_remaining()
            lifecycle.wait_for_shutdown(None if remaining is None else remaining + 5.0)
        self.uninstall()
        return "failed" if lifecycle.exit_code == 1 else self.outcome

    def uninstall(self) -> None:
        """Stop watching; put back gunicorn's wakeup fd and SIGTERM handler if still ours."""
        self._stopping = True
        if self._thread is not None:
            with contextlib.suppress(OSError):
                os.write(self._write, b"\0")  # wake the watcher now rather than at its next look
            self._thread.join(1.0)
        if threading.current_thread() is threading.main_thread():
            current = signal.set_wakeup_fd(self._prev_wakeup)
            if current != self._write:  # someone else's (asyncio's): leave theirs in place
                signal.set_wakeup_fd(current)
            if signal.getsignal(signal.SIGTERM) == self._on_term:
                signal.signal(signal.SIGTERM, self._prev_term)
        if self._thread is None or not self._thread.is_alive():
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- force quit --------------------------------------------------------------------------

    def _main_thread_stack(self) -> list[str]:
        """In graceful's report: where the worker's main thread (the worker loop) is."""
        title = f"graceful: gunicorn worker {self.pid}: main thread (the worker loop) at force quit:"
        return format_thread_stacks([threading.main_thread()], title)

    def _forced(self) -> None:
        self.outcome = "forced"
        self._on_forced()
