"""Upgrade in place: SIGUSR2 under ``run()`` starts the next generation on the same sockets.

Why: a service on one machine restarted in place refuses every connection between the old
process closing its port and the new one binding it (issue #25: 30,245 refused in 5 restarts).
nginx's binary upgrade and cloudflare/tableflip avoid it: the old process starts the new one
with its listening sockets passed down, keeps serving until the new one says it is ready, then
drains and exits, so both accept on the very same sockets meanwhile and nothing is refused.
gunicorn's USR2 does the same for gunicorn alone (and breaks under systemd, gunicorn #2856);
uvicorn (#712), aiohttp, grpcio and the standard library have nothing.

The hand-over, old generation (this module's ``Upgrader``) to new (``successor_ready()``):

1. SIGUSR2 (the router calls ``Upgrader.request()``, which starts a thread or logs why not:
   already upgrading, stopping, not every server started yet, or PID 1 of a container). With
   ``NOTIFY_SOCKET``: ``RELOADING=1`` and ``MONOTONIC_USEC=`` (``Type=notify-reload``).
2. The new generation is started as this one was: ``sys.executable`` with ``sys.orig_argv``
   (so ``python -m pkg`` and ``python -c CODE`` run again as they were), this environment, the
   working directory ``run()`` started in. It gets the listening sockets (those made by
   ``listen()``, and the inherited ones nobody claimed) at the same fd numbers, and
   ``GRACEFUL_UPGRADE=from=PID listen=FDS ready=FD stderr=FD capture=FD`` (``_sockets``):
   systemd's ``LISTEN_*`` and a ``WATCHDOG_PID`` naming this process are not passed on.
3. Its stderr is a pipe that this generation forwards to its own stderr line by line, keeping
   the last ``TAIL_LINES`` lines: a new generation that crashes at import is reported with its
   traceback. The pipe would break once this generation exits, so the new one takes its real
   stderr back (passed as ``stderr``) when it is ready, and forwards whatever a process it
   started meanwhile still writes into the pipe (``capture``).
4. Once its ``run()`` reached "all servers started", the new generation sends ``MAINPID=`` and
   ``READY=1`` (systemd follows it: ``NotifyAccess=all``), then writes ``ready`` on the pipe.
5. This generation then stops notifying systemd (its ``STOPPING=1`` would now speak for the new
   main process), stops answering probes (the new one answers them), and shuts down through
   the normal sequence with no drain delay: its listening sockets stay open in the new
   generation, so no balancer needs time to look elsewhere. Its adapters stop accepting and
   close *their own* fds only (never ``shutdown()`` on a listener, which would stop the other
   process's copy too); the stdlib, uvicorn and aiohttp adapters end each kept-alive
   connection by answering one more request with ``Connection: close`` (``handing_over()``,
   ``LINGER``); WebSockets get 1001 and streams their end, as at any wrap-up. Exit code 0.

A failed successor loses nothing: one that exits, or is not ready within
``GRACEFUL_UPGRADE_TIMEOUT`` (30 s), is stopped (SIGTERM, after its own budget SIGKILL) and
reaped; the ERROR line says why, with its exit code and the last lines of its stderr; this
generation keeps serving and takes the next SIGUSR2. A SIGUSR2 during an upgrade is logged and
ignored. If this generation is stopped before the hand-over (SIGTERM), a wrap-up listener stops
the new one too and waits for it, and the force quit kills it: it never outlives an old one
that stopped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

from . import systemd
from ._checks import TYPE_CHECKING
from ._drain_delay import drain_delay_of
from ._lifecycle import Lifecycle, budget, listening_sockets, on_force_quit
from ._settings import DrainDelaySetting
from ._sockets import ENV_UPGRADE, SYSTEMD_VARIABLES, describe, is_listening, take_handover, unclaimed

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._listeners import Waiter

__all__ = ["LINGER", "TAIL_LINES", "Upgrader", "container_init", "handing_over", "successor_ready"]

log = logging.getLogger("graceful")

LINGER = 1.0
"""Seconds a kept-alive connection may stay idle at a hand-over before the old generation closes
it. Until then its next request is answered, with ``Connection: close``: closing a kept-alive
connection is a race with a client sending on it (a non-idempotent request lost), whereas a
response that says ``close`` sends the client's next request to a new connection, which the new
generation accepts. A client busy enough to be in that race sends within milliseconds; one idle
for this long is rarely sending just then."""
TAIL_LINES = 20
"""Lines of a failed new generation's stderr repeated in the ERROR line that reports it."""
STOP_MARGIN = 5.0
"""Seconds past its own force-quit budget that a new generation stopped with SIGTERM gets
before SIGKILL (it may have started serving, and drains what it accepted)."""
BOUND = 10.0
"""Seconds for what should take no time: a pipe's last bytes, a reaped process."""
CONTAINER_INITS = ("tini", "docker-init", "dumb-init", "catatonit")
"""Container inits that exit when their one child does: handing over would end the container."""

