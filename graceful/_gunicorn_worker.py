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
from ._lifecycle import add_report_section, on_force_quit
from ._listeners import mark_own

__all__ = ["POLL", "QUICK_GRACE", "WorkerWatch"]

log = logging.getLogger("graceful")

POLL = 0.1  # seconds between two looks at worker.alive / uvicorn's should_exit (uvicorn's own tick)
QUICK_GRACE = 1.0  # seconds the listeners get on gunicorn's quick shutdown (the arbiter allows 2)
_TERM = bytes([signal.SIGTERM])

_Handler = Callable[[int, FrameType | None], object] | int | None


class WorkerWatch:
    """Ties one gunicorn worker to a graceful ``Lifecycle``; made and installed in the worker."""

    def __init__(
        self,
        worker: object,
        lifecycle: Lifecycle,
        on_forced: Callable[[], object],
        *,
        hold_term: Callable[[], bool] | None = None,
        drain_wait: Callable[[], object] | None = None,
        on_begin: Callable[[], object] | None = None,
    ) -> None:
        """``hold_term`` (called in the SIGTERM handler: plain reads only) says whether to keep
        accepting through ``drain_wait`` (called on a thread) before gunicorn sees the TERM;
        ``on_begin`` is called on the watcher thread when the worker's stop begins."""
        self.worker = worker
        self._hold_term = hold_term
        self._drain_wait = drain_wait
        self._on_begin = on_begin
        self._held = False  # a TERM is being held back from gunicorn's handler
        self._unheard = False  # a TERM came while SIGTERM's previous handler was SIG_DFL
        self._released = False
        self._drain_started = False
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
        self.lifecycle.add_wrap_up_listener(
            mark_own(self._requests_in_flight), name="gunicorn: requests in flight"
        )
        add_report_section(self.lifecycle, self._main_thread_stack)
        on_force_quit(self.lifecycle, self._forced, name="gunicorn: forced outcome")
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
            and callable(self._prev_term)  # gunicorn's handler to pass it on to (uvicorn's: SIG_DFL)
            and getattr(self.worker, "alive", True) is not False  # not stopping already (max_requests)
            and self._hold_term is not None
            and self._drain_wait is not None
            and self._hold_term()
        )
        if first_hold:
            self._held = True  # before the write: the watcher starts the delay, then releases
        with contextlib.suppress(OSError):
            os.write(self._write, _TERM)
        if self._held and not self._released:
            return  # held (a second TERM while draining too): released after the delay
        previous = self._prev_term
        if callable(previous):
            previous(sig, frame)
        else:  # SIG_DFL: the uvicorn worker before its server serves; the watcher re-sends it
            self._unheard = True

    def release(self) -> None:
        """Pass a held TERM on to gunicorn's handler and wake the worker loop (any thread)."""
        if not self._held or self._released:
            return
        self._released = True
        previous = self._prev_term
        if callable(previous):
            previous(signal.SIGTERM, None)  # gunicorn's: a store (and a wakeup for gthread)
        if self._prev_wakeup >= 0:
            with contextlib.suppress(OSError):
                os.write(self._prev_wakeup, _TERM)

    def _drain_then_release(self) -> None:
        try:
            if self._drain_wait is not None:
                self._drain_wait()
        except Exception:  # never keep the worker accepting past a failed wait
            log.exception("graceful: the drain delay failed; the worker stops accepting now")
        finally:
            self.release()
            _close_kept_alive(self.worker, self.pid)

    # -- the watcher thread ------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping:
            try:
                ready, _, _ = select.select([self._read], [], [], POLL)
            except (OSError, ValueError):  # closed under us at exit
                return
            if ready and self._drain():
                self._begin("SIGTERM")
                self._start_drain()  # here, not in _begin: the C-level wakeup byte comes first
            if not self._begun:
                why = self._stopping_without_signal()
                if why is not None:
                    self._begin(why)
            if self._unheard:
                self._resend_unheard()

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
        if self._begun:  # a TERM's byte and its wakeup byte may be read apart: begin once
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
        self.loop_ended.set()
        self.release()  # the loop ended anyway (a quick shutdown): nothing to hold any more
        lifecycle = self.lifecycle
        if not self._begun and self._drain():  # an idle worker may get here before the watcher looked
            self._begin("SIGTERM")
        lifecycle.shutdown(f"gunicorn worker {self.pid}: exiting", wait=False)
        if self.quick is not None:
            if not lifecycle.wait_for_shutdown(QUICK_GRACE):
                lifecycle.force_quit_now(f"gunicorn's quick shutdown ({self.quick}) allows {QUICK_GRACE:g} s")
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

    def close() -> None:  # on the worker's loop
        count = len(kept)
        murder(force=True)
        if count:
            log.info("graceful: gunicorn worker %d closed %d idle keep-alive connection(s)", pid, count)

    with contextlib.suppress(OSError, ValueError):  # the loop has closed its queue: nothing left
        defer(close)
