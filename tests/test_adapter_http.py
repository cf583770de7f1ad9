"""The http.server / socketserver / wsgiref adapter against a real server and real clients."""

from __future__ import annotations

import contextlib
import http.client
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from graceful import Lifecycle, State
from graceful.adapters import adapt
from graceful.adapters.http import HTTPServerService
from graceful.testing import ProcessFactory

from .conftest import BOUND, Recorder
from .support.preamble import PREAMBLE
from .support.web import (
    check_a_stuck_request_is_cut_at_the_wrap_up_timeout,
    check_serving_during_the_drain_delay,
    check_the_deadline_names_a_request_still_running,
    get,
    in_flight,
    refused_within,
    start,
)

# A server whose /slow/<n> requests print "in <n>" and answer once the test says "release".
SERVER = (
    PREAMBLE
    + r"""
import logging, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path.startswith("/slow/"):
            sys.stdout.write(f"in {self.path[6:]}\n")  # one write: lines from threads stay whole
            sys.stdout.flush()
            release.wait()
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""
)

WSGI_SERVER = (
    PREAMBLE
    + r"""
import logging, sys, threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
import graceful


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/slow/"):
        sys.stdout.write(f"in {path[6:]}\n")
        sys.stdout.flush()
        release.wait()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [path.encode()]

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

server = make_server("127.0.0.1", 0, app, server_class=ThreadingWSGIServer, handler_class=Quiet)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [SERVER, WSGI_SERVER], ids=["http.server", "wsgiref"])
def test_sigterm_with_50_requests_in_flight_answers_all_of_them(
    graceful_process: ProcessFactory, code: str
) -> None:
    child, port = start(graceful_process, code)
    with ThreadPoolExecutor(50) as pool:
        futures = in_flight(child, pool, port, 50)
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("stopped accepting", stream="stderr")
        refused_within(port)
        child.send_line("release")
        results = [f.result(BOUND) for f in futures]
    assert [(status, body) for status, body, _ in results] == [(200, f"/slow/{i}") for i in range(50)]
    if code is SERVER:  # HTTP/1.1 keep-alive: each answer in the drain says the connection ends
        assert {connection for _, _, connection in results} == {"close"}
    assert child.wait().returncode == 0
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [SERVER, WSGI_SERVER], ids=["http.server", "wsgiref"])
def test_a_request_stuck_at_the_wrap_up_timeout_is_abandoned_named_and_the_listeners_run(
    graceful_process: ProcessFactory, code: str
) -> None:
    """The wrap-up timeout (1 s of a 30 s budget), not the deadline, ends the drain: the request
    is named, the shutdown and flush listeners run, exit code 1. Its handler thread cannot be
    stopped: it runs on, and its client sees the connection closed when the process exits."""
    child, future = check_a_stuck_request_is_cut_at_the_wrap_up_timeout(
        graceful_process, code, release=False, cut="abandoned"
    )
    with pytest.raises(http.client.RemoteDisconnected):
        future.result(0)  # no response: closed at the exit
    assert "a handler thread cannot be stopped: the 1 abandoned above run on" in child.stderr


@pytest.mark.timeout(60)
def test_a_request_still_running_at_the_deadline_is_named_again_and_cut(
    graceful_process: ProcessFactory,
) -> None:
    """A stuck handler and a stuck shutdown listener: abandoned at the wrap-up timeout, named
    again at the deadline and its connection shut down there (the client sees it), exit 70."""
    check_the_deadline_names_a_request_still_running(graceful_process, SERVER, "/slow/one", cut="abandoned")


@pytest.mark.timeout(60)
def test_idle_keep_alive_connections_are_closed_and_do_not_hold_the_exit(
    graceful_process: ProcessFactory,
) -> None:
    child, port = start(graceful_process, SERVER)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    conn.request("GET", "/fast")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"/fast")
    assert conn.sock is not None
    child.send_signal(signal.SIGTERM)
    assert conn.sock.recv(1) == b""  # the server closed the idle connection
    conn.close()
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_during_the_drain_delay(graceful_process: ProcessFactory) -> None:
    check_serving_during_the_drain_delay(graceful_process, SERVER)


