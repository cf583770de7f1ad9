"""Clients that reset or close early, as a load balancer does: counted, DEBUG, never a traceback.

Real ``ThreadingHTTPServer`` under ``graceful.run`` in a child, real probe server
(``GRACEFUL_PROBE_PORT``), real clients that reset with ``SO_LINGER`` 0 (an RST, as HAProxy
closes). The deterministic cases are the ones whose server side must fail: a reset before the
request is whole, a reset of an idle keep-alive connection, a reset after the status line while
the handler still has its body to write (the handler waits, bounded, until the reset is there).
"""

from __future__ import annotations

import http.client
import re
import select
import signal
import socket
import struct

import pytest

from graceful.adapters import _inflight as _gone
from graceful.testing import GracefulProcess, ProcessFactory

from .conftest import BOUND
from .support.preamble import PREAMBLE
from .support.web import free_port, get, start

SERVER = (
    PREAMBLE
    + r"""
import logging, os, select, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

logging.getLogger("graceful").setLevel(os.environ["LEVEL"])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = float(os.environ.get("TIMEOUT", "0")) or None
    def do_POST(self):  # a timeout here, in the request, is the handler's to log
        self.rfile.read(int(self.headers["Content-Length"]))
    def do_GET(self):
        if self.path == "/boom":
            raise RuntimeError("boom in the handler")
        if self.path == "/backend":  # the handler's own call failing, its client still there
            raise ConnectionResetError("the backend reset")
        self.send_response(200)
        self.send_header("Content-Length", "4096")
        self.end_headers()
        self.wfile.flush()
        if self.path == "/status-then-body":  # the body only once the client has reset
            select.select([self.connection], [], [], 10)
        for _ in range(64):
            self.wfile.write(b"x" * 64)
    def log_request(self, *args):
        pass  # no access lines; errors still go to stderr ("Request timed out", say)

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""
)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed before {marker!r}; got {data!r}"
        data += chunk
    return data


def reset_mid_request(port: int) -> None:
    """(a) Half a request, then a reset: the server fails reading the headers."""
    sock = _connect(port)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
    sock.close()


def reset_idle_keep_alive(port: int) -> None:
    """(b) One full answer on a keep-alive connection, then a reset while the server waits."""
    sock = _connect(port)
    sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _read_until(sock, b"\r\n\r\n")
    rest = len(head.partition(b"\r\n\r\n")[2])
    while rest < 4096:
        rest += len(sock.recv(4096))
    sock.close()


def reset_after_status_line(port: int, path: str) -> None:
    """(c) Read the status line, then reset (a health check that has what it wanted)."""
    sock = _connect(port)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert _read_until(sock, b"\r\n").startswith(b"HTTP/1.")
    sock.close()


def reset_idle_keep_alive_probe(port: int) -> None:
    """(b) for the probe server, which closes after each answer (HTTP/1.0): read it all, reset."""
    sock = _connect(port)
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    while sock.recv(4096):
        pass
    sock.close()


def reset_before_sending(port: int) -> None:
    """Connect, then reset before a byte is sent: the server's first read fails."""
    _connect(port).close()


def gone_lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"DEBUG graceful {prefix}: client ")]


@pytest.mark.timeout(60)
def test_clients_that_reset_are_counted_at_debug_and_real_errors_keep_their_traceback(
    graceful_process: ProcessFactory,
) -> None:
    """Adapter: (a), (b), (c) are three DEBUG lines and a count; handler errors still traceback."""
    child, port = start(graceful_process, SERVER, LEVEL="DEBUG")
    reset_mid_request(port)
    reset_idle_keep_alive(port)
    reset_after_status_line(port, "/status-then-body")
    child.wait_for_output("went away early", stream="stderr")
    child.wait_for_output("; 3 so far", stream="stderr")
    lines = gone_lines(child.stderr, "ThreadingHTTPServer")
    assert len(lines) == 3, child.stderr
    assert all(
        re.search(r"client 127\.0\.0\.1:\d+ went away early \((ConnectionReset|BrokenPipe)", x) for x in lines
    )
    assert "Traceback" not in child.stderr
    assert "Exception occurred" not in child.stderr

    for path, error in (("/boom", "RuntimeError: boom in the handler"), ("/backend", "the backend reset")):
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            get(port, path)  # the handler raised: the connection closes without an answer
        child.wait_for_output(error, stream="stderr")
    assert child.stderr.count("Traceback") == 2
    assert len(gone_lines(child.stderr, "ThreadingHTTPServer")) == 3  # neither counted as gone

    child.send_signal(signal.SIGTERM)
    child.wait_for_output("(3 client(s) had gone away early)", stream="stderr")
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_at_info_a_client_that_resets_leaves_no_line_and_no_traceback(
    graceful_process: ProcessFactory,
) -> None:
    """At INFO (the default): no DEBUG line, no traceback; the drain line still carries the count."""
    child, port = start(graceful_process, SERVER, LEVEL="INFO")
    for _ in range(5):
        reset_mid_request(port)
        reset_idle_keep_alive(port)
        reset_after_status_line(port, "/status-then-body")
    assert get(port, "/fast")[0] == 200  # still serving
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("client(s) had gone away early)", stream="stderr")
    assert child.wait().returncode == 0
    assert "went away early" not in child.stderr
    assert "Traceback" not in child.stderr
    assert "Exception occurred" not in child.stderr


