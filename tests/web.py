"""What the web adapters' tests share: start a server process, real requests, refusal timing.

A server under test is a ``python -c`` child (``tests.child.Child``) that prints ``port N``
once bound and logs graceful's lines (INFO) to stderr; slow requests print ``in <id>`` once
the app has them, and wait until the test writes a line to the child's stdin.
"""

from __future__ import annotations

import http.client
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .child import Child
from .conftest import BOUND

__all__ = ["free_port", "get", "in_flight", "refused_within", "start"]


def start(children: list[Child], code: str, **env: str) -> tuple[Child, int]:
    """Start ``code``; return it and its port once graceful says every server is ready."""
    child = Child(code, env=env)
    children.append(child)
    port = int(child.expect("port").split()[1])
    child.expect_err("ready")  # graceful.run() has its signal handlers in place
    return child, port


def get(port: int, path: str) -> tuple[int, str, str | None]:
    """One request on a new connection: status, body, the Connection header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(), response.getheader("Connection")
    finally:
        conn.close()


def refused_within(port: int) -> float:
    """Seconds a new connection took to be refused (AssertionError if it was accepted)."""
    started = time.monotonic()
    with socket.socket() as sock:
        sock.settimeout(BOUND)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return time.monotonic() - started
    raise AssertionError("a connection after the listening socket closed was accepted")


def in_flight(
    child: Child, pool: ThreadPoolExecutor, port: int, n: int
) -> list[Future[tuple[int, str, str | None]]]:
    """Send ``n`` slow requests (``/slow/<i>``); return once the app has every one of them."""
    futures = [pool.submit(get, port, f"/slow/{i}") for i in range(n)]
    seen = {child.expect("in ").split()[1] for _ in range(n)}
    assert seen == {str(i) for i in range(n)}
    return futures


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot be told to pick one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
