"""One run of the rolling-restart rig: two instances behind HAProxy, ``hey``, N rolling restarts.

Why it is built this way:

* A restart is what a deploy controller does: SIGTERM one instance, wait for it to exit, start
  the new one on the same port, wait until HAProxy has it UP again, then the other instance.
  Three times are taken from the SIGTERM, on the monotonic clock: HAProxy marks the instance
  down (its ``show stat`` status leaves UP), the process exits (a pidfd turns readable), HAProxy
  has the new one UP. An instance HAProxy never saw down has no "down" time; it is back in
  rotation once the new one accepts connections (HAProxy never took it out).
* A failed request is placed on the restart whose window it falls in: from that restart's
  SIGTERM to the next one's (the last runs to the end of the load), by the moment it ended
  (hey's offset + duration). HAProxy's counters are snapshot at each SIGTERM, so its own view
  (5xx it sent, retries, redispatches, connection and response errors) is placed the same way.
* After an instance is back, the controller lets the load run ``SETTLE`` seconds before the
  next SIGTERM (a deploy's ``minReadySeconds``), so that a failure caused by one restart is
  not put on the next one.
* The SIGTERMs are spread over HAProxy's check interval: the wait before restart i + 1 (of
  n) is ``SETTLE`` plus (i + 0.5) / (n - 1) of an interval. Without it every SIGTERM landed at the same point of the
  checks' cycle (the controller wakes at a check of one instance, and HAProxy keeps the
  instances' checks a fixed distance apart), here just after a check, so each restart waited
  a whole interval to be seen; a deploy's SIGTERM falls anywhere in the cycle.
"""

from __future__ import annotations

import bisect
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _harness import BenchError, free_port
from _rolling_programs import WSGI_APP, Contender
from _rolling_rig import CHECK_INTER, EXIT_BOUND, POLL, START_BOUND, Groups, HAProxy, Hey

SETTLE = 0.5  # seconds of load between one instance back in rotation and the next SIGTERM
WARM = 100  # requests through HAProxy before the first restart


@dataclass(frozen=True)
class Variant:
    keepalive: bool
    retries: int

    @property
    def label(self) -> str:
        return f"keep-alive {'on' if self.keepalive else 'off'}, retries {self.retries}"


@dataclass
class Restart:
    down: float | None  # seconds from SIGTERM to HAProxy marking it down (None: never marked down)
    exit: float | None  # seconds from SIGTERM to the process exit (None: killed after EXIT_BOUND)
    up: float  # seconds from SIGTERM to back in rotation
    code: int | None
    failed: int = 0  # non-2xx answers in hey's CSV that ended in this restart's window
    haproxy: dict[str, int] = field(default_factory=dict)  # counter deltas over the window
    unanswered: int = 0  # requests HAProxy logged with no complete answer, ended in this window


@dataclass
class RunResult:
    restarts: list[Restart]
    requests: int  # answered requests in hey's CSV
    unanswered: int  # requests HAProxy logged with no complete answer (hey's CSV has no line for them)
    failed_before: int  # failed before the first SIGTERM (should be 0)
    tracebacks: int
    seconds: float  # load duration
    logged_states: dict[str, int] = field(default_factory=dict)  # "status state" -> requests, HAProxy's log
    logged_sample: list[str] = field(default_factory=list)  # its first lines
    hey_skew: float = 0.0  # seconds from launching hey to its own start, as fitted
    traceback_sample: str = ""  # the first traceback of the run, for the JSON samples

    @property
    def failed(self) -> int:
        return self.failed_before + sum(r.failed + r.unanswered for r in self.restarts)


class _Instance:
    def __init__(self, index: int, contender: Contender) -> None:
        self.server = f"s{index + 1}"
        self.port = free_port()
        self.probe = free_port() if contender.probes else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def check_port(self) -> int:
        return self.probe if self.probe is not None else self.port


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_one(
    python: str, contender: Contender, variant: Variant, restarts: int, graceful_from: str = ""
) -> RunResult:
    """Measure ``restarts`` rolling restarts of ``contender`` behind HAProxy; every process is cleaned up."""
    with tempfile.TemporaryDirectory(prefix="graceful-rolling-") as tmp, Groups() as groups:
        workdir = Path(tmp)
        (workdir / "rig_wsgi.py").write_text(WSGI_APP, encoding="utf-8")
        stderrs: list[Path] = []

        def launch(inst: _Instance) -> None:
            path = workdir / f"{inst.server}-{len(stderrs)}.stderr"
            stderrs.append(path)
            with open(path, "wb") as err:
                inst.proc = groups.start(
                    contender.argv(python, inst.port, tmp),
                    env=contender.environment(inst.probe, graceful_from),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    cwd=tmp,
                )

        def tail() -> str:
            return " | ".join(p.read_text(errors="replace").strip()[-300:] for p in stderrs[-2:])

        instances = [_Instance(0, contender), _Instance(1, contender)]
        for inst in instances:
            launch(inst)
        proxy = HAProxy(
            groups,
            workdir,
            [(inst.port, inst.probe) for inst in instances],
            retries=variant.retries,
            probes=contender.probes,
        )
        try:
            for inst in instances:
                try:
                    proxy.wait_up(inst.server)
                except BenchError as exc:
                    raise BenchError(f"{exc}; the instances' stderr: {tail()}") from None
            hey = Hey(groups, workdir, f"http://127.0.0.1:{proxy.port}/", variant.keepalive)
            base = proxy.counters()
            hey.start()
            deadline = time.monotonic() + 30
            while proxy.counters()["req_tot"] < base["req_tot"] + WARM:
                if time.monotonic() > deadline or hey.proc.poll() is not None:
                    raise BenchError(f"no load through HAProxy within 30 s (hey exit {hey.proc.poll()})")
                time.sleep(POLL)
            done: list[Restart] = []
            starts: list[float] = []
            snapshots: list[dict[str, int]] = []
            for number in range(restarts):
                inst = instances[number % 2]
                snapshots.append(proxy.counters())
                starts.append(time.monotonic())
                done.append(_restart(proxy, inst, launch, tail))
                # load keeps running: the window of this restart, not a synchronisation
                time.sleep(SETTLE + _phase(number, restarts))
            snapshots.append(proxy.counters())
            last = time.monotonic()
            hey.stop()
            seconds = time.monotonic() - hey.started
        finally:
            proxy.close()
        traces, sample = _tracebacks(stderrs)
        logged = proxy.went_wrong()
    failed_before = _place(hey, base=base, starts=starts, last=last, snapshots=snapshots, done=done)
    unanswered_before = 0
    states: dict[str, int] = {}
    for entry in logged:
        key = f"{entry.status} {entry.state}"
        states[key] = states.get(key, 0) + 1
        if not entry.unanswered:
            continue  # a 5xx: hey has it as a non-2xx line already
        where = max((i for i, start in enumerate(starts) if start <= entry.end), default=None)
        if where is None:
            unanswered_before += 1
        else:
            done[where].unanswered += 1
    return RunResult(
        restarts=done,
        requests=len(hey.rows),
        unanswered=sum(r.unanswered for r in done) + unanswered_before,
        failed_before=failed_before + unanswered_before,
        logged_states=states,
        logged_sample=[entry.line for entry in logged[:5]],
        tracebacks=traces,
        traceback_sample=sample,
        seconds=seconds,
        hey_skew=hey.skew,
    )


