"""The aiohttp adapter against a real aiohttp server and real clients, with real signals."""

from __future__ import annotations

import asyncio
import http.client
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from graceful.adapters import adapt
from graceful.testing import ProcessFactory

from .conftest import BOUND, ROOT
from .support.preamble import PREAMBLE
from .support.web import (
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
)

web = pytest.importorskip("aiohttp.web")
import graceful.adapters.aiohttp  # noqa: E402 - after the skip: it imports aiohttp
from graceful.adapters.aiohttp import AiohttpService  # noqa: E402

# /slow/<n> prints "in <n>" and answers once the test writes a line to stdin; /stubborn/<n> does
# the same but catches the first cancellation and waits on; on_shutdown and on_cleanup print. AIOHTTP_GRACE sets shutdown_timeout=; AIOHTTP_RUNNER=1 passes an
# AppRunner instead of the Application.
SERVER = (
    PREAMBLE
    + r"""
import asyncio, logging, os, sys, threading
from aiohttp import web
import graceful
from graceful.adapters.aiohttp import AiohttpService


async def answer(request):
    name = request.match_info.get("name")
    if name is not None:
        sys.stdout.write(f"in {name}\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
    return web.Response(text=request.path)

async def stubborn(request):
    say(f"in {request.match_info['name']}")
    try:
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
    except asyncio.CancelledError:
        say("cancelled, and going on")
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
    return web.Response(text=request.path)

async def on_shutdown(app):
    print("on_shutdown", flush=True)

async def on_cleanup(app):
    print("on_cleanup", flush=True)

app = web.Application()
app.add_routes([web.get("/slow/{name}", answer), web.get("/stubborn/{name}", stubborn)])
app.add_routes([web.get("/{tail:.*}", answer)])
app.on_shutdown.append(on_shutdown)
app.on_cleanup.append(on_cleanup)
port = int(sys.argv[1])
grace = float(os.environ["AIOHTTP_GRACE"]) if os.environ.get("AIOHTTP_GRACE") else None
served = web.AppRunner(app) if os.environ.get("AIOHTTP_RUNNER") else app
print("port", port, flush=True)
sys.exit(graceful.run(AiohttpService(served, host="127.0.0.1", port=port, shutdown_timeout=grace)))
"""
)


def server_code(port: int | None = None) -> str:
    return f"import sys; sys.argv = ['server', '{port or free_port()}']\n" + SERVER


@pytest.mark.timeout(60)
@pytest.mark.parametrize("served", ["Application", "AppRunner"])
def test_sigterm_with_50_requests_in_flight_answers_all_and_runs_the_hooks(
    graceful_process: ProcessFactory, served: str
) -> None:
    env = {"AIOHTTP_RUNNER": "1"} if served == "AppRunner" else {}
    child, port = start(graceful_process, server_code(), **env)
    idle = idle_connection(port)
    try:
        with ThreadPoolExecutor(50) as pool:
            futures = in_flight(child, pool, port, 50)
            child.send_signal(signal.SIGTERM)
            child.wait_for_output("stopped accepting", stream="stderr")
            assert_refused_fast(port)
            child.wait_for_line("on_shutdown")
            assert closed_by_server(idle)  # while the 50 are still running
            assert not any(f.done() for f in futures)
            child.send_line("release")
            results = [f.result(BOUND) for f in futures]
    finally:
        idle.close()
    assert [(status, body) for status, body, _ in results] == [(200, f"/slow/{i}") for i in range(50)]
    assert {connection for _, _, connection in results} == {"close"}
    child.wait_for_line("on_cleanup")
    assert child.wait().returncode == 0
    assert "Traceback" not in child.stderr


@pytest.mark.timeout(60)
def test_a_request_stuck_at_the_wrap_up_timeout_is_named_answered_503_and_the_listeners_run(
    graceful_process: ProcessFactory,
) -> None:
    """The wrap-up timeout (1 s of a 30 s budget), not the deadline, ends the drain: the request
    is named and answered 503, on_cleanup and the shutdown and flush listeners run, exit 1."""
    child, future = check_a_stuck_request_is_cut_at_the_wrap_up_timeout(
        graceful_process, server_code(), AIOHTTP_GRACE="60"
    )
    status, body, connection = future.result(0)
    assert (status, connection) == (503, "close")
    assert body == "Service Unavailable: the server stopped before this request was answered\n"
    assert child.stdout.index("on_cleanup") < child.stdout.index("shutdown listener ran")
    assert (  # said at start: aiohttp's longer timeout never applies
        "aiohttp's shutdown_timeout (60 s) ends after graceful's wrap-up timeout (1 s): graceful's governs"
        in child.stderr
    )
    assert "cancelled while draining" not in child.stderr