_handing_over: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def handing_over(lifecycle: Lifecycle) -> bool:
    """True once ``lifecycle`` handed its sockets to a new generation that is ready: its
    wrap-up stops accepting without cutting kept-alive clients short (the new one serves them)."""
    return lifecycle in _handing_over


def container_init() -> str | None:
    """Why an upgrade in place cannot work here (PID 1 of a container, or a child of an init
    that exits with its child), or None."""
    if os.getpid() == 1:
        return (
            "this process is PID 1 (a container's init): it cannot exit and leave a new "
            "generation running without ending the container"
        )
    if os.getppid() != 1:
        return None
    try:
        with open("/proc/1/comm", encoding="utf-8") as comm:
            init = comm.read().strip()
    except OSError:
        return None
    if init not in CONTAINER_INITS:
        return None
    return f"PID 1 is {init}, which exits when this process does, and the container with it"


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _write_all(fd: int, data: bytes) -> None:
    # stderr gone: nothing to tell.
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Tail:
    """Forwards a pipe to this process's stderr line by line, keeping the last lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # A socket pair, not a pipe: once closed, a late stop() fails on it instead of writing
        # into whatever file reused its fd number.
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread = threading.Thread(target=self._pump, name="graceful-upgrade-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        partial = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.fd, selectors.EVENT_READ)
                selector.register(self._stop_r, selectors.EVENT_READ)
                while True:
                    events = [key.fileobj for key, _ in selector.select()]
                    if self._stop_r in events:
                        break
                    chunk = os.read(self.fd, 65536)
                    if not chunk:
                        break
                    *complete, partial = (partial + chunk).split(b"\n")
                    if complete:
                        _write_all(2, b"\n".join(complete) + b"\n")
                        self.lines.extend(line.decode("utf-8", "replace") for line in complete)
            if partial:
                _write_all(2, partial + b"\n")
                self.lines.append(partial.decode("utf-8", "replace"))
        finally:
            os.close(self.fd)
            self._stop_r.close()

    def stop(self) -> None:
        """Stop forwarding now (the new generation writes to the real stderr from now on)."""
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        self.join()

    def join(self) -> None:
        """Wait (bounded) for the pipe's end: the process and whatever it started are gone."""
        self._thread.join(BOUND)
        if not self._thread.is_alive():
            self._stop_w.close()

    def text(self) -> str:
        return "".join(f"\n    {line}" for line in self.lines)


