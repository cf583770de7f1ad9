"""The demo: a small real service (an HTTP API and a background worker) under graceful.run.

Run it, then press Ctrl-C (or ``kill <pid>`` from another terminal) and watch every phase of
the shutdown in the log:

    python examples/demo.py            # serves on http://127.0.0.1:8000 (PORT=... to change)
    curl -s localhost:8000/             # {"jobs_done": 3, "stopping": false}
    curl -s -X POST localhost:8000/jobs # queue a job for the worker

A job the API accepts (202) is always done. ``run([worker, server])`` wraps up in reverse list
order: the API first (not ready, the drain delay, stop accepting, finish the requests in
flight), and only then the worker, whose ``ctx.wrapping_up()`` turns True at that moment (not
``graceful.is_stopping()``, which is True for everyone at once). So a late request never gets
a 202 for work that would be lost: it is refused at the door (connection refused), since the
API has stopped accepting before the worker stops. The worker then finishes every job still
queued: the queue lives in memory and dies with the process. (The 503 in ``do_POST`` guards
that order: it answers only if the worker stopped while the API still accepted, say with the
list the other way round.) A shutdown listener then "closes the database". A second Ctrl-C
forces the exit (code 70).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import graceful

log = logging.getLogger("demo")
jobs: queue.Queue[int] = queue.Queue()
done = {"count": 0}
job_ids = itertools.count(1)
accepting = {"open": True}  # closed by the worker when its turn to stop comes
accept_lock = threading.Lock()  # a job is queued only while the worker will still take it


class Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._reply(200, {"jobs_done": done["count"], "stopping": graceful.is_stopping()})

    def do_POST(self) -> None:
        with accept_lock:
            job = next(job_ids) if accepting["open"] else None
            if job is not None:
                jobs.put(job)
        if job is None:  # the worker has stopped: a 202 now would be a promise nobody keeps
            self._reply(503, {"error": "shutting down: no new jobs"})
        else:
            self._reply(202, {"job": job, "queued": jobs.qsize()})

    def _reply(self, code: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def work(job: int) -> None:
    time.sleep(0.2)  # the "work"
    done["count"] += 1
    log.info("job %s done", job)


def worker(ctx: graceful.Context) -> None:
    """Take jobs until this worker's turn to wrap up; then finish every job accepted."""
    while not ctx.wrapping_up():  # the API, listed after us, has drained by then
        try:
            job = jobs.get(timeout=0.1)
        except queue.Empty:
            continue
        work(job)
    with accept_lock:
        accepting["open"] = False  # the API has stopped accepting already; a 503 if it had not
    left = jobs.qsize()
    log.info("worker: no new jobs taken; finishing the %d still queued", left)
    while True:
        try:
            work(jobs.get_nowait())
        except queue.Empty:
            break


def close_database() -> None:
    log.info("database connections closed")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)-8s %(message)s")
    port = int(os.environ.get("PORT", "8000"))
    host = os.environ.get("HOST", "127.0.0.1")
    try:
        # systemd's socket (socket activation), the previous generation's (an upgrade in place
        # with SIGUSR2: docs/deploys.md), or a new one bound here
        listening = graceful.listen((host, port))
    except OSError as exc:  # a taken port is the usual one: say so in one line, exit 1
        log.error(  # noqa: TRY400 - one line: the traceback would say nothing more
            "cannot serve on %s:%d: %s (PORT=... picks another port)",
            host,
            port,
            os.strerror(exc.errno) if exc.errno else exc,
        )
        return 1
    server = ThreadingHTTPServer(listening.getsockname()[:2], Api, bind_and_activate=False)
    server.socket.close()  # the unbound one it made
    server.socket = listening
    for _ in range(3):
        jobs.put(next(job_ids))
    graceful.add_shutdown_listener(close_database, name="close-database")
    log.info(
        "serving on http://%s:%d (pid %d); Ctrl-C or kill to stop",
        *server.server_address[:2],
        os.getpid(),
    )
    return graceful.run([worker, server])


if __name__ == "__main__":
    sys.exit(main())
