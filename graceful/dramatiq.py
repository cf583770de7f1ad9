"""Dramatiq workers: graceful's listeners, deadline, report and probes in every worker process.

``graceful.dramatiq.install(broker)``, once, where the broker is made (the module the
``dramatiq`` command imports); or ``GracefulMiddleware()`` in the broker's middleware list,
which is what ``install`` adds. The ``dramatiq`` command forks worker processes and forwards
SIGTERM, SIGINT (as SIGTERM) and SIGHUP to them; each worker process imports the broker module
and so runs graceful on its own lifecycle:

* **Stop** (the forwarded SIGTERM, or ``graceful.shutdown()`` in the process): the wrap-up
  listeners run at once; ``is_stopping()`` and ``wait_for_wrap_up()`` turn True for the actors
  running in the worker threads, so a long actor can send the rest of itself from its cursor
  (``graceful.iteration``); no worker thread starts another message (one taken in that very
  instant goes back to its queue unrun), the consumers fetch no more, and the messages
  prefetched but not started go back to their queues at once, for other workers to take.
* Once every message in hand is done with (acknowledged), Dramatiq's own stop runs (its
  middleware hooks, what it still holds put back), then the **shutdown listeners**, and the
  worker process exits at once: 0, or 1 if a listener raised; ``dramatiq`` passes the code on.
  Plain Dramatiq looks at its stop flag once a second and waits up to a second more for each
  idle thread: a stop there takes 1-2 s more than its messages.
* **Deadline** (graceful's budget from the SIGTERM; Dramatiq's ``--worker-shutdown-timeout`` is
  10 minutes): graceful's report names each message still running (actor, message id, queue,
  for how long) with the stack of the actor's own code, then every message the process holds
  (running, prefetched, delayed, fetched but not handed over) is put back on its queue and
  logged, then exit 70, which ``dramatiq`` passes on. A message cut there runs again
  elsewhere: at-least-once, as the docs say.
* **A second SIGTERM** (a second Ctrl-C: ``dramatiq`` forwards SIGINT as SIGTERM) is a force
  quit now, graceful's way: the report, everything held put back, exit 70. Plain Dramatiq exits
  1 from inside its signal handler and leaves the messages to its heartbeat timeout.
* **Heartbeat** (Redis broker): the broker records a worker's heartbeat with each command its
  consumers run, and a worker silent for ``heartbeat_timeout`` (60 s) is taken for dead: another
  worker puts its messages back and they run twice (Dramatiq #159: the heartbeat stopped while
  a worker drained). Today Dramatiq's stop keeps its consumers fetching for that reason.
  graceful stops them at the stop instead (what they fetch during a drain would only be handed
  back at its end, out of other workers' reach meanwhile) and beats for the worker itself,
  every quarter of ``heartbeat_timeout``, from boot to exit.
* **Probes** (``GRACEFUL_PROBE_PORT``): each worker process answers ``/readyz`` (200 from
  Dramatiq's ``after_worker_boot`` until the stop) and ``/livez`` on the same port
  (``SO_REUSEPORT``), from memory. Under systemd each worker process sends ``READY=1`` and the
  stop's notifications (``NotifyAccess=all``).
* **Start**: every ``GRACEFUL_*`` variable is read and the probe port bound before the worker
  threads start; a value graceful cannot use stops the worker process there with one line
  naming it (``dramatiq`` exits 1), never a worker that runs without graceful.

Only the ``dramatiq`` command's worker processes are hosted: a ``dramatiq.Worker`` a program
starts itself (a test suite with the ``StubBroker``) runs as it would without graceful, so that
graceful never takes over a test runner's signals or lifecycle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections import defaultdict

import dramatiq
from dramatiq.middleware import Middleware, SkipMessage

from . import readiness, systemd
from ._checks import TYPE_CHECKING
from ._current import get_lifecycle
from ._diagnostics import frame_lines
from ._lifecycle import (
    Event,
    Lifecycle,
    add_report_section,
    on_force_quit,
    prepare,
    shutdown_requested,
    subscribe,
)
from ._listeners import mark_own

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

__all__ = ["GracefulMiddleware", "install"]

log = logging.getLogger("graceful")

_ACTOR_CALL = os.path.join("dramatiq", "actor.py")

ACK_GRACE = 0.2
"""Seconds the deadline waits for Dramatiq to acknowledge a message whose actor has returned
(within the share of the force quit's last second its hooks get)."""


def install(broker: dramatiq.Broker) -> None:
    """Add graceful to every worker process of ``broker``; see the module docstring. Idempotent.

    Call it where the broker is made, in the module ``dramatiq`` imports. Listeners registered
    at import time run in every worker process (each imports the module).

    Raises:
        TypeError: ``broker`` is not a ``dramatiq.Broker``.
    """
    if not isinstance(broker, dramatiq.Broker):
        raise TypeError(f"graceful.dramatiq.install() takes a dramatiq.Broker, not {type(broker).__name__}")
    if not any(isinstance(middleware, GracefulMiddleware) for middleware in broker.middleware):
        broker.add_middleware(GracefulMiddleware())


class GracefulMiddleware(Middleware):
    """The Dramatiq middleware ``install()`` adds: graceful in each ``dramatiq`` worker process."""

    def __init__(self) -> None:
        self._host: _Host | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if not _in_a_dramatiq_worker_process():
            log.debug("graceful.dramatiq: a Worker started outside the dramatiq command: left alone")
            return
        try:
            self._host = _Host(broker, worker, get_lifecycle())
        except (ValueError, RuntimeError) as exc:
            # Dramatiq logs and swallows what a middleware raises; a SystemExit it lets through,
            # and the ``dramatiq`` command then stops with exit code 1.
            raise SystemExit(f"graceful: the dramatiq worker cannot start: {exc}") from exc

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._host is not None:
            self._host.ready()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._host is not None:
            self._host.starting(message)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if self._host is not None:
            self._host.running.returned(message)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._host is not None:
            self._host.running.returned(message)

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._host is not None:
            # Done with: acknowledged after it ran.
            self._host.running.remove(message)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if self._host is not None:
            # Done with: dead-lettered.
            self._host.running.remove(message)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._host is not None:
            self._host.finish()


def _in_a_dramatiq_worker_process() -> bool:
    """True when called (at any depth) from the ``dramatiq`` command's worker process function."""
    import sys

    cli = sys.modules.get("dramatiq.cli")
    code = getattr(getattr(cli, "worker_process", None), "__code__", None)
    return code is not None and any(frame.f_code is code for frame, _ in traceback.walk_stack(None))


class _Running:
    """The messages this process's worker threads hold, from ``before_process_message`` until
    they are acknowledged (or rejected): message id -> its entry."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._messages: dict[str, _Entry] = {}

    def add(self, message: Any) -> None:
        with self._changed:
            self._messages[message.message_id] = _Entry(message, threading.get_ident(), time.monotonic())

    def returned(self, message: Any) -> None:
        """Its actor has returned (or raised): only the acknowledgement is left to do."""
        with self._changed:
            entry = self._messages.get(message.message_id)
            if entry is not None:
                entry.returned = True

    def remove(self, message: Any) -> None:
        with self._changed:
            if self._messages.pop(message.message_id, None) is not None:
                self._changed.notify_all()

    def snapshot(self) -> list[_Entry]:
        with self._changed:
            return sorted(self._messages.values(), key=lambda entry: entry.since)

    def wait_until_none(self) -> None:
        """Block until no message is held (no timeout: graceful's deadline bounds the wait)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._messages)

    def wait_until_gone(self, ids: set[str], timeout: float) -> set[str]:
        """Wait (at most ``timeout`` s) until none of ``ids`` is held; those still held."""
        with self._changed:
            self._changed.wait_for(lambda: not ids & self._messages.keys(), timeout)
            return ids & self._messages.keys()


class _Entry:
    """One message held: the message, the thread running it, since when, and whether its actor
    has returned (then only Dramatiq's acknowledgement is left)."""

    __slots__ = ("message", "returned", "since", "thread_id")

    def __init__(self, message: Any, thread_id: int, since: float) -> None:
        self.message = message
        self.thread_id = thread_id
        self.since = since
        self.returned = False


class _Host:
    """graceful's side of one ``dramatiq`` worker process, made at ``before_worker_boot``."""

    def __init__(self, broker: dramatiq.Broker, worker: dramatiq.Worker, lifecycle: Lifecycle) -> None:
        # What can fail comes first, before anything is registered: every variable read and
        # checked (ValueError), the sequence's threads started ahead of need, then the probe
        # port bound (RuntimeError).
        self.settings = readiness.configure_from_env(lifecycle)
        prepare(lifecycle)
        self.probes = readiness.serve_probes_from_env(lifecycle, self.settings, reuse_port=True)
        self.broker = broker
        self.worker = worker
        self.lifecycle = lifecycle
        self.running = _Running()
        self.drained = threading.Event()
        """Set at ``after_worker_shutdown``: Dramatiq's own stop is over."""
        self._dramatiq_stop = signal.getsignal(signal.SIGTERM)
        self._main = threading.get_ident()
        self._booted = threading.Event()
        self._stop_asked = threading.Event()
        self._exited = threading.Event()
        self._exit_code = 0
        self._finished = False
        lifecycle.add_wrap_up_listener(
            mark_own(self._messages_in_flight), name="dramatiq: messages in flight"
        )
        add_report_section(lifecycle, self._report_section)
        on_force_quit(lifecycle, self._at_deadline, name="dramatiq: put back the messages held")
        subscribe(lifecycle, self._on_event)
        self.notifier = systemd.SystemdNotifier(lifecycle) if os.environ.get("NOTIFY_SOCKET") else None
        worker.stop = self._stop_from_dramatiq  # type: ignore[method-assign]
        threading.Thread(target=self._stop_when_asked, name="graceful-dramatiq-stop", daemon=True).start()
        self.signals = _SignalHandOff(self._on_signal, self._exit_now)
        self.heartbeat = _Heartbeat.start_for(broker)

    def ready(self) -> None:
        self._booted.set()
        readiness.set_ready(self.lifecycle)
        systemd.notify("READY=1", f"STATUS=dramatiq worker process {os.getpid()} ready")

    # -- the stop --------------------------------------------------------------------------------

    def _on_signal(self, signum: int, count: int) -> None:
        name = signal.Signals(signum).name
        if count == 1:
            self.lifecycle.shutdown(f"dramatiq {name}", wait=False)
        else:
            self.lifecycle.force_quit_now(f"{name} again: dramatiq's cold stop")

    def _on_event(self, event: Event, detail: str) -> None:
        if event is Event.SHUTDOWN_REQUESTED:
            self._stop_asked.set()

    def _messages_in_flight(self) -> None:
        """The wrap-up listener: take no new message, put back the prefetched ones, wait until
        the running ones are done with (acknowledged); at a shutdown, also for Dramatiq's stop."""
        shutdown = shutdown_requested(self.lifecycle)
        self._stop_taking(shutdown=shutdown)
        self.running.wait_until_none()
        if shutdown:
            self.drained.wait()

    def _stop_taking(self, *, shutdown: bool) -> None:
        """Worker threads finish their message and take no other; consumers fetch no more
        (stopped at a shutdown; paused at a pause, which Dramatiq makes last 3 s or more);
        the messages prefetched go back to their queues at once."""
        for thread in self.worker.workers:
            (thread.stop if shutdown else thread.pause)()
        for consumer in list(self.worker.consumers.values()):
            (consumer.stop if shutdown else consumer.pause)()
        prefetched = []
        work = self.worker.work_queue
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                break
            work.task_done()
            prefetched.append(item.message)
        self._put_back(prefetched, "prefetched, not started")

    def _stop_when_asked(self) -> None:
        """The stop, on a thread of its own started at boot: once the messages in hand are done
        with, Dramatiq's own ``Worker.stop`` (its middleware hooks, what it holds put back), the
        rest of graceful's sequence, then the worker process's exit, at once.

        Dramatiq's worker process looks at its stop flag once a second, and its stop waits up to
        a second more for each idle thread; neither is needed once every message is done with.
        """
        self._stop_asked.wait()
        self._booted.wait()
        self._tell_dramatiq()
        self._stop_taking(shutdown=True)
        self.running.wait_until_none()
        try:
            # The threads have nothing left to do.
            type(self.worker).stop(self.worker, timeout=0)
        except Exception:
            log.exception("graceful: Dramatiq's worker stop failed")
        finally:
            self.finish()
            self._exit_code = self.lifecycle.exit_code
            self._exited.set()
            # See _exit_now.
            signal.pthread_kill(self._main, signal.SIGTERM)

    def _tell_dramatiq(self) -> None:
        """Dramatiq's own handler, once: its main loop then calls ``worker.stop()`` (ours) within
        a second, should the wake-up of ``_exit_now`` not come."""
        stop = self._dramatiq_stop
        if callable(stop):
            with contextlib.suppress(Exception):
                stop(signal.SIGTERM, None)

    def _stop_from_dramatiq(self, timeout: int = 0) -> None:
        """What the worker process's main thread calls as ``worker.stop()``: wait for ours."""
        self.lifecycle.shutdown("dramatiq worker stops", wait=False)
        self._exited.wait()
        raise SystemExit(self._exit_code)

    def _exit_now(self) -> int | None:
        """In the main thread's signal handler: the exit code once the stop is over, else None.
        Raising ``SystemExit`` there ends the worker process the way Dramatiq's own does."""
        return self._exit_code if self._exited.is_set() else None

    def starting(self, message: Any) -> None:
        """``before_process_message``, in the worker thread: note it, or put it back if stopping."""
        if self.lifecycle.is_stopping() and not message.failed:
            # A worker thread took it from the work queue as the stop began: it never starts.
            self._put_back([message], "taken as the worker began to stop, not started")
            raise SkipMessage(f"graceful: put back on queue {message.queue_name!r}: the worker is stopping")
        self.running.add(message)

    def finish(self) -> None:
        """At ``after_worker_shutdown``: run the rest of the sequence and wait for it."""
        if self._finished:
            return
        self._finished = True
        self._put_back(self._fetched_not_handed_over(), "fetched, not handed over")
        self.drained.set()
        lc = self.lifecycle
        lc.shutdown("dramatiq worker stopped", wait=False)
        lc.wait_for_shutdown()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.notifier is not None:
            self.notifier.close()
        if self.probes is not None:
            # Only now: /livez answers until the very end.
            self.probes.close()

    # -- putting messages back -------------------------------------------------------------------

    def _put_back(self, messages: Iterable[Any], why: str) -> int:
        """Put ``messages`` back on their queues through Dramatiq's consumers; one log line each."""
        by_queue: defaultdict[str, list[Any]] = defaultdict(list)
        for message in messages:
            by_queue[message.queue_name].append(message)
        done = 0
        for queue_name, held in by_queue.items():
            try:
                self.worker.consumers[queue_name].requeue_messages(held)
            except Exception:
                # The other queues must still be put back.
                log.exception(
                    "dramatiq: %d message(s) of queue %r could not be put back (%s): %s",
                    len(held),
                    queue_name,
                    why,
                    ", ".join(_describe(message) for message in held),
                )
                continue
            done += len(held)
            for message in held:
                log.warning(
                    "dramatiq message %s put back on queue %r (%s)", _describe(message), queue_name, why
                )
        return done

    def _fetched_not_handed_over(self) -> list[Any]:
        """What a consumer fetched from Redis but never handed to the worker (Dramatiq's consumer
        stops in the middle of its batch; those messages would wait for the heartbeat timeout)."""
        found = []
        for queue_name, thread in list(self.worker.consumers.items()):
            cache = getattr(thread.consumer, "message_cache", None)
            while cache:
                data = cache.pop(0)
                if data is not None:
                    with contextlib.suppress(Exception):
                        found.append(dramatiq.Message.decode(data).copy(queue_name=queue_name))
        return found

    def _held(self) -> list[Any]:
        """Every message this process holds unacknowledged: running, prefetched, delayed, cached."""
        held = [entry.message for entry in self.running.snapshot()]
        held.extend(item.message for item in list(self.worker.work_queue.queue))
        for thread in list(self.worker.consumers.values()):
            held.extend(item.message for item in list(thread.delay_queue.queue))
        held.extend(self._fetched_not_handed_over())
        return held

    # -- the deadline ----------------------------------------------------------------------------

    def _report_section(self) -> list[str]:
        held = self.running.snapshot()
        now = time.monotonic()
        lines = [f"graceful: dramatiq messages still running at the deadline: {len(held)}"]
        for entry in held:
            fate = "its actor has returned: being acknowledged" if entry.returned else "put back on its queue"
            lines.append(
                f"  - {_describe(entry.message)} on queue {entry.message.queue_name!r}, thread "
                f"{entry.thread_id}, running for {now - entry.since:.1f} s: {fate}"
            )
            if not entry.returned:
                lines.extend(_actor_stack(entry.thread_id))
        return lines

    def _at_deadline(self) -> None:
        """Put back every message held (the report named the running ones), before the exit.

        A message whose actor has already returned is not put back at once: its effect is done,
        and Dramatiq acknowledges it within milliseconds. It is given ``ACK_GRACE`` for that,
        and put back only if it is still not acknowledged then (else it would wait for the
        heartbeat timeout). One that returns after it was put back runs twice: at-least-once.
        """
        for thread in self.worker.workers:
            thread.pause()
        returned = {
            entry.message.message_id: entry.message for entry in self.running.snapshot() if entry.returned
        }
        held = {message.message_id: message for message in self._held() if message.message_id not in returned}
        self._put_back(held.values(), "held at the force-quit deadline")
        late = self.running.wait_until_gone(set(returned), ACK_GRACE)
        self._put_back(
            [returned[message_id] for message_id in late], "not acknowledged at the force-quit deadline"
        )


def _describe(message: Any) -> str:
    return f"{message.actor_name}[{message.message_id}]"


def _actor_stack(thread_id: int, indent: str = "      ") -> list[str]:
    """The stack of the thread running an actor, from the actor's own code inward."""
    import sys

    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return [f"{indent}(its thread has finished)"]
    return frame_lines(frame, indent, inner_from=(_ACTOR_CALL, None), outer="Dramatiq's worker thread")


class _SignalHandOff:
    """SIGTERM and SIGHUP in the worker process: a byte to a pipe, acted on by a thread.

    Dramatiq's own handler logs from inside the handler and exits from wherever the main thread
    is at a second signal; graceful's handler only writes the signal number (no lock, no log:
    see graceful/_signals.py), and its thread starts the shutdown (first) or the force quit
    (any later one). SIGINT stays ignored, as Dramatiq has it (the ``dramatiq`` command forwards
    SIGINT as SIGTERM). Once graceful's stop is over, graceful sends the main thread a SIGTERM of
    its own and the handler raises ``SystemExit`` with the exit code there: the main thread is
    asleep in Dramatiq's once-a-second loop, and that is how the worker process ends at once.
    """

    def __init__(self, on_signal: Callable[[int, int], object], exit_now: Callable[[], int | None]) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._on_signal = on_signal
        self._exit_now = exit_now
        threading.Thread(target=self._relay, name="graceful-dramatiq-signals", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        code = self._exit_now()
        if code is not None:
            # The stop is over: the main thread ends the process.
            raise SystemExit(code)
        # A full pipe drops a repeat: the stop is under way.
        with contextlib.suppress(OSError):
            os.write(self._write, bytes([signum]))

    def _relay(self) -> None:
        count = 0
        while True:
            try:
                received = os.read(self._read, 16)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                count += 1
                try:
                    self._on_signal(signum, count)
                except Exception:
                    # The next signal must still be acted on.
                    log.exception("graceful: the dramatiq worker process could not act on a signal")


class _Heartbeat:
    """The Redis broker's heartbeat, kept beating for the worker's whole life (module docstring).

    Each command Dramatiq's Redis script runs records the worker's heartbeat first; a cheap one
    (``qsize``) every quarter of ``heartbeat_timeout`` keeps it alive whatever the consumers do:
    paused by graceful at a stop, or holding as many messages as their prefetch.
    """

    def __init__(self, broker: Any, every: float) -> None:
        self.broker = broker
        self.every = every
        self._stopped = threading.Event()
        self._failing = False
        threading.Thread(target=self._beat, name="graceful-dramatiq-heartbeat", daemon=True).start()

    @classmethod
    def start_for(cls, broker: dramatiq.Broker) -> _Heartbeat | None:
        try:
            from dramatiq.brokers.redis import RedisBroker
        except ImportError:
            # No redis client: no Redis broker either.
            return None
        if not isinstance(broker, RedisBroker):
            return None
        return cls(broker, max(0.05, broker.heartbeat_timeout / 1000 / 4))

    def _beat(self) -> None:
        while not self._stopped.wait(self.every):
            queues = sorted(self.broker.get_declared_queues())
            if not queues:
                continue
            try:
                self.broker.do_qsize(queues[0])
            except Exception:
                if not self._failing:
                    log.warning("graceful: the dramatiq heartbeat failed; retrying", exc_info=True)
                self._failing = True
            else:
                self._failing = False

    def stop(self) -> None:
        self._stopped.set()
