"""A web service with Kubernetes probes and a drain delay, set up in code.

Run it, then stop it while watching the probes:

    python examples/probes.py                # the app on :8000, the probes on :8086
    curl -i localhost:8086/readyz             # 200 ready
    kill -TERM <pid>                          # /readyz says 503 at once, /livez still 200;
    curl -i localhost:8000/                   # the app still answers during the drain delay,
                                              # then stops accepting, drains, and exits 0

The same without code: ``GRACEFUL_PROBE_PORT=8086 GRACEFUL_DRAIN_DELAY=5`` in the
environment of any ``graceful.run`` program (see examples/kubernetes/deployment.yaml).
Settings: ``PORT``, ``HOST``, ``PROBE_PORT``, ``PROBE_HOST`` (``0.0.0.0`` in a pod: the kubelet
probes the pod's IP) and ``DRAIN_DELAY`` (seconds).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful
from graceful import readiness

log = logging.getLogger("probes")


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/slow":
            log.info("working on %s", self.path)
            time.sleep(1.0)  # some work still in flight when SIGTERM comes
        body = f"hello from {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    host = os.environ.get("HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8000"))), App)
    # Not ready from the first moment of a SIGTERM, but still serving for this long, while
    # the endpoint controller and the proxies stop sending new connections.
    readiness.set_drain_delay(float(os.environ.get("DRAIN_DELAY", "5")))
    probe_host = os.environ.get("PROBE_HOST", host)
    with readiness.serve_probes(int(os.environ.get("PROBE_PORT", "8086")), probe_host) as probes:
        log.info(
            "app on http://%s:%d/, probes on http://%s:%d/readyz and /livez (pid %d)",
            host,
            server.server_address[1],
            probe_host,
            probes.port,
            os.getpid(),
        )
        # /livez answers until run() returns: close the probes after it, not in a listener.
        return graceful.run(server)


if __name__ == "__main__":
    sys.exit(main())
