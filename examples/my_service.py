"""my_service: a small HTTP service whose shutdown is worth testing (see test_my_service.py).

Requests record events in an in-memory outbox; the outbox is sent to "the broker" when the
service shuts down, so a deploy never loses an event. graceful runs the steps in order:

* wrap-up: the HTTP server stops accepting and finishes the requests in flight;
* shutdown: ``flush-outbox`` sends every event still waiting (a log line says how many);
* if the broker hangs, the force-quit report after 25 s names ``flush-outbox``.

Run it, post an event, then stop it:

    PORT=8080 python examples/my_service.py
    curl -X POST localhost:8080/order-1
    kill -TERM <pid>      # or Ctrl-C
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful

log = logging.getLogger("my_service")


class Outbox:
    """Events waiting for the broker; ``flush()`` sends them all with ``send(event)``."""

    def __init__(self, send: Callable[[str], object] | None = None) -> None:
        self._send = send or (lambda event: log.info("sent %s to the broker", event))
        self._lock = threading.Lock()
        self._pending: list[str] = []

    def add(self, event: str) -> None:
        with self._lock:
            self._pending.append(event)

    def flush(self) -> None:
        with self._lock:
            events, self._pending = self._pending, []
        for event in events:
            self._send(event)
        log.info("outbox flushed: %d event(s) sent", len(events))


def install(outbox: Outbox) -> None:
    """Hook the service's cleanup into graceful's shutdown (the default lifecycle)."""
    graceful.add_shutdown_listener(outbox.flush, name="flush-outbox")


def make_server(outbox: Outbox, port: int) -> ThreadingHTTPServer:
    """``POST /<event>`` records the event and answers 202."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            outbox.add(self.path.strip("/"))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    outbox = Outbox()
    install(outbox)
    server = make_server(outbox, int(os.environ.get("PORT", "8080")))
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    return graceful.run(server)  # READY=1 to systemd once serving; 0, 1 or 70 at the end


if __name__ == "__main__":
    sys.exit(main())
