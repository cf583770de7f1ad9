"""4. Drain under load: SIGTERM arrives while another process keeps sending requests.

A load process runs ``CONCURRENCY`` clients, each opening a fresh connection per request
(``Connection: close``), each request taking ``DELAY`` s to handle. Once it has seen the
server answer ``2 x CONCURRENCY`` requests it prints ``loaded``; the parent then sends SIGTERM
and times the server's exit. Each client stops at its first refused connection.

Every request ends in one of three ways:

* **ok**: a complete 200 response;
* **refused**: ``connect()`` failed: the server had stopped accepting, the client knows at
  once and can retry elsewhere (this is what a graceful stop should do to new work);
* **failed**: the connection was accepted (by the server or by the kernel's listen backlog)
  and then reset, closed without a response, timed out or answered with an error: work lost.

"accepted" = ok + failed. The clocks of both processes are ``CLOCK_MONOTONIC`` (system-wide
on Linux), so the parent also counts the requests that were in flight when SIGTERM was sent.
"""

from __future__ import annotations

import json
import signal
import time

from _harness import BenchError, Child, Row, Setup, log, median, ms
from _programs import GRACEFUL_HTTP, GRACEFUL_UVICORN, STDLIB_HTTP, UVICORN, Program, note, unavailable

DELAY = 0.2
CONCURRENCY = 16
CLIENT_BOUND = 30.0
EXIT_BOUND = 15.0

LOAD = """
import json, socket, sys, threading, time

PORT, CONCURRENCY, BOUND = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
REQUEST = b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n"
lock = threading.Lock()
outcomes = []
ok = 0
loaded = threading.Event()
stop_at = time.monotonic() + BOUND

def one():
    try:
        sock = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    except OSError as exc:
        return "refused", type(exc).__name__
    with sock:
        try:
            sock.sendall(REQUEST)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            return "failed", type(exc).__name__
    status = data.split(b"\\r\\n", 1)[0]
    if b" 200 " in status and data.endswith(b"\\r\\n\\r\\nok"):
        return "ok", ""
    if b" 200 " in status:
        return "failed", "truncated 200 response"
    return "failed", status.decode(errors="replace") or "closed without a response"

def client():
    global ok
    while time.monotonic() < stop_at:
        start = time.monotonic()
        outcome, detail = one()
        with lock:
            outcomes.append((start, time.monotonic(), outcome, detail))
            if outcome == "ok":
                ok += 1
                if ok >= 2 * CONCURRENCY and not loaded.is_set():
                    loaded.set()
                    print("loaded", flush=True)
        if outcome == "refused":
            return

threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(outcomes))
"""

_SERVERS = [
    Program("stdlib ThreadingHTTPServer (hand-written handler)", STDLIB_HTTP, baseline=True),
    Program(
        "graceful.run(ThreadingHTTPServer)",
        GRACEFUL_HTTP,
        notify=True,
        adapter="http",
        fallback=True,
        is_graceful=True,
    ),
    Program("uvicorn Server.run()", UVICORN, module="uvicorn"),
    Program(
        "graceful.run(uvicorn.Server)",
        GRACEFUL_UVICORN,
        notify=True,
        module="uvicorn",
        adapter="uvicorn",
        is_graceful=True,
    ),
]


class _Series:
    def __init__(self, program: Program) -> None:
        self.program = program
        self.exits: list[float] = []
        self.codes: list[int | None] = []
        self.counts = {"ok": 0, "refused": 0, "failed": 0}
        self.in_flight = 0
        self.in_flight_ok = 0
        self.failures: dict[str, int] = {}
        self.problem = ""


def _once(setup: Setup, series: _Series) -> None:
    program = series.program
    try:
        with Child(setup.python, program.code(delay=DELAY), notify=program.notify) as server:
            ready = server.wait_ready()
            port = ready.split()[1] if ready.startswith("ready") else server.line_value("port")
            with Child(setup.python, LOAD, args=(port, str(CONCURRENCY), str(CLIENT_BOUND))) as load:
                load.wait_for("loaded")
                sent = time.monotonic()
                took = server.time_signal(signal.SIGTERM, EXIT_BOUND)
                series.codes.append(server.returncode)
                if took is None:
                    series.problem = f"server did not exit within {EXIT_BOUND:g} s under load (killed)"
                    return
                series.exits.append(took)
                printed = load.stdout_rest(CLIENT_BOUND)  # read before waiting: a full pipe blocks it
                if not load.wait_exit(EXIT_BOUND):
                    series.problem = "the load process did not finish"
                    return
                outcomes = json.loads(printed.strip().splitlines()[-1])
    except BenchError as exc:
        series.problem = f"failed: {exc}"
        return
    for start, end, outcome, detail in outcomes:
        series.counts[outcome] += 1
        if outcome == "failed":
            series.failures[detail] = series.failures.get(detail, 0) + 1
        if start < sent < end and outcome != "refused":
            series.in_flight += 1
            series.in_flight_ok += outcome == "ok"


def run(setup: Setup, runs: int) -> list[Row]:
    runs = max(1, min(runs, 1 if setup.quick else 5))
    all_series = [_Series(program) for program in _SERVERS]
    runnable = [s for s in all_series if not unavailable(s.program, setup)]
    for i in range(runs):
        for series in runnable:
            if not series.problem:
                _once(setup, series)
        log(f"drain: run {i + 1} of {runs} done")
    return [_row(setup, series, runs) for series in all_series]


def _row(setup: Setup, series: _Series, runs: int) -> Row:
    bench = f"4. drain under load ({CONCURRENCY} clients, {DELAY:g} s requests)"
    reason = unavailable(series.program, setup)
    if reason or series.problem or not series.exits:
        return Row(bench, series.program.contender, reason or series.problem or "no data")
    c = series.counts
    accepted = c["ok"] + c["failed"]
    result = (
        f"accepted {accepted}: ok {c['ok']}, failed {c['failed']}; refused {c['refused']}; "
        f"in flight at SIGTERM {series.in_flight}, of which completed {series.in_flight_ok}; "
        f"SIGTERM -> exit median {ms(median(series.exits))} (n={len(series.exits)} runs)"
    )
    if series.failures:
        result += "; failures: " + ", ".join(f"{k} x{v}" for k, v in sorted(series.failures.items()))
    extra = note(series.program, setup)
    if extra:
        result += f"; {extra}"
    goal = ""
    if series.program.is_graceful:
        goal = f"{'met' if c['failed'] == 0 else 'MISSED'}: zero failed accepted requests ({c['failed']})"
    data = {"counts": c, "exits_s": series.exits, "codes": series.codes, "failures": series.failures}
    return Row(bench, series.program.contender, result, "", goal, data)
