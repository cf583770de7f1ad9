"""5. Force-quit precision: how late the exit comes after the deadline.

Each child has something that never finishes at shutdown (a listener, a service's stop, a
request handler) and a shutdown budget of ``BUDGET`` seconds; the parent sends SIGTERM and
sees the exit. Lateness = (SIGTERM -> exit) - budget, so it includes signal delivery, the
report the tool writes, and interpreter teardown: what an operator actually waits for.

cotyledon takes whole seconds only (``signal.alarm``); the budget is 1 s for every contender
so that all are measured against the same deadline. A contender that does not exit within
``budget + HANG`` seconds is killed, reported, and not run again.
"""

from __future__ import annotations

import signal
import time

from _harness import BenchError, Child, Row, Setup, codes_text, log, median, ms, p90
from _programs import GRACEFUL_IDLE_SERVICE

BUDGET = 1.0
QUICK_BUDGET = 0.25  # --quick: graceful and bare only, so no whole seconds needed
HANG = 5.0
GOAL = 0.05

BARE = """
import os, signal, threading

stop = threading.Event()

def on_term(signum, frame):
    threading.Timer(BUDGET, os._exit, (70,)).start()  # the hand-written force quit
    stop.set()

signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
stop.wait()
threading.Event().wait()  # the cleanup that never finishes
"""

GRACEFUL = (
    GRACEFUL_IDLE_SERVICE
    + """
graceful.add_shutdown_listener(lambda: threading.Event().wait(), name="stuck listener")
sys.exit(graceful.run(Idle(), force_quit=BUDGET))
"""
)

AIOMISC = """
import asyncio
import aiomisc

class Stuck(aiomisc.Service):
    async def start(self):
        pass

    async def stop(self, exception=None):
        await asyncio.Event().wait()

with aiomisc.entrypoint(Stuck(), shutdown_timeout=BUDGET) as loop:
    loop.call_soon(lambda: print("ready", flush=True))
    loop.run_forever()
"""

COTYLEDON = """
import threading
import cotyledon

class Stuck(cotyledon.Service):
    graceful_shutdown_timeout = int(BUDGET)

    def run(self):
        print("ready", flush=True)

    def terminate(self):
        threading.Event().wait()

manager = cotyledon.ServiceManager(graceful_shutdown_timeout=int(BUDGET))
manager.add(Stuck, workers=1)
manager.run()
"""

UVICORN = """
import asyncio, socket, threading, time
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    print("ready", flush=True)
    await asyncio.Event().wait()  # a request that never finishes

config = uvicorn.Config(
    app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=BUDGET
)
server = uvicorn.Server(config)

def client():
    while not server.started:
        time.sleep(0.002)
    port = server.servers[0].sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
    sock.recv(1)

threading.Thread(target=client, daemon=True).start()
server.run()
"""

GRPCIO = """
import signal, sys, threading
from concurrent import futures
import grpc

def stuck(request, context):
    print("ready", flush=True)
    threading.Event().wait()  # an RPC handler that never finishes

handler = grpc.method_handlers_generic_handler("bench.Stuck", {"Call": grpc.unary_unary_rpc_method_handler(stuck)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
port = server.add_insecure_port("127.0.0.1:0")
server.start()

def on_term(signum, frame):
    server.stop(grace=BUDGET)

signal.signal(signal.SIGTERM, on_term)

def client():
    try:
        grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/bench.Stuck/Call")(b"x")
    except grpc.RpcError:
        pass

threading.Thread(target=client, daemon=True).start()
server.wait_for_termination()
sys.exit(0)
"""

# (contender, source, notify, module)
_PROGRAMS = [
    ("bare Python (threading.Timer + os._exit)", BARE, False, ""),
    ("graceful.run(service) + stuck listener", GRACEFUL, True, ""),
    ("aiomisc entrypoint(shutdown_timeout=1)", AIOMISC, False, "aiomisc"),
    ("cotyledon (graceful_shutdown_timeout=1)", COTYLEDON, False, "cotyledon"),
    ("uvicorn (timeout_graceful_shutdown=1)", UVICORN, False, "uvicorn"),
    ("grpcio stop(grace=1), stuck handler", GRPCIO, False, "grpc"),
]


class _Series:
    def __init__(self, contender: str, source: str, notify: bool) -> None:
        self.contender = contender
        self.source = source
        self.notify = notify
        self.late: list[float] = []
        self.codes: list[int | None] = []
        self.problem = ""


def _budget(setup: Setup) -> float:
    return QUICK_BUDGET if setup.quick else BUDGET


def _once(setup: Setup, series: _Series) -> None:
    budget = _budget(setup)
    code = f"BUDGET = {budget!r}\n" + series.source
    try:
        with Child(setup.python, code, notify=series.notify) as child:
            child.wait_ready()
            time.sleep(0.05)
            took = child.time_signal(signal.SIGTERM, budget + HANG)
            series.codes.append(child.returncode)
            if took is None:
                series.problem = f"no exit within {budget + HANG:g} s of SIGTERM (killed)"
                return
            series.late.append(took - budget)
    except BenchError as exc:
        series.problem = f"failed: {exc}"


def run(setup: Setup, runs: int) -> list[Row]:
    runs = max(1, min(runs, 1 if setup.quick else 10))
    all_series = [_Series(contender, source, notify) for contender, source, notify, _ in _PROGRAMS]
    for series, (_, _, _, module) in zip(all_series, _PROGRAMS, strict=True):
        if module and not setup.has(module):
            series.problem = (
                "skipped: --quick runs only graceful and the bare baseline" if setup.quick else "skipped"
            )
    for i in range(runs):
        for series in all_series:
            if not series.problem:
                _once(setup, series)
        log(f"force quit: run {i + 1} of {runs} done")
    return [_row(series, _budget(setup)) for series in all_series]


def _row(series: _Series, budget: float) -> Row:
    bench = f"5. force quit: lateness after a {budget:g} s budget"
    if series.problem or not series.late:
        return Row(bench, series.contender, series.problem or "no data", "", "", {"codes": series.codes})
    late = series.late
    result = (
        f"median {ms(median(late))} late, p90 {ms(p90(late))}, max {ms(max(late))} "
        f"(n={len(late)}); exit {codes_text(series.codes)}"
    )
    goal = ""
    if series.contender.startswith("graceful"):
        met = max(late) <= GOAL
        goal = f"{'met' if met else 'MISSED'}: every exit <= 50 ms late (max {ms(max(late))})"
    return Row(bench, series.contender, result, "", goal, {"late_s": late, "codes": series.codes})
