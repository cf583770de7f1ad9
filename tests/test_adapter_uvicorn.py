"""The uvicorn adapter against a real uvicorn server and real clients, with real signals."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from graceful.adapters import adapt
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT
from .support.preamble import PREAMBLE
from .support.web import (
    WRAP_UP_CUT,
    assert_refused_fast,
    check_a_stuck_request_is_cut_at_the_wrap_up_timeout,
    check_serving_during_the_drain_delay,
    check_the_deadline_names_a_request_still_running,
    check_the_example_drains,
    closed_by_server,
    free_port,
    get,
    idle_connection,
    in_flight,
    run_on_a_taken_port,
    start,
    with_listeners,
)

uvicorn = pytest.importorskip("uvicorn")
import graceful.adapters.uvicorn  # noqa: E402 - after the skip: it imports uvicorn
from graceful.adapters.uvicorn import UvicornService  # noqa: E402

# /slow/<n> prints "in <n>" and answers once the test writes a line to stdin; /stubborn/<n> does
# the same but catches the first cancellation and waits on; the lifespan prints its startup and
# shutdown. UVICORN_GRACE sets uvicorn's timeout_graceful_shutdown.
SERVER = (
    PREAMBLE
    + r"""
import asyncio, logging, os, sys, threading
import uvicorn
import graceful


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                print("lifespan startup", flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                print("lifespan shutdown", flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path.startswith("/slow/"):
        sys.stdout.write(f"in {path[6:]}\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
    if path.startswith("/stubborn/"):
        say(f"in {path[10:]}")
        try:
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
        except asyncio.CancelledError:
            say("cancelled, and going on")
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
    body = path.encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

port = int(sys.argv[1])
grace = float(os.environ["UVICORN_GRACE"]) if os.environ.get("UVICORN_GRACE") else None
config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=grace)
print("port", port, flush=True)
sys.exit(graceful.run(uvicorn.Server(config)))
"""
)


def server_code(port: int | None = None) -> str:
    return f"import sys; sys.argv = ['server', '{port or free_port()}']\n" + SERVER


@pytest.mark.timeout(60)
def test_sigterm_with_50_requests_in_flight_answers_all_and_runs_the_lifespan_shutdown(
    graceful_process: ProcessFactory,
) -> None:
    child, port = start(graceful_process, server_code())
    child.wait_for_line("lifespan startup")
    idle = idle_connection(port)
    try:
        with ThreadPoolExecutor(50) as pool:
            futures = in_flight(child, pool, port, 50)
            child.send_signal(signal.SIGTERM)
            child.wait_for_output("stopped accepting", stream="stderr")
            assert_refused_fast(port)
            assert closed_by_server(idle)  # while the 50 are still running
            assert not any(f.done() for f in futures)
            child.send_line("release")
            results = [f.result(BOUND) for f in futures]
    finally:
        idle.close()
    assert [(status, body) for status, body, _ in results] == [(200, f"/slow/{i}") for i in range(50)]
    assert {connection for _, _, connection in results} == {"close"}
    child.wait_for_line("lifespan shutdown")
    assert child.wait().returncode == 0  # not 143: uvicorn did not re-raise the signal
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_a_request_stuck_at_the_wrap_up_timeout_is_named_answered_503_and_the_listeners_run(
    graceful_process: ProcessFactory,
) -> None:
    """The wrap-up timeout (1 s of a 30 s budget), not the deadline, ends the drain: the request
    is named and answered 503, the lifespan, shutdown and flush listeners run, exit code 1."""
    child, future = check_a_stuck_request_is_cut_at_the_wrap_up_timeout(
        graceful_process, server_code(), UVICORN_GRACE="60"
    )
    status, body, connection = future.result(0)
    assert (status, connection) == (503, "close")
    assert body == "Service Unavailable: the server stopped before this request was answered\n"
    assert "lifespan shutdown" in child.stdout  # uvicorn's own last step still ran
    # uvicorn's longer timeout never applied, and it was said at start
    assert (
        "uvicorn's timeout_graceful_shutdown (60 s) ends after graceful's wrap-up timeout (1 s): "
        "graceful's governs" in child.stderr
    )
    assert "timeout graceful shutdown exceeded" not in child.stderr


@pytest.mark.timeout(60)
def test_a_drain_under_way_in_a_pause_is_bounded_once_a_shutdown_comes(
    graceful_process: ProcessFactory,
) -> None:
    """SIGTSTP: no wrap-up timeout, the stuck request is waited for; SIGTERM starts the count,
    and the wrap-up timeout cuts it (named, 503), exit 1."""
    child, port = start(graceful_process, with_listeners(server_code()), **WRAP_UP_CUT)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/stuck")
        child.wait_for_line("in stuck")
        child.send_signal(signal.SIGTSTP)
        child.wait_for_output("stopped accepting", stream="stderr")
        child.send_signal(signal.SIGTERM)
        child.wait_for_line("shutdown listener ran")
        assert future.result(BOUND)[0] == 503
    child.send_line("release")
    assert child.wait().returncode == 1
    assert "dropped request GET /slow/stuck from 127.0.0.1 (running " in child.stderr


@pytest.mark.timeout(60)
def test_a_handler_that_outlives_its_cut_is_named_again_at_the_deadline(
    graceful_process: ProcessFactory,
) -> None:
    """A handler that catches the cut's cancellation, and a stuck shutdown listener: exit 70 at
    the deadline, and the force-quit hook names the request again."""
    check_the_deadline_names_a_request_still_running(graceful_process, server_code(), "/stubborn/one")


@pytest.mark.timeout(60)
def test_uvicorns_own_graceful_timeout_cancels_and_names_the_request(
    graceful_process: ProcessFactory,
) -> None:
    child, port = start(graceful_process, server_code(), UVICORN_GRACE="0.3")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/late")
        child.wait_for_line("in late")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("dropped request GET /slow/late from 127.0.0.1", stream="stderr")
        child.send_line("release")  # frees the executor thread the cancelled request left waiting
        assert future.result(BOUND)[0] == 500  # uvicorn's answer to a cancelled app
    child.wait_for_line("lifespan shutdown")
    assert child.wait().returncode == 0
    assert "cancelled while draining" in child.stderr
    assert (  # said at start: uvicorn's shorter timeout governs
        "uvicorn's timeout_graceful_shutdown (0.3 s) ends before graceful's wrap-up timeout (20 s): "
        "uvicorn's governs" in child.stderr
    )


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_during_the_drain_delay(graceful_process: ProcessFactory) -> None:
    check_serving_during_the_drain_delay(graceful_process, server_code())


@pytest.mark.timeout(60)
def test_uvicorn_installs_no_signal_handler_of_its_own(graceful_process: ProcessFactory) -> None:
    """A second SIGTERM is graceful's "logged and ignored", not uvicorn's handler."""
    child, port = start(graceful_process, server_code())
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/one")
        child.wait_for_line("in one")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("stopped accepting", stream="stderr")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("ignored", stream="stderr")
        child.send_line("release")
        assert future.result(BOUND)[:2] == (200, "/slow/one")
    assert child.wait().returncode == 0


@pytest.mark.timeout(60)
def test_a_port_in_use_fails_the_start_with_a_sentence_and_exit_1(graceful_process: ProcessFactory) -> None:
    child = run_on_a_taken_port(graceful_process, server_code)
    assert child.returncode == 1
    assert "could not start" in child.stderr
    assert "address already in use" in child.stderr
    assert "Traceback" not in child.stderr  # one line from graceful, not uvicorn's SystemExit


@pytest.mark.timeout(60)
def test_the_example_serves_drains_and_exits_0(graceful_process: ProcessFactory) -> None:
    check_the_example_drains(
        graceful_process,
        ROOT / "examples" / "uvicorn_app.py",
        "lifespan: connection pool opened",
        "stopped accepting",
        "lifespan: connection pool closed",
    )


def test_adapt_picks_the_uvicorn_adapter() -> None:
    server = uvicorn.Server(uvicorn.Config(lambda *a: None, host="127.0.0.1", port=0))
    service = adapt(server)
    assert isinstance(service, UvicornService)
    assert service.name == "uvicorn 127.0.0.1:0"
    assert UvicornService(server, name="api").name == "api"


def test_the_adapter_declines_other_objects_and_rejects_them_by_name() -> None:
    assert graceful.adapters.uvicorn.adapt(object()) is None
    assert graceful.adapters.uvicorn.adapt(uvicorn.Config(lambda *a: None)) is None
    with pytest.raises(TypeError, match=r"uvicorn\.Server"):
        UvicornService(object())  # type: ignore[arg-type]
