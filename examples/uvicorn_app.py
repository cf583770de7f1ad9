"""An ASGI app on uvicorn under graceful.run: uvicorn drains, graceful owns the signals.

Run it, then ``curl localhost:8001/slow`` and press Ctrl-C while it runs: the request
completes, new connections are refused at once, the lifespan shutdown runs, and the process
exits 0 (``uvicorn.run()`` would exit 143).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import uvicorn

import graceful

log = logging.getLogger("app")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                log.info("lifespan: connection pool opened")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info("lifespan: connection pool closed")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        log.info("GET /slow: working for 2 s")
        await asyncio.sleep(2)  # some work
    body = f"{scope['path']}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8001")))
    return graceful.run(uvicorn.Server(config))


if __name__ == "__main__":
    sys.exit(main())
