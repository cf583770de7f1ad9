"""9. Serving cost: requests/s and p99 latency under ``wrk``, each server alone and under graceful.

graceful's web adapters sit on every request's path (a tracker, a wrapper around the app), so a server
under ``graceful.run()`` must serve as fast as the same server alone. Each server answers a
trivial ``GET /`` (a fixed 2-byte body) on 127.0.0.1, and ``wrk`` (one thread, ``CONNECTIONS``
keep-alive connections) loads it for ``SECONDS`` s after a ``WARM`` s warm-up that is thrown
away.

Why it is measured this way:

* **Interleaved, paired.** The machine is shared and noisy, and its speed drifts by more than
  the 2 % this benchmark looks for. Each round runs the server alone and under graceful one
  right after the other (the order alternates from round to round), and the figure that
  decides is the median of the per-round ratios: a slow minute hits both halves of a pair.
* **A fresh process per measurement**, so that a lucky or unlucky process (hash seed, memory
  layout) is one sample among several, not the whole result.
* **Not pinned.** Running the server on one CPU and ``wrk`` on the other (``sched_setaffinity``)
  was tried: on this shared machine it made the spread no tighter and every server slower (a
  pinned process cannot leave a CPU a neighbour is using).
* **Instructions too.** The rounds' spread is often wider than 2 %, so the full run also
  counts the instructions per request under callgrind (``_serving_callgrind.py``), which no
  neighbour disturbs. That figure says whether graceful costs anything; req/s says how much it
  shows under load.
* **Figures from wrk itself**: a Lua ``done()`` prints the request count, the duration and the
  latency percentiles (microseconds) as JSON; nothing is scraped from its human output.

gRPC is not measured: ``wrk`` speaks HTTP/1.1 only, and gRPC needs HTTP/2.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import _serving_callgrind
from _harness import BenchError, Child, Row, Setup, free_port, log, median

CONNECTIONS = 16
SECONDS, QUICK_SECONDS = 2, 1  # wrk takes whole seconds
WARM, QUICK_WARM = 1, 0
ROUNDS = 5  # --rounds sets it: the spread of one round is often wider than the 2 % looked for
GOAL = 0.98  # graceful's requests/s at least this fraction of the server alone's
WRK_BOUND = 30.0  # s beyond the run's own duration before wrk is given up on

LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %.0f, "p99_us": %.0f, "max_us": %.0f, '
    .. '"errors": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
"""

STDLIB = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    disable_nagle_algorithm = True  # else headers and body, two writes, wait out delayed ACKs

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    request_queue_size = 4096  # not 5: wrk's 16 connections at once would see SYNs dropped

server = Server(("127.0.0.1", PORT), Handler)
"""
STDLIB_ALONE = STDLIB + 'print("ready", flush=True)\nserver.serve_forever()\n'
STDLIB_GRACEFUL = STDLIB + "import graceful\nsys.exit(graceful.run(server))\n"

ASGI = """
import sys, threading, time
import uvicorn

HEADERS = [(b"content-length", b"2"), (b"content-type", b"text/plain")]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": b"ok"})

server = uvicorn.Server(
    uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning", lifespan="off")
)
"""
UVICORN_ALONE = (
    ASGI
    + """
def announce():
    while not server.started:
        time.sleep(0.002)
    print("ready", flush=True)

threading.Thread(target=announce, daemon=True).start()
server.run()
"""
)
UVICORN_GRACEFUL = ASGI + "import graceful\nsys.exit(graceful.run(server))\n"

AIOHTTP = """
import sys
from aiohttp import web

async def hello(request):
    return web.Response(body=b"ok", content_type="text/plain")

app = web.Application()
app.router.add_get("/", hello)
"""
AIOHTTP_ALONE = (
    AIOHTTP + 'web.run_app(app, host="127.0.0.1", port=PORT, print=lambda _: print("ready", flush=True))\n'
)
AIOHTTP_GRACEFUL = (
    AIOHTTP
    + """
import graceful
from graceful.adapters.aiohttp import AiohttpService

