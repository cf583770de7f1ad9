"""gRPC and the upgrade in place: what binding alongside with SO_REUSEPORT loses, measured.

    python benchmarks/grpc_upgrade.py                  # 20 SIGUSR2 upgrades per row, ~1-2 minutes
    python benchmarks/grpc_upgrade.py --upgrades 5     # a quick look

Why a script of its own: grpcio binds its ports itself (``add_insecure_port``), with
``SO_REUSEPORT`` on by default, and offers Python no way to serve on a listening socket it did
not open, so ``graceful.listen()`` cannot hand a gRPC server its socket. Under ``graceful.run()``
a SIGUSR2 upgrade still works: the new generation binds the same port *alongside* the old one
(``SO_REUSEPORT``), says ready, and the old one stops. But ``SO_REUSEPORT`` is not a hand-over:
the kernel spreads new connections over the sockets of the group, each with an accept queue of
its own, and the old server's ``stop()`` closes its listener with whatever waits in its queue,
which the clients see reset (unless ``net.ipv4.tcp_migrate_req=1``, Linux 5.14+, moves them to
another socket of the group). Issue #25 asks how much that is: this measures it, beside the
same load against graceful's stdlib server, whose new generation inherits the very socket.

Two loads, each run through ``--upgrades`` SIGUSR2 upgrades of one service:

* ``connect``: ``--threads`` threads open a new TCP connection each, in a loop, and wait for the
  server's first bytes (a gRPC server sends its HTTP/2 SETTINGS frame as soon as it has accepted a
  connection; the HTTP server answers a one-line request). What a listener's close can lose is a
  *new* connection: one accepted by a live server is answered, one left in a closing queue is
  reset. This is the worst case: a connection rate far above what gRPC clients open.
* ``rpc``: ``--threads`` gRPC channels, each kept open, calling a unary method back to back (no
  ``wait_for_ready``): what a gRPC client sees. At the old server's stop its channels get GOAWAY
  and reconnect, to either server, and the new connection may land in the closing queue.

Every wait is bounded; nothing sleeps to synchronise (generations are followed through their log
lines and pidfds). Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOUND = 30.0

GRPC_SERVER = """
import logging, os, sys
from concurrent import futures
import grpc
import graceful

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s %(message)s")


def echo(request, context):
    return str(os.getpid()).encode()


handler = grpc.method_handlers_generic_handler(
    "bench.Svc", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler])
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")  # SO_REUSEPORT: grpcio's default
sys.exit(graceful.run(server))
"""

HTTP_SERVER = """
import logging, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s %(message)s")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler, bind_and_activate=False)
server.daemon_threads = True
sys.exit(graceful.run(server))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.ok = 0
        self.failed: dict[str, int] = {}

    def add(self, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                self.lock.notify_all()
            else:
                self.failed[error] = self.failed.get(error, 0) + 1

    def wait_more(self, answers: int) -> None:
        """Until ``answers`` more have been answered (bounded)."""
        with self.lock:
            goal = self.ok + answers
            if not self.lock.wait_for(lambda: self.ok >= goal, BOUND):
                raise RuntimeError(f"the load stalled: {self.ok} answered, {self.failed}")


def connect_load(port: int, http: bool, counts: Counts, stop: threading.Event) -> None:
    """New connections in a loop; each must get the server's first bytes."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                if http:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = conn.recv(64)
                counts.add(None if data else "closed before the first byte")
        except ConnectionRefusedError:
            counts.add("refused")
        except ConnectionResetError:
            counts.add("reset")
        except OSError as exc:
            counts.add(type(exc).__name__)


def rpc_load(port: int, counts: Counts, stop: threading.Event) -> None:
    """One kept channel, unary calls back to back."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/bench.Svc/Echo")
        while not stop.is_set():
            try:
                call(b"x", timeout=10)
                counts.add(None)
            except grpc.RpcError as exc:
                counts.add(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]


