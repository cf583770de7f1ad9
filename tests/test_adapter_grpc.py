"""The gRPC adapters against real grpcio servers and clients on 127.0.0.1, with real signals.

The server programs and the client helpers are in ``tests/support/grpc_service.py``.
"""

from __future__ import annotations

import asyncio
import re
import signal
from concurrent import futures

import pytest

from graceful.adapters import adapt
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT, run_python
from .support.web import DEADLINE_CUT, WRAP_UP_CUT, start, start_script, with_listeners

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health.v1")
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402 - after the skip

from graceful.adapters.grpc import (  # noqa: E402 - after the skip: it imports grpc
    AioRpcInterceptor,
    GrpcAioService,
    GrpcService,
    RpcInterceptor,
    aio_interceptor,
    interceptor,
)

from .support.grpc_service import Stream, Watch, code, echo, health_status, refused  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
STREAMS = 8  # server-streaming calls in flight at SIGTERM


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_a_stream_in_flight_at_sigterm_completes_and_health_says_not_serving_first(
    graceful_process: ProcessFactory, server: str
) -> None:
    """SIGTERM mid-RPC: NOT_SERVING while the port is open, then refused; RPCs in flight end whole."""
    child, port = start(graceful_process, code(server), GRACEFUL_DRAIN_DELAY="2")
    assert health_status(port) == SERVING
    streams = [Stream(port, f"stream-{i}".encode()) for i in range(STREAMS)]
    unary = Stream(port, b"slow-1", unary=True)
    seen = {child.wait_for_line("in ").split()[1] for _ in range(STREAMS + 1)}
    assert seen == {f"stream-{i}" for i in range(STREAMS)} | {"slow-1"}
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("health service NOT_SERVING", stream="stderr")
    assert health_status(port) == NOT_SERVING  # answered: the port is still open (drain delay)
    assert echo(port, "during-delay") == b"during-delay"  # and still serving
    child.wait_for_output("stopped accepting", stream="stderr")
    status, _took = refused(port)
    assert status == grpc.StatusCode.UNAVAILABLE  # refused, not left to its deadline
    child.send_line("release")
    for stream in streams:
        stream.join()
        assert stream.errors == []
        assert stream.got == [b"0", b"1", b"2", b"3", b"4"]
    unary.join()
    assert unary.errors == []
    assert unary.got == [b"done slow-1"]
    assert child.wait().returncode == 0
    assert "echo late" not in child.stdout  # the refused RPC never reached its handler
    assert "Traceback" not in child.stderr


