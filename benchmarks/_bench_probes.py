"""12. The probe port under a soak: hundreds of idle and slow clients held open (issue #27).

The probe port is reachable by whoever can reach the host. Each contender serves ``/readyz`` in
a child process; the parent opens ``IDLE`` connections that send nothing and ``SLOW`` ones that
send half a request and then one header line every 0.5 s (slowloris), holds them for ``HOLD``
seconds and meanwhile:

* probes ``/readyz`` on a fresh connection every few milliseconds, as a kubelet or a balancer
  would (median, p99 and max of connect-to-answer, and how many got no 200);
* reads the child's ``Threads:`` and ``VmRSS:`` from ``/proc/PID/status`` at each probe (the
  peak above what it had before the connections were opened);
* counts the connections the server closed (its timeout, its cap).

The contenders: graceful's ``ProbeServer`` (``serve_probes()``, what ``run()`` and the hosts
start); the server graceful used before (``ThreadingHTTPServer`` with a ``/readyz`` handler, a
thread per connection and no timeout: what ``prometheus_client.start_http_server`` and most
hand-written probe endpoints are too); and, in the full run, uvicorn serving a one-route ASGI
app (asyncio: no thread per connection either).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from dataclasses import dataclass, field

from _harness import BenchError, Child, Row, Setup, free_port, log, median, ms

BENCH = "12. probe port soak"

GRACEFUL = """
import sys, threading
import graceful
from graceful import readiness

lc = graceful.Lifecycle()
readiness.set_ready(lc)
probes = readiness.serve_probes(int(sys.argv[1]), "127.0.0.1", lc)
print("ready", flush=True)
threading.Event().wait()  # until the parent kills it
"""

THREAD_PER_CONNECTION = """
import sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Probe(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"ready\\n")
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Probe)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()  # until the parent kills it
"""

UVICORN = """
import sys, threading, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ready\\n"})

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error", lifespan="off")
server = uvicorn.Server(config)

def announce():
    while not server.started:
        time.sleep(0.002)
    print("ready", flush=True)