@pytest.mark.timeout(60)
def test_a_handler_that_outlives_its_cut_is_named_again_at_the_deadline(
    graceful_process: ProcessFactory,
) -> None:
    """A handler that catches the cut's cancellation, and a stuck shutdown listener: exit 70 at
    the deadline, and the force-quit hook names the request again."""
    check_the_deadline_names_a_request_still_running(graceful_process, server_code(), "/stubborn/one")


@pytest.mark.timeout(60)
def test_shutdown_timeout_cancels_and_names_the_request(graceful_process: ProcessFactory) -> None:
    child, port = start(graceful_process, server_code(), AIOHTTP_GRACE="0.3")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/late")
        child.wait_for_line("in late")
        child.send_signal(signal.SIGTERM)
        child.wait_for_output("dropped request GET /slow/late from 127.0.0.1", stream="stderr")
        child.send_line("release")  # frees the executor thread the cancelled request left waiting
        with pytest.raises((http.client.HTTPException, OSError)):
            future.result(BOUND)
    child.wait_for_line("on_cleanup")
    assert child.wait().returncode == 0
    assert "cancelled while draining" in child.stderr
    assert (  # said at start: aiohttp's shorter timeout governs
        "aiohttp's shutdown_timeout (0.3 s) ends before graceful's wrap-up timeout (20 s): aiohttp's governs"
        in child.stderr
    )


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_during_the_drain_delay(graceful_process: ProcessFactory) -> None:
    check_serving_during_the_drain_delay(graceful_process, server_code())


@pytest.mark.timeout(60)
def test_a_port_in_use_fails_the_start_and_exit_is_1(graceful_process: ProcessFactory) -> None:
    child = run_on_a_taken_port(graceful_process, server_code)
    assert child.returncode == 1
    assert "address already in use" in child.stderr
    assert "could not start" in child.stderr
    assert "Traceback" not in child.stderr  # one line, not the OSError's traceback
    assert "on_cleanup" in child.stdout  # the runner was set up: its cleanup still ran


@pytest.mark.timeout(60)
def test_the_example_serves_drains_and_exits_0(graceful_process: ProcessFactory) -> None:
    check_the_example_drains(
        graceful_process,
        ROOT / "examples" / "aiohttp_app.py",
        "stopped accepting",
        "on_shutdown: websockets told",
        "on_cleanup: connection pool closed",
    )


def test_adapt_picks_the_aiohttp_adapter_for_apps_and_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORT", raising=False)
    service = adapt(web.Application())
    assert isinstance(service, AiohttpService)
    assert (service.host, service.port, service.name) == (None, 8080, "aiohttp *:8080")
    assert isinstance(adapt(web.AppRunner(web.Application())), AiohttpService)
    assert AiohttpService(web.Application(), host="127.0.0.1", port=9).name == "aiohttp 127.0.0.1:9"
    monkeypatch.setenv("PORT", "8123")
    assert AiohttpService(web.Application()).port == 8123
    assert AiohttpService(web.Application(), port=9).port == 9


def test_the_adapter_declines_other_objects() -> None:
    assert graceful.adapters.aiohttp.adapt(object()) is None
    assert graceful.adapters.aiohttp.adapt(web.RouteTableDef()) is None


def test_bad_input_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TypeError, match=r"web\.Application or web\.AppRunner"):
        AiohttpService(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="handle_signals=False"):
        AiohttpService(web.AppRunner(web.Application(), handle_signals=True))
    frozen = web.Application()
    frozen.freeze()
    with pytest.raises(ValueError, match="fresh one"):
        AiohttpService(frozen)
    monkeypatch.setenv("PORT", "http")
    with pytest.raises(ValueError, match="PORT='http' is not a port number"):
        AiohttpService(web.Application())


def test_a_runner_already_set_up_is_refused() -> None:
    async def check() -> None:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        try:
            with pytest.raises(ValueError, match=r"before setup\(\)"):
                AiohttpService(runner)
        finally:
            await runner.cleanup()

    asyncio.run(check())