def _tracebacks(stderrs: list[Path]) -> tuple[int, str]:
    """How many tracebacks the instances wrote, and the first one."""
    traces, sample = 0, ""
    for path in stderrs:
        lines = path.read_text(errors="replace").splitlines()
        starts_at = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        traces += len(starts_at)
        if starts_at and not sample:
            sample = "\n".join(lines[starts_at[0] : starts_at[0] + 40])
    return traces, sample


def _place(
    hey: Hey,
    *,
    base: dict[str, int],
    starts: list[float],
    last: float,
    snapshots: list[dict[str, int]],
    done: list[Restart],
) -> int:
    """Put each non-2xx answer and HAProxy's counters on their restart; the non-2xx before the first.

    hey's offsets count from its own start, a little after the rig launched it: that skew is
    fitted once per run (the shift, 0-100 ms, that best lines up the requests hey began in each
    window with those HAProxy received in it), then used for every placement.
    """
    received = [snapshots[0]["req_tot"] - base["req_tot"]] + [
        snapshots[i + 1]["req_tot"] - snapshots[i]["req_tot"] for i in range(len(done))
    ]
    begun_at = sorted(end - took for end, took, _status in hey.rows)

    def begun(skew: float) -> list[int]:
        edges = [0, *(bisect.bisect_left(begun_at, at - hey.started - skew) for at in (*starts, last))]
        return [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]

    skew = min(
        (ms / 1000 for ms in range(101)),
        key=lambda k: sum((r - b) ** 2 for r, b in zip(received, begun(k), strict=True)),
    )
    hey.skew = skew

    def window(at: float) -> int | None:
        return max((i for i, start in enumerate(starts) if start <= hey.started + skew + at), default=None)

    failed_before = 0
    for end, _took, status in hey.rows:
        if 200 <= status < 300:
            continue
        where = window(end)
        if where is None:
            failed_before += 1
        else:
            done[where].failed += 1
    for i, restart in enumerate(done):
        restart.haproxy = {key: snapshots[i + 1][key] - snapshots[i][key] for key in snapshots[i]}
    return failed_before


def _phase(number: int, restarts: int) -> float:
    """Seconds past ``SETTLE`` before the restart after ``number``: spread over one check interval."""
    if number >= restarts - 1:
        return 0.0  # the last restart's window: no restart follows
    return CHECK_INTER * (number + 0.5) / (restarts - 1)


def _restart(
    proxy: HAProxy, inst: _Instance, launch: Callable[[_Instance], None], tail: Callable[[], str]
) -> Restart:
    """SIGTERM ``inst``, time down / exit / back in rotation, start its successor on the same port."""
    assert inst.proc is not None
    proc = inst.proc
    pidfd = os.pidfd_open(proc.pid)
    try:
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        down = exited = None
        while exited is None:
            readable, _, _ = select.select([pidfd], [], [], POLL)
            now = time.monotonic()
            if readable:
                proc.wait()
                exited = now
            if down is None and not proxy.status(inst.server).startswith("UP"):
                down = time.monotonic()
            if exited is None and now - sent > EXIT_BOUND:
                Groups.kill(proc)
                break
    finally:
        os.close(pidfd)
    code = proc.returncode if exited is not None else None
    launch(inst)
    deadline = time.monotonic() + START_BOUND
    accepting: float | None = None
    while True:
        now = time.monotonic()
        status = proxy.status(inst.server)
        if down is None and not status.startswith("UP"):
            down = now
        if down is not None and status.startswith("UP"):
            up = now
            break
        if down is None and accepting is None and _accepts(inst.check_port):
            accepting = now
        if down is None and accepting is not None and now - accepting > 0.5:
            up = accepting  # HAProxy never took it out (0.5 s: more than two check intervals)
            break
        assert inst.proc is not None
        if inst.proc.poll() is not None or now > deadline:
            raise BenchError(
                f"the new {inst.server} never came back UP (exit {inst.proc.poll()}); stderr: {tail()}"
            )
        time.sleep(POLL)
    return Restart(
        down=None if down is None else down - sent,
        exit=None if exited is None else exited - sent,
        up=up - sent,
        code=code,
    )