threading.Thread(target=announce, daemon=True).start()
server.run()
"""

PROBE = b"GET /readyz HTTP/1.1\r\nHost: soak\r\n\r\n"
TRICKLE = 0.5  # seconds between two header lines of a slow client
PACE = 0.002  # seconds between two connections started


@dataclass(frozen=True)
class _Contender:
    name: str
    code: str
    needs: str | None = None
    quick: bool = True


_CONTENDERS = [
    _Contender("graceful ProbeServer (one selector thread)", GRACEFUL),
    _Contender("thread per connection (ThreadingHTTPServer; graceful before #27)", THREAD_PER_CONNECTION),
    _Contender("uvicorn (a one-route ASGI app)", UVICORN, needs="uvicorn", quick=False),
]


@dataclass
class _Soak:
    threads_before: int = 0
    rss_before_kib: int = 0
    threads_peak: int = 0
    rss_peak_kib: int = 0
    latencies: list[float] = field(default_factory=list)
    refused: int = 0  # probes that got no 200
    opened: int = 0
    not_opened: int = 0
    retried: int = 0  # connections that took a SYN sent again (> 0.5 s)
    closed_by_server: int = 0
    open_s: float = 0.0


def _status(pid: int) -> tuple[int, int]:
    """(threads, RSS in KiB) of ``pid`` from /proc."""
    threads = rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


def _probe(port: int) -> float | None:
    """Seconds from connect to the whole answer of one ``GET /readyz``; None if not a 200."""
    start = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(PROBE)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
                if answer.endswith(b"ready\n"):
                    break
    except OSError:
        return None
    return time.perf_counter() - start if answer[:12] in (b"HTTP/1.1 200", b"HTTP/1.0 200") else None


def _open_all(selector: selectors.BaseSelector, port: int, count: int, result: _Soak) -> None:
    """Open ``count`` connections, one started every ``PACE`` s (a steady arrival, not a
    burst), registered for reading once established. Non-blocking: a connection whose SYN the
    server dropped (``http.server`` queues 5 unaccepted connections; the kernel sends the SYN
    again only 1 s later) does not hold up the next ones."""
    pending = selectors.DefaultSelector()

    def settle(timeout: float) -> None:
        for key, _ in pending.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            pending.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                result.not_opened += 1
                sock.close()
                continue
            if time.perf_counter() - key.data > 0.5:
                result.retried += 1
            selector.register(sock, selectors.EVENT_READ)
            result.opened += 1

    begun = time.perf_counter()
    for n in range(count):
        while (wait := begun + n * PACE - time.perf_counter()) > 0:
            settle(wait)
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        pending.register(sock, selectors.EVENT_WRITE, time.perf_counter())
        settle(0)
    deadline = time.monotonic() + 15.0
    while pending.get_map() and time.monotonic() < deadline:
        settle(0.1)
    for key in list(pending.get_map().values()):
        result.not_opened += 1
        key.fileobj.close()  # type: ignore[union-attr]
    pending.close()


def _soak(child: Child, port: int, idle: int, slow: int, hold: float) -> _Soak:
    pid = child.proc.pid
    result = _Soak()
    result.threads_before, result.rss_before_kib = _status(pid)
    result.threads_peak, result.rss_peak_kib = result.threads_before, result.rss_before_kib
    selector = selectors.DefaultSelector()  # epoll: more descriptors than select() takes
    slow_ones: list[socket.socket] = []
    started = time.perf_counter()
    try:
        _open_all(selector, port, idle + slow, result)
        for n, key in enumerate(list(selector.get_map().values())):
            if n >= idle:
                sock = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    sock.send(b"GET /readyz HTTP/1.1\r\nHost: soak\r\n")
                slow_ones.append(sock)
        result.open_s = time.perf_counter() - started
        end = time.monotonic() + hold
        trickle = time.monotonic() + TRICKLE
        while time.monotonic() < end:
            took = _probe(port)
            if took is None:
                result.refused += 1
            else:
                result.latencies.append(took)
            threads, rss = _status(pid)
            result.threads_peak = max(result.threads_peak, threads)
            result.rss_peak_kib = max(result.rss_peak_kib, rss)
            for key, _ in selector.select(0.01):
                sock = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    if sock.recv(4096):
                        continue  # an answer (never, to half a request): not a close
                result.closed_by_server += 1
                selector.unregister(sock)
                sock.close()
            if time.monotonic() >= trickle:
                trickle += TRICKLE
                for sock in slow_ones:
                    with contextlib.suppress(OSError):
                        sock.send(b"X-Slow: 1\r\n")
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return result


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def _row(contender: _Contender, soak: _Soak, idle: int, slow: int, hold: float, *, goal: bool) -> Row:
    probes = len(soak.latencies) + soak.refused
    lat = (
        f"/readyz median {ms(median(soak.latencies))}, p99 {ms(_p99(soak.latencies))}, "
        f"max {ms(max(soak.latencies))}"
        if soak.latencies
        else "/readyz never answered"
    )
    grew_threads = soak.threads_peak - soak.threads_before
    grew_mib = (soak.rss_peak_kib - soak.rss_before_kib) / 1024
    result = (
        f"threads {soak.threads_before} -> peak {soak.threads_peak} (+{grew_threads}); "
        f"RSS +{grew_mib:.1f} MiB; {lat}; {soak.refused} of {probes} probes without a 200; "
        f"{soak.opened} connections opened in {soak.open_s:.2f} s"
        + (f" ({soak.retried} after a SYN sent again)" if soak.retried else "")
        + (f" ({soak.not_opened} not)" if soak.not_opened else "")
        + f", {soak.closed_by_server} closed by the server"
    )
    verdict = ""
    if goal:
        flat = grew_threads <= 0 and grew_mib < 5 and soak.refused == 0
        verdict = (
            f"{'met' if flat else 'MISSED'}: no thread more, RSS +< 5 MiB, every probe answered 200 "
            f"(+{grew_threads} threads, +{grew_mib:.1f} MiB, {soak.refused} not)"
        )
    return Row(
        f"{BENCH} ({idle} idle + {slow} slow clients, {hold:g} s)",
        contender.name,
        result,
        goal=verdict,
        data={
            "threads_before": soak.threads_before,
            "threads_peak": soak.threads_peak,
            "rss_before_kib": soak.rss_before_kib,
            "rss_peak_kib": soak.rss_peak_kib,
            "latencies_s": soak.latencies,
            "refused": soak.refused,
            "opened": soak.opened,
            "not_opened": soak.not_opened,
            "retried": soak.retried,
            "closed_by_server": soak.closed_by_server,
        },
    )


def run(setup: Setup, runs: int) -> list[Row]:
    # Past the cap of 256 in both; past the 5 s timeout in the full run; the 800 idle.
    idle, slow, hold = (250, 50, 1.0) if setup.quick else (800, 200, 7.0)
    rows: list[Row] = []
    for contender in _CONTENDERS:
        if setup.quick and not contender.quick:
            rows.append(Row(BENCH, contender.name, "skipped: --quick runs no peer"))
            continue
        if contender.needs and not setup.has(contender.needs):
            rows.append(Row(BENCH, contender.name, f"skipped: {contender.needs} not installed"))
            continue
        port = free_port()
        log(f"{contender.name}: {idle} idle + {slow} slow clients for {hold:g} s")
        try:
            with Child(setup.python, contender.code, args=[str(port)]) as child:
                child.wait_ready()
                soak = _soak(child, port, idle, slow, hold)
        except (BenchError, OSError) as exc:
            rows.append(Row(BENCH, contender.name, f"failed: {exc}"))
            continue
        rows.append(_row(contender, soak, idle, slow, hold, goal=contender.code is GRACEFUL))
    _beside(rows)
    return rows


def _beside(rows: list[Row]) -> None:
    """graceful's row says what each other contender's soak cost, in the same run."""
    ours = next((row for row in rows if row.contender == _CONTENDERS[0].name and row.data), None)
    if ours is None:
        return
    said = []
    for row in rows:
        if row is ours or not row.data:
            continue
        threads = int(row.data["threads_peak"]) - int(row.data["threads_before"])  # type: ignore[call-overload]
        mib = (int(row.data["rss_peak_kib"]) - int(row.data["rss_before_kib"])) / 1024  # type: ignore[call-overload]
        said.append(f"{row.contender.split(' (')[0]}: +{threads} threads, +{mib:.1f} MiB")
    ours.vs = "; ".join(said)
