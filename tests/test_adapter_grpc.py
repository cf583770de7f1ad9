"""The gRPC adapters against real grpcio servers and clients, with real signals.

The service has no generated code: bytes in, bytes out, through generic handlers.
``/test.Svc/Stream`` prints ``in <request>``, sends one message, waits until the test writes a
line to the server's stdin, then sends four more; ``/test.Svc/Echo`` answers at once.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from graceful.adapters import adapt
from graceful.adapters.grpc import GrpcAioService, GrpcService, RpcTracker

from .child import Child
from .conftest import BOUND
from .web import free_port, start

SYNC = r"""
import logging, sys, threading
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
import graceful
from graceful.adapters.grpc import GrpcService, RpcTracker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()

def stream(request, context):
    sys.stdout.write(f"in {request.decode()}\n")
    sys.stdout.flush()
    yield b"0"
    release.wait()
    for i in range(1, 5):
        yield str(i).encode()

def echo(request, context):
    print("echo", request.decode(), flush=True)
    return request

tracker = RpcTracker()
server = grpc.server(futures.ThreadPoolExecutor(60), interceptors=[tracker.interceptor])
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", {
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
})])
checks = health.HealthServicer()
health_pb2_grpc.add_HealthServicer_to_server(checks, server)
port = server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
print("port", port, flush=True)
sys.exit(graceful.run(GrpcService(server, health=checks, tracker=tracker)))
"""

AIO = r"""
import asyncio, logging, sys, threading
import grpc
from grpc_health.v1 import health, health_pb2_grpc
import graceful
from graceful.adapters.grpc import GrpcAioService, RpcTracker

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()

async def stream(request, context):
    sys.stdout.write(f"in {request.decode()}\n")
    sys.stdout.flush()
    yield b"0"
    await asyncio.get_running_loop().run_in_executor(None, release.wait)
    for i in range(1, 5):
        yield str(i).encode()

async def echo(request, context):
    print("echo", request.decode(), flush=True)
    return request

tracker = RpcTracker()
checks = health.aio.HealthServicer()

def make_server():  # called on graceful.run's loop: a grpc.aio server belongs to its loop
    server = grpc.aio.server(interceptors=[tracker.aio_interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Svc", {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    })])
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    print("port", port, flush=True)
    return server

sys.exit(graceful.run(GrpcAioService(make_server, health=checks, tracker=tracker)))
"""


def _code(server: str) -> str:
    return f"import sys; sys.argv = ['server', '{free_port()}']\n" + (SYNC if server == "sync" else AIO)


class Stream:
    """A server-streaming call on its own thread, collecting its messages or its error."""

    def __init__(self, port: int) -> None:
        self.got: list[bytes] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._call, args=(port,))
        self._thread.start()

    def _call(self, port: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/test.Svc/Stream")
            try:
                self.got.extend(call(b"stream-1", timeout=BOUND))
            except grpc.RpcError as exc:
                self.errors.append(exc)

    def join(self) -> None:
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the streaming call never ended"


def _health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        status: int = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=""), timeout=BOUND)
            .status
        )
        return status


def _echo_refused_within(port: int) -> float:
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary("/test.Svc/Echo")(b"late", timeout=BOUND)
    # Refused: UNAVAILABLE on a new connection; CANCELLED when grpc.aio took the call on an
    # open connection during its stop. Either way the handler never ran (checked by the caller).
    assert raised.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}  # type: ignore[attr-defined]
    return time.monotonic() - started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_a_stream_in_flight_at_sigterm_completes_and_health_says_not_serving_first(
    children: list[Child], server: str
) -> None:
    child, port = start(children, _code(server), GRACEFUL_DRAIN_DELAY="2")
    assert _health(port) == health_pb2.HealthCheckResponse.SERVING
    stream = Stream(port)
    child.expect("in stream-1")
    child.send(signal.SIGTERM)
    child.expect_err("health service NOT_SERVING")
    assert _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING  # the port is still open
    child.expect_err("stopped accepting")
    assert _echo_refused_within(port) < 1.0
    child.tell("release")
    stream.join()
    assert stream.errors == []
    assert stream.got == [b"0", b"1", b"2", b"3", b"4"]
    assert child.wait() == 0
    assert "echo late" not in child.out
    assert "Traceback" not in child.err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_an_rpc_that_outlives_the_budget_is_named_and_the_exit_is_70(
    children: list[Child], server: str
) -> None:
    child, port = start(children, _code(server), GRACEFUL_FORCE_QUIT="1")
    stream = Stream(port)
    child.expect("in stream-1")
    child.send(signal.SIGTERM)
    assert child.wait() == 70
    stream.join()
    assert len(stream.errors) == 1
    assert "dropped request RPC /test.Svc/Stream from ipv4:127.0.0.1:" in child.err


def test_adapt_picks_the_grpc_adapters() -> None:
    from concurrent import futures

    with futures.ThreadPoolExecutor(1) as pool:
        server = grpc.server(pool)
        assert isinstance(adapt(server), GrpcService)
        server.stop(None)
    with pytest.raises(TypeError, match=r"grpc\.Server"):
        GrpcService(object())
    with pytest.raises(TypeError, match=r"grpc\.aio\.Server"):
        GrpcAioService(object())
    assert GrpcAioService(lambda: None).server is None  # built later, on run()'s loop
    assert isinstance(health.HealthServicer(), health.HealthServicer)
    assert RpcTracker().wrap(None, "/x") is None
