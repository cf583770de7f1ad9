"""Contract section 8: at wrap-up a WebSocket gets 1001 and a stream ends cleanly.

A real uvicorn or aiohttp server under ``graceful.run`` in a child process, a real WebSocket
client (``websockets``) and a real HTTP client reading a stream, and a real SIGTERM.
"""

from __future__ import annotations

import http.client
import signal

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND
from .support.preamble import PREAMBLE
from .support.web import free_port, start

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
