"""7. Long-lived connections: SIGTERM with a WebSocket and a server-sent-events stream open.

A client process opens a WebSocket (``websockets``, reads until the close) and an SSE stream
(a raw socket reading the chunked body until the end), waits for the first message on both and
prints ``open``; the parent then sends SIGTERM to the server and times, on ``CLOCK_MONOTONIC``
(system-wide on Linux, so both processes share it):

* **SIGTERM -> close frame**: when the WebSocket client got a close frame, and its code (1001
  Going Away is what the contract asks for; uvicorn's own shutdown sends 1012);
* **SIGTERM -> stream end**: when the stream ended, and how: a clean end (the chunked body's
  last chunk), a cut (end of file without it), a reset;
* **SIGTERM -> exit** and the exit code.

The app is the same for uvicorn alone and uvicorn under graceful: a WebSocket that reads until
``websocket.disconnect``, an SSE stream that sends an event every 0.1 s until
``http.disconnect`` (ASGI's way to learn that a response should stop). graceful's force-quit
deadline is set to ``DEADLINE``; a contender still running after ``EXIT_BOUND`` s is killed,
its row says so, and it is not run again (a hang is no figure to take a median of).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from _harness import BenchError, Child, Row, Setup, child_env, codes_text, free_port, log, median, ms

DEADLINE = 30.0  # graceful's force-quit deadline in these runs
EXIT_BOUND = 5.0  # seconds after SIGTERM before a server still running is killed
MUST = 2.0  # the contract's bound for the close frame and the stream end

ASGI = """
import asyncio, sys, threading, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(disconnected())
    while not gone.done():
        await send({"type": "http.response.body", "body": b"data: tick\\n\\n", "more_body": True})
        await asyncio.wait({gone}, timeout=0.1)
    await send({"type": "http.response.body", "body": b"", "more_body": False})

config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
server = uvicorn.Server(config)

def announce(word):
    while not server.started:
        time.sleep(0.002)
    print(word, server.servers[0].sockets[0].getsockname()[1], flush=True)
"""

UVICORN = (
    ASGI
    + """
threading.Thread(target=announce, args=("ready",), daemon=True).start()
server.run()
"""
)

GRACEFUL_UVICORN = (
    ASGI
    + f"""
import graceful

graceful.set_time_to_force_quit({DEADLINE!r})
threading.Thread(target=announce, args=("port",), daemon=True).start()
sys.exit(graceful.run(server))
"""
)

GRACEFUL_AIOHTTP = f"""
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
    return ws

async def events(request):
    response = web.StreamResponse(headers={{"content-type": "text/event-stream"}})
    await response.prepare(request)
    while True:
        await response.write(b"data: tick\\n\\n")
        await asyncio.sleep(0.1)

app = web.Application()
app.add_routes([web.get("/ws", websocket), web.get("/events", events)])
port = int(sys.argv[1])
graceful.set_time_to_force_quit({DEADLINE!r})
print("port", port, flush=True)
sys.exit(graceful.run(AiohttpService(app, host="127.0.0.1", port=port)))
"""

CLIENT = """
import json, socket, sys, threading, time
from websockets.sync.client import connect
from websockets.exceptions import ConnectionClosed

