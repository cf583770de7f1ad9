"""One chaos run: one queue, one seed, its own Redis; a worker stopped at random moments.

Why it is built this way:

* **Its own redis-server** (the test extra's, found as tests/redis_server.py finds it) on a free
  port of 127.0.0.1, per run: runs can go side by side and nothing of one leaks into another.
* **Jobs and stop moments come from the seed**: the same seed gives every queue the same jobs
  (10-500 ms, uniform; one in five iterates over 3-10 items) and the same waits.
* **A stop**: the worker is started, says it is ready (``RPUSH ready:<gen>``, see _chaos_job),
  runs for a random time, gets SIGTERM (its main process only, as Kubernetes, ``docker stop``
  and systemd's ``KillMode=mixed`` do), and the controller waits for the exit through a pidfd,
  bounded (SIGKILL past the bound, counted). Then every process of that worker still alive
  (pool children, rq's horse) is found by the tag in its environment (``CHAOS_TAG``, inherited
  across fork), counted and SIGKILLed, as ``KillMode=mixed`` or a container runtime would: what
  it left running would otherwise go on unseen.
* **The end**: a last worker drains what is left; the run ends once every expected key is in
  ``done``, or nothing has moved for ``IDLE`` seconds (bounded), and that worker is stopped too.
  Lost = the keys never in ``done``; duplicated = the ``duplicates`` counter (exact: SADD said 0).
* **Exit after the last job**: each job logs its end and its generation; per stop, the exit time
  minus the last end of a job of that worker after the SIGTERM, for stops where no job of that
  worker was cut (a cut job's end never comes: those stops count as "cut").
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _chaos_job import expected_keys
from _harness import BenchError, child_env, log

READY_BOUND = 60.0  # seconds a worker may take to say it is ready (Celery on a loaded box)
IDLE = 5.0  # seconds without progress after which the final drain gives up
ITEMS = (3, 10)  # an iterating job's item count, inclusive
ITERATING = 5  # one job in this many iterates
LENGTH = (0.010, 0.500)  # seconds a job takes, uniform

_live: set[subprocess.Popen[bytes]] = set()  # every worker running now: killed on the way out
_live_lock = threading.Lock()
abort = threading.Event()  # set to end every run early (Ctrl-C, SIGTERM to the benchmark)


@dataclass(frozen=True)
class Launch:
    """How to start one worker of a row, and how to enqueue its jobs."""

    python: str
    argv: tuple[str, ...]  # after the interpreter
    module: str  # the program module: ``module.enqueue(path)`` fills the queue
    env: dict[str, str]  # CHAOS_GRACEFUL, CHAOS_ACKS, GRACEFUL_FORCE_QUIT...
    concurrency: int  # jobs at once: sizes the waits between stops


@dataclass
class Stop:
    gen: int
    pid: int
    term: float  # CLOCK_MONOTONIC at SIGTERM
    exit: float  # CLOCK_MONOTONIC when the exit was seen
    code: int | None  # the main process's exit code (negative: a signal)
    killed: bool  # still running past the bound: SIGKILLed
    children: int  # processes of the worker alive after its main process exited (SIGKILLed)
    early: bool = False  # it exited before the SIGTERM (a crash)
    left: list[str] = field(default_factory=list)  # "pid command line" of each process left
    dying: int = 0  # processes of the worker alive at its exit but already SIGKILLed (pdeathsig)
    cut: int = 0  # jobs of this worker that started and never ended
    last_job: float | None = None  # exit minus the last end of a job after SIGTERM (none cut)


@dataclass
class Outcome:
    seed: int
    jobs: int
    expected: int
    stops: list[Stop] = field(default_factory=list)
    final: Stop | None = None
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicated: list[str] = field(default_factory=list)
    stranded: int = 0  # lost keys whose message sits in kombu's "unacked" hash (Celery)
    drained: bool = False  # every key done before the final bound
    took: float = 0.0


def make_jobs(seed: int, count: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    jobs: list[dict[str, object]] = []
    for index in range(count):
        seconds = round(rng.uniform(*LENGTH), 4)
        items = rng.randint(*ITEMS) if rng.randrange(ITERATING) == 0 else 0
        jobs.append({"id": f"j{index}", "s": seconds, "n": items, "c": 0})
    return jobs


def tagged(tag: str, dying: list[int] | None = None) -> list[int]:
    """Live processes whose environment holds ``CHAOS_TAG=<tag>``: not zombies, and not already
    dying of a SIGKILL sent to them (Celery's pool processes get one from the kernel when their
    parent exits: ``PR_SET_PDEATHSIG``; it may not have been acted on yet when we look: those go
    on ``dying``)."""
    needle = f"CHAOS_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        state = fields.get("State", "").split()[:1]
        pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
        if not state or state[0] in ("Z", "X"):
            continue
        if pending & (1 << (signal.SIGKILL - 1)):
            if dying is not None:
                dying.append(int(entry))
            continue
        found.append(int(entry))
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            text = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {text[:120].strip()}"


class Worker:
    """One generation: a worker process, its log appended to the run's, its pidfd."""

    def __init__(
        self, launch: Launch, url: str, gen: int | str, *, tag: str, logfile: Path, cwd: str
    ) -> None:
        self.gen = str(gen)
        self.tag = f"{tag}-{gen}"
        env = child_env(
            {
                **launch.env,
                "CHAOS_REDIS_URL": url,
                "CHAOS_GEN": self.gen,
                "CHAOS_TAG": self.tag,
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
                ),
            }
        )
        self._log = open(logfile, "ab")  # noqa: SIM115 - closed in close()
        self._log.write(f"\n===== generation {gen} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [launch.python, *launch.argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        with _live_lock:
            _live.add(self.proc)
        self.pidfd = os.pidfd_open(self.proc.pid)

    def wait_ready(self, db: object, bound: float = READY_BOUND) -> None:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and not abort.is_set():
            if db.blpop([f"ready:{self.gen}"], timeout=1):  # type: ignore[attr-defined]
                return
            if self.proc.poll() is not None:
                raise BenchError(f"worker {self.gen} exited with {self.proc.returncode} before it was ready")
        raise BenchError(f"worker {self.gen} not ready within {bound:g} s")

    def wait_exit(self, bound: float) -> bool:
        readable, _, _ = select.select([self.pidfd], [], [], max(0.0, bound))
        if readable:
            self.proc.wait()
        return bool(readable)

    def stop(self, bound: float) -> Stop:
        """SIGTERM, the exit (SIGKILL past ``bound``), then the processes it left behind."""
        early = self.proc.poll() is not None
        term = time.monotonic()
        if not early:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.note(f"SIGTERM to {self.proc.pid}")
        exited = self.wait_exit(bound)
        ended = time.monotonic()
        if not exited:
            self.proc.kill()
            self.proc.wait()
        self.note(
            f"exit {self.proc.returncode} after {ended - term:.3f} s"
            + ("" if exited else f" (SIGKILL past {bound:g} s)")
        )
        dying: list[int] = []
        left = tagged(self.tag, dying)
        named = [describe(pid) for pid in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left or dying:
            self.note(f"left running: {named or '-'}; dying of a pending SIGKILL: {dying or '-'}")
        return Stop(
            int(self.gen) if self.gen.isdigit() else -1,
            self.proc.pid,
            term,
            ended,
            self.proc.returncode,
            not exited,
            len(left),
            early,
            left=named,
            dying=len(dying),
        )

    def note(self, text: str) -> None:
        """A controller line in the run's log, stamped like the workers' (wall clock) and with
        the monotonic time the figures use."""
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        self._log.write(
            f"[{stamp}] controller: generation {self.gen}: {text} (t={time.monotonic():.3f})\n".encode()
        )
        self._log.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in tagged(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with _live_lock:
            _live.discard(self.proc)
        os.close(self.pidfd)
        self._log.close()


def kill_all() -> None:
    """Every worker still running, now (the benchmark is leaving)."""
    abort.set()
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _enqueue(launch: Launch, url: str, jobs: list[dict[str, object]], folder: str, logfile: Path) -> None:
    path = os.path.join(folder, "jobs.json")
    with open(path, "w", encoding="utf-8") as out:
        json.dump(jobs, out)
    env = child_env(
        {
            **launch.env,
            "CHAOS_REDIS_URL": url,
            "CHAOS_GEN": "enqueue",
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
            ),
        }
    )
    with open(logfile, "ab") as out:
        done = subprocess.run(
            [launch.python, "-c", f"import {launch.module}; {launch.module}.enqueue({path!r})"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
            timeout=300,
            check=False,
        )
    if done.returncode != 0:
        raise BenchError(f"enqueueing failed (exit {done.returncode}); see {logfile}")


def run_one(
    launch: Launch,
    *,
    seed: int,
    jobs: int,
    stops: int,
    bound: float,
    logfile: Path,
    redis_server: Callable[[Path], object],
    label: str,
) -> Outcome:
    """Enqueue ``jobs``, stop the worker ``stops`` times at random moments, drain, count."""
    import redis

    started = time.monotonic()
    outcome = Outcome(seed=seed, jobs=jobs, expected=0)
    specs = make_jobs(seed, jobs)
    expected = expected_keys(specs)  # type: ignore[arg-type]
    outcome.expected = len(expected)
    rng = random.Random(seed * 7919 + 1)
    work = sum(float(s["s"]) for s in specs) / launch.concurrency  # type: ignore[arg-type]
    mean_wait = max(0.3, 0.8 * work / max(1, stops))
    with tempfile.TemporaryDirectory(prefix="graceful-chaos-") as folder:
        server = redis_server(Path(folder))
        url = server.start()  # type: ignore[attr-defined]
        db = redis.Redis.from_url(url, decode_responses=True, socket_timeout=60)
        tag = f"{os.getpid()}-{label}-{seed}"
        try:
            _enqueue(launch, url, specs, folder, logfile)
            for gen in range(stops):
                if abort.is_set():
                    raise BenchError("aborted")
                worker = Worker(launch, url, gen, tag=tag, logfile=logfile, cwd=folder)
                try:
                    worker.wait_ready(db)
                    if worker.wait_exit(rng.uniform(0.1, 2 * mean_wait - 0.1)):
                        log(
                            f"chaos {label} seed {seed}: worker {gen} exited by itself ({worker.proc.returncode})"
                        )
                    outcome.stops.append(worker.stop(bound))
                finally:
                    worker.close()
            outcome.drained, outcome.final = _drain(
                launch, url, db, tag=tag, logfile=logfile, folder=folder, expected=expected, bound=bound
            )
            _count(db, outcome, expected)
        finally:
            db.close()
            server.stop()  # type: ignore[attr-defined]
    outcome.took = time.monotonic() - started
    return outcome


def _drain(
    launch: Launch,
    url: str,
    db: object,
    *,
    tag: str,
    logfile: Path,
    folder: str,
    expected: set[str],
    bound: float,
) -> tuple[bool, Stop]:
    """A last worker runs what is left; stop it once all is done or nothing moves for IDLE s."""
    worker = Worker(launch, url, "final", tag=tag, logfile=logfile, cwd=folder)
    try:
        worker.wait_ready(db)
        moved, seen = time.monotonic(), None
        drained = False
        while not abort.is_set():
            done = db.scard("done")  # type: ignore[attr-defined]
            if done >= len(expected) and not (set(expected) - set(db.smembers("done"))):  # type: ignore[attr-defined]
                drained = True
                break
            now = (done, db.hget("started", "final"), db.llen("fin:final"))  # type: ignore[attr-defined]
            if now != seen:
                moved, seen = time.monotonic(), now
            elif time.monotonic() - moved > IDLE:
                break
            if worker.wait_exit(0.2):
                break
        return drained, worker.stop(bound)
    finally:
        worker.close()


def _count(db: object, outcome: Outcome, expected: set[str]) -> None:
    done = set(db.smembers("done"))  # type: ignore[attr-defined]
    outcome.lost = sorted(expected - done)
    outcome.duplicates = int(db.get("duplicates") or 0)  # type: ignore[attr-defined]
    outcome.duplicated = list(db.lrange("dup", 0, -1))  # type: ignore[attr-defined]
    started = db.hgetall("started")  # type: ignore[attr-defined]
    for stop in outcome.stops:
        ends = [float(t) for t in db.lrange(f"fin:{stop.gen}", 0, -1)]  # type: ignore[attr-defined]
        stop.cut = max(0, int(started.get(str(stop.gen), 0)) - len(ends))
        after = [t for t in ends if t >= stop.term]
        if after and not stop.cut and not stop.killed:
            stop.last_job = stop.exit - max(after)
    if outcome.lost:
        outcome.stranded = _stranded(db, set(outcome.lost))


def _stranded(db: object, lost: set[str]) -> int:
    """Lost keys whose Celery message is still in kombu's ``unacked`` hash (invisible for its
    ``visibility_timeout``, an hour by default, then redelivered)."""
    count = 0
    with contextlib.suppress(Exception):
        for raw in db.hvals("unacked"):  # type: ignore[attr-defined]
            body = json.loads(raw)[0]["body"]
            import base64

            args = json.loads(base64.b64decode(body))[0]
            spec = args[0]
            keys = (
                {str(spec["id"])}
                if not spec["n"]
                else {f"{spec['id']}:{i}" for i in range(int(spec["c"]), int(spec["n"]))}
            )
            count += len(keys & lost)
    return count
