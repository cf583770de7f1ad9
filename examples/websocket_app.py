"""A WebSocket and a server-sent-events stream on uvicorn under graceful.run.

Run it (``pip install uvicorn websockets``), then open a WebSocket to ``ws://localhost:8003/ws``
(``python -m websockets ws://localhost:8003/ws``) and ``curl -N localhost:8003/events`` in two
other terminals, and press Ctrl-C here: the WebSocket client is closed with code 1001 (Going
Away: reconnect, to another instance), the event stream ends cleanly, and the process exits 0
at once, instead of waiting for a timeout and cutting both.

The app is plain ASGI and knows nothing of graceful but one line: the stream stops on
``http.disconnect`` (its client left, or graceful ended it) and, to say goodbye first, on
``graceful.wait_for_wrap_up_async()``.
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


async def echo(receive: Any, send: Any) -> None:
    """/ws: echoes each text message until the client, or graceful, closes the socket."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":  # code 1001 when graceful closed it
            log.info("ws: closed with code %s", message.get("code"))
            return
        await send({"type": "websocket.send", "text": f"echo: {message.get('text')}"})


async def events(receive: Any, send: Any) -> None:
    """/events: one event a second until the client leaves or the service stops."""
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    stop = {asyncio.ensure_future(disconnected()), asyncio.ensure_future(graceful.wait_for_wrap_up_async())}
    sent = 0
    try:
        while True:
            sent += 1
            body = f"data: tick {sent}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            done, _ = await asyncio.wait(stop, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if done:
                break
    finally:
        for task in stop:
            task.cancel()
    # Still ours to end unless graceful ended it first (then this goes nowhere): say goodbye.
    bye = b"event: bye\ndata: reconnect\n\n"
    await send({"type": "http.response.body", "body": bye, "more_body": False})
    log.info("events: stream ended after %d event(s)", sent)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket" and scope["path"] == "/ws":
        await echo(receive, send)
    elif scope["type"] == "http" and scope["path"] == "/events":
        await events(receive, send)
    elif scope["type"] == "http":
        body = b"try /events, or a WebSocket to /ws\n"
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = uvicorn.Config(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8003")), lifespan="off")
    return graceful.run(uvicorn.Server(config))


if __name__ == "__main__":
    sys.exit(main())