PORT, BOUND = int(sys.argv[1]), float(sys.argv[2])
out = {}
ws = connect(f"ws://127.0.0.1:{PORT}/ws", open_timeout=10)
assert ws.recv(10) == "hello"
sock = socket.create_connection(("127.0.0.1", PORT), timeout=10)
sock.sendall(b"GET /events HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
data = b""
while b"tick" not in data:
    chunk = sock.recv(65536)
    if not chunk:
        raise SystemExit("the stream ended before its first event")
    data += chunk
print("open", flush=True)

def watch_ws():
    try:
        while True:
            ws.recv(BOUND)
    except ConnectionClosed as exc:
        out["ws_at"] = time.monotonic()
        out["ws_code"] = exc.rcvd.code if exc.rcvd else None
    except TimeoutError:
        out["ws_code"] = "still open"

def watch_stream():
    global data
    sock.settimeout(BOUND)
    try:
        while chunk := sock.recv(65536):
            data += chunk
        out["stream"] = "clean end" if data.endswith(b"\\r\\n0\\r\\n\\r\\n") else "cut"
    except ConnectionResetError:
        out["stream"] = "reset"
    except TimeoutError:
        out["stream"] = "still open"
        return
    out["stream_at"] = time.monotonic()

threads = [threading.Thread(target=watch_ws), threading.Thread(target=watch_stream)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(out), flush=True)
"""


@dataclass(frozen=True)
class _Contender:
    name: str
    code: str
    needs: tuple[str, ...]
    notify: bool = False
    port_arg: bool = False  # the parent picks the port and passes it as argv[1]
    is_graceful: bool = False


_CONTENDERS = [
    _Contender("uvicorn Server.run() alone", UVICORN, ("uvicorn", "websockets")),
    _Contender(
        "graceful.run(uvicorn.Server)",
        GRACEFUL_UVICORN,
        ("uvicorn", "websockets"),
        notify=True,
        is_graceful=True,
    ),
    _Contender(
        "graceful.run(AiohttpService)",
        GRACEFUL_AIOHTTP,
        ("aiohttp", "websockets"),
        notify=True,
        port_arg=True,
        is_graceful=True,
    ),
]


@dataclass
class _Series:
    contender: _Contender
    close_s: list[float] = field(default_factory=list)
    close_codes: list[object] = field(default_factory=list)
    stream_s: list[float] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    exit_s: list[float] = field(default_factory=list)
    codes: list[int | None] = field(default_factory=list)
    problem: str = ""


def _missing(python: str, modules: tuple[str, ...]) -> list[str]:
    code = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if not importlib.util.find_spec(m)))"
    done = subprocess.run(
        [python, "-c", code, *modules],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    return done.stdout.split() if done.returncode == 0 else list(modules)


def _unavailable(contender: _Contender, setup: Setup) -> str:
    if setup.quick and not contender.is_graceful:
        return "skipped: --quick runs only graceful"
    missing = _missing(setup.python, contender.needs)
    return f"skipped: {' '.join(missing)} not installed" if missing else ""


def _once(setup: Setup, series: _Series) -> None:
    contender = series.contender
    args = (str(free_port()),) if contender.port_arg else ()
    with Child(setup.python, contender.code, notify=contender.notify, args=args) as server:
        ready = server.wait_ready()
        port = ready.split()[1] if ready.startswith("ready") else server.line_value("port")
        with Child(setup.python, CLIENT, args=(port, str(EXIT_BOUND + 2))) as client:
            client.wait_for("open")
            sent = time.monotonic()
            os.kill(server.proc.pid, signal.SIGTERM)
            exited = server.wait_exit(EXIT_BOUND)
            ended = time.monotonic()
            if not exited:
                server.kill()
            series.codes.append(server.returncode if exited else None)
            if exited:
                series.exit_s.append(ended - sent)
            if not client.wait_exit(EXIT_BOUND + 5):
                raise BenchError(f"the client did not finish; stderr: {client.stderr_tail()}")
            out = json.loads(client.stdout_rest().strip().splitlines()[-1])
    cut_by_kill = not exited
    code = out.get("ws_code")
    if code is None and cut_by_kill:
        code = "none (cut when killed)"
    series.close_codes.append(code)
    if isinstance(out.get("ws_at"), float) and out.get("ws_code") is not None:
        series.close_s.append(out["ws_at"] - sent)
    stream = out.get("stream", "?")
    if cut_by_kill and stream != "clean end":
        stream = f"{stream} (when killed)"
    series.streams.append(stream)
    if stream == "clean end":
        series.stream_s.append(out["stream_at"] - sent)


def run(setup: Setup, runs: int) -> list[Row]:
    runs = max(1, min(runs, 1 if setup.quick else 5))
    all_series = [_Series(contender) for contender in _CONTENDERS]
    reasons = {id(s): _unavailable(s.contender, setup) for s in all_series}
    for i in range(runs):
        for series in all_series:
            if reasons[id(series)] or series.problem or None in series.codes:
                continue  # unavailable, failed, or hung once already
            try:
                _once(setup, series)
            except BenchError as exc:
                series.problem = f"failed: {exc}"
        log(f"long_lived: run {i + 1} of {runs} done")
    return [_row(series, reasons[id(series)]) for series in all_series]


def _seen(values: list[object]) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(text if len(counts) == 1 else f"{text} x{n}" for text, n in counts.items())


def _spread(values: list[float]) -> str:
    return f"{ms(median(values))} (max {ms(max(values))})" if len(values) > 1 else ms(values[0])


def _row(series: _Series, reason: str) -> Row:
    bench = f"7. long-lived (a WebSocket + an SSE stream open; deadline {DEADLINE:g} s)"
    name = series.contender.name
    if reason or series.problem or not series.codes:
        return Row(bench, name, reason or series.problem or "no data")
    n = len(series.codes)
    close = f"close frame {_seen(series.close_codes)}"
    if series.close_s:
        close += f" after {_spread(series.close_s)}"
    stream = f"stream: {_seen(series.streams)}"
    if series.stream_s:
        stream += f" after {_spread(series.stream_s)}"
    if series.exit_s:
        leave = f"exit {codes_text(series.codes)} after {_spread(series.exit_s)}"
    else:
        leave = f"no exit within {EXIT_BOUND:g} s (killed)"
    result = f"{close}; {stream}; {leave} (after SIGTERM, n={n} runs)"
    goal = ""
    if series.contender.is_graceful:
        ok = (
            series.close_codes == [1001] * n
            and len(series.close_s) == n
            and max(series.close_s) < MUST
            and series.streams == ["clean end"] * n
            and max(series.stream_s) < MUST
            and series.codes == [0] * n
            and len(series.exit_s) == n
            and max(series.exit_s) < DEADLINE / 2
        )
        goal = f"{'met' if ok else 'MISSED'}: 1001 and a clean end within {MUST:g} s, exit 0 well before the deadline"
    data = {
        "close_s": series.close_s,
        "close_codes": series.close_codes,
        "stream_s": series.stream_s,
        "streams": series.streams,
        "exit_s": series.exit_s,
        "codes": series.codes,
    }
    return Row(bench, name, result, "", goal, data)
