"""The probe port cannot be used to exhaust the process (issue #27, items 1 and 9).

The probe port is reachable by whoever can reach the host. Each test here is a client doing
what an adversary or a broken balancer does to it (connections left idle, requests sent a
byte at a time, more connections than the cap, requests that are not probes) against a real
``ProbeServer``; the first two run a real service under ``graceful.run`` in a child, with real
signals, one of them under a real thread cap:

* as root (this sandbox, a container): a pids cgroup with ``pids.max`` set, which is what a
  container's pids limit is; the child moves itself into it before it starts a thread;
* otherwise: ``RLIMIT_NPROC`` set in the child to what its user runs now plus a headroom
  (the limit counts the user's threads system-wide, and does not bind root);
* neither: skipped, and the thread count test still proves the bound.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import select
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from graceful import Lifecycle, readiness
from graceful._settings import Settings
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND, Recorder
from .support.web import free_port
from .test_readiness import probe

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/task")

CAP = r"""
import os
if os.environ.get("CAP_CGROUP"):  # a container's pids limit: this process joins the cgroup
    with open(os.path.join(os.environ["CAP_CGROUP"], "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
elif os.environ.get("CAP_NPROC"):  # what the user runs now, plus a headroom
    import resource
    uid, used = os.getuid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                used += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    resource.setrlimit(resource.RLIMIT_NPROC, (used + int(os.environ["CAP_NPROC"]), hard))
"""

SERVICE = r"""
import logging, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass

graceful.add_shutdown_listener(lambda: print("shutdown listener ran", flush=True), name="said")
server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""

IDLE = 300
"""Connections opened and left idle: more than the cap (256), as many as the issue's test."""
SLOW = 100
"""Connections that send half a request and stall (slowloris)."""
HEADROOM = 40
"""Threads the capped child may start beyond what it (or its user) runs at start: a service
under ``run()`` needs about ten; the old probe server needed one per connection."""


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@contextlib.contextmanager
def held_open(port: int, idle: int, slow: int, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``idle`` connections that send nothing and ``slow`` ones that send half a request."""
    held: list[socket.socket] = []
    try:
        for n in range(idle + slow):
            sock = socket.create_connection((host, port), timeout=BOUND)
            if n >= idle:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: probe\r\nX-Slow: ")
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def start(graceful_process: ProcessFactory, env: dict[str, str]) -> tuple[GracefulProcess, int]:
    probe_port = free_port()
    child = graceful_process(
        CAP + SERVICE, env={"GRACEFUL_PROBE_PORT": str(probe_port), "GRACEFUL_PROBE_HOST": "127.0.0.1", **env}
    )
    child.wait_for_line("port")
    child.wait_for_output("server(s) started: ready", stream="stderr")
    return child, probe_port


def stops_with_its_listeners(child: GracefulProcess) -> None:
    """SIGTERM: the shutdown listener runs and the exit code is the true one (0)."""
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("shutdown listener ran")
    result = child.wait(BOUND)
    assert result.returncode == 0, result.stderr
    assert "can't start new thread" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_hundreds_of_idle_and_slow_probe_connections_cost_no_thread(graceful_process: ProcessFactory) -> None:
    """300 idle and 100 slow connections: not one thread more, /readyz answered, the cap said
    once at WARNING; then SIGTERM stops the service with its listeners and exit code 0.

    On the old probe server (a thread per connection, no timeout) the count grew by 400."""
    child, probe_port = start(graceful_process, {})
    before = threads_of(child.pid)
    with held_open(probe_port, IDLE, SLOW):
        assert probe(probe_port, "/readyz") == (200, "ready")  # accepted after all 400 (FIFO)
        assert threads_of(child.pid) == before
        assert probe(probe_port, "/livez") == (200, "live")
        child.wait_for_output("connections open to the probe port, the most it keeps: closing the oldest")
        assert child.stderr.count("the most it keeps") == 1  # once; the next ones at DEBUG
        stops_with_its_listeners(child)


def _pids_cgroup() -> Path | None:
    """A writable pids hierarchy (cgroup v1, or v2's root with the pids controller), or None."""
    for root, controllers in (
        (Path("/sys/fs/cgroup/pids"), None),
        (Path("/sys/fs/cgroup"), "cgroup.subtree_control"),
    ):
        try:
            if controllers is not None and "pids" not in (root / controllers).read_text().split():
                continue
            if (root / "cgroup.procs").exists() and os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    return None


_cgroups = itertools.count()


@pytest.fixture
def thread_cap(graceful_process: ProcessFactory) -> Iterator[dict[str, str]]:
    """The environment that makes a child cap its own threads (see the module's docstring)."""
    root = _pids_cgroup()
    if root is not None and os.geteuid() == 0:
        group = root / f"graceful-test-{os.getpid()}-{next(_cgroups)}"
        group.mkdir()
        try:
            (group / "pids.max").write_text(str(HEADROOM))
            yield {"CAP_CGROUP": str(group)}
        finally:
            try:
                group.rmdir()
            except OSError:  # a process still in it (the test failed): kill it, then remove
                graceful_process.close()
                group.rmdir()
    elif os.geteuid() != 0:
        yield {"CAP_NPROC": str(HEADROOM)}
    else:
        pytest.skip("root without a writable pids cgroup: no thread cap can bind this process")


@pytest.mark.timeout(90)
def test_under_a_thread_cap_probes_are_answered_and_sigterm_stops_the_service(
    graceful_process: ProcessFactory, thread_cap: dict[str, str]
) -> None:
    """The issue's case, run for real: a thread cap (a container's pids limit) and 200 idle
    probe connections. /readyz is still answered, and SIGTERM stops the service: its shutdown
    listener runs, exit code 0.

    On the old probe server the connections took every thread the cap allowed: /readyz was
    refused, SIGTERM failed ("can't start new thread") and the listeners never ran."""
    child, probe_port = start(graceful_process, thread_cap)
    with held_open(probe_port, 200, 0):
        assert probe(probe_port, "/readyz") == (200, "ready")
        assert probe(probe_port, "/livez") == (200, "live")
        stops_with_its_listeners(child)


# -- the bounds, in process --------------------------------------------------------------------


class Quick(readiness.ProbeServer):
    """The same server with bounds small enough for a test."""

    TIMEOUT = 0.3
    MAX_CONNECTIONS = 8


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset), waiting at most BOUND."""
    if not select.select([sock], [], [], BOUND)[0]:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def ready_lifecycle() -> Lifecycle:
    lc = Lifecycle(force_quit=BOUND, exit=Recorder())
    readiness.set_ready(lc)
    return lc


def test_idle_and_slow_connections_are_closed_at_the_timeout() -> None:
    """No whole request within TIMEOUT: closed, however the client trickles bytes in."""
    with Quick(ready_lifecycle(), "127.0.0.1", 0) as server:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=BOUND)
        slow.sendall(b"GET /readyz HTTP/1.1\r\n")
        closed = False
        for _ in range(int(BOUND / 0.05)):  # one header line every 50 ms: never a whole request
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                slow.sendall(b"X-Slow: 1\r\n")
            if select.select([slow], [], [], 0.05)[0]:
                closed = closed_by_server(slow)
                break
        assert closed
        assert closed_by_server(idle)
        assert server.timed_out == 2
        assert probe(server.port, "/readyz") == (200, "ready")
        idle.close()
        slow.close()


def test_at_the_cap_the_oldest_connection_is_closed_and_a_new_probe_is_answered() -> None:
    """8 idle connections (the cap) and a probe: the probe is answered, the oldest closed."""

    class Patient(Quick):
        TIMEOUT = 3 * BOUND

    with Patient(ready_lifecycle(), "127.0.0.1", 0) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) for _ in range(8)]
        assert probe(server.port, "/readyz") == (200, "ready")
        assert closed_by_server(held[0])
        assert select.select(held[1:], [], [], 0)[0] == []  # the others are still open
        assert server.evicted == 1
        for sock in held:
            sock.close()


def test_close_returns_at_once_and_closes_every_connection() -> None:
    """``close()`` with connections open: each is closed, the port refuses, twice is harmless."""
    server = readiness.serve_probes(0, lifecycle=ready_lifecycle())
    with held_open(server.port, 20, 5) as held:
        assert probe(server.port, "/livez") == (200, "live")
        server.close()
        assert all(closed_by_server(sock) for sock in held)
    server.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=BOUND).close()


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        pytest.param(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK", id="1.1"),
        pytest.param(b"GET /readyz HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK", id="1.0"),
        pytest.param(b"GET /livez?verbose=1 HTTP/1.1\n\n", b"HTTP/1.1 200 OK", id="bare-LF-and-query"),
        pytest.param(b"GET http://pod:8081/readyz HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK", id="absolute-form"),
        pytest.param(b"GET /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found", id="other-path"),
        pytest.param(
            b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 405 Method Not Allowed",
            id="POST",
        ),
        pytest.param(b"GET /readyz\r\n\r\n", b"HTTP/1.1 400 Bad Request", id="HTTP/0.9"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"HTTP/1.1 400 Bad Request", id="h2c-preface"),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"HTTP/1.1 400 Bad Request", id="TLS"
        ),
        pytest.param(
            b"GET /readyz HTTP/1.1\r\nX-Big: " + b"a" * 9000,
            b"HTTP/1.1 431 Request Header Fields Too Large",
            id="too-large",
        ),
    ],
)
def test_anything_but_a_probe_gets_a_clear_status(request_bytes: bytes, status_line: bytes) -> None:
    with readiness.serve_probes(0, lifecycle=ready_lifecycle()) as server:
        answer = raw(server.port, request_bytes)
    assert answer.split(b"\r\n", 1)[0] == status_line
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nconnection: close" in head
    assert b"\r\ndate: " in head
    if b" 405 " in status_line:
        assert b"\r\nallow: get, head" in head


def test_head_gets_the_headers_and_no_body() -> None:
    with readiness.serve_probes(0, lifecycle=ready_lifecycle()) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=BOUND)
        conn.request("HEAD", "/readyz")
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Length"), response.read()) == (200, "6", b"")
        conn.close()


# -- where it binds: IPv6 and names (item 9) ----------------------------------------------------


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
@pytest.mark.timeout(60)
def test_probe_host_may_be_an_ipv6_address(graceful_process: ProcessFactory) -> None:
    """``GRACEFUL_PROBE_HOST=::1`` under ``run()`` binds IPv6 and answers (it was "Address family
    for hostname not supported" at start)."""
    probe_port = free_port()
    child = graceful_process(
        SERVICE, env={"GRACEFUL_PROBE_PORT": str(probe_port), "GRACEFUL_PROBE_HOST": "::1"}
    )
    child.wait_for_output("server(s) started: ready", stream="stderr")
    conn = http.client.HTTPConnection("::1", probe_port, timeout=BOUND)
    conn.request("GET", "/readyz")
    assert conn.getresponse().status == 200
    conn.close()
    stops_with_its_listeners(child)


@needs_ipv6
def test_the_any_address_of_ipv6_and_a_name_bind_too() -> None:
    lc = ready_lifecycle()
    with readiness.serve_probes(0, "::", lifecycle=lc) as server:
        assert repr(server) == f"<graceful.readiness.ProbeServer [::]:{server.port}>"
        assert probe(server.port, "/readyz") == (200, "ready")  # dual stack: IPv4 reaches it
    with readiness.serve_probes(0, "localhost", lifecycle=lc) as server:
        family = socket.getaddrinfo("localhost", server.port, 0, socket.SOCK_STREAM)[0][0]
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        conn = http.client.HTTPConnection(host, server.port, timeout=BOUND)
        conn.request("GET", "/livez")
        assert conn.getresponse().status == 200
        conn.close()


def test_a_host_that_does_not_resolve_says_which_variable_to_set() -> None:
    with pytest.raises(RuntimeError, match=r"'no-such-host\.invalid'.*GRACEFUL_PROBE_HOST"):
        readiness.serve_probes(0, "no-such-host.invalid", lifecycle=Lifecycle())


@pytest.mark.parametrize("raw_port", ["١٢٣٤", "1_0", "+80", "80a", "0x50", "8081.0", "65536", "0"])
def test_the_probe_port_takes_ascii_digits_only(monkeypatch: pytest.MonkeyPatch, raw_port: str) -> None:
    """``int()`` would take Arabic-Indic digits as 1234 and ``1_0`` as 10: neither is a port here."""
    monkeypatch.setenv("GRACEFUL_PROBE_PORT", raw_port)
    with pytest.raises(ValueError, match=r"GRACEFUL_PROBE_PORT.*is not a port number"):
        Settings.read()
    monkeypatch.setenv("GRACEFUL_PROBE_PORT", " 8081 ")
    assert Settings.read().probe_port == 8081
