"""What the web adapters' tests share: start a server process, real requests, refusal timing.

A server under test is a ``python -c`` child (started by the ``graceful_process`` fixture
that graceful ships) that prints ``port N`` once bound and logs graceful's lines (INFO) to
stderr; slow requests print ``in <id>`` once the app has them, and wait until the test writes
a line to the child's stdin (``tests/support/preamble.py``). Every wait is bounded
(``BOUND``); none of these helpers sleeps to synchronise.

* ``start(graceful_process, code, **env)``: start a server child; its port once graceful says
  "ready".
* ``start_script(graceful_process, path, **env)``: the same for a script that reads ``PORT``.
* ``get(port, path)``: one request on a new connection: status, body, ``Connection`` header.
* ``in_flight(child, pool, port, n)``: ``n`` slow requests, returned once the app has all.
* ``refused_within(port)`` / ``assert_refused_fast(port, within)``: how fast a new connection
  is refused (it must be refused, never accepted nor left hanging).
* ``idle_connection(port)`` / ``closed_by_server(conn)``: a keep-alive connection left idle
  after one response, and a bounded wait for the server to close it.
* ``free_port()``: a port that was free a moment ago.
* ``with_listeners(code)``: the server program with a shutdown listener that prints "shutdown
  listener ran" (and, with ``STUCK_SHUTDOWN=1`` in its environment, then never returns, so the
  process meets its deadline) and a flush listener that prints "flush listener ran".
* ``WRAP_UP_CUT``: the environment of a stop whose wrap-up timeout (1 s) cuts what is still
  running, long before the deadline (30 s): every wait in the test stays bounded by ``BOUND``.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from graceful.testing import GracefulProcess, ProcessFactory

from ..conftest import BOUND

__all__ = [
    "DEADLINE_CUT",
    "WRAP_UP_CUT",
    "assert_refused_fast",
    "check_a_stuck_request_is_cut_at_the_wrap_up_timeout",
    "check_serving_during_the_drain_delay",
    "check_the_deadline_names_a_request_still_running",
    "check_the_example_drains",
    "closed_by_server",
    "free_port",
    "get",
    "idle_connection",
    "in_flight",
    "refused_within",
    "run_on_a_taken_port",
    "start",
    "start_script",
    "with_listeners",
]

WRAP_UP_CUT = {"GRACEFUL_FORCE_QUIT": "30", "GRACEFUL_WRAP_UP_TIMEOUT": "1"}
"""A stop whose wrap-up timeout cuts what is still running at 1 s; the deadline is far."""

DEADLINE_CUT = {**WRAP_UP_CUT, "GRACEFUL_FORCE_QUIT": "5", "STUCK_SHUTDOWN": "1"}
"""The same cut at 1 s, then a shutdown listener that never returns: the deadline comes at 5 s
(4 s after the cut: room for a child starved of CPU on a loaded machine to reach its listener)."""

LISTENERS = r"""
import os, threading
import graceful

def _close_the_pool():
    say("shutdown listener ran")  # say() comes from the PREAMBLE, defined by the time it runs
    if os.environ.get("STUCK_SHUTDOWN"):
        threading.Event().wait()

