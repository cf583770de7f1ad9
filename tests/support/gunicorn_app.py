"""The apps tests/test_host_gunicorn.py serves under gunicorn: one WSGI, one ASGI.

Each prints ``EVENT <pid> <what>`` lines on stdout (one ``os.write``, so lines from several
workers never mix). ``/slow`` holds its request until this worker's wrap-up listener has run
(bounded), which proves the request was in flight while the worker wrapped up. With
``STUCK=1`` a shutdown listener never returns, for the force-quit report; with ``SLOW=<s>`` one
takes that long. ``/hang`` never answers (a worker timeout: the arbiter's SIGABRT).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import graceful

HOLD = 10.0  # seconds a /slow request waits at most for the wrap-up
HANG = 60.0  # seconds a /hang request waits: past any test's gunicorn --timeout


def say(what: str) -> None:
    os.write(1, f"EVENT {os.getpid()} {what}\n".encode())


wrapped = threading.Event()


def on_wrap_up() -> None:
    say("wrap-up")
    wrapped.set()


def on_shutdown() -> None:
    say("shutdown")


def stuck_flush() -> None:
    threading.Event().wait()  # never set: the listener the report must name


def slow_close() -> None:
    say("slow-close")
    threading.Event().wait(float(os.environ["SLOW"]))  # never set: a listener that takes SLOW s


def hang() -> None:
    say("hang")
    threading.Event().wait(HANG)  # never set: the request the arbiter times out


graceful.add_wrap_up_listener(on_wrap_up, name="app-wrap-up")
graceful.add_shutdown_listener(on_shutdown, name="app-shutdown")
if os.environ.get("STUCK") == "1":
    graceful.add_shutdown_listener(stuck_flush, name="stuck-flush")
if os.environ.get("SLOW"):
    graceful.add_shutdown_listener(slow_close, name="slow-close")
if os.environ.get("FAIL") == "1":
    graceful.add_shutdown_listener(lambda: 1 / 0, name="failing-close")
say("loaded")


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """WSGI: ``/slow`` waits for the wrap-up, anything else answers at once."""
    body = b"fast\n"
    if environ.get("PATH_INFO") == "/hang":
        hang()
    if environ.get("PATH_INFO") == "/slow":
        say("request-start")
        body = b"done after wrap-up\n" if wrapped.wait(HOLD) else b"no wrap-up\n"
        say("request-end")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """ASGI: the same, for the uvicorn worker."""
    import asyncio

    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b"fast\n"
    if scope["path"] == "/slow":
        say("request-start")
        ok = await asyncio.get_running_loop().run_in_executor(None, wrapped.wait, HOLD)
        body = b"done after wrap-up\n" if ok else b"no wrap-up\n"
        say("request-end")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