def _dropped(what: str, err: str) -> re.Match[str] | None:
    return re.search(
        r"dropped request RPC /test\.Svc/Stream from ipv4:127\.0\.0\.1:\d+ \(running [\d.]+ s\) " + what, err
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_an_rpc_stuck_at_the_wrap_up_timeout_is_named_cancelled_and_the_listeners_run(
    graceful_process: ProcessFactory, server: str
) -> None:
    """A stream still running at the wrap-up timeout (1 s of a 30 s budget): named, cancelled
    (the client gets UNAVAILABLE), the shutdown and flush listeners run, exit code 1 (not 70)."""
    child, port = start(graceful_process, with_listeners(code(server)), **WRAP_UP_CUT)
    stream = Stream(port)
    child.wait_for_line("in stream-1")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("shutdown listener ran")
    child.wait_for_line("flush listener ran")
    stream.join()
    assert stream.got == [b"0"]
    assert [error.code() for error in stream.errors] == [grpc.StatusCode.UNAVAILABLE]  # type: ignore[attr-defined]
    child.send_line("release")  # the handler's thread, which stop(0) cannot stop, may end
    assert child.wait().returncode == 1
    assert _dropped("at the wrap-up timeout", child.stderr), child.stderr
    assert "force quit" not in child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_without_the_interceptor_the_count_of_cut_rpcs_is_logged(graceful_process: ProcessFactory) -> None:
    """No interceptor on a sync server: the wrap-up timeout still says how many RPCs it cancels."""
    child, port = start(graceful_process, code("sync"), GRPC_TEST_TRACK="0", **WRAP_UP_CUT)
    stream = Stream(port)
    child.wait_for_line("in stream-1")
    child.send_signal(signal.SIGTERM)
    stream.join()
    child.send_line("release")
    assert child.wait().returncode == 1
    assert "grpc: 1 RPC(s) still running are cancelled at the wrap-up timeout" in child.stderr


@pytest.mark.timeout(60)
def test_an_rpc_whose_handler_outlives_its_cut_is_named_again_at_the_deadline(
    graceful_process: ProcessFactory,
) -> None:
    """stop(0) cannot stop a handler's thread: with a stuck shutdown listener, the deadline names
    the RPC again, exit 70."""
    child, port = start(graceful_process, with_listeners(code("sync")), **DEADLINE_CUT)
    stream = Stream(port)
    child.wait_for_line("in stream-1")
    child.send_signal(signal.SIGTERM)
    child.wait_for_line("shutdown listener ran")
    assert child.wait().returncode == 70
    stream.join()
    assert _dropped("at the wrap-up timeout", child.stderr), child.stderr
    assert _dropped("at the force-quit deadline", child.stderr), child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_a_health_watch_sees_not_serving_then_ends_and_does_not_hold_the_drain(
    graceful_process: ProcessFactory, server: str
) -> None:
    """gRPC client-side health checking: a Watch stream would hold stop(grace) to the deadline."""
    child, port = start(graceful_process, code(server), GRACEFUL_FORCE_QUIT="8")
    watch = Watch(port)
    assert watch.first.wait(BOUND)
    child.send_signal(signal.SIGTERM)
    watch.join()
    assert watch.errors == []  # ended with OK, not cut
    assert watch.statuses == [SERVING, NOT_SERVING]
    assert child.wait().returncode == 0  # 70 if the Watch had held the drain to the deadline


@pytest.mark.timeout(60)
@pytest.mark.parametrize("server", ["sync", "aio"])
def test_a_pause_turns_not_serving_keeps_serving_and_shutdown_then_stops(
    graceful_process: ProcessFactory, server: str
) -> None:
    """SIGTSTP: NOT_SERVING, RPCs still answered, no stop; a later SIGTERM stops it, exit 0."""
    child, port = start(graceful_process, code(server))
    child.send_signal(signal.SIGTSTP)
    child.wait_for_output("paused; still serving", stream="stderr")
    assert health_status(port) == NOT_SERVING
    assert echo(port, "paused") == b"paused"
    assert "stopped accepting" not in child.stderr
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("stopped accepting", stream="stderr")
    assert child.wait().returncode == 0
    assert refused(port)[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(60)
def test_a_grpc_aio_server_made_outside_run_is_served_on_its_own_loop(
    graceful_process: ProcessFactory,
) -> None:
    """``grpc.aio.server()`` at module level belongs to another loop than run()'s: it still works."""
    child, port = start(graceful_process, code("aio"), GRPC_TEST_BUILD="module")
    child.wait_for_output("serving it on its own", stream="stderr")
    stream = Stream(port)
    child.wait_for_line("in stream-1")
    child.send_signal(signal.SIGTERM)
    child.wait_for_output("stopped accepting", stream="stderr")
    assert refused(port)[0] == grpc.StatusCode.UNAVAILABLE
    child.send_line("release")
    stream.join()
    assert stream.got == [b"0", b"1", b"2", b"3", b"4"]
    assert child.wait().returncode == 0
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_the_example_serves_and_stops_with_exit_0(graceful_process: ProcessFactory) -> None:
    """examples/grpc_server.py: a stream in flight at SIGTERM completes; the log tells the steps."""
    child, port = start_script(graceful_process, ROOT / "examples" / "grpc_server.py")
    assert health_status(port) == SERVING
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        ticks = channel.unary_stream("/demo.Ticker/Ticks")(b"3", timeout=BOUND)
        assert next(ticks) == b"0"  # the stream is under way
        child.send_signal(signal.SIGTERM)
        assert list(ticks) == [b"1", b"2"]
    assert child.wait().returncode == 0
    for line in ("health service NOT_SERVING", "stopped accepting", "stopped ("):
        assert line in child.stderr, child.stderr


def test_adapt_picks_the_grpc_adapters_and_finds_health_and_interceptor() -> None:
    """A sync server's health servicer and interceptor are found on it; bad input is a TypeError."""
    tracking = interceptor()
    with futures.ThreadPoolExecutor(1) as pool:
        server = grpc.server(pool, interceptors=[tracking])
        checks = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        service = adapt(server)
        assert isinstance(service, GrpcService)
        assert service.health is checks
        assert service.interceptor is tracking
        bare = GrpcService(grpc.server(pool))
        with pytest.raises(TypeError, match=r"health\.aio\.HealthServicer"):
            GrpcService(grpc.server(pool), health=health.aio.HealthServicer())
        assert bare.health is None
        assert bare.interceptor is None
        server.stop(None)
    assert isinstance(tracking, RpcInterceptor)
    assert isinstance(tracking, grpc.ServerInterceptor)
    assert isinstance(aio_interceptor(), AioRpcInterceptor)
    assert isinstance(aio_interceptor(), grpc.aio.ServerInterceptor)
    with pytest.raises(TypeError, match=r"grpc\.Server"):
        GrpcService(object())
    with pytest.raises(TypeError, match=r"grpc\.aio\.Server"):
        GrpcAioService(object())
    with pytest.raises(TypeError, match="HealthServicer"):
        GrpcAioService(lambda: None, health=object())
    assert GrpcAioService(lambda: None).server is None  # built later, on run()'s loop
    assert tracking._wrap(None, "/x") is None


def test_adapt_picks_the_aio_adapter() -> None:
    """A ``grpc.aio.Server`` made on a running loop is a GrpcAioService."""

    async def made() -> None:
        server = grpc.aio.server()
        assert isinstance(adapt(server), GrpcAioService)
        await server.stop(None)

    asyncio.run(made())


def test_graceful_imports_grpc_only_when_given_a_grpc_server() -> None:
    """``import graceful`` and adapting other servers leave grpc unimported."""
    result = run_python(
        "import sys, threading, graceful\n"
        "from graceful.adapters import adapt\n"
        "adapt(threading.Thread(target=print))\n"
        "print('grpc' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