class _Attempt:
    """One upgrade: the new generation, from its start to the hand-over or its stop."""

    def __init__(self, upgrader: Upgrader) -> None:
        self.upgrader = upgrader
        self.lifecycle = upgrader.lifecycle
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = threading.Event()
        """Set once the start succeeded or failed."""
        self.aborted = False
        """This generation began to stop first: the guard stops the new one."""
        self.tail: _Tail | None = None
        self.guard: Waiter | None = None
        # Sockets, not a pipe: once closed, a late write fails rather than reach a reused fd.
        self._wake_r, self._wake_w = socket.socketpair()
        self._ready_r = -1

    # -- the steps ------------------------------------------------------------------------------

    def run(self) -> None:
        fds = self._sockets()
        systemd.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={_monotonic_usec()}",
            "STATUS=upgrading: starting the next generation",
        )
        self.guard = self.lifecycle.add_wrap_up_listener(
            self._stop_on_wrap_up, name="stop the next generation"
        )
        try:
            try:
                self.proc = self._spawn(fds)
            except OSError as exc:
                if self.guard is not None:
                    self.guard.remove()
                self.upgrader.release(self)
                log.error(  # noqa: TRY400 - the cause is the message; a traceback says nothing more
                    "upgrade failed: the next generation could not be started (%s): this generation "
                    "(pid %d) keeps serving",
                    exc,
                    os.getpid(),
                )
                systemd.notify(
                    "READY=1", "STATUS=serving (upgrade failed: could not start the next generation)"
                )
                return
            finally:
                self.spawned.set()
            described = ", ".join(describe(sock) for sock in fds.values()) or "none"
            log.info(
                "upgrade: started the next generation (pid %d) with %d listening socket(s) (%s); "
                "serving until it is ready (at most %g s)",
                self.proc.pid,
                len(fds),
                described,
                self.upgrader.timeout,
            )
            outcome = self._wait()
            if outcome == "ready" and self._hand_over():
                return
            if outcome == "ready":
                outcome = "stopping"
            self._failed(outcome)
        finally:
            self._wake_r.close()
            self._wake_w.close()
            if self._ready_r >= 0:
                os.close(self._ready_r)

    def _sockets(self) -> dict[int, socket.socket]:
        """fd -> socket: what ``listen()`` gave and the inherited ones nobody claimed."""
        found: dict[int, socket.socket] = {}
        for sock in [*listening_sockets(self.lifecycle), *(item.sock for item in unclaimed())]:
            if is_listening(sock):
                found.setdefault(sock.fileno(), sock)
        if not found:
            log.warning(
                "upgrade: no listening socket was made with graceful.listen(): the next generation "
                "binds its own (it fails where the port is taken, unless SO_REUSEPORT shares it, as gRPC does)"
            )
        return found

    def _spawn(self, fds: dict[int, socket.socket]) -> subprocess.Popen[bytes]:
        ready_r, ready_w = os.pipe()
        capture_r, capture_w = os.pipe()
        try:
            stderr = os.dup(2)
        except OSError:
            stderr = os.open(os.devnull, os.O_WRONLY)
        argv = [sys.executable, *sys.orig_argv[1:]]
        env = dict(os.environ)
        # systemd's, for this pid only: the new one has its own pid.
        for name in SYSTEMD_VARIABLES:
            env.pop(name, None)
        if env.get("WATCHDOG_PID") == str(os.getpid()):
            # Unset means "this process": the new one.
            del env["WATCHDOG_PID"]
        listening = ",".join(str(fd) for fd in fds)
        env[ENV_UPGRADE] = (
            f"from={os.getpid()} listen={listening} ready={ready_w} stderr={stderr} capture={capture_r}"
        )
        try:
            proc = subprocess.Popen(
                # Empty (embedded): Popen's error says so.
                argv if sys.executable else [""],
                cwd=self.upgrader.cwd,
                env=env,
                pass_fds=(*fds, ready_w, stderr, capture_r),
                stderr=capture_w,
            )
        except BaseException:
            for fd in (ready_r, capture_r):
                os.close(fd)
            raise
        finally:
            for fd in (ready_w, capture_w, stderr):
                os.close(fd)
        self._ready_r = ready_r
        self.tail = _Tail(capture_r)
        return proc

    def _wait(self) -> str:
        """Until the new generation says ready, exits, times out, or this one begins to stop."""
        deadline = time.monotonic() + self.upgrader.timeout
        said = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._ready_r, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                for key, _ in selector.select(left):
                    if key.fileobj is self._wake_r:
                        return "stopping"
                    chunk = os.read(self._ready_r, 64)
                    if not chunk:
                        return "exited"
                    said += chunk
                    if said.startswith(b"ready\n"):
                        return "ready"

    def _hand_over(self) -> bool:
        """The new generation is ready: this one stops, unless it began to stop first."""
        proc = self.proc
        assert proc is not None
        with self.upgrader.lock:
            if self.aborted:
                return False
            self.upgrader.handed_over_to = proc.pid
            _handing_over.add(self.lifecycle)
        if self.tail is not None:
            self.tail.stop()
        log.info(
            "upgrade: the next generation (pid %d) is ready and accepts on the same sockets: this "
            "generation (pid %d) stops accepting, drains and exits (no drain delay: nothing is refused)",
            proc.pid,
            os.getpid(),
        )
        if self.guard is not None:
            self.guard.remove()
        self.upgrader.before_handover()
        drain_delay_of(self.lifecycle).set(DrainDelaySetting(0.0))
        self.lifecycle.shutdown(f"upgraded: pid {proc.pid} took over", wait=False)
        return True

    def _failed(self, outcome: str) -> None:
        proc = self.proc
        assert proc is not None
        if outcome == "stopping":
            # The guard stops it, and this generation waits for that.
            return
        why = (
            f"was not ready within {self.upgrader.timeout:g} s (GRACEFUL_UPGRADE_TIMEOUT)"
            if outcome == "timeout"
            else "exited before it was ready"
        )
        code = self._stop(proc, "SIGTERM" if outcome == "timeout" else None)
        if self.tail is not None:
            self.tail.join()
        tail = self.tail.text() if self.tail is not None else ""
        if self.guard is not None:
            self.guard.remove()
        # Before the line: a SIGUSR2 sent on reading it is taken.
        self.upgrader.release(self)
        log.error(
            "upgrade failed: the next generation (pid %d) %s (%s). This generation (pid %d) keeps "
            "serving; SIGUSR2 tries again.%s",
            proc.pid,
            why,
            _exit_text(code),
            os.getpid(),
            f" The last lines of its stderr:{tail}" if tail else " It wrote nothing on stderr.",
        )
        systemd.notify("READY=1", f"STATUS=serving (upgrade failed: pid {proc.pid} {why})")

    def _stop(self, proc: subprocess.Popen[bytes], why: str | None) -> int | None:
        """SIGTERM, its own budget to drain what it may have accepted, then SIGKILL; reaped."""
        if proc.poll() is None:
            if why is not None:
                log.info("upgrade: stopping the next generation (pid %d) with %s", proc.pid, why)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(budget(self.lifecycle) + STOP_MARGIN)
            except subprocess.TimeoutExpired:
                log.error("upgrade: the next generation (pid %d) did not stop: SIGKILL", proc.pid)  # noqa: TRY400 - no traceback: the line is the news
                proc.kill()
        try:
            return proc.wait(BOUND)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed and still not reaped
            return None

    # -- this generation stops first ----------------------------------------------------------

    def _stop_on_wrap_up(self) -> None:
        """A wrap-up listener while the upgrade is under way: this generation is stopping (a
        SIGTERM) before the hand-over, so the new one is stopped too, and waited for."""
        with self.upgrader.lock:
            if self.upgrader.handed_over_to is not None:
                # The hand-over's own wrap-up.
                return
            self.aborted = True
        # Closed: the attempt is over already.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.spawned.wait(BOUND)
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            log.info(
                "stopping the next generation (pid %d) too: this generation stops before the hand-over",
                proc.pid,
            )
            proc.send_signal(signal.SIGTERM)
        remaining = self.lifecycle.time_remaining()
        try:
            proc.wait(None if remaining is None else max(remaining - 1.0, 0.0))
        except subprocess.TimeoutExpired:
            log.error("the next generation (pid %d) did not stop within the budget: SIGKILL", proc.pid)  # noqa: TRY400 - no traceback: the line is the news
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(BOUND)
        if self.tail is not None:
            self.tail.join()
        log.info("the next generation (pid %d) stopped (%s)", proc.pid, _exit_text(proc.returncode))

    def kill(self) -> None:
        """At the force quit: the new generation, not handed over to, must not outlive this one."""
        proc = self.proc
        if proc is not None and proc.poll() is None and self.upgrader.handed_over_to != proc.pid:
            log.error("killing the next generation (pid %d) with this one", proc.pid)
            proc.kill()


