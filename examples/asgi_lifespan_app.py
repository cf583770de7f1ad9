"""An ASGI app for a server graceful does not start: ``uvicorn examples.asgi_lifespan_app:app``.

The same line works as ``hypercorn --workers 0 examples.asgi_lifespan_app:app`` or
``granian --interface asgi examples.asgi_lifespan_app:app``. Run it, ``curl localhost:8000/``,
then press Ctrl-C: the server drains, then graceful stops the outbox flusher (a wrap-up
listener: the pool is still open for its last write), then the app's own lifespan shutdown
closes the pool, and the server hears that the lifespan shutdown is complete.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import graceful
import graceful.asgi

# Under a server's CLI this module is all there is: configure logging here to see graceful's lines.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
log = logging.getLogger("app")


class Pool:
    """Stands for a database pool: what the app's lifespan opens and closes."""

    def __init__(self) -> None:
        self.open = True
        self.writes = 0

    def write(self) -> None:
        assert self.open, "written after the pool was closed"
        self.writes += 1


async def flush_outbox(pool: Pool) -> None:
    """Background work: writes until wrap-up, then one last flush."""
    while not graceful.is_stopping():
        pool.write()
        await asyncio.sleep(0.05)
    pool.write()  # the last flush: the pool must still be open
    log.info("outbox flusher stopped after %d writes", pool.writes)


def start_background_work(pool: Pool) -> None:
    flusher = asyncio.ensure_future(flush_outbox(pool))

    async def stop_flusher() -> None:  # runs on the server's loop: it was registered there
        await flusher

    graceful.add_wrap_up_listener(stop_flusher, name="outbox flusher")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        pool = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                pool = Pool()
                start_background_work(pool)
                log.info("lifespan: connection pool opened")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                assert pool is not None
                pool.open = False
                log.info("lifespan: connection pool closed")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b"hello\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = graceful.asgi.lifespan(app)  # type: ignore[assignment]
