"""What the gRPC tests share: server programs, and real grpcio clients on 127.0.0.1.

The service has no generated code: bytes in, bytes out, through generic handlers.
``/test.Svc/Stream`` prints ``in <request>``, sends one message, waits until the test writes a
line to the server's stdin, then sends four more; ``/test.Svc/Slow`` (unary) prints
``in <request>``, waits for the same line and answers ``done <request>``; ``/test.Svc/Echo``
prints ``echo <request>`` and answers at once. Each server prints ``port N`` once bound and
logs graceful's lines (INFO) to stderr. No helper sleeps to synchronise: each waits on a line,
a message or a status, bounded.
"""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import BOUND
from .preamble import PREAMBLE
from .web import free_port

__all__ = ["AIO", "SYNC", "Stream", "Watch", "code", "echo", "health_status", "refused"]

# A sync server as a user writes it: graceful finds the health servicer and the interceptor on
# the server. GRPC_TEST_TRACK=0 leaves the interceptor out.
SYNC = (
    PREAMBLE
    + r"""
import logging, os, sys, threading
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
import graceful
from graceful.adapters.grpc import interceptor


def stream(request, context):
    say(f"in {request.decode()}")
    yield b"0"
    release.wait()
    for i in range(1, 5):
        yield str(i).encode()

def echo(request, context):
    say(f"echo {request.decode()}")
    return request

def slow(request, context):
    say(f"in {request.decode()}")
    release.wait()
    return b"done " + request

track = os.environ.get("GRPC_TEST_TRACK", "1") == "1"
server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=[interceptor()] if track else None)
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", {
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
})])
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
say(f"port {server.add_insecure_port('127.0.0.1:' + sys.argv[1])}")
sys.exit(graceful.run(server))
"""
)

# The same on grpc.aio, built on run()'s loop by a function (GRPC_TEST_BUILD=factory), or made
# at module level and passed as it is (GRPC_TEST_BUILD=module: served on its own loop).
AIO = (
    PREAMBLE
    + r"""
import asyncio, logging, os, sys, threading
import grpc
from grpc_health.v1 import health, health_pb2_grpc
import graceful
from graceful.adapters.grpc import GrpcAioService, aio_interceptor


async def stream(request, context):
    say(f"in {request.decode()}")
    yield b"0"
    await asyncio.get_running_loop().run_in_executor(None, release.wait)
    for i in range(1, 5):
        yield str(i).encode()

async def echo(request, context):
    say(f"echo {request.decode()}")
    return request

async def slow(request, context):
    say(f"in {request.decode()}")
    await asyncio.get_running_loop().run_in_executor(None, release.wait)
    return b"done " + request

tracking = aio_interceptor()
checks = health.aio.HealthServicer()

def make_server():
    server = grpc.aio.server(interceptors=[tracking])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    })])
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    say(f"port {server.add_insecure_port('127.0.0.1:' + sys.argv[1])}")
    return server

if os.environ.get("GRPC_TEST_BUILD", "factory") == "factory":
    sys.exit(graceful.run(GrpcAioService(make_server, health=checks, interceptor=tracking)))
sys.exit(graceful.run(GrpcAioService(make_server(), health=checks, interceptor=tracking)))
"""
)


def code(server: str) -> str:
    """The program for ``server`` ("sync" or "aio"), on a free port."""
    return f"import sys; sys.argv = ['server', '{free_port()}']\n" + (SYNC if server == "sync" else AIO)


class Stream:
    """A server-streaming call (or with ``unary``, a ``Slow`` call) on its own thread.

    Collects the messages it receives, or its error.
    """

    def __init__(self, port: int, request: bytes = b"stream-1", *, unary: bool = False) -> None:
        self.got: list[bytes] = []
        self.errors: list[grpc.RpcError] = []
        self._thread = threading.Thread(target=self._call, args=(port, request, unary))
        self._thread.start()

    def _call(self, port: int, request: bytes, unary: bool) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                if unary:
                    self.got.append(channel.unary_unary("/test.Svc/Slow")(request, timeout=BOUND))
                else:
                    self.got.extend(channel.unary_stream("/test.Svc/Stream")(request, timeout=BOUND))
            except grpc.RpcError as exc:
                self.errors.append(exc)

    def join(self) -> None:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the streaming call never ended"


class Watch:
    """A health ``Watch`` stream (gRPC's client-side health checking) on its own thread."""

    def __init__(self, port: int) -> None:
        self.statuses: list[int] = []
        self.errors: list[grpc.RpcError] = []
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._call, args=(port,))
        self._thread.start()

    def _call(self, port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = health_pb2.HealthCheckRequest(service="")
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=BOUND * 2):
                    self.statuses.append(response.status)
                    self.first.set()
            except grpc.RpcError as exc:
                self.errors.append(exc)
            finally:
                self.first.set()

    def join(self) -> None:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the Watch stream never ended"


# grpcio shares connections between channels to the same address (a process-wide subchannel
# pool): a "new" channel rides a connection that an open Stream still holds. After the server's
# stop, an RPC on that one races the server's GOAWAY and may get CANCELLED; only a connection of
# its own tests that the listening socket refuses.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def health_status(port: int) -> int:
    """The overall ("") status from ``Health/Check`` on a new connection of its own."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
        request = health_pb2.HealthCheckRequest(service="")
        status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=BOUND).status
        return status


def echo(port: int, text: str) -> bytes:
    """One ``Echo`` call on a new connection of its own."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
        answer: bytes = channel.unary_unary("/test.Svc/Echo")(text.encode(), timeout=BOUND)
        return answer


def refused(port: int) -> tuple[grpc.StatusCode, float]:
    """An ``Echo`` on a new connection that must fail: its status code and how long it took."""
    started = time.monotonic()
    try:
        echo(port, "late")
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        return code, time.monotonic() - started
    raise AssertionError("an RPC after the stop was answered")
