"""examples/websocket_app.py as a user runs it: a real WebSocket client, a real SSE reader, SIGTERM."""

from __future__ import annotations

import http.client
import signal

import pytest

from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT
from .support.web import start_script

websockets_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402 - after the skip

EXAMPLE = ROOT / "examples" / "websocket_app.py"


def drain(ws: websockets_client.ClientConnection) -> None:
    """Read messages until the connection closes (ConnectionClosed), each within BOUND."""
    while True:
        ws.recv(BOUND)


@pytest.mark.timeout(60)
def test_the_websocket_example_closes_with_1001_ends_the_stream_and_exits_0(
    graceful_process: ProcessFactory,
) -> None:
    """SIGTERM with /ws and /events open: close code 1001, a complete event stream, exit 0."""
    child, port = start_script(graceful_process, EXAMPLE)
    with websockets_client.connect(f"ws://127.0.0.1:{port}/ws", open_timeout=BOUND) as ws:
        ws.send("hi")
        assert ws.recv(BOUND) == "echo: hi"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND)
        try:
            conn.request("GET", "/events")
            response = conn.getresponse()
            assert response.getheader("Content-Type") == "text/event-stream"
            assert response.readline() == b"data: tick 1\n"
            child.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                drain(ws)
            rest = response.read()  # IncompleteRead if the stream was cut instead of ended
        finally:
            conn.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    events = [event.strip() for event in rest.decode().split("\n\n") if event.strip()]
    assert all(e.startswith("data: tick ") or e == "event: bye\ndata: reconnect" for e in events), events
    assert child.wait().returncode == 0
    assert "app ws: closed with code 1001" in child.stderr
    assert "app events: stream ended after " in child.stderr
    assert "Traceback" not in child.stderr