@pytest.mark.timeout(60)
def test_a_pause_stops_accepting_and_a_later_sigterm_exits_0(graceful_process: ProcessFactory) -> None:
    child, port = start(graceful_process, SERVER)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/paused")
        child.wait_for_line("in paused")
        child.send_signal(signal.SIGTSTP)
        child.wait_for_output("stopped accepting", stream="stderr")
        refused_within(port)
        child.send_line("release")
        assert future.result(BOUND)[:2] == (200, "/slow/paused")
    assert child.returncode is None  # paused, not stopped
    child.send_signal(signal.SIGTERM)
    assert child.wait().returncode == 0


def test_adapt_picks_the_http_adapter_for_socketserver_servers() -> None:
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    for server in (
        ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler),
        socketserver.TCPServer(("127.0.0.1", 0), socketserver.StreamRequestHandler),
    ):
        with server:
            assert isinstance(adapt(server), HTTPServerService)


def test_a_handler_factory_that_is_not_a_class_is_refused_with_a_hint() -> None:
    from http.server import ThreadingHTTPServer

    with (
        ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: None) as server,  # type: ignore[arg-type]
        pytest.raises(TypeError, match=r"functools\.partial"),
    ):
        HTTPServerService(server)


@pytest.mark.timeout(30)
def test_a_partial_handler_is_tracked_and_a_user_shutdown_stops_everything(fresh: object) -> None:
    import functools
    import urllib.request
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import graceful

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory="/"))
    port = server.server_address[1]
    fetched = threading.Event()

    def client() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=BOUND) as response:
            assert response.status == 200
        fetched.set()
        server.shutdown()  # what a handler might do: here it asks graceful to stop

    assert graceful.run([server, client]) == 0
    assert fetched.is_set()


@pytest.mark.timeout(30)
def test_in_process_a_stuck_request_is_named_at_the_wrap_up_timeout_and_the_deadline_stays_armed(
    fresh: Lifecycle, exits: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """run() returns 1 at the wrap-up timeout; the abandoned handler still runs, so the deadline
    stays armed: a process still alive then is forced, and the request named again."""
    caplog.set_level(logging.INFO, "graceful")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import graceful

    entered, release = threading.Event(), threading.Event()

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            entered.set()
            release.wait(BOUND)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stuck)
    port = server.server_address[1]

    def client() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
            conn.request("POST", "/upload")
            conn.getresponse()

    def stop_once_stuck() -> None:
        assert entered.wait(BOUND)
        fresh.set_wrap_up_timeout(0.3)
        fresh.set_time_to_force_quit(2.0)  # run() returns long before: room for a loaded machine
        fresh.shutdown("test", wait=False)

    caller = threading.Thread(target=client)
    caller.start()
    try:
        assert graceful.run([server, stop_once_stuck]) == 1
        assert fresh.state() is State.STOPPED
        assert "abandoned request POST /upload from 127.0.0.1 (running " in caplog.text
        assert (
            "1 request(s) abandoned at the wrap-up timeout: the force-quit deadline stays armed"
            in caplog.text
        )
        assert exits.called.wait(BOUND)  # the process is still alive at the deadline
    finally:
        release.set()  # the abandoned handler returns: its client sees the connection closed
    caller.join(BOUND)
    assert exits.codes == [70]
    assert "dropped request POST /upload from 127.0.0.1 (running " in caplog.text


def test_the_adapter_takes_only_socketserver_servers() -> None:
    with pytest.raises(TypeError, match="socketserver server"):
        HTTPServerService(object())  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_a_single_threaded_server_held_by_an_idle_keep_alive_client_still_stops(fresh: Lifecycle) -> None:
    """HTTPServer answers in its accept loop: the loop only leaves once that connection closes."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import graceful

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), KeepAlive)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=BOUND)

    def client_then_stop() -> None:
        conn.request("GET", "/")
        assert conn.getresponse().status == 204  # the connection stays open, idle
        fresh.shutdown("test", wait=False)

    try:
        assert graceful.run([server, client_then_stop]) == 0
    finally:
        conn.close()