class Upgrader:
    """SIGUSR2 under ``run()``: one upgrade in place at a time (see the module docstring).

    Args:
        lifecycle: this generation's.
        timeout: seconds the new generation may take to be ready (``GRACEFUL_UPGRADE_TIMEOUT``).
        cwd: the working directory to start it in (where ``run()`` started).
        before_handover: what ``run()`` stops before this generation shuts down for the new one
            (its systemd notifier, its probes).
    """

    def __init__(
        self, lifecycle: Lifecycle, *, timeout: float, cwd: str, before_handover: Callable[[], object]
    ) -> None:
        self.lifecycle = lifecycle
        self.timeout = timeout
        self.cwd = cwd
        self.before_handover = before_handover
        self.lock = threading.Lock()
        self.serving = False
        """Set by ``run()`` once every server has started: before that there is nothing to hand over."""
        self.handed_over_to: int | None = None
        """The new generation's pid once it is ready and this one stops for it."""
        self._attempt: _Attempt | None = None
        on_force_quit(lifecycle, self._kill, name="stop the next generation")

    def request(self) -> None:
        """SIGUSR2: start an upgrade on a thread of its own, or log why not. Returns at once."""
        with self.lock:
            why = self._refusal()
            attempt = None
            if why is None:
                attempt = self._attempt = _Attempt(self)
        if attempt is None:
            log.warning("received SIGUSR2: %s; ignored", why)
            return
        log.info("received SIGUSR2: upgrading in place")
        threading.Thread(target=self._upgrade, args=(attempt,), name="graceful-upgrade", daemon=True).start()

    def _refusal(self) -> str | None:
        if self.handed_over_to is not None:
            return f"handed over to pid {self.handed_over_to} already"
        if self._attempt is not None:
            proc = self._attempt.proc
            return f"an upgrade is under way{f' (pid {proc.pid})' if proc is not None else ''}"
        if self.lifecycle.is_stopping():
            return "this generation is stopping"
        if not self.serving:
            return "not every server has started yet"
        inside = container_init()
        if inside is not None:
            return f"{inside}; in a container, replace the container instead (docs/deploys.md)"
        return None

    def _upgrade(self, attempt: _Attempt) -> None:
        try:
            attempt.run()
        except BaseException:
            # An upgrade must never end this generation.
            log.exception("upgrade failed: this generation keeps serving")
        finally:
            self.release(attempt)

    def release(self, attempt: _Attempt) -> None:
        """``attempt`` is over and failed: the next SIGUSR2 may start another (idempotent)."""
        with self.lock:
            if self._attempt is attempt and self.handed_over_to is None and not attempt.aborted:
                self._attempt = None

    def _kill(self) -> None:
        attempt = self._attempt
        if attempt is not None:
            attempt.kill()


# -- the new generation ---------------------------------------------------------------------------


def _forward(fd: int) -> None:
    """What a process this generation started before it was ready still writes into the pipe
    that was its stderr: forwarded to the real stderr until the last writer is gone."""
    try:
        while chunk := os.read(fd, 65536):
            _write_all(2, chunk)
    except OSError:
        pass
    finally:
        os.close(fd)


def successor_ready(messages: list[str]) -> bool:
    """This process's ``run()`` has started every server: if it is a new generation, take its
    real stderr back, send ``MAINPID=`` with ``messages`` to systemd, and tell the previous
    generation; True then. False (nothing done) if it is not one."""
    handover = take_handover()
    if handover is None:
        return False
    for stream in (sys.stdout, sys.stderr):
        # A closed or odd stream: its bytes are its own.
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os.dup2(handover.stderr, 2)
    os.close(handover.stderr)
    threading.Thread(target=_forward, args=(handover.capture,), name="graceful-stderr", daemon=True).start()
    systemd.notify(f"MAINPID={os.getpid()}", *messages)
    log.info("upgrade: ready; the previous generation (pid %d) hands over now", handover.parent)
    try:
        _write_all(handover.ready, b"ready\n")
    finally:
        os.close(handover.ready)
    return True
