"""A ThreadingHTTPServer under graceful.run: nothing in flight is lost at SIGTERM.

Run it, then ``curl localhost:8000/slow`` and press Ctrl-C while it runs: the request completes,
the next connection is refused, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: graceful closes idle connections at wrap-up

    def do_GET(self) -> None:
        time.sleep(0.5 if self.path == "/slow" else 0)  # some work
        body = f"{self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Api)
    return graceful.run(server)


if __name__ == "__main__":
    sys.exit(main())
