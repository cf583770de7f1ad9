"""An aiohttp app under graceful.run: on_shutdown and on_cleanup run, nothing in flight is lost.

Run it, then ``curl localhost:8002/slow`` and press Ctrl-C while it runs: the request
completes, new connections are refused at once, the hooks run, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from aiohttp import web

import graceful
from graceful.adapters.aiohttp import AiohttpService

log = logging.getLogger("app")


async def hello(request: web.Request) -> web.Response:
    if request.path == "/slow":
        log.info("GET /slow: working for 2 s")
        await asyncio.sleep(2)  # some work
    return web.Response(text=f"{request.path}\n")


async def close_pool(app: web.Application) -> None:
    log.info("on_cleanup: connection pool closed")


async def say_goodbye(app: web.Application) -> None:
    log.info("on_shutdown: websockets told to reconnect elsewhere")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = web.Application()
    app.add_routes([web.get("/{tail:.*}", hello)])
    app.on_shutdown.append(say_goodbye)
    app.on_cleanup.append(close_pool)
    port = int(os.environ.get("PORT", "8002"))
    return graceful.run(AiohttpService(app, host="127.0.0.1", port=port))


if __name__ == "__main__":
    sys.exit(main())