def _probe_child(graceful_process: ProcessFactory, level: str) -> tuple[GracefulProcess, int]:
    probe_port = free_port()
    env = {"GRACEFUL_PROBE_PORT": str(probe_port), "GRACEFUL_PROBE_HOST": "127.0.0.1", "LEVEL": level}
    child, _ = start(graceful_process, SERVER, **env)
    return child, probe_port


@pytest.mark.timeout(60)
def test_probers_that_reset_are_counted_at_debug_never_a_traceback(graceful_process: ProcessFactory) -> None:
    """Probe server: resets before and during the request are DEBUG lines; status-line closes too."""
    child, probe_port = _probe_child(graceful_process, "DEBUG")
    reset_before_sending(probe_port)
    reset_mid_request(probe_port)
    child.wait_for_output("; 2 so far", stream="stderr")  # the two that cannot but fail on the server's side
    for _ in range(30):  # HAProxy's health check: the status line, then an RST
        reset_after_status_line(probe_port, "/readyz")
        reset_idle_keep_alive_probe(probe_port)
    status = http.client.HTTPConnection("127.0.0.1", probe_port, timeout=BOUND)
    status.request("GET", "/livez")
    assert status.getresponse().status == 200  # still answering
    status.close()
    lines = gone_lines(child.stderr, "probes")
    assert len(lines) >= 2, child.stderr
    assert all(re.search(r"client 127\.0\.0\.1:\d+ went away early \(\w+Error: ", x) for x in lines)
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert "Traceback" not in child.stderr
    assert "Exception occurred" not in child.stderr


@pytest.mark.timeout(60)
def test_at_info_probers_that_reset_leave_nothing_in_the_log(graceful_process: ProcessFactory) -> None:
    """Probe server at INFO: the same resets leave no line at all."""
    child, probe_port = _probe_child(graceful_process, "INFO")
    for _ in range(10):
        reset_before_sending(probe_port)
        reset_mid_request(probe_port)
        reset_after_status_line(probe_port, "/readyz")
    with socket.create_connection(("127.0.0.1", probe_port), timeout=BOUND) as sock:
        sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        assert select.select([sock], [], [], BOUND)[0]
        assert sock.recv(4096).startswith(b"HTTP/1.0 200")
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0
    assert "went away early" not in child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_an_idle_keep_alive_past_the_handler_timeout_is_counted_a_stalled_request_is_not(
    graceful_process: ProcessFactory,
) -> None:
    """``timeout`` expiring between requests: DEBUG; expiring inside one: the stdlib's line."""
    child, port = start(graceful_process, SERVER, LEVEL="DEBUG", TIMEOUT="1")
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    idle.request("GET", "/fast")
    assert idle.getresponse().read() == b"x" * 4096  # then nothing more on this connection
    child.wait_for_output("went away early (idle past the timeout); 1 so far", stream="stderr")
    idle.close()
    stalled = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    stalled.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    child.wait_for_output(
        "Request timed out", stream="stderr"
    )  # the body never came: the request's own error
    stalled.close()
    assert len(gone_lines(child.stderr, "ThreadingHTTPServer")) == 1
    assert "Traceback" not in child.stderr
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0


def _pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over 127.0.0.1: (client, the server's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=BOUND)
        server, _ = listener.accept()
    return client, server


def _wait_hangup(sock: socket.socket) -> None:
    """Bounded wait until the kernel reports the peer's FIN or RST on ``sock``."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    assert poller.poll(BOUND * 1000), "the peer's close never arrived"


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(select, "POLLRDHUP"), reason="waits on Linux's POLLRDHUP")
def test_peer_gone_tells_a_reset_or_closed_client_from_a_quiet_or_busy_one() -> None:
    """Quiet, bytes waiting, or half-closed with a request unread: not gone; EOF or reset: gone."""
    client, server = _pair()
    with client, server:
        assert not _gone.peer_gone(server)  # quiet, connected
        client.sendall(b"GET / HTTP/1.1\r\n")
        assert select.select([server], [], [], BOUND)[0]
        assert not _gone.peer_gone(server)  # bytes waiting, connected
        client.close()
        _wait_hangup(server)
        assert not _gone.peer_gone(server)  # FIN, a request unread: may await its answer
        assert server.recv(64) == b"GET / HTTP/1.1\r\n"
        assert _gone.peer_gone(server)  # FIN and nothing left: end of stream
    client, server = _pair()
    with client, server:
        client.sendall(b"GET / HTTP/1.1\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        _wait_hangup(server)
        assert _gone.peer_gone(server)  # reset with bytes left before the reset
        assert server.recv(64) == b"GET / HTTP/1.1\r\n"  # nothing was consumed
