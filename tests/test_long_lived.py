"""Contract section 8: at wrap-up a WebSocket gets 1001 and a stream ends cleanly.

A real uvicorn or aiohttp server under ``graceful.run`` in a child process, a real WebSocket
client (``websockets``) and a real HTTP client reading a stream, and a real SIGTERM.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND
from .support.preamble import PREAMBLE
from .support.web import WRAP_UP_CUT, free_port, start, with_listeners

websockets_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402 - after the skip

SERVER = (
    PREAMBLE
    + r"""
import asyncio, sys
import uvicorn
import graceful

async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        if scope["path"] == "/ticker":  # only sends, never receives
            try:
                while True:
                    await send({"type": "websocket.send", "text": "tick"})
                    await asyncio.sleep(0.05)
            finally:
                say("ticker ended")
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                say(f"ws disconnect {message.get('code')}")
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/download":  # announced length, sent in two pieces: not a stream
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"hello", "more_body": True})
        say("download half sent")
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await send({"type": "http.response.body", "body": b"world"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/raw":  # a raw ASGI stream that never awaits receive() (issue #27, item 8)
        try:
            while True:
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
                await asyncio.sleep(0.05)
        finally:
            say("raw stream ended")

    async def ticks():
        while True:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.05)

    ticking = asyncio.ensure_future(ticks())
    while (await receive())["type"] != "http.disconnect":
        pass
    ticking.cancel()
    say("stream got disconnect")

port = int(sys.argv[1])
config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
print("port", port, flush=True)
sys.exit(graceful.run(uvicorn.Server(config)))
"""
)


# The aiohttp twin: /ws says hello, then reads until the close; /ticker only sends; /stream writes a tick every
# 50 ms and, told to end (cancelled), a last "bye" line. /polite/stream ends by itself once
# graceful's wrap-up begins. The server logs nothing itself; its handlers say what they saw.
AIOHTTP_SERVER = (
    PREAMBLE
    + r"""
import asyncio, sys
from aiohttp import web
import graceful
from graceful.adapters.aiohttp import AiohttpService

async def websocket(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str("hello")
    async for message in ws:
        pass
    say("ws loop ended")
    return ws

async def ticker(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    while True:  # never receives: its send after the close fails, and the adapter drops that
        await ws.send_str("tick")
        await asyncio.sleep(0.05)

async def stream(request):
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    try:
        while True:
            await response.write(b"tick\n")
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        say("stream told to end")
        await response.write(b"bye\n")
        raise

async def polite(request):
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"tick\n")
    await graceful.wait_for_wrap_up_async()
    await response.write(b"bye\n")
    say("polite stream ended itself")
    return response

app = web.Application()
app.add_routes([web.get("/ws", websocket), web.get("/ticker", ticker)])
app.add_routes([web.get("/stream", stream), web.get("/polite", polite)])
port = int(sys.argv[1])
print("port", port, flush=True)
sys.exit(graceful.run(AiohttpService(app, host="127.0.0.1", port=port)))
"""
)


CLOSE_1001 = b"\x88" + bytes([2 + len(b"server going away")]) + b"\x03\xe9server going away"
"""A server's close frame (unmasked, short) with code 1001 and graceful's reason."""


@contextlib.contextmanager
def silent_websocket(port: int, path: str) -> Iterator[socket.socket]:
    """A WebSocket opened by hand that then reads nothing and never answers a close."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"hello" not in head:  # the 101, then the app's first message
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 ")
        yield sock


def read_to_the_end(sock: socket.socket) -> bytes:
    """What the server sends until it closes (bounded by the socket's timeout)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def drain(ws: websockets_client.ClientConnection) -> None:
    """Read messages until the connection closes (ConnectionClosed), each within BOUND."""
    while True:
        ws.recv(BOUND)


@pytest.mark.timeout(60)
def test_a_websocket_gets_1001_and_a_stream_ends_cleanly_at_wrap_up(graceful_process: ProcessFactory) -> None:
    """SIGTERM: the WebSocket client sees close code 1001, the stream a clean end, the app both."""
    child, port = start(graceful_process, f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER)
    with websockets_client.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=BOUND) as ws:
        assert ws.recv(BOUND) == "hello"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
        try:
            conn.request("GET", "/stream")
            response = conn.getresponse()
            assert response.readline() == b"tick\n"
            child.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                drain(ws)
            rest = response.read()  # raises IncompleteRead if the stream was cut, not ended
        finally:
            conn.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert set(rest.splitlines()) <= {b"tick"}
    assert child.wait().returncode == 0
    assert "closed 1 WebSocket(s) with 1001 (going away), ended 1 stream(s)" in child.stderr
    assert "ws disconnect 1001" in child.stdout
    assert "stream got disconnect" in child.stdout
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_a_stream_and_a_websocket_that_never_read_end_at_once_and_cleanly(
    graceful_process: ProcessFactory,
) -> None:
    """uvicorn, an app that never awaits receive() (a raw ASGI stream, a WebSocket ticker):
    ended at wrap-up, not held to a timeout: a clean end, 1001, its finally runs, exit 0."""
    child, port = start(graceful_process, f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER)
    with websockets_client.connect(f"ws://127.0.0.1:{port}/ticker", open_timeout=BOUND) as ws:
        assert ws.recv(BOUND) == "hello"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
        try:
            conn.request("GET", "/raw")
            response = conn.getresponse()
            assert response.readline() == b"tick\n"
            child.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                drain(ws)
            rest = response.read()  # raises IncompleteRead if the stream was cut, not ended
        finally:
            conn.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert set(rest.splitlines()) <= {b"tick"}
    # 0, within BOUND: before, the stream held the process to the deadline (25 s, exit 70); now
    # the wrap-up timeout (20 s) would cut it with exit 1
    assert child.wait().returncode == 0
    assert "closed 1 WebSocket(s) with 1001 (going away), ended 1 stream(s)" in child.stderr
    assert "raw stream ended" in child.stdout
    assert "ticker ended" in child.stdout
    assert "Traceback" not in child.stderr
    assert "Exception in ASGI application" not in child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["uvicorn", "aiohttp"])
def test_a_websocket_client_that_never_answers_the_close_holds_nothing(
    graceful_process: ProcessFactory, server: str
) -> None:
    """A WebSocket client that reads nothing and never answers our 1001 close: it gets the close
    frame, and the connection ends at once: nothing waits for its answer, exit 0."""
    code = f"import sys; sys.argv = ['server', '{free_port()}']\n" + (
        SERVER if server == "uvicorn" else AIOHTTP_SERVER
    )
    # a wrap-up timeout well inside every wait: held there, the test would see it in the log
    child, port = start(
        graceful_process, with_listeners(code), **{**WRAP_UP_CUT, "GRACEFUL_WRAP_UP_TIMEOUT": "8"}
    )
    with silent_websocket(port, "/ws") as sock:
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("shutdown listener ran")
        received = read_to_the_end(sock)
    assert CLOSE_1001 in received  # the close frame, code 1001
    assert child.wait().returncode == 0
    assert "at the wrap-up timeout" not in child.stderr  # nothing held it there
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_a_response_under_way_at_the_wrap_up_timeout_is_cut_short(graceful_process: ProcessFactory) -> None:
    """uvicorn, a download (Content-Length) stuck half sent at the wrap-up timeout: named, its
    connection aborted (the client sees it short, never complete), exit 1."""
    code = f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER
    child, port = start(graceful_process, with_listeners(code), **WRAP_UP_CUT)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", "/download")
        response = conn.getresponse()
        assert response.read(5) == b"hello"
        child.wait_for_line("download half sent")
        child.send_signal(signal.SIGTERM)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
    finally:
        conn.close()
    child.wait_for_line("shutdown listener ran")
    child.send_line("release")  # the executor thread the cut handler left waiting
    assert child.wait().returncode == 1
    assert "dropped request GET /download from 127.0.0.1 (running " in child.stderr
    assert "Traceback" not in child.stderr
    assert "ASGI callable returned without completing response" not in child.stderr


@pytest.mark.timeout(60)
def test_a_response_of_announced_length_is_not_ended_early(graceful_process: ProcessFactory) -> None:
    """uvicorn, SIGTERM mid-download (Content-Length, body in pieces): it completes, not truncated."""
    child, port = start(graceful_process, f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
    try:
        conn.request("GET", "/download")
        response = conn.getresponse()
        assert response.read(5) == b"hello"
        child.wait_for_line("download half sent")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("stopped accepting", stream="stderr")
        child.send_line("release")
        assert response.read() == b"world"  # IncompleteRead if it was ended early
    finally:
        conn.close()
    assert child.wait().returncode == 0
    assert "ended 1 stream(s)" not in child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_aiohttp_a_websocket_gets_1001_and_streams_end_cleanly_at_wrap_up(
    graceful_process: ProcessFactory,
) -> None:
    """aiohttp, SIGTERM: 1001 for both WebSockets, a clean end for a stream and a polite one."""
    code = f"import sys; sys.argv = ['server', '{free_port()}']\n" + AIOHTTP_SERVER
    # The drain delay is when /polite ends itself (its wait returns as the wrap-up begins);
    # without one it races the adapter, which would tell it to end before it wrote "bye".
    child, port = start(graceful_process, code, GRACEFUL_DRAIN_DELAY="0.5")
    with (
        websockets_client.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=BOUND) as ws,
        websockets_client.connect(f"ws://127.0.0.1:{port}/ticker", open_timeout=BOUND) as ticker,
    ):
        assert ws.recv(BOUND) == "hello"
        assert ticker.recv(BOUND) == "tick"
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND) for _ in range(2)]
        try:
            responses = []
            for conn, path in zip(conns, ["/stream", "/polite"], strict=True):
                conn.request("GET", path)
                responses.append(conn.getresponse())
                assert responses[-1].readline() == b"tick\n"
            child.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                drain(ws)
            with pytest.raises(ConnectionClosed) as ticker_closed:
                drain(ticker)
            # read() raises IncompleteRead if a stream was cut, not ended
            rests = [response.read().splitlines() for response in responses]
        finally:
            for conn in conns:
                conn.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert closed.value.rcvd.reason == "server going away"
    assert ticker_closed.value.rcvd is not None
    assert ticker_closed.value.rcvd.code == 1001
    for rest in rests:
        assert rest[-1] == b"bye"
        assert set(rest[:-1]) <= {b"tick"}
    assert child.wait().returncode == 0
    assert "closed 2 WebSocket(s) with 1001 (going away), ended 1 stream(s)" in child.stderr
    assert "ws loop ended" in child.stdout
    assert "stream told to end" in child.stdout
    assert "polite stream ended itself" in child.stdout
    assert "Traceback" not in child.stderr
    assert "Error handling request" not in child.stderr
