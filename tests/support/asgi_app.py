"""The ASGI app the host tests run under real servers (uvicorn, hypercorn, granian CLIs).

Each line it prints is one ``os.write`` (atomic: workers and listener threads print at once).
Environment: ``INNER`` = ``lifespan`` (default: the inner app has a lifespan of its own),
``raises`` (it raises on the lifespan scope), ``silent`` (it returns without answering) or
``startup-raises`` (it receives ``lifespan.startup``, then raises: a failed startup);
``STUCK=1`` adds a shutdown listener that never returns; ``RELEASE_FILE``: ``/slow`` answers once
that file exists (the test creates it: worker processes have no stdin to read a line from).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import graceful
import graceful.asgi
from graceful import readiness


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


async def answer(send: Any, body: str) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})


async def released() -> None:
    path = os.environ["RELEASE_FILE"]
    while not os.path.exists(path):  # the child's own bounded poll; the test waits on output
        await asyncio.sleep(0.02)


async def inner(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        mode = os.environ.get("INNER", "lifespan")
        if mode == "raises":
            raise RuntimeError("this app knows nothing of lifespan")
        if mode == "silent":
            return
        if mode == "startup-raises":
            await receive()
            raise RuntimeError("the database is not there")
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                say(f"inner startup ready={readiness.is_ready()}")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                say(f"inner shutdown stopping={graceful.is_stopping()}")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        say("in slow")
        await released()
        await answer(send, "slow done")
        say("out slow")
    else:
        await answer(send, f"ready={readiness.is_ready()}")


def wrap_up() -> None:
    say(f"wrap-up listener stopping={graceful.is_stopping()}")


def shutdown() -> None:
    say("shutdown listener")


graceful.add_wrap_up_listener(wrap_up, name="wrap-up")
graceful.add_shutdown_listener(shutdown, name="shutdown")
if os.environ.get("STUCK"):
    graceful.add_shutdown_listener(threading.Event().wait, name="stuck-listener")

app = graceful.asgi.lifespan(inner)