graceful.add_shutdown_listener(_close_the_pool, name="close the pool")
graceful.add_flush_listener(lambda: say("flush listener ran"), name="flush the metrics")
"""


def with_listeners(code: str) -> str:
    """``code`` (a server program that calls ``graceful.run()`` after the PREAMBLE) with the
    shutdown and flush listeners of ``LISTENERS`` registered first."""
    return LISTENERS + code


def start(graceful_process: ProcessFactory, code: str, **env: str) -> tuple[GracefulProcess, int]:
    """Start ``code``; return it and its port once graceful says every server is ready."""
    child = graceful_process(code, env=env, stdin=True)
    port = int(child.wait_for_line("port").split()[1])
    child.wait_for_output("ready", stream="stderr")  # graceful.run() has its signal handlers in place
    return child, port


def start_script(graceful_process: ProcessFactory, path: Path, **env: str) -> tuple[GracefulProcess, int]:
    """Run the script at ``path`` as ``__main__`` with ``PORT`` set to a free port.

    Returns the child and its port once graceful says every server is ready.
    """
    port = int(env.pop("PORT", "0")) or free_port()
    code = f"import runpy; runpy.run_path({str(path)!r}, run_name='__main__')"
    child = graceful_process(code, env={"PORT": str(port), **env}, stdin=True)
    child.wait_for_output("ready", stream="stderr")
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


REFUSAL_BOUND = 2.0
"""Seconds a connect may take before it counts as left hanging (a refusal on loopback is an
immediate RST; a listener that still exists but no longer accepts leaves the SYN unanswered)."""


def refused_within(port: int) -> float:
    """A new connection is refused, not accepted nor left hanging; the seconds it took.

    No timing is asserted: the bound is only how long a hanging connect is given before it
    counts as hanging (``REFUSAL_BOUND``).
    """
    started = time.monotonic()
    with socket.socket() as sock:
        sock.settimeout(REFUSAL_BOUND)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return time.monotonic() - started
        except TimeoutError:
            raise AssertionError(
                f"a new connection was left hanging for {REFUSAL_BOUND} s instead of being refused"
            ) from None
    raise AssertionError("a connection after the listening socket closed was accepted")


def assert_refused_fast(port: int, within: float = REFUSAL_BOUND) -> float:
    """A new connection is refused (not accepted, not left hanging past ``within`` s)."""
    return refused_within(port)


def in_flight(
    child: GracefulProcess, pool: ThreadPoolExecutor, port: int, n: int
) -> list[Future[tuple[int, str, str | None]]]:
    """Send ``n`` slow requests (``/slow/<i>``); return once the app has every one of them.

    Each future gives what ``get()`` returns, once the test has released the requests.
    """
    futures = [pool.submit(get, port, f"/slow/{i}") for i in range(n)]
    seen = {child.wait_for_line("in ").split()[1] for _ in range(n)}
    assert seen == {str(i) for i in range(n)}
    return futures


def idle_connection(port: int, path: str = "/idle") -> http.client.HTTPConnection:
    """A keep-alive connection that has had one complete 200 response and now sits idle.

    The caller closes it (``conn.close()``), whatever the server did.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert (response.getheader("Connection") or "").lower() != "close", "the server did not keep it alive"
    except BaseException:
        conn.close()
        raise
    return conn


