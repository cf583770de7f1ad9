"""The demo: a small real service (an HTTP API and a background worker) under graceful.run.

Run it, then press Ctrl-C (or ``kill <pid>`` from another terminal) and watch every phase of
the shutdown in the log:

    python examples/demo.py            # serves on http://127.0.0.1:8000 (PORT=... to change)
    curl -s localhost:8000/             # {"jobs_done": 3, "stopping": false}
    curl -s -X POST localhost:8000/jobs # queue a job for the worker

The worker takes jobs from an in-memory queue and stops fetching as soon as
``graceful.is_stopping()`` turns True; the job in its hands is finished first. A shutdown
listener then "closes the database". A second Ctrl-C forces the exit (code 70).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful

log = logging.getLogger("demo")
jobs: queue.Queue[int] = queue.Queue()
done = {"count": 0}


class Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._reply(200, {"jobs_done": done["count"], "stopping": graceful.is_stopping()})

    def do_POST(self) -> None:
        jobs.put(int(time.time() * 1000))
        self._reply(202, {"queued": jobs.qsize()})

    def _reply(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def worker() -> None:
    """Take jobs until graceful says stop; finish the one in hand."""
    while not graceful.is_stopping():
        try:
            job = jobs.get(timeout=0.1)
        except queue.Empty:
            continue
        time.sleep(0.2)  # the "work"
        done["count"] += 1
        log.info("job %s done", job)
    log.info("worker: no new jobs taken; %d left queued for the next run", jobs.qsize())


def close_database() -> None:
    log.info("database connections closed")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)-8s %(message)s")
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    try:
        server = ThreadingHTTPServer((host, port), Api)
    except OSError as exc:  # a taken port is the usual one: say so in one line, exit 1
        log.error(  # noqa: TRY400 - one line: the traceback would say nothing more
            "cannot serve on %s:%d: %s (PORT=... picks another port)", host, port, exc.strerror or exc
        )
        return 1
    for n in range(3):
        jobs.put(n)
    graceful.add_shutdown_listener(close_database, name="close-database")
    log.info(
        "serving on http://%s:%d (pid %d); Ctrl-C or kill to stop",
        *server.server_address[:2],
        os.getpid(),
    )
    return graceful.run([worker, server])


if __name__ == "__main__":
    sys.exit(main())
