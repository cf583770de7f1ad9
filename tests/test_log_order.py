"""Issue #15: the log a person reads, in the order things happen (real signals, real server)."""

from __future__ import annotations

import re
import signal
import threading
import urllib.request

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND
from .support.preamble import PREAMBLE

SERVER = (
    PREAMBLE
    + r"""
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

app = logging.getLogger("app")


class Slow(BaseHTTPRequestHandler):
    def do_GET(self):
        app.info("request started")
        release.wait()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        app.info("request answered")

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
say(f"port {server.server_address[1]}")
graceful.add_shutdown_listener(lambda: app.info("user listener ran"), name="mine")
sys.exit(graceful.run(server))
"""
)


def _in_order(text: str, *lines: str) -> None:
    at = [text.find(line) for line in lines]
    assert all(i >= 0 for i in at), (lines, text)
    assert at == sorted(at), (lines, text)


@pytest.mark.timeout(40)
def test_drain_delay_then_drain_then_server_stopped_then_phase_counts(
    graceful_process: ProcessFactory,
) -> None:
    """SIGTERM mid-request: drain delay start/end, drain, "server stopped" after it, counts named."""
    child = graceful_process(SERVER, env={"GRACEFUL_DRAIN_DELAY": "0.3"}, stdin=True)
    try:
        port = child.wait_for_line("port ").split()[1]
        child.wait_for_output("ready", stream="stderr")
        answers: list[bytes] = []
        client = threading.Thread(
            target=lambda: answers.append(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=BOUND).read()
            ),
            daemon=True,
        )
        client.start()
        child.wait_for_output("request started", stream="stderr")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("stopped accepting", stream="stderr")
        assert "server 'ThreadingHTTPServer' stopped" not in child.stderr  # its drain is not over
        child.send_line("go")
        assert child.wait(30).returncode == 0, child.stderr
        client.join(BOUND)
        assert answers == [b"ok"]
        # "wrapping up" is logged by the coordinator after it has started the listeners (act
        # first, log after: gunicorn #3198), so the drain delay's first line may come before it.
        assert "wrapping up (SIGTERM)" in child.stderr, child.stderr
        _in_order(
            child.stderr,
            "drain delay: serving 0.3 s more while the balancer stops sending",
            "drain delay over: the servers stop accepting",
            "stopped accepting",
            "request answered",
            "server 'ThreadingHTTPServer' stopped",
            "wrap_up phase done: 1 listener(s), 1 of them graceful's own (the servers') in",
            "user listener ran",
            "shutdown phase done: 2 listener(s), 1 of them graceful's own (the servers') in",
        )
        assert child.stderr.count("server 'ThreadingHTTPServer' stopped") == 1
    finally:
        child.kill()


@pytest.mark.timeout(40)
def test_stopped_line_names_both_signals_after_tstp_then_term(graceful_process: ProcessFactory) -> None:
    """SIGTSTP, then SIGTERM: the last line counts from the first and names both."""
    child = graceful_process(SERVER, stdin=True)
    try:
        child.wait_for_output("ready", stream="stderr")
        child.send_signal(signal.SIGTSTP)
        child.wait_for_output("wrap_up phase done", stream="stderr")
        child.send_signal(signal.SIGTERM)
        assert child.wait(30).returncode == 0, child.stderr
        assert re.search(r"stopped \(\d+\.\d{3} s after SIGTSTP then SIGTERM\)", child.stderr), child.stderr
        assert "drain delay" not in child.stderr  # none set: nothing to say
    finally:
        child.kill()


@pytest.mark.timeout(40)
def test_the_first_line_naming_a_signal_is_the_wrap_up_and_the_router_line_follows(
    graceful_process: ProcessFactory,
) -> None:
    """SIGINT: "wrapping up (SIGINT)" is the first line to name it, "received SIGINT" comes later.

    The listeners' own lines (the server's "stopped accepting"), and even "stopped (... after
    SIGINT)", may come before the router's line: the lifecycle starts the listeners before it
    logs the transition (act first, log after: gunicorn #3198), and the sequence runs on.
    """
    child = graceful_process(SERVER, stdin=True)
    try:
        child.wait_for_output("ready", stream="stderr")
        before = len(child.stderr)
        child.send_signal(signal.SIGINT)
        assert child.wait(30).returncode == 0, child.stderr
        after = [line for line in child.stderr[before:].splitlines() if line.startswith("INFO graceful")]
        naming = [line for line in after if "SIGINT" in line]
        assert naming[0] == "INFO graceful wrapping up (SIGINT)", after
        received = [
            line for line in naming if line.startswith("INFO graceful received SIGINT: shutting down")
        ]
        assert len(received) == 1, after  # once, after the wrap-up line (the same thread logs both)
    finally:
        child.kill()
