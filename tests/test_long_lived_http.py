"""Contract section 8 for ``http.server``: upgraded and hijacked connections are named, not waited on silently.

A real ``ThreadingHTTPServer`` under ``graceful.run`` in a child process whose handler does a
WebSocket by hand (101 Switching Protocols) or a ``CONNECT`` tunnel; a real WebSocket client
(``websockets``), a real socket for the tunnel, and a real SIGTERM.
"""

from __future__ import annotations

import signal
import socket

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND
from .support.preamble import PREAMBLE
from .support.web import DEADLINE_CUT, WRAP_UP_CUT, start, with_listeners

websockets_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402 - after the skip

# /polite: a WebSocket done by hand that, once the test says "release", closes with 1001 and
# returns; any other path: one that never ends. CONNECT: a tunnel that never ends.
SERVER = (
    PREAMBLE
    + r"""
import base64, hashlib, struct, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import graceful

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

def frame(opcode, payload):
    return bytes([0x80 | opcode, len(payload)]) + payload  # a server's frame: unmasked, short

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.write(frame(1, b"hello"))
        say(f"ws open {self.path}")
        if self.path != "/polite":
            threading.Event().wait()  # never ends by itself
        release.wait()
        self.wfile.write(frame(8, struct.pack("!H", 1001) + b"server going away"))
        header = self.rfile.read(2)  # the client's close frame: masked, short
        self.rfile.read(4 + (header[1] & 0x7F))
        self.close_connection = True
        say("ws closed by its handler")

    def do_CONNECT(self):
        self.send_response(200)
        self.end_headers()
        say("tunnel open")
        threading.Event().wait()  # never ends by itself

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""
)


def drain(ws: websockets_client.ClientConnection) -> None:
    """Read messages until the connection closes (ConnectionClosed), each within BOUND."""
    while True:
        ws.recv(BOUND)


@pytest.mark.timeout(60)
def test_an_upgraded_connection_is_named_and_waited_for_until_its_handler_ends_it(
    graceful_process: ProcessFactory,
) -> None:
    """SIGTERM: the drain log names the hand-made WebSocket; its handler's 1001 ends it; exit 0."""
    child, port = start(graceful_process, SERVER)
    with websockets_client.connect(f"ws://127.0.0.1:{port}/polite", open_timeout=BOUND) as ws:
        assert ws.recv(BOUND) == "hello"
        child.wait_for_line("ws open /polite")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output(
            "waiting on upgraded connection (websocket) GET /polite from 127.0.0.1 (running ", stream="stderr"
        )
        assert child.returncode is None  # waited for, not cut
        child.send_line("release")
        with pytest.raises(ConnectionClosed) as closed:
            drain(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert child.wait().returncode == 0
    child.wait_for_line("ws closed by its handler")
    assert "1 upgraded connection(s) ended during the drain" in child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("env", [WRAP_UP_CUT, DEADLINE_CUT], ids=["wrap-up-timeout", "deadline"])
def test_upgraded_connections_and_tunnels_still_open_are_named_at_each_step(
    graceful_process: ProcessFactory, env: dict[str, str]
) -> None:
    """A stuck WebSocket and a CONNECT tunnel: named when the drain starts, abandoned at the
    wrap-up timeout (exit 1, the shutdown listener runs); with a stuck shutdown listener, named
    again and cut at the deadline (exit 70). The clients see the connection end either way."""
    child, port = start(graceful_process, with_listeners(SERVER), **env)
    with (
        websockets_client.connect(f"ws://127.0.0.1:{port}/stuck", open_timeout=BOUND) as ws,
        socket.create_connection(("127.0.0.1", port), timeout=BOUND) as tunnel,
    ):
        assert ws.recv(BOUND) == "hello"
        tunnel.sendall(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
        assert tunnel.recv(1024).startswith(b"HTTP/1.1 200 ")
        # Two handler threads say these, in either order: each is looked for in the whole
        # output so far (wait_for_line would look only past the line it found last).
        child.wait_for_output("ws open /stuck", stream="stdout")
        child.wait_for_output("tunnel open", stream="stdout")
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("shutdown listener ran")
        with pytest.raises(ConnectionClosed) as closed:
            drain(ws)  # at the exit, or cut at the deadline: not left hanging
        assert tunnel.recv(1024) == b""
    assert closed.value.rcvd is None  # no close frame: what the log lines are for
    deadline = "STUCK_SHUTDOWN" in env
    assert child.wait().returncode == (70 if deadline else 1)
    err = child.stderr
    for what in (
        "upgraded connection (websocket) GET /stuck from 127.0.0.1 (running ",
        "tunnel CONNECT db.internal:5432 from 127.0.0.1 (running ",
    ):
        steps = [f"waiting on {what}", f"abandoned {what}"] + ([f"cut {what}"] if deadline else [])
        assert [err.index(step) for step in steps] == sorted(err.index(step) for step in steps), err
        assert (f"cut {what}" in err) is deadline
    assert err.count(") at the wrap-up timeout") == 2  # each named once there
    assert "dropped request" not in err  # each named as what it is
    assert "Traceback" not in err
