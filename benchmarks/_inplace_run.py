"""One run of the in-place rig: one service on one port, ``hey`` straight at it, N replacements.

Why it is built this way:

* No balancer: ``hey`` (16 keep-alive clients, no rate limit, as in issue #25) sends to the
  service's port on 127.0.0.1, so what a client of a service on one machine sees is what is
  counted. hey rather than wrk: wrk counts errors by the call that failed, not by their cause
  (on Linux a refused non-blocking connect returns EINPROGRESS and the refusal surfaces at the
  first write: an in-place restart shows as tens of thousands of "write" errors, a reset as a
  "read" or "write" one), and it keeps a latency histogram, not a time per request, so neither
  refused-or-reset nor the latency during a window can be had from it. hey names each error's
  cause and times each answered request.
* What hey saw comes from one report (``_rolling_rig.HEY_TEMPLATE``): every answered request
  (duration, status, start offset) and its error distribution, the text of each error with its
  count. hey does not time its errors, so they are counted per run, split into refused, reset and
  other; the non-2xx answers are placed on the replacement whose window they ended in.
* hey's offsets count from its own start, a few ms after the rig launched it. Here no balancer
  counts requests to fit that skew against (the rolling rig does), so it is measured: right
  before the load, a ``hey -n 1`` against a socket the rig accepts on; the skew is the accept
  time less the launch time less hey's offset of that request.
* A window runs from the signal until the old generation is gone and the new one serves. An
  upgrade's new generation serves before the old one exits (it said READY=1, or its app
  loaded). An in-place restart's serves once it answers: its port listening is not enough (a
  new process binds, then imports and sets up while the connections pile up in its backlog),
  so the window runs to the end of the first request answered that hey began after the old
  process exited, which only the new one can have answered. A request is in a window when it
  overlaps it; the steady state is every other request, less the load's first ``SKIP`` s (hey
  opening its connections). Latency is taken over 2xx answers only.
* Generations the rig did not start (graceful's successor, gunicorn's new master) are followed
  and cleaned up as ``_inplace_rig`` says; their exit codes are read as systemd reads them.
* Between two replacements the load runs ``SETTLE`` s; every wait is bounded; nothing sleeps to
  synchronise: exits are pidfds turning readable, readiness is a datagram (``MAINPID=`` and
  ``READY=1``, or gunicorn's app saying it loaded) or, for a restart, the port accepting.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from _harness import BenchError, free_port
from _inplace_programs import GUNICORN_LAUNCHER, RESTART, SIGUSR2, WSGI_LOADED, Contender
from _inplace_rig import Generation, Lineage, Message, Notify, subreaper
from _rolling_rig import Groups, Hey

CONCURRENCY = 16  # hey's clients, each with one kept-alive connection
WARM = 1.0  # seconds of load before the first signal
SKIP = 0.2  # seconds at the start of the load left out of the steady state
SETTLE = 0.5  # seconds of load between one replacement done and the next signal
START_BOUND = 30.0  # seconds for a generation to serve
UPGRADE_BOUND = 40.0  # seconds for a successor to be ready (graceful's own bound is 30 s)
EXIT_BOUND = 40.0  # seconds for the old generation to exit (gunicorn's graceful_timeout is 30)
PROMOTE_BOUND = 5.0  # seconds for gunicorn's new master to take the pidfile (its loop wakes every 1 s)
POLL = 0.002  # seconds between two connection attempts while a restarted port is closed
PROBE = 0.05  # seconds a connection attempt may go unanswered before the port counts as listening


@dataclass
class Upgrade:
    """One replacement: times in seconds from its signal (SIGTERM, SIGUSR2 or USR2)."""

    old_pid: int
    at: float  # monotonic time of the signal
    new_pid: int = 0
    ready: float | None = None  # the new one is ready: READY=1, its app loaded, or (restart) its port listens
    gone: float | None = None  # the old generation exited (None: killed after EXIT_BOUND)
    served: float | None = None  # restart: the new one's first answer (the first 2xx begun after the exit)
    window: float = 0.0  # the window's length: until the old is gone and the new one serves
    code: int | None = None  # the old generation's exit code; None with killed False: not the rig's to reap
    killed: bool = False
    term: float | None = None  # gunicorn: the TERM to the old master
    promoted: float | None = None  # gunicorn: the new master renamed its pidfile (takes USR2 again)
    non2xx: int = 0  # non-2xx answers that ended between this signal and the next
    requests: int = 0  # 2xx answers that overlap the window
    p99: float | None = None  # their p99 latency


@dataclass
class RunResult:
    upgrades: list[Upgrade]
    answered: int  # requests hey got an answer for
    results: int  # every request hey made: answered and failed
    non2xx: int
    errors: dict[str, int]  # hey's error texts (client ports blanked) -> count
    refused: int
    reset: int
    other: int
    window: tuple[float, float, int] | None  # p50, p99 (s) and count of the 2xx in the windows
    steady: tuple[float, float, int] | None  # the same outside them
    non2xx_before: int  # before the first signal (should be 0)
    seconds: float  # load duration
    hey_skew: float
    tracebacks: int
    traceback_sample: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.non2xx + self.refused + self.reset + self.other


# -- one run ---------------------------------------------------------------------------------------


class _Rig:
    """The service under test and the way its generations replace one another."""

    def __init__(
        self,
        contender: Contender,
        *,
        argv: list[str],
        env: dict[str, str],
        workdir: Path,
        groups: Groups,
        lineage: Lineage,
        notify: Notify,
        stderr: IO[bytes],
        port: int,
        pidfile: Path,
    ) -> None:
        self.contender, self.argv, self.env, self.workdir = contender, argv, env, workdir
        self.groups, self.lineage, self.notify, self.stderr = groups, lineage, notify, stderr
        self.port, self.pidfile = port, pidfile
        self.current: Generation | None = None

    def tail(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text(errors="replace").strip()[-600:] or "(empty)"

    def launch(self) -> Generation:
        proc = self.groups.start(
            self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=self.stderr, cwd=str(self.workdir)
        )
        return self.lineage.add(proc.pid, proc)

    def start(self) -> None:
        """The first generation, serving."""
        first = self.launch()
        if self.contender.how == RESTART:
            self._accepting(first)
        elif self.contender.how == SIGUSR2:
            self._await(first, lambda m: m.fields.get("READY") == "1", "READY=1")
        else:
            self._await(first, lambda m: m.fields.get("RIG_PARENT") == str(first.pid), "a worker loaded")
        self.current = first

    def replace(self) -> Upgrade:
        how = self.contender.how
        return self._restart() if how == RESTART else self._sigusr2() if how == SIGUSR2 else self._gunicorn()

    # -- the three ways --------------------------------------------------------------------------

    def _restart(self) -> Upgrade:
        """SIGTERM, wait for the exit, start a new process on the same port (``systemctl restart``)."""
        assert self.current is not None
        up = Upgrade(self.current.pid, time.monotonic())
        old = self._signal(signal.SIGTERM)
        gone = self._gone(old, up)
        new = self.launch()
        served = self._accepting(new)
        up.new_pid, up.ready, up.window = new.pid, served - up.at, max(gone, served) - up.at
        self.current = new
        return up

    def _sigusr2(self) -> Upgrade:
        """SIGUSR2; the successor says MAINPID= and READY=1; the old one exits by itself."""
        assert self.current is not None
        old = self.current
        self.notify.read()  # what came before the signal is not the successor's
        up = Upgrade(old.pid, time.monotonic())
        self._signal(signal.SIGUSR2)
        main: int | None = None
        ready_at: float | None = None
        readied: set[int] = set()  # senders of a READY=1 since the signal

        def successor(message: Message) -> bool:
            """MAINPID= of a new pid, and READY=1 with it, after it, or before it from that pid."""
            nonlocal main, ready_at
            if message.fields.get("READY") == "1":
                readied.add(message.sender)
            value = message.fields.get("MAINPID", "")
            if value.isdigit() and int(value) != old.pid:
                main = int(value)
                ready_at = message.at if message.fields.get("READY") == "1" or main in readied else None
            elif message.fields.get("READY") == "1" and main is not None:
                ready_at = message.at
            return main is not None and ready_at is not None

        self._await(old, successor, "MAINPID= of a new pid and READY=1", bound=UPGRADE_BOUND)
        assert main is not None
        assert ready_at is not None
        new = self.lineage.add(main)
        gone = self._gone(old, up)
        up.new_pid, up.ready, up.window = new.pid, ready_at - up.at, max(gone, ready_at) - up.at
        self.current = new
        return up

    def _gunicorn(self) -> Upgrade:
        """USR2 to the master; once a worker of the new master loaded the app, TERM to the old one."""
        assert self.current is not None
        old = self.current
        self.notify.read()
        up = Upgrade(old.pid, time.monotonic())
        self._signal(signal.SIGUSR2)
        loaded = self._await(
            old,
            lambda m: m.fields.get("RIG_PARENT", str(old.pid)) != str(old.pid),
            "a worker of a new master loaded the app",
            bound=UPGRADE_BOUND,
        )
        new = self.lineage.add(int(loaded.fields["RIG_PARENT"]))
        up.new_pid, up.ready = new.pid, loaded.at - up.at
        up.term = time.monotonic() - up.at
        os.kill(old.pid, signal.SIGTERM)
        gone = self._gone(old, up)
        up.window = max(gone, loaded.at) - up.at
        deadline = time.monotonic() + PROMOTE_BOUND
        while True:  # the next USR2 is ignored ("Parent exists") until the new master knows it is alone
            with contextlib.suppress(OSError, ValueError):
                if int(self.pidfile.read_text().strip() or 0) == new.pid:
                    up.promoted = time.monotonic() - up.at
                    break
            if new.exited() or time.monotonic() > deadline:
                raise BenchError(
                    f"gunicorn's new master {new.pid} did not take the pidfile within {PROMOTE_BOUND:g} s "
                    f"of the old one's exit; stderr: {self.tail()}"
                )
            time.sleep(0.02)  # a file another process renames: nothing to wait on
        self.current = new
        return up

    # -- pieces ------------------------------------------------------------------------------------

    def _signal(self, signum: int) -> Generation:
        assert self.current is not None
        if self.current.exited():
            raise BenchError(f"the serving generation {self.current.pid} is gone; stderr: {self.tail()}")
        os.kill(self.current.pid, signum)
        return self.current

    def _gone(self, old: Generation, up: Upgrade) -> float:
        """Wait for the old generation's exit (killed after EXIT_BOUND); the monotonic time it was seen."""
        exited = old.wait(EXIT_BOUND)
        if exited is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(old.pidfd, signal.SIGKILL)
            old.wait(10)
            up.killed = True
            up.code = old.reap()
            return time.monotonic()
        up.gone = exited - up.at
        up.code = old.reap()
        return exited

    def _accepting(self, generation: Generation) -> float:
        """Poll the port until something listens on it; the monotonic time it was seen so.

        A connection attempt that is neither accepted nor refused within ``PROBE`` s also says
        so: on loopback a SYN goes unanswered only when a listener's queue is full, as it is
        while a new process has bound the port but not yet begun to accept (the stdlib's
        ``request_queue_size`` is 5, and hey has 16 clients). Waiting on it instead would take the
        kernel's 1 s SYN retransmit for the port's opening.
        """
        deadline = time.monotonic() + START_BOUND
        while True:
            with socket.socket() as sock:
                sock.setblocking(False)
                tried = time.monotonic()
                code = sock.connect_ex(("127.0.0.1", self.port))
                if code == errno.EINPROGRESS:
                    _, writable, _ = select.select([], [sock], [], PROBE)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if writable else 0
                if code != errno.ECONNREFUSED:
                    return tried
            if generation.exited() or time.monotonic() > deadline:
                raise BenchError(
                    f"generation {generation.pid} never accepted on port {self.port} "
                    f"(exited: {generation.exited()}); stderr: {self.tail()}"
                )
            time.sleep(POLL)  # a port that is not open yet: nothing to wait on

    def _await(
        self, watched: Generation, wanted: Callable[[Message], bool], what: str, bound: float = START_BOUND
    ) -> Message:
        """The first datagram for which ``wanted(message)`` holds; a BenchError if ``watched`` exits first."""
        deadline = time.monotonic() + bound
        while True:
            for message in self.notify.read(min(0.05, max(0.0, deadline - time.monotonic()))):
                if wanted(message):
                    return message
            if watched.exited():
                code = watched.reap()
                raise BenchError(
                    f"generation {watched.pid} exited ({code}) before {what}; stderr: {self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"no {what} within {bound:g} s; stderr: {self.tail()}")


def run_one(
    python: str,
    contender: Contender,
    upgrades: int,
    *,
    graceful_from: str = "",
    method: str = "GET",
    gunicorn_extra: tuple[str, ...] = (),
) -> RunResult:
    """``upgrades`` replacements of ``contender`` under hey's load; every process is cleaned up."""
    with (
        subreaper() as adopting,
        tempfile.TemporaryDirectory(prefix="graceful-inplace-") as tmp,
        Groups() as groups,
        Lineage() as lineage,
        Notify() as notify,
    ):
        workdir = Path(tmp)
        (workdir / "rig_wsgi.py").write_text(WSGI_LOADED, encoding="utf-8")
        (workdir / "rig_gunicorn.py").write_text(GUNICORN_LAUNCHER, encoding="utf-8")
        (workdir / "rig_service.py").write_text(contender.source, encoding="utf-8")
        port, pidfile = free_port(), workdir / "gunicorn.pid"
        argv = contender.argv(python, port, tmp, str(pidfile), gunicorn_extra)
        with open(workdir / "service.stderr", "ab") as stderr:
            rig = _Rig(
                contender,
                argv=argv,
                env=contender.environment(notify.name, graceful_from),
                workdir=workdir,
                groups=groups,
                lineage=lineage,
                notify=notify,
                stderr=stderr,
                port=port,
                pidfile=pidfile,
            )
            rig.start()
            skew = _hey_skew(groups, workdir)
            hey = Hey(
                groups,
                workdir,
                f"http://127.0.0.1:{port}/",
                keepalive=True,
                concurrency=CONCURRENCY,
                qps=0,
                method=method,
            )
            hey.start()
            time.sleep(WARM)  # the load runs: the steady state's first sample, not a synchronisation
            done: list[Upgrade] = []
            for _ in range(upgrades):
                if hey.proc.poll() is not None:
                    raise BenchError(f"hey exited ({hey.proc.returncode}) in the middle of the run")
                done.append(rig.replace())
                time.sleep(SETTLE)  # the load runs between two replacements
            last = time.monotonic()
            hey.stop()
            seconds = last - hey.started
        traces, sample = _tracebacks(workdir / "service.stderr")
    notes = (
        []
        if adopting
        else ["not a child subreaper: exit codes of generations the rig did not start are unknown"]
    )
    return _analyse(
        hey,
        skew,
        done,
        restart=contender.how == RESTART,
        last=last,
        seconds=seconds,
        traces=traces,
        sample=sample,
        notes=notes,
    )


def _hey_skew(groups: Groups, workdir: Path) -> float:
    """Seconds from launching hey to its own clock's zero: one request to a socket the rig accepts on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        probe = Hey(
            groups,
            workdir,
            f"http://127.0.0.1:{listener.getsockname()[1]}/",
            keepalive=True,
            concurrency=1,
            qps=0,
            requests=1,
            name="hey-skew",
        )
        probe.start()
        conn, _ = listener.accept()
        accepted = time.monotonic()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    probe.stop()
    if not probe.rows:
        raise BenchError(f"hey's clock could not be measured: {probe.errors}")
    end, took, _status = probe.rows[0]
    return max(0.0, accepted - probe.started - (end - took))


def _tracebacks(path: Path) -> tuple[int, str]:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    return len(starts), "\n".join(lines[starts[0] : starts[0] + 40]) if starts else ""


_CLIENT_PORT = re.compile(r"(127\.0\.0\.1|\[::1\]):\d+->")


def classify(message: str) -> str:
    """refused, reset or other, from the text of a Go error as hey reports it."""
    text = message.lower()
    if "connection refused" in text:
        return "refused"
    if "connection reset" in text or "broken pipe" in text:
        return "reset"
    return "other"


def percentiles(values: list[float]) -> tuple[float, float, int] | None:
    """(p50, p99, count) by nearest rank; None if empty."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return rank(0.50), rank(0.99), len(ordered)


def _served(hey: Hey, origin: float, done: list[Upgrade]) -> None:
    """A restart's new process serves at the end of the first 2xx that began after the old one's exit."""
    begun = sorted(
        (origin + end - took, origin + end) for end, took, status in hey.rows if 200 <= status < 300
    )
    starts = [begin for begin, _ in begun]
    for index, upgrade in enumerate(done):
        if upgrade.gone is None:
            continue  # killed: the window runs to the kill and the new one's port
        until = done[index + 1].at if index + 1 < len(done) else float("inf")
        first: float | None = None
        for begin, end in begun[bisect.bisect_left(starts, upgrade.at + upgrade.gone) :]:
            if begin >= until:
                break
            first = end if first is None else min(first, end)
        if first is not None:
            upgrade.served = first - upgrade.at
            upgrade.window = max(upgrade.window, upgrade.served)


def _analyse(
    hey: Hey,
    skew: float,
    done: list[Upgrade],
    *,
    restart: bool,
    last: float,
    seconds: float,
    traces: int,
    sample: str,
    notes: list[str],
) -> RunResult:
    origin = hey.started + skew
    starts = [u.at for u in done]
    if restart:
        _served(hey, origin, done)
    ends = [u.at + u.window for u in done]
    window: list[float] = []
    steady: list[float] = []
    per: list[list[float]] = [[] for _ in done]
    non2xx_before = 0
    for end_offset, took, status in hey.rows:
        end = origin + end_offset
        begin = end - took
        if not 200 <= status < 300:
            where = bisect.bisect_right(starts, end) - 1
            if where < 0:
                non2xx_before += 1
            else:
                done[where].non2xx += 1
            continue
        hit = False
        index = bisect.bisect_right(starts, end) - 1
        while index >= 0 and ends[index] > begin:  # windows ordered, apart: a long request may span some
            if end > starts[index]:
                per[index].append(took)
                hit = True
            index -= 1
        if hit:
            window.append(took)
        elif origin + SKIP <= begin <= last:
            steady.append(took)
    for upgrade, values in zip(done, per, strict=True):
        stats = percentiles(values)
        upgrade.requests = len(values)
        upgrade.p99 = stats[1] if stats else None
    errors: dict[str, int] = {}
    kinds = dict.fromkeys(("refused", "reset", "other"), 0)
    for message, count in hey.errors.items():
        text = _CLIENT_PORT.sub(r"\1:*->", message)
        errors[text] = errors.get(text, 0) + count
        kinds[classify(message)] += count
    return RunResult(
        upgrades=done,
        answered=len(hey.rows),
        results=hey.results,
        non2xx=non2xx_before + sum(u.non2xx for u in done),
        errors=errors,
        refused=kinds["refused"],
        reset=kinds["reset"],
        other=kinds["other"],
        window=percentiles(window),
        steady=percentiles(steady),
        non2xx_before=non2xx_before,
        seconds=seconds,
        hey_skew=skew,
        tracebacks=traces,
        traceback_sample=sample,
        notes=notes,
    )
