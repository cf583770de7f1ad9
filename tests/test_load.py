"""Bounded load tests: a stream of requests from a second process while SIGTERM arrives.

Zero failed requests among those the server accepted. Run in CI; deselect with
``-m 'not load'``. The figures are printed in the test output.
"""

from __future__ import annotations

import json
import signal

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND
from .support.web import free_port

pytestmark = [pytest.mark.load, pytest.mark.timeout(120)]

# Counts the connections it accepts (every accepted connection gets a handler) and the
# requests its app received; prints both when it has stopped.
STDLIB = r"""
import logging, random, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
accepted = {"connections": 0, "requests": 0}
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()
        with lock:
            accepted["connections"] += 1
    def do_GET(self):
        with lock:
            accepted["requests"] += 1
        time.sleep(random.uniform(0, 0.02))  # the work
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"done")
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
graceful.add_shutdown_listener(lambda: print("accepted", accepted["connections"], accepted["requests"], flush=True))
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""

# uvicorn: the app counts the requests it received (uvicorn does not expose accepted
# connections; a connection it accepted but never read a request from is not counted).
UVICORN = r"""
import asyncio, logging, random, sys
import uvicorn
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
accepted = {"connections": 0, "requests": 0}

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    accepted["requests"] += 1
    accepted["connections"] += 1  # one request per connection: the client sends Connection: close
    await asyncio.sleep(random.uniform(0, 0.02))  # the work
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
    await send({"type": "http.response.body", "body": b"done"})

config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
graceful.add_shutdown_listener(lambda: print("accepted", accepted["connections"], accepted["requests"], flush=True))
print("port", sys.argv[1], flush=True)
sys.exit(graceful.run(uvicorn.Server(config)))
"""


@pytest.mark.parametrize("server", ["stdlib", "uvicorn"])
def test_no_accepted_request_fails_when_sigterm_arrives_under_load(
    graceful_process: ProcessFactory, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if server == "uvicorn":
        pytest.importorskip("graceful.adapters.uvicorn", reason="the uvicorn adapter has not landed")
        code = f"import sys; sys.argv = ['server', '{free_port()}']\n" + UVICORN
    else:
        code = STDLIB
    service = graceful_process(code)
    port = int(service.wait_for_line("port").split()[1])
    service.wait_for_output("ready", stream="stderr")
    client = graceful_process(f"from tests.support.load_client import main; main({port})", wait_ready=False)
    client.wait_for_line("started", timeout=BOUND)
    service.send_signal(signal.SIGTERM)
    assert service.wait(30).returncode == 0, service.stderr
    connections, requests = (int(n) for n in service.wait_for_line("accepted").split()[1:])
    assert client.wait(30).returncode == 0, client.stderr
    figures = json.loads(client.wait_for_line("{"))
    with capsys.disabled():
        print(
            f"\n[load {server}] server accepted {connections} connection(s), {requests} request(s); "
            f"client: {figures['ok']} ok, {figures['failed']} failed, "
            f"{figures['reset_before_response']} reset before any response, "
            f"{figures['refused']} refused, over {figures['seconds']} s"
        )
    assert figures["failed"] == 0
    assert figures["ok"] == requests  # every request the server received was answered
    assert figures["ok"] + figures["reset_before_response"] >= connections >= figures["ok"] > 0
    assert connections == requests  # no accepted connection was dropped before its request was read
    assert figures["refused"] >= 1