def closed_by_server(conn: http.client.HTTPConnection, timeout: float = BOUND) -> bool:
    """Wait (bounded) until the server closes the idle ``conn``; False if it stays open."""
    sock = conn.sock
    assert sock is not None, "the connection is not open"
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""  # end of stream: the server closed it
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot be told to pick one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- scenarios every web adapter must pass (each test module passes its server's code) ----------


def check_a_stuck_request_is_cut_at_the_wrap_up_timeout(
    graceful_process: ProcessFactory, code: str, *, release: bool = True, cut: str = "dropped", **env: str
) -> tuple[GracefulProcess, Future[tuple[int, str, str | None]]]:
    """A request still running at the wrap-up timeout (1 s of a 30 s budget): named with how long
    it ran, the shutdown and flush listeners run, exit code 1 (not the deadline's 70).

    ``code`` is a server program of ``with_listeners``. Returns the child (exited) and the
    client's request, done (what the client saw is the caller's to check). ``release``: the test
    lets the stuck handler go once the shutdown listener has run (a thread the cut could not
    stop would otherwise hold the exit: the deadline, kept armed, would end it with 70). ``cut``:
    how the log line says it ("dropped"; the standard library's threads are "abandoned"). ``env``:
    more of the child's environment.
    """
    child, port = start(graceful_process, with_listeners(code), **WRAP_UP_CUT, **env)
    pool = ThreadPoolExecutor(1)
    try:
        future = pool.submit(get, port, "/slow/stuck")
        child.wait_for_line("in stuck")
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("shutdown listener ran")
        child.wait_for_line("flush listener ran")
        if release:
            child.send_line("release")
        assert child.wait().returncode == 1
        with contextlib.suppress(http.client.HTTPException, ConnectionError):
            future.result(BOUND)  # answered or cut by now (the process is gone): not left hanging
    finally:
        pool.shutdown(wait=False)
    assert re.search(
        cut + r" request GET /slow/stuck from 127\.0\.0\.1 \(running [\d.]+ s\) at the wrap-up timeout",
        child.stderr,
    ), child.stderr
    assert "force quit" not in child.stderr
    assert "Traceback" not in child.stderr
    return child, future


def check_the_deadline_names_a_request_still_running(
    graceful_process: ProcessFactory, code: str, path: str, *, cut: str = "dropped"
) -> str:
    """A request the wrap-up timeout could not end (its handler goes on) and a shutdown listener
    that never returns: at the deadline the force-quit hook names the request again, exit 70.

    ``code`` is a server program of ``with_listeners``; the handler at ``path`` prints "in
    <name>" and outlives its cut. ``cut``: as for the check above. Returns the child's stderr.
    """
    child, port = start(graceful_process, with_listeners(code), **DEADLINE_CUT)
    pool = ThreadPoolExecutor(1)
    try:
        future = pool.submit(get, port, path)
        child.wait_for_line("in ")
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("shutdown listener ran")
        assert child.wait().returncode == 70
        with pytest.raises((http.client.HTTPException, OSError)):
            future.result(BOUND)  # cut, not left hanging
    finally:
        pool.shutdown(wait=False)
    err = child.stderr
    named = f" request GET {path} from 127.0.0.1 (running "
    assert re.search(re.escape(cut + named) + r"[\d.]+ s\) at the wrap-up timeout", err), err
    assert re.search(re.escape("dropped" + named) + r"[\d.]+ s\) at the force-quit deadline", err), err
    report = err.split("graceful: force quit:", 1)[1]
    # The shutdown phase was not held by the request: its stuck listener had started.
    assert "shutdown listener 'close the pool'" in report, report
    assert "'close the pool': never started" not in report, report
    return err


def check_serving_during_the_drain_delay(graceful_process: ProcessFactory, code: str) -> None:
    """With a 1 s drain delay a request sent after SIGTERM is answered; then refusal at once."""
    child, port = start(graceful_process, code, GRACEFUL_DRAIN_DELAY="1")
    signalled = time.monotonic()
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("wrapping up", stream="stderr")
    assert get(port, "/during-delay")[:2] == (200, "/during-delay")
    child.wait_for_output("stopped accepting", stream="stderr")
    assert time.monotonic() - signalled >= 0.9
    assert_refused_fast(port, within=0.1)
    assert child.wait().returncode == 0


def check_the_example_drains(graceful_process: ProcessFactory, script: Path, *log_lines: str) -> None:
    """An example under SIGTERM mid-request: the request completes, exit 0, the lines are logged."""
    child, port = start_script(graceful_process, script)
    assert get(port, "/")[:2] == (200, "/\n")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow")
        child.wait_for_output("GET /slow: working", stream="stderr")
        child.send_signal(signal.SIGTERM)
        assert future.result(BOUND) == (200, "/slow\n", "close")
    assert child.wait().returncode == 0
    for line in log_lines:
        assert line in child.stderr
    assert "Traceback" not in child.stderr


def run_on_a_taken_port(
    graceful_process: ProcessFactory, server_code: Callable[[int], str]
) -> GracefulProcess:
    """Start ``server_code(port)`` on a port already listened on; the child once it has exited."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        child = graceful_process(server_code(taken.getsockname()[1]), wait_ready=False, stdin=True)
        child.wait()
    return child
