"""The child programs: one idle (or lightly loaded) service per contender, as source text.

Each is what a user of that tool would write, at the tool's defaults. Each announces
readiness once it accepts work: a stdout line ``ready [port]``, or, under ``graceful.run()``,
READY=1 on ``NOTIFY_SOCKET`` (then it prints ``port N`` first when it has a port). ``DELAY``
is how long an HTTP request takes to handle (the drain benchmark sets it; idle services never
see a request).
"""

from __future__ import annotations

from dataclasses import dataclass

from _harness import Setup

# -- building blocks --------------------------------------------------------------------------

STDLIB_HANDLER = """
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(DELAY)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
"""

ASGI_APP = """
import asyncio, threading, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(DELAY)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))

def announce(word):
    while not server.started:
        time.sleep(0.002)
    print(word, server.servers[0].sockets[0].getsockname()[1], flush=True)
"""

GRACEFUL_IDLE_SERVICE = """
import sys, threading
import graceful

class Idle:
    name = "idle"

    def __init__(self):
        self.stop = threading.Event()

    def serve(self, ctx):
        ctx.started()
        self.stop.wait()

    def wrap_up(self, ctx):
        self.stop.set()

    def close(self, ctx):
        pass
"""

# -- idle services, one per contender ---------------------------------------------------------

BARE = """
import signal, sys

def on_term(signum, frame):
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    signal.pause()
"""

ASYNCIO = """
import asyncio, signal

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()

asyncio.run(main())
"""

STDLIB_HTTP = (
    STDLIB_HANDLER
    + """
import signal, sys, threading

def on_term(signum, frame):
    threading.Thread(target=server.shutdown).start()  # shutdown() from this thread would deadlock

signal.signal(signal.SIGTERM, on_term)
print("ready", server.server_address[1], flush=True)
server.serve_forever()
server.server_close()
sys.exit(0)
"""
)

AIOMISC = """
import aiomisc

with aiomisc.entrypoint() as loop:
    loop.call_soon(lambda: print("ready", flush=True))
    loop.run_forever()
"""

COTYLEDON = """
import cotyledon

class Idle(cotyledon.Service):
    def run(self):
        print("ready", flush=True)

manager = cotyledon.ServiceManager()
manager.add(Idle, workers=1)
manager.run()
"""

UVICORN = (
    ASGI_APP
    + """
threading.Thread(target=announce, args=("ready",), daemon=True).start()
server.run()
"""
)

GRPCIO = """
import signal, sys
from concurrent import futures
import grpc

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
port = server.add_insecure_port("127.0.0.1:0")
server.start()

def on_term(signum, frame):
    server.stop(grace=GRACE).wait()

signal.signal(signal.SIGTERM, on_term)
print("ready", port, flush=True)
server.wait_for_termination()
sys.exit(0)
"""

GRACEFUL_CORE = GRACEFUL_IDLE_SERVICE + "\nsys.exit(graceful.run(Idle()))\n"

GRACEFUL_HTTP = (
    STDLIB_HANDLER
    + """
import sys
import graceful

print("port", server.server_address[1], flush=True)
sys.exit(graceful.run(server))
"""
)

GRACEFUL_UVICORN = (
    ASGI_APP
    + """
import sys
import graceful

threading.Thread(target=announce, args=("port",), daemon=True).start()
sys.exit(graceful.run(server))
"""
)

GRACEFUL_GRPC = """
import sys
from concurrent import futures
import grpc
import graceful

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
print("port", server.add_insecure_port("127.0.0.1:0"), flush=True)
sys.exit(graceful.run(server))
"""


@dataclass(frozen=True)
class Program:
    """One contender's child: its source, and what it needs to run."""

    contender: str
    source: str
    notify: bool = False  # readiness via NOTIFY_SOCKET (graceful.run) instead of a stdout line
    module: str = ""  # third-party module it needs from the peers' environment
    adapter: str = ""  # graceful adapter module it uses (graceful/adapters/<adapter>.py)
    fallback: bool = False  # runs on a generic adapter while that module has not landed
    is_graceful: bool = False
    baseline: bool = False  # a hand-written stdlib baseline: runs in --quick too

    def code(self, delay: float = 0.0, grace: float = 5.0) -> str:
        return f"DELAY = {delay!r}\nGRACE = {grace!r}\n" + self.source


IDLE = [
    Program("bare Python (signal.signal + sys.exit)", BARE, baseline=True),
    Program("graceful.run(service)", GRACEFUL_CORE, notify=True, is_graceful=True),
    Program("bare asyncio (add_signal_handler)", ASYNCIO),
    Program("aiomisc entrypoint", AIOMISC, module="aiomisc"),
    Program("cotyledon ServiceManager (1 worker)", COTYLEDON, module="cotyledon"),
    Program("stdlib ThreadingHTTPServer (hand-written handler)", STDLIB_HTTP),
    Program(
        "graceful.run(ThreadingHTTPServer)",
        GRACEFUL_HTTP,
        notify=True,
        adapter="http",
        fallback=True,
        is_graceful=True,
    ),
    Program("uvicorn Server.run()", UVICORN, module="uvicorn"),
    Program(
        "graceful.run(uvicorn.Server)",
        GRACEFUL_UVICORN,
        notify=True,
        module="uvicorn",
        adapter="uvicorn",
        is_graceful=True,
    ),
    Program("grpcio (hand-written handler, stop(grace))", GRPCIO, module="grpc"),
    Program(
        "graceful.run(grpc.server)",
        GRACEFUL_GRPC,
        notify=True,
        module="grpc",
        adapter="grpc",
        is_graceful=True,
    ),
]


def unavailable(program: Program, setup: Setup) -> str:
    """Why ``program`` cannot run in this setup ("" if it can)."""
    if setup.quick and not (program.is_graceful or program.baseline):
        return "skipped: --quick runs only graceful and the bare baseline"
    if program.module and not setup.has(program.module):
        return "skipped: --quick runs no peer" if setup.quick else f"skipped: {program.module} not installed"
    if program.adapter and not program.fallback and not setup.adapter_landed(program.adapter):
        return f"not run: graceful/adapters/{program.adapter}.py has not landed yet"
    return ""


def note(program: Program, setup: Setup) -> str:
    """A remark for the row, e.g. that a generic adapter stood in for a missing one."""
    if program.fallback and not setup.adapter_landed(program.adapter):
        return f"generic SocketServerService (graceful/adapters/{program.adapter}.py not landed: 0.5 s poll)"
    return ""