def http_rpc_load(port: int, counts: Counts, stop: threading.Event) -> None:
    """The stdlib row's kept-alive equivalent: HTTP/1.1 on one connection, reconnecting on close."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            counts.add(None)
        except (OSError, http.client.HTTPException) as exc:
            counts.add(type(exc).__name__)
            conn.close()
    conn.close()


class Service:
    """One service and its generations, followed through their log lines on stderr."""

    def __init__(self, source: str, port: int, workdir: str) -> None:
        script = Path(workdir) / "service.py"
        script.write_text(source)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.first = subprocess.Popen(
            [sys.executable, str(script), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.text = ""
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.current = self.first.pid
        self.wait_for(f"{self.first.pid} INFO graceful all 1 server(s) started")

    def _read(self) -> None:
        assert self.first.stderr is not None
        for line in self.first.stderr:
            with self.changed:
                self.text += line
                self.changed.notify_all()

    def wait_for(self, text: str) -> str:
        with self.changed:
            if not self.changed.wait_for(lambda: text in self.text, BOUND):
                raise RuntimeError(f"{text!r} did not come within {BOUND} s:\n{self.text[-3000:]}")
            return self.text

    def upgrade(self) -> float:
        """SIGUSR2; seconds until the old generation is gone."""
        old = self.current
        pidfd = os.pidfd_open(old)
        began = time.monotonic()
        try:
            os.kill(old, signal.SIGUSR2)
            text = self.wait_for(f"this generation (pid {old}) stops accepting")
            found = re.search(
                rf"the next generation \(pid (\d+)\) is ready and accepts on the same sockets: this generation \(pid {old}\)",
                text,
            )
            assert found is not None
            self.current = int(found.group(1))
            if not select.select([pidfd], [], [], BOUND)[0]:
                raise RuntimeError(f"generation {old} did not exit")
            return time.monotonic() - began
        finally:
            os.close(pidfd)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.current, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, OSError):
            pidfd = os.pidfd_open(self.current)
            select.select([pidfd], [], [], BOUND)
            os.close(pidfd)
        if self.first.poll() is None:
            self.first.kill()
        self.first.wait(BOUND)

    def errors(self) -> int:
        return self.text.count(" ERROR ")


def run_row(name: str, source: str, load: str, upgrades: int, threads: int) -> str:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="grpc-upgrade-") as workdir:
        service = Service(source, port, workdir)
        counts, stop = Counts(), threading.Event()
        http = source is HTTP_SERVER
        if load == "connect":
            target, args = connect_load, (port, http, counts, stop)
        elif http:
            target, args = http_rpc_load, (port, counts, stop)  # type: ignore[assignment]
        else:
            target, args = rpc_load, (port, counts, stop)  # type: ignore[assignment]
        workers = [threading.Thread(target=target, args=args, daemon=True) for _ in range(threads)]
        began = time.monotonic()
        for worker in workers:
            worker.start()
        try:
            times = []
            for _ in range(upgrades):
                counts.wait_more(200)  # the load flows before each signal
                times.append(service.upgrade())
            counts.wait_more(200)  # and after the last
        finally:
            stop.set()
            for worker in workers:
                worker.join(15)
            service.stop()
        seconds = time.monotonic() - began
        failed = sum(counts.failed.values())
        detail = ", ".join(f"{why} {n}" for why, n in sorted(counts.failed.items())) or "none"
        times.sort()
        return (
            f"| {name} | {load} | {upgrades} | {counts.ok + failed} ({(counts.ok + failed) / seconds:.0f}/s) | "
            f"{failed} ({detail}) | {times[len(times) // 2]:.2f} / {times[-1]:.2f} s | {service.errors()} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrades", type=int, default=20)
    parser.add_argument("--threads", type=int, default=16)
    options = parser.parse_args()
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    print(f"net.ipv4.tcp_migrate_req = {migrate.read_text().strip() if migrate.exists() else 'absent'}")
    print(
        f"command: python benchmarks/grpc_upgrade.py --upgrades {options.upgrades} --threads {options.threads}"
    )
    print()
    print(
        "| service | load | upgrades | connections or calls | failed | signal -> old gone (median / max) | ERROR lines |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("graceful.run(grpc.server), binds alongside (SO_REUSEPORT)", GRPC_SERVER, "connect"),
        ("graceful.run(ThreadingHTTPServer), inherits the socket", HTTP_SERVER, "connect"),
        ("graceful.run(grpc.server), binds alongside (SO_REUSEPORT)", GRPC_SERVER, "rpc"),
    ]
    for name, source, load in rows:
        print(run_row(name, source, load, options.upgrades, options.threads), flush=True)


if __name__ == "__main__":
    main()
