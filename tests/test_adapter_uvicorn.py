"""The uvicorn adapter against a real uvicorn server and real clients, with real signals."""

from __future__ import annotations

import http.client
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn

from graceful.adapters import adapt
from graceful.adapters.uvicorn import UvicornService

from .child import Child
from .conftest import BOUND
from .web import free_port, get, in_flight, refused_within, start

# /slow/<n> prints "in <n>" and answers once the test writes a line to stdin; the lifespan
# prints its startup and shutdown.
SERVER = r"""
import asyncio, logging, sys, threading
import uvicorn
import graceful

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()

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
    body = path.encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

port = int(sys.argv[1])
config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
print("port", port, flush=True)
sys.exit(graceful.run(uvicorn.Server(config)))
"""


def server_code() -> str:
    return f"import sys; sys.argv = ['server', '{free_port()}']\n" + SERVER


@pytest.mark.timeout(60)
def test_sigterm_with_50_requests_in_flight_answers_all_and_runs_the_lifespan_shutdown(
    children: list[Child],
) -> None:
    child, port = start(children, server_code())
    child.expect("lifespan startup")
    with ThreadPoolExecutor(50) as pool:
        futures = in_flight(child, pool, port, 50)
        child.send(signal.SIGTERM)
        child.expect_err("stopped accepting")
        assert refused_within(port) < 0.1
        child.tell("release")
        results = [f.result(BOUND) for f in futures]
    assert [(status, body) for status, body, _ in results] == [(200, f"/slow/{i}") for i in range(50)]
    assert {connection for _, _, connection in results} == {"close"}
    child.expect("lifespan shutdown")
    assert child.wait() == 0  # not 143: uvicorn did not re-raise the signal
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


@pytest.mark.timeout(60)
def test_uvicorn_installs_no_signal_handler_of_its_own(children: list[Child]) -> None:
    """A second SIGTERM is graceful's "logged and ignored", not uvicorn's handler."""
    child, port = start(children, server_code())
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(get, port, "/slow/one")
        child.expect("in one")
        child.send(signal.SIGTERM)
        child.expect_err("stopped accepting")
        child.send(signal.SIGTERM)
        child.expect_err("ignored")
        child.tell("release")
        assert future.result(BOUND)[:2] == (200, "/slow/one")
    assert child.wait() == 0


def test_adapt_picks_the_uvicorn_adapter() -> None:
    server = uvicorn.Server(uvicorn.Config(lambda *a: None, host="127.0.0.1", port=0))
    service = adapt(server)
    assert isinstance(service, UvicornService)
    assert service.name == "uvicorn 127.0.0.1:0"
    with pytest.raises(TypeError, match=r"uvicorn\.Server"):
        UvicornService(object())  # type: ignore[arg-type]
