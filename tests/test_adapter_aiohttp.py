"""The aiohttp adapter against a real aiohttp server and real clients, with real signals."""

from __future__ import annotations

import http.client
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiohttp import web

from graceful.adapters import adapt
from graceful.adapters.aiohttp import AiohttpService

from .child import Child
from .conftest import BOUND
from .web import free_port, get, in_flight, refused_within, start

# /slow/<n> prints "in <n>" and answers once the test writes a line to stdin; on_shutdown
# and on_cleanup print.
SERVER = r"""
import asyncio, logging, sys, threading
from aiohttp import web
import graceful
from graceful.adapters.aiohttp import AiohttpService

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()

async def answer(request):
    name = request.match_info.get("name")
    if name is not None:
        sys.stdout.write(f"in {name}\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
    return web.Response(text=request.path)

async def on_shutdown(app):
    print("on_shutdown", flush=True)

async def on_cleanup(app):
    print("on_cleanup", flush=True)

app = web.Application()
app.add_routes([web.get("/slow/{name}", answer), web.get("/{tail:.*}", answer)])
app.on_shutdown.append(on_shutdown)
app.on_cleanup.append(on_cleanup)
port = int(sys.argv[1])
print("port", port, flush=True)
sys.exit(graceful.run(AiohttpService(app, host="127.0.0.1", port=port)))
"""


def server_code() -> str:
    return f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER


@pytest.mark.timeout(60)
def test_sigterm_with_50_requests_in_flight_answers_all_and_runs_the_hooks(children: list[Child]) -> None:
    child, port = start(children, server_code())
    with ThreadPoolExecutor(50) as pool:
        futures = in_flight(child, pool, port, 50)
        child.send(signal.SIGTERM)
        child.expect_err("stopped accepting")
        assert refused_within(port) < 0.1
        child.expect("on_shutdown")
        child.tell("release")
        results = [f.result(BOUND) for f in futures]
    assert [(status, body) for status, body, _ in results] == [(200, f"/slow/{i}") for i in range(50)]
    assert {connection for _, _, connection in results} == {"close"}
    child.expect("on_cleanup")
    assert child.wait() == 0
    assert "Traceback" not in child.err


@pytest.mark.timeout(60)
def test_a_request_that_outlives_the_budget_is_named_and_the_exit_is_70(children: list[Child]) -> None:
    child, port = start(children, server_code(), GRACEFUL_FORCE_QUIT="1")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/stuck")
        child.expect("in stuck")
        child.send(signal.SIGTERM)
        assert child.wait() == 70
        with pytest.raises((http.client.HTTPException, OSError)):
            future.result(BOUND)
    assert "dropped request GET /slow/stuck from 127.0.0.1 (running " in child.err


@pytest.mark.timeout(60)
def test_the_server_keeps_serving_during_the_drain_delay(children: list[Child]) -> None:
    child, port = start(children, server_code(), GRACEFUL_DRAIN_DELAY="3")
    child.send(signal.SIGTERM)
    child.expect_err("wrapping up")
    assert get(port, "/during-delay")[:2] == (200, "/during-delay")
    child.expect_err("stopped accepting")
    assert refused_within(port) < 0.1
    assert child.wait() == 0


def test_adapt_picks_the_aiohttp_adapter_for_apps_and_runners() -> None:
    assert isinstance(adapt(web.Application()), AiohttpService)
    assert isinstance(adapt(web.AppRunner(web.Application())), AiohttpService)
    assert AiohttpService(web.Application(), host="127.0.0.1", port=9).name == "aiohttp 127.0.0.1:9"


def test_bad_input_says_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"web\.Application or web\.AppRunner"):
        AiohttpService(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="handle_signals=False"):
        AiohttpService(web.AppRunner(web.Application(), handle_signals=True))