sys.exit(graceful.run(AiohttpService(app, host="127.0.0.1", port=PORT)))
"""
)


@dataclass(frozen=True)
class Server:
    """One server, and its two programs: alone, and under graceful.run()."""

    contender: str
    alone: str
    graceful: str
    module: str = ""  # third-party module it needs from the peers' environment
    adapter: str = ""
    skip: str = ""  # why it is never measured


SERVERS = [
    Server(
        "stdlib ThreadingHTTPServer vs graceful.run(server)", STDLIB_ALONE, STDLIB_GRACEFUL, adapter="http"
    ),
    Server(
        "uvicorn Server.run() vs graceful.run(uvicorn.Server)",
        UVICORN_ALONE,
        UVICORN_GRACEFUL,
        module="uvicorn",
        adapter="uvicorn",
    ),
    Server(
        "aiohttp web.run_app vs graceful.run(AiohttpService)",
        AIOHTTP_ALONE,
        AIOHTTP_GRACEFUL,
        module="aiohttp",
        adapter="aiohttp",
    ),
    Server(
        "grpcio vs graceful.run(grpc.server)",
        "",
        "",
        skip="skipped: wrk speaks HTTP/1.1 only and gRPC needs HTTP/2 (h2load or ghz would drive it)",
    ),
]


@dataclass
class _Sample:
    rps: float
    p50: float  # seconds
    p99: float
    errors: int
    requests: int
    cpu: float = 0.0  # the server's CPU time (every thread) per request, seconds


@dataclass
class _Series:
    server: Server
    alone: list[_Sample] = field(default_factory=list)
    graceful: list[_Sample] = field(default_factory=list)
    instructions: tuple[float, float] | None = None  # per request under callgrind: alone, graceful
    problem: str = ""


def _cpu_clock(pid: int) -> int:
    """The clock of ``pid``'s CPU time, every thread's, dead ones included (Linux's
    ``clock_getcpuclockid()``, which Python lacks: ``CPUCLOCK_SCHED`` of the whole process)."""
    return ((~pid) << 3) | 2


@contextlib.contextmanager
def _lua_script() -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="graceful-bench-") as script:
        script.write(LUA)
        script.flush()
        yield script.name


def _wrk(port: int, seconds: int, script: str) -> _Sample:
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}/"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=seconds + WRK_BOUND,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + WRK_BOUND:g} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRKJSON ")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    figures = json.loads(lines[-1].split(" ", 1)[1])
    return _Sample(
        rps=figures["requests"] / (figures["duration_us"] / 1e6),
        p50=figures["p50_us"] / 1e6,
        p99=figures["p99_us"] / 1e6,
        errors=int(figures["errors"]),
        requests=int(figures["requests"]),
    )


def _measure(setup: Setup, source: str, *, notify: bool, script: str, seconds: int, warm: int) -> _Sample:
    port = free_port()
    code = f"PORT = {port}\n" + source
    with Child(setup.python, code, notify=notify) as child:
        child.wait_ready()
        if warm > 0:
            _wrk(port, warm, script)
        clock = _cpu_clock(child.proc.pid)
        try:
            before = time.clock_gettime(clock)
        except OSError:  # not Linux: no CPU figure
            before = None
        sample = _wrk(port, seconds, script)
        if before is not None:
            sample.cpu = (time.clock_gettime(clock) - before) / max(1, sample.requests)
        if child.proc.poll() is not None:
            raise BenchError(f"the server exited with {child.returncode}; stderr: {child.stderr_tail()}")
    return sample


def unavailable(server: Server, setup: Setup) -> str:
    """Why ``server`` is not measured in this setup ("" if it is)."""
    if server.skip:
        return server.skip
    if shutil.which("wrk") is None:
        return "skipped: wrk not found on PATH (Debian: apt-get install wrk)"
    if server.module and setup.quick:
        return "skipped: --quick runs no peer"
    if server.module and not setup.has(server.module):
        return f"skipped: {server.module} not installed"
    if server.adapter and not setup.adapter_landed(server.adapter):
        return f"not run: graceful/adapters/{server.adapter}.py has not landed yet"
    return ""


def run(setup: Setup, runs: int) -> list[Row]:
    rounds = 1 if setup.quick else ROUNDS
    seconds, warm = (QUICK_SECONDS, QUICK_WARM) if setup.quick else (SECONDS, WARM)
    all_series = [_Series(server) for server in SERVERS]
    runnable = [s for s in all_series if not unavailable(s.server, setup)]
    if runnable:
        with _lua_script() as script:
            for i in range(rounds):
                for series in runnable:
                    order = [("alone", False), ("graceful", True)]
                    for variant, notify in order if i % 2 == 0 else order[::-1]:
                        if series.problem:
                            break
                        source = series.server.graceful if notify else series.server.alone
                        try:
                            sample = _measure(
                                setup, source, notify=notify, script=script, seconds=seconds, warm=warm
                            )
                        except BenchError as exc:
                            series.problem = f"failed ({variant}): {exc}"
                            break
                        getattr(series, variant).append(sample)
                log(f"serving: round {i + 1} of {rounds} done")
        if not setup.quick and _serving_callgrind.available():
            for series in runnable:
                _count(setup, series)
    return [_row(setup, series, seconds) for series in all_series]


def _count(setup: Setup, series: _Series) -> None:
    """Instructions per request under callgrind, alone then under graceful (no noise to pair)."""
    counts = []
    for source in (series.server.alone, series.server.graceful):
        port = free_port()
        code = f"PORT = {port}\n" + source
        try:
            counts.append(_serving_callgrind.instructions_per_request(setup.python, code, port))
        except BenchError as exc:
            log(f"serving: {series.server.contender}: {exc}")
            return
    series.instructions = (counts[0], counts[1])
    log(f"serving: callgrind done for {series.server.contender}")


def _rps(value: float) -> str:
    return f"{value:,.0f}"


def _lat(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def _row(setup: Setup, series: _Series, seconds: int) -> Row:
    bench = f"9. serving cost (wrk -t1 -c{CONNECTIONS}, {seconds:g} s a run, keep-alive)"
    reason = unavailable(series.server, setup)
    pairs = list(zip(series.alone, series.graceful, strict=False))
    if reason or series.problem or not pairs:
        return Row(bench, series.server.contender, reason or series.problem or "no data")
    alone, grace = series.alone[: len(pairs)], series.graceful[: len(pairs)]
    ratios = [g.rps / a.rps for a, g in pairs]
    p99_ratios = [g.p99 / a.p99 for a, g in pairs]
    cpu_ratios = [g.cpu / a.cpu for a, g in pairs]
    errors = sum(s.errors for s in alone + grace)

    def spread(samples: list[_Sample]) -> str:
        rps = [s.rps for s in samples]
        return (
            f"{_rps(median(rps))} req/s ({_rps(min(rps))}-{_rps(max(rps))}), "
            f"p99 {_lat(median([s.p99 for s in samples]))}, "
            f"CPU {median([s.cpu for s in samples]) * 1e6:.0f} us/request"
        )

    result = f"alone {spread(alone)}; graceful {spread(grace)}; n={len(pairs)} rounds"
    if errors:
        result += f"; {errors} socket/status errors"
    vs = (
        f"req/s {median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}x); "
        f"p99 {median(p99_ratios):.2f}x; CPU/request {median(cpu_ratios):.3f}x "
        f"(rounds {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}x)"
    )
    ratio = median(ratios)
    goal = f"req/s {'met' if ratio >= GOAL else 'MISSED'}: within 2 % of alone ({(ratio - 1) * 100:+.1f} %"
    goal += ", inside the rounds' spread)" if ratio < GOAL and max(ratios) >= 1.0 else ")"
    if series.instructions is not None:
        instr_alone, instr_graceful = series.instructions
        extra = instr_graceful / instr_alone
        vs += f"; instructions/request {extra:.3f}x"
        result += (
            f"; callgrind (user-space instructions per request, 1 connection): "
            f"alone {instr_alone / 1000:,.1f}k, graceful {instr_graceful / 1000:,.1f}k"
        )
        goal += (
            f"; instructions {'met' if extra <= 2 - GOAL else 'MISSED'}: "
            f"within 2 % ({(extra - 1) * 100:+.1f} %)"
        )
    data = {
        "alone": [vars(s) for s in alone],
        "graceful": [vars(s) for s in grace],
        "ratios": ratios,
        "p99_ratios": p99_ratios,
        "cpu_ratios": cpu_ratios,
        "instructions": series.instructions,
    }
    return Row(bench, series.server.contender, result, vs, goal, data)
